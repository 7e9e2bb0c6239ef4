//! The shared tensor layer: the host's implementation of the plugin-api backend table on
//! candle. Plugins hold opaque handles to [`HostTensor`]s and call back into these functions;
//! they never link candle, so one device, one allocator and one copy of the weights serve every
//! plugin.

pub mod fused;
pub mod kernels;

use abi_stable::std_types::{RResult, RSlice, RString, RVec};
use candle_core::{DType, Device, Tensor, D};
use mglue_plugin_api::ffi::{self, BackendVTable, FfiResult, TensorHandle};
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

/// A tensor behind a handle. `exclusive` is false when its storage may be shared with another
/// tensor (inputs, duplicates, views), so in-place ops copy first.
pub struct HostTensor {
    tensor: Tensor,
    exclusive: AtomicBool,
}

/// Converts between candle's dtype and the boundary's codes.
pub fn dtype_code(dt: DType) -> u32 {
    match dt {
        DType::F32 => ffi::dtype::F32,
        DType::F16 => ffi::dtype::F16,
        DType::BF16 => ffi::dtype::BF16,
        DType::F64 => ffi::dtype::F64,
        DType::U8 => ffi::dtype::U8,
        DType::U32 => ffi::dtype::U32,
        DType::I64 => ffi::dtype::I64,
        _ => u32::MAX,
    }
}

/// The candle dtype for a boundary code.
pub fn dtype_from_code(code: u32) -> candle_core::Result<DType> {
    Ok(match code {
        ffi::dtype::F32 => DType::F32,
        ffi::dtype::F16 => DType::F16,
        ffi::dtype::BF16 => DType::BF16,
        ffi::dtype::F64 => DType::F64,
        ffi::dtype::U8 => DType::U8,
        ffi::dtype::U32 => DType::U32,
        ffi::dtype::I64 => DType::I64,
        other => candle_core::bail!("unknown dtype code {other}"),
    })
}

/// The host's backend state (the device every tensor lives on).
pub struct CandleBackend {
    device: Device,
}

impl CandleBackend {
    /// A backend on `device` (CPU, or CUDA with the `cuda` feature).
    pub fn new(device: Device) -> Self {
        CandleBackend { device }
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The table handed to plugins; valid while `self` lives.
    pub fn vtable(&self) -> BackendVTable {
        BackendVTable {
            struct_size: std::mem::size_of::<BackendVTable>(),
            api_minor: mglue_plugin_api::API_VERSION.minor,
            ctx: self as *const CandleBackend as *const c_void,
            release,
            dup,
            dtype,
            shape,
            to_dtype,
            unary,
            binary,
            affine,
            weighted_sum,
            axpy,
            reduce,
            dot,
            compare,
            select,
            abs_kth_largest,
            topk_abs_mask,
            bernoulli_mask,
            full_like,
            from_f32,
            to_vec_f32,
            reshape,
            matmul,
            softmax_last,
            transpose,
            narrow,
            cat,
            reduce_last,
            lerp,
            abs_rank_last,
            bernoulli_probs,
            task_merge,
            dot_norms,
            lincomb,
        }
    }

    /// A handle to a host tensor, shared (not exclusive): the caller keeps its copy.
    pub fn share(&self, t: &Tensor) -> TensorHandle {
        into_handle(t.clone(), false)
    }

    /// Takes back a handle a plugin returned.
    ///
    /// # Safety
    /// `h` must be a live handle created by this backend and not used afterwards.
    pub unsafe fn take(&self, h: TensorHandle) -> Tensor {
        // SAFETY: per the contract, `h` came from `into_handle` and is released here.
        let b = unsafe { Box::from_raw(h.0 as *mut HostTensor) };
        b.tensor
    }

    /// Releases a handle without taking its tensor.
    ///
    /// # Safety
    /// As for [`CandleBackend::take`].
    pub unsafe fn release(&self, h: TensorHandle) {
        // SAFETY: forwarded contract.
        drop(unsafe { self.take(h) });
    }
}

fn into_handle(tensor: Tensor, exclusive: bool) -> TensorHandle {
    TensorHandle(Box::into_raw(Box::new(HostTensor {
        tensor,
        exclusive: AtomicBool::new(exclusive),
    })) as *mut c_void)
}

/// # Safety
/// `h` must be a live handle of this backend.
unsafe fn get<'a>(h: TensorHandle) -> candle_core::Result<&'a HostTensor> {
    if h.is_null() {
        candle_core::bail!("null tensor handle");
    }
    // SAFETY: caller guarantees liveness.
    Ok(unsafe { &*(h.0 as *const HostTensor) })
}

/// # Safety
/// `ctx` must be the pointer from [`CandleBackend::vtable`].
unsafe fn backend<'a>(ctx: *const c_void) -> &'a CandleBackend {
    // SAFETY: caller guarantees ctx is a live CandleBackend.
    unsafe { &*(ctx as *const CandleBackend) }
}

/// Runs an op so that neither a candle error nor a panic unwinds into the plugin.
fn guard<T>(f: impl FnOnce() -> candle_core::Result<T>) -> FfiResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(RString::from(e.to_string())),
        Err(_) => RResult::RErr(RString::from("host backend panicked (this is a modelglue bug)")),
    }
}

fn fresh(f: impl FnOnce() -> candle_core::Result<Tensor>) -> FfiResult<TensorHandle> {
    guard(|| f().map(|t| into_handle(t, true)))
}

fn shared(f: impl FnOnce() -> candle_core::Result<Tensor>) -> FfiResult<TensorHandle> {
    guard(|| f().map(|t| into_handle(t, false)))
}

fn to_dtype_fast(t: &Tensor, dt: DType) -> candle_core::Result<Tensor> {
    if t.dtype() == dt {
        return Ok(t.clone());
    }
    match kernels::convert(t, dt) {
        Some(r) => r,
        None => t.to_dtype(dt),
    }
}

fn dims(shape: RSlice<'_, u64>) -> Vec<usize> {
    shape.iter().map(|&d| d as usize).collect()
}

unsafe extern "C" fn release(_ctx: *const c_void, h: TensorHandle) {
    if !h.is_null() {
        // SAFETY: plugin-api releases each owned handle exactly once.
        let _ = std::panic::catch_unwind(|| drop(unsafe { Box::from_raw(h.0 as *mut HostTensor) }));
    }
}

unsafe extern "C" fn dup(_ctx: *const c_void, h: TensorHandle) -> FfiResult<TensorHandle> {
    guard(|| {
        // SAFETY: live handle.
        let t = unsafe { get(h) }?;
        t.exclusive.store(false, Ordering::Relaxed);
        Ok(into_handle(t.tensor.clone(), false))
    })
}

unsafe extern "C" fn dtype(_ctx: *const c_void, h: TensorHandle) -> u32 {
    // SAFETY: live handle.
    unsafe { get(h) }
        .map(|t| dtype_code(t.tensor.dtype()))
        .unwrap_or(u32::MAX)
}

unsafe extern "C" fn shape(_ctx: *const c_void, h: TensorHandle) -> RVec<u64> {
    // SAFETY: live handle.
    unsafe { get(h) }
        .map(|t| t.tensor.dims().iter().map(|&d| d as u64).collect::<Vec<_>>())
        .unwrap_or_default()
        .into()
}

unsafe extern "C" fn to_dtype(_ctx: *const c_void, h: TensorHandle, code: u32) -> FfiResult<TensorHandle> {
    guard(|| {
        // SAFETY: live handle.
        let t = &unsafe { get(h) }?.tensor;
        let dt = dtype_from_code(code)?;
        let same = t.dtype() == dt;
        Ok(into_handle(to_dtype_fast(t, dt)?, !same))
    })
}

unsafe extern "C" fn unary(_ctx: *const c_void, op: u32, h: TensorHandle) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: live handle.
        let t = &unsafe { get(h) }?.tensor;
        match op {
            ffi::unary::NEG => t.neg(),
            ffi::unary::ABS => t.abs(),
            ffi::unary::SIGN => t.sign(),
            ffi::unary::SQRT => t.sqrt(),
            ffi::unary::EXP => t.exp(),
            ffi::unary::LOG => t.log(),
            ffi::unary::SQR => t.sqr(),
            other => candle_core::bail!("unknown unary op code {other}"),
        }
    })
}

unsafe extern "C" fn binary(
    _ctx: *const c_void,
    op: u32,
    a: TensorHandle,
    b: TensorHandle,
) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: live handles.
        let (a, b) = unsafe { (&get(a)?.tensor, &get(b)?.tensor) };
        match op {
            ffi::binary::ADD => a.broadcast_add(b),
            ffi::binary::SUB => a.broadcast_sub(b),
            ffi::binary::MUL => a.broadcast_mul(b),
            ffi::binary::DIV => a.broadcast_div(b),
            ffi::binary::MAXIMUM => a.broadcast_maximum(b),
            ffi::binary::MINIMUM => a.broadcast_minimum(b),
            other => candle_core::bail!("unknown binary op code {other}"),
        }
    })
}

unsafe extern "C" fn affine(
    _ctx: *const c_void,
    h: TensorHandle,
    mul: f64,
    add: f64,
) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: live handle.
        let t = &unsafe { get(h) }?.tensor;
        t.affine(mul, add)
    })
}

unsafe extern "C" fn weighted_sum(
    _ctx: *const c_void,
    hs: RSlice<'_, TensorHandle>,
    ws: RSlice<'_, f64>,
    divisor: f64,
    out: u32,
) -> FfiResult<TensorHandle> {
    fresh(|| {
        if hs.len() != ws.len() || hs.is_empty() {
            candle_core::bail!("weighted_sum: {} tensors but {} weights", hs.len(), ws.len());
        }
        let out = dtype_from_code(out)?;
        let ts = hs
            .iter()
            // SAFETY: live handles.
            .map(|h| unsafe { get(*h) }.map(|t| &t.tensor))
            .collect::<candle_core::Result<Vec<_>>>()?;
        if let Some(r) = kernels::weighted_sum(&ts, ws.as_slice(), divisor, out) {
            return r;
        }
        // Generic path (CUDA, non-contiguous): the same formula with candle ops (separate
        // multiply and add, so the last bit may differ from the fused CPU kernel's FMA).
        let mut acc = ts[0].to_dtype(DType::F32)?.affine(ws[0] as f32 as f64, 0.0)?;
        for (t, &w) in ts.iter().zip(ws.iter()).skip(1) {
            acc = (acc + t.to_dtype(DType::F32)?.affine(w as f32 as f64, 0.0)?)?;
        }
        if divisor != 1.0 {
            acc = (acc / (divisor as f32 as f64))?;
        }
        acc.to_dtype(out)
    })
}

struct Axpy(f64);

impl candle_core::InplaceOp2 for Axpy {
    fn name(&self) -> &'static str {
        "axpy"
    }
    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dst_l: &candle_core::Layout,
        src: &candle_core::CpuStorage,
        src_l: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage as S;
        let (Some((ds, de)), Some((ss, se))) = (dst_l.contiguous_offsets(), src_l.contiguous_offsets())
        else {
            candle_core::bail!("axpy needs contiguous tensors");
        };
        match (dst, src) {
            (S::F32(y), S::F32(x)) => {
                let a = self.0 as f32;
                y[ds..de]
                    .iter_mut()
                    .zip(&x[ss..se])
                    .for_each(|(y, x)| *y += a * *x);
            }
            (S::F64(y), S::F64(x)) => {
                y[ds..de]
                    .iter_mut()
                    .zip(&x[ss..se])
                    .for_each(|(y, x)| *y += self.0 * *x);
            }
            (S::BF16(y), S::BF16(x)) => {
                let a = half::bf16::from_f64(self.0);
                y[ds..de]
                    .iter_mut()
                    .zip(&x[ss..se])
                    .for_each(|(y, x)| *y += a * *x);
            }
            (S::F16(y), S::F16(x)) => {
                let a = half::f16::from_f64(self.0);
                y[ds..de]
                    .iter_mut()
                    .zip(&x[ss..se])
                    .for_each(|(y, x)| *y += a * *x);
            }
            _ => candle_core::bail!("axpy needs two tensors of one float dtype"),
        }
        Ok(())
    }
}

unsafe extern "C" fn axpy(
    _ctx: *const c_void,
    y: TensorHandle,
    alpha: f64,
    x: TensorHandle,
) -> FfiResult<u8> {
    guard(|| {
        // SAFETY: live handles; y is mutated only through its own HostTensor.
        let (yh, xt) = unsafe { (get(y)?, &get(x)?.tensor) };
        if yh.tensor.dims() != xt.dims() || yh.tensor.dtype() != xt.dtype() {
            candle_core::bail!(
                "axpy: y is {:?} {:?}, x is {:?} {:?}",
                yh.tensor.dims(),
                yh.tensor.dtype(),
                xt.dims(),
                xt.dtype()
            );
        }
        let y_ptr = y.0 as *mut HostTensor;
        if !yh.exclusive.load(Ordering::Relaxed) || !yh.tensor.is_contiguous() || !yh.tensor.device().is_cpu()
        {
            let updated = (&yh.tensor + xt.affine(alpha, 0.0)?)?;
            // SAFETY: the plugin holds the only handle to this HostTensor during the call.
            unsafe {
                (*y_ptr).tensor = updated;
                (*y_ptr).exclusive.store(true, Ordering::Relaxed);
            }
            return Ok(1);
        }
        yh.tensor.inplace_op2(xt, &Axpy(alpha))?;
        Ok(1)
    })
}

fn f64_values(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

unsafe extern "C" fn reduce(_ctx: *const c_void, op: u32, h: TensorHandle) -> FfiResult<f64> {
    guard(|| {
        // SAFETY: live handle.
        let t = &unsafe { get(h) }?.tensor;
        let v = f64_values(t)?;
        Ok(match op {
            ffi::reduce::SUM => v.iter().sum(),
            ffi::reduce::SUM_SQ => v.iter().map(|x| x * x).sum(),
            ffi::reduce::MAX_ABS => v.iter().fold(0.0, |m, x| f64::max(m, x.abs())),
            ffi::reduce::SUM_ABS => v.iter().map(|x| x.abs()).sum(),
            ffi::reduce::COUNT_NONZERO => v.iter().filter(|x| **x != 0.0).count() as f64,
            other => candle_core::bail!("unknown reduce op code {other}"),
        })
    })
}

unsafe extern "C" fn dot(_ctx: *const c_void, a: TensorHandle, b: TensorHandle) -> FfiResult<f64> {
    guard(|| {
        // SAFETY: live handles.
        let (a, b) = unsafe { (&get(a)?.tensor, &get(b)?.tensor) };
        if a.elem_count() != b.elem_count() {
            candle_core::bail!("dot: {:?} vs {:?}", a.dims(), b.dims());
        }
        Ok(f64_values(a)?
            .iter()
            .zip(f64_values(b)?)
            .map(|(x, y)| x * y)
            .sum())
    })
}

unsafe extern "C" fn compare(
    _ctx: *const c_void,
    op: u32,
    a: TensorHandle,
    b: TensorHandle,
) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: live handles.
        let (a, b) = unsafe { (&get(a)?.tensor, &get(b)?.tensor) };
        let m = match op {
            ffi::compare::EQ => a.broadcast_eq(b),
            ffi::compare::NE => a.broadcast_ne(b),
            ffi::compare::GT => a.broadcast_gt(b),
            ffi::compare::GE => a.broadcast_ge(b),
            ffi::compare::LT => a.broadcast_lt(b),
            ffi::compare::LE => a.broadcast_le(b),
            other => candle_core::bail!("unknown compare op code {other}"),
        }?;
        m.to_dtype(a.dtype())
    })
}

unsafe extern "C" fn select(
    _ctx: *const c_void,
    cond: TensorHandle,
    a: TensorHandle,
    b: TensorHandle,
) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: live handles.
        let (c, a, b) = unsafe { (&get(cond)?.tensor, &get(a)?.tensor, &get(b)?.tensor) };
        let mask = c.ne(&c.zeros_like()?)?;
        mask.where_cond(a, b)
    })
}

fn f32_values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    to_dtype_fast(&t.flatten_all()?, DType::F32)?.to_vec1::<f32>()
}

unsafe extern "C" fn abs_kth_largest(_ctx: *const c_void, h: TensorHandle, k: u64) -> FfiResult<f64> {
    guard(|| {
        // SAFETY: live handle.
        let t = &unsafe { get(h) }?.tensor;
        let v = f32_values(t)?;
        kernels::abs_kth_largest(&v, k as usize)
            .map(|x| x as f64)
            .ok_or_else(|| candle_core::Error::Msg(format!("k = {k} outside 1..={}", v.len())))
    })
}

unsafe extern "C" fn topk_abs_mask(_ctx: *const c_void, h: TensorHandle, k: u64) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: live handle.
        let t = &unsafe { get(h) }?.tensor;
        let mask = kernels::topk_abs_mask(&f32_values(t)?, k as usize);
        kernels::tensor_from_f32(mask, t.dims(), t.dtype())?.to_device(t.device())
    })
}

unsafe extern "C" fn bernoulli_mask(
    _ctx: *const c_void,
    h: TensorHandle,
    p: f64,
    seed: u64,
    stream: u64,
) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: live handle.
        let t = &unsafe { get(h) }?.tensor;
        if !(0.0..=1.0).contains(&p) {
            candle_core::bail!("bernoulli probability {p} outside [0, 1]");
        }
        let mask = kernels::bernoulli(t.elem_count(), p, seed, stream);
        kernels::tensor_from_f32(mask, t.dims(), t.dtype())?.to_device(t.device())
    })
}

unsafe extern "C" fn full_like(_ctx: *const c_void, h: TensorHandle, v: f64) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: live handle.
        let t = &unsafe { get(h) }?.tensor;
        t.zeros_like()?.affine(0.0, v)
    })
}

unsafe extern "C" fn from_f32(
    ctx: *const c_void,
    data: RSlice<'_, f32>,
    shape: RSlice<'_, u64>,
    code: u32,
) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: ctx comes from our own vtable.
        let be = unsafe { backend(ctx) };
        let dims = dims(shape);
        if dims.iter().product::<usize>() != data.len() {
            candle_core::bail!("from_f32: {} values for shape {:?}", data.len(), dims);
        }
        kernels::tensor_from_f32(data.to_vec(), &dims, dtype_from_code(code)?)?.to_device(&be.device)
    })
}

unsafe extern "C" fn to_vec_f32(_ctx: *const c_void, h: TensorHandle) -> FfiResult<RVec<f32>> {
    guard(|| {
        // SAFETY: live handle.
        let t = &unsafe { get(h) }?.tensor;
        f32_values(t).map(RVec::from)
    })
}

unsafe extern "C" fn reshape(
    _ctx: *const c_void,
    h: TensorHandle,
    shape: RSlice<'_, u64>,
) -> FfiResult<TensorHandle> {
    shared(|| {
        // SAFETY: live handle.
        let t = &unsafe { get(h) }?.tensor;
        t.reshape(dims(shape))
    })
}

unsafe extern "C" fn matmul(
    _ctx: *const c_void,
    a: TensorHandle,
    b: TensorHandle,
) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: live handles.
        let (a, b) = unsafe { (&get(a)?.tensor, &get(b)?.tensor) };
        a.broadcast_matmul(b)
    })
}

unsafe extern "C" fn softmax_last(_ctx: *const c_void, h: TensorHandle) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: live handle.
        let t = &unsafe { get(h) }?.tensor;
        let max = t.max_keepdim(D::Minus1)?;
        let e = t.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    })
}

unsafe extern "C" fn transpose(
    _ctx: *const c_void,
    h: TensorHandle,
    d0: u32,
    d1: u32,
) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: live handle.
        let t = &unsafe { get(h) }?.tensor;
        t.transpose(d0 as usize, d1 as usize)?.contiguous()
    })
}

unsafe extern "C" fn narrow(
    _ctx: *const c_void,
    h: TensorHandle,
    dim: u32,
    start: u64,
    len: u64,
) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: live handle.
        let t = &unsafe { get(h) }?.tensor;
        t.narrow(dim as usize, start as usize, len as usize)?.contiguous()
    })
}

unsafe extern "C" fn cat(
    _ctx: *const c_void,
    hs: RSlice<'_, TensorHandle>,
    dim: u32,
) -> FfiResult<TensorHandle> {
    fresh(|| {
        let ts = hs
            .iter()
            // SAFETY: live handles.
            .map(|h| unsafe { get(*h) }.map(|t| t.tensor.clone()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&ts, dim as usize)
    })
}

unsafe extern "C" fn reduce_last(_ctx: *const c_void, op: u32, h: TensorHandle) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: live handle.
        let t = &unsafe { get(h) }?.tensor;
        match op {
            ffi::reduce::SUM => t.sum_keepdim(D::Minus1),
            ffi::reduce::SUM_SQ => t.sqr()?.sum_keepdim(D::Minus1),
            ffi::reduce::SUM_ABS => t.abs()?.sum_keepdim(D::Minus1),
            ffi::reduce::MAX_ABS => t.abs()?.max_keepdim(D::Minus1),
            other => candle_core::bail!("reduce_last does not support op code {other}"),
        }
    })
}

unsafe extern "C" fn lerp(
    _ctx: *const c_void,
    a: TensorHandle,
    b: TensorHandle,
    t: f64,
) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: live handles.
        let (a, b) = unsafe { (&get(a)?.tensor, &get(b)?.tensor) };
        a + (b - a)?.affine(t, 0.0)?
    })
}

unsafe extern "C" fn abs_rank_last(_ctx: *const c_void, h: TensorHandle) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: live handle.
        let t = &unsafe { get(h) }?.tensor;
        let row = t.dims().last().copied().unwrap_or(1);
        // Any device and dtype: the values come to the host as f32 (exact for f32/f16/bf16) and
        // the ranks are computed by one kernel, so the tie order is the same everywhere.
        let ranks = kernels::abs_rank_rows(&f32_values(t)?, row);
        kernels::tensor_from_f32(ranks, t.dims(), DType::F32)?.to_device(t.device())
    })
}

unsafe extern "C" fn bernoulli_probs(
    _ctx: *const c_void,
    h: TensorHandle,
    seed: u64,
    stream: u64,
) -> FfiResult<TensorHandle> {
    fresh(|| {
        // SAFETY: live handle.
        let t = &unsafe { get(h) }?.tensor;
        if !t.dtype().is_float() {
            candle_core::bail!("bernoulli_probs needs float probabilities, got {:?}", t.dtype());
        }
        // The generator runs on the host for every device, as for `bernoulli_mask`, so a mask
        // does not depend on where the tensors live.
        let mask = match kernels::with_float_slice(t, |s| match s {
            kernels::FloatSlice::F32(p) => Some(kernels::bernoulli_probs(p, seed, stream)),
            _ => None,
        }) {
            Some(Some(mask)) => mask,
            _ => kernels::bernoulli_probs(&f32_values(t)?, seed, stream),
        };
        kernels::tensor_from_f32(mask, t.dims(), t.dtype())?.to_device(t.device())
    })
}

unsafe extern "C" fn task_merge(
    _ctx: *const c_void,
    req: *const ffi::TaskMergeRequest<'_>,
) -> FfiResult<TensorHandle> {
    fresh(|| {
        if req.is_null() {
            candle_core::bail!("task_merge: null request");
        }
        // SAFETY: the plugin passes a live request for the duration of the call.
        let req = unsafe { &*req };
        if req.struct_size < std::mem::size_of::<ffi::TaskMergeRequest<'_>>() {
            candle_core::bail!("task_merge: request of {} bytes is too short", req.struct_size);
        }
        // SAFETY: live handles.
        let base = &unsafe { get(req.base) }?.tensor;
        let models = req
            .vectors
            .iter()
            .map(|v| {
                // SAFETY: live handles.
                let t = &unsafe { get(v.tensor) }?.tensor;
                Ok((
                    t,
                    fused::VectorParams {
                        weight: v.weight,
                        sparsify: v.sparsify,
                        rescale: v.rescale,
                        k: v.k,
                        p: v.p,
                        seed: v.seed,
                        stream: v.stream,
                    },
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let knobs = fused::Knobs {
            consensus: req.consensus != 0,
            normalize: req.normalize != 0,
            divisor: req.divisor,
            lambda: req.lambda,
        };
        fused::task_merge(base, &models, &knobs)
    })
}

unsafe extern "C" fn dot_norms(
    _ctx: *const c_void,
    a: TensorHandle,
    b: TensorHandle,
) -> FfiResult<RVec<f64>> {
    guard(|| {
        // SAFETY: live handles.
        let (a, b) = unsafe { (&get(a)?.tensor, &get(b)?.tensor) };
        let (aa, bb, ab) = fused::dot_norms(a, b)?;
        Ok(RVec::from(vec![aa, bb, ab]))
    })
}

unsafe extern "C" fn lincomb(
    _ctx: *const c_void,
    hs: RSlice<'_, TensorHandle>,
    ws: RSlice<'_, f64>,
    out: u32,
) -> FfiResult<TensorHandle> {
    fresh(|| {
        let ts = hs
            .iter()
            // SAFETY: live handles.
            .map(|h| unsafe { get(*h) }.map(|t| &t.tensor))
            .collect::<candle_core::Result<Vec<_>>>()?;
        fused::lincomb(&ts, ws.as_slice(), dtype_from_code(out)?)
    })
}

//! The ergonomic side of the boundary: [`Backend`] and [`Tensor`], so that a merge method reads
//! like its formula (`a.sub(&b)?.scale(w)?`).

use crate::error::{Error, Result};
use crate::ffi::{self, BackendVTable, FfiResult, TensorHandle};
use abi_stable::std_types::{RResult, RSlice};

/// Element type of a host tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit float.
    F64,
    /// Unsigned byte.
    U8,
    /// Unsigned 32-bit.
    U32,
    /// Signed 64-bit.
    I64,
}

impl DType {
    /// The code used across the boundary.
    pub fn code(self) -> u32 {
        match self {
            DType::F32 => ffi::dtype::F32,
            DType::F16 => ffi::dtype::F16,
            DType::BF16 => ffi::dtype::BF16,
            DType::F64 => ffi::dtype::F64,
            DType::U8 => ffi::dtype::U8,
            DType::U32 => ffi::dtype::U32,
            DType::I64 => ffi::dtype::I64,
        }
    }
    /// The dtype for a code, `None` for codes this plugin-api does not know.
    pub fn from_code(code: u32) -> Option<DType> {
        Some(match code {
            ffi::dtype::F32 => DType::F32,
            ffi::dtype::F16 => DType::F16,
            ffi::dtype::BF16 => DType::BF16,
            ffi::dtype::F64 => DType::F64,
            ffi::dtype::U8 => DType::U8,
            ffi::dtype::U32 => DType::U32,
            ffi::dtype::I64 => DType::I64,
            _ => return None,
        })
    }
    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }
}

fn lift<T>(r: FfiResult<T>) -> Result<T> {
    match r {
        RResult::ROk(v) => Ok(v),
        RResult::RErr(e) => Err(Error::Backend(e.into_string())),
    }
}

/// How [`Backend::task_merge`] sparsifies one task vector δ = θ − θ₀ (plugin-api 1.3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TvSparsify {
    /// Keep every element.
    None,
    /// Keep exactly the k largest |δ| over the whole tensor (ties kept in index order).
    TopK(usize),
    /// Keep element i when the host's counter-based generator draws below `p` for
    /// `(seed, stream, i)` (the mask of [`Tensor::bernoulli_mask`]).
    Bernoulli {
        /// Keep probability.
        p: f64,
        /// Seed.
        seed: u64,
        /// Stream.
        stream: u64,
    },
}

/// How [`Backend::task_merge`] rescales a sparsified task vector (plugin-api 1.3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TvRescale {
    /// No rescale.
    None,
    /// Times ‖δ‖₁ / ‖δ ⊙ M‖₁, skipped when either is below 1e-7.
    L1,
    /// Divided by the given keep probability.
    Divide(f64),
}

/// One task vector of [`Backend::task_merge`].
#[derive(Debug, Clone, Copy)]
pub struct TaskVectorSpec<'t, 'b> {
    /// The fine-tuned model's tensor θᵢ.
    pub tensor: &'t Tensor<'b>,
    /// wᵢ, already rounded to the base's dtype.
    pub weight: f64,
    /// Sparsification.
    pub sparsify: TvSparsify,
    /// Rescale after sparsification.
    pub rescale: TvRescale,
}

/// The global knobs of [`Backend::task_merge`].
#[derive(Debug, Clone, Copy)]
pub struct TaskMergeOptions {
    /// Sign consensus (TIES).
    pub consensus: bool,
    /// Divide by the (agreeing) weights.
    pub normalize: bool,
    /// Without consensus and with `normalize`: the divisor, already rounded to the dtype.
    pub divisor: f64,
    /// λ.
    pub lambda: f64,
}

/// The host's tensor operations, as seen by a plugin during one call.
#[derive(Clone, Copy)]
pub struct Backend<'b> {
    vt: &'b BackendVTable,
}

impl<'b> Backend<'b> {
    /// Wraps the host's table.
    ///
    /// # Safety
    /// `vt` must be a table produced by a modelglue host (or its testing helper) that stays valid
    /// for `'b`.
    pub unsafe fn from_raw(vt: &'b BackendVTable) -> Self {
        Backend { vt }
    }

    /// The host's plugin-api minor version.
    pub fn host_api_minor(&self) -> u32 {
        self.vt.api_minor
    }

    fn wrap(&self, r: FfiResult<TensorHandle>) -> Result<Tensor<'b>> {
        lift(r).map(|h| Tensor {
            h,
            backend: *self,
            owned: true,
        })
    }

    /// Takes a host-owned handle for the duration of a call; dropping it does not release it.
    ///
    /// # Safety
    /// `h` must be a live handle of this backend that outlives `'b`.
    pub unsafe fn borrow_handle(&self, h: TensorHandle) -> Tensor<'b> {
        Tensor {
            h,
            backend: *self,
            owned: false,
        }
    }

    /// A new tensor from f32 values.
    pub fn from_f32(&self, data: &[f32], shape: &[usize], dtype: DType) -> Result<Tensor<'b>> {
        let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        // SAFETY: the table comes from the host; slices outlive the call.
        self.wrap(unsafe {
            (self.vt.from_f32)(
                self.vt.ctx,
                RSlice::from_slice(data),
                RSlice::from_slice(&dims),
                dtype.code(),
            )
        })
    }

    /// `(Σᵢ wᵢ xᵢ) / divisor`, fused, accumulated in f32 left to right, written as `out`.
    pub fn weighted_sum(
        &self,
        tensors: &[&Tensor<'b>],
        weights: &[f64],
        divisor: Option<f64>,
        out: DType,
    ) -> Result<Tensor<'b>> {
        if tensors.len() != weights.len() || tensors.is_empty() {
            return Err(Error::params(format!(
                "weighted_sum needs one weight per tensor (got {} tensors, {} weights)",
                tensors.len(),
                weights.len()
            )));
        }
        let hs: Vec<TensorHandle> = tensors.iter().map(|t| t.h).collect();
        // SAFETY: handles are live for 'b; slices outlive the call.
        self.wrap(unsafe {
            (self.vt.weighted_sum)(
                self.vt.ctx,
                RSlice::from_slice(&hs),
                RSlice::from_slice(weights),
                divisor.unwrap_or(1.0),
                out.code(),
            )
        })
    }

    /// Concatenation along `dim`.
    pub fn cat(&self, tensors: &[&Tensor<'b>], dim: usize) -> Result<Tensor<'b>> {
        let hs: Vec<TensorHandle> = tensors.iter().map(|t| t.h).collect();
        // SAFETY: handles are live for 'b.
        self.wrap(unsafe { (self.vt.cat)(self.vt.ctx, RSlice::from_slice(&hs), dim as u32) })
    }

    /// Whether the host has the fused ops of plugin-api 1.3 ([`Backend::task_merge`],
    /// [`Tensor::dot_norms`], [`Backend::lincomb`]); plugins fall back to separate ops otherwise.
    pub fn has_fused_1_3(&self) -> bool {
        self.vt.has(crate::__entry_end!(BackendVTable, lincomb))
    }

    /// The generalized task-arithmetic merge (task arithmetic, TIES, DARE) fused into a few
    /// chunked passes, bit-identical to the op-by-op formula in the base's dtype (f32, f16 or
    /// bf16); the exact op order is documented on [`BackendVTable::task_merge`] (plugin-api 1.3).
    pub fn task_merge(
        &self,
        base: &Tensor<'b>,
        vectors: &[TaskVectorSpec<'_, 'b>],
        options: TaskMergeOptions,
    ) -> Result<Tensor<'b>> {
        self.require(crate::__entry_end!(BackendVTable, task_merge), "task_merge", 3)?;
        let raw: Vec<ffi::TaskVector> = vectors
            .iter()
            .map(|v| {
                let (sparsify, k, p, seed, stream) = match v.sparsify {
                    TvSparsify::None => (ffi::sparsify::NONE, 0, 1.0, 0, 0),
                    TvSparsify::TopK(k) => (ffi::sparsify::TOPK, k as u64, 1.0, 0, 0),
                    TvSparsify::Bernoulli { p, seed, stream } => {
                        (ffi::sparsify::BERNOULLI, 0, p, seed, stream)
                    }
                };
                let (rescale, p) = match v.rescale {
                    TvRescale::None => (ffi::rescale::NONE, p),
                    TvRescale::L1 => (ffi::rescale::L1, p),
                    TvRescale::Divide(d) => (ffi::rescale::INVERSE, d),
                };
                ffi::TaskVector {
                    tensor: v.tensor.h,
                    weight: v.weight,
                    sparsify,
                    rescale,
                    k,
                    p,
                    seed,
                    stream,
                }
            })
            .collect();
        let req = ffi::TaskMergeRequest {
            struct_size: std::mem::size_of::<ffi::TaskMergeRequest<'_>>(),
            base: base.h,
            vectors: RSlice::from_slice(&raw),
            consensus: options.consensus as u8,
            normalize: options.normalize as u8,
            divisor: options.divisor,
            lambda: options.lambda,
        };
        // SAFETY: handles are live for 'b; the request outlives the call.
        self.wrap(unsafe { (self.vt.task_merge)(self.vt.ctx, &req) })
    }

    /// `Σᵢ (f32(wᵢ) · xᵢ + 0)` in f32, left to right, each product rounded before its add (no
    /// FMA: the bits of `scale` then `add` on f32 tensors), written as `out` (f32, f16 or bf16),
    /// in one pass (plugin-api 1.3).
    pub fn lincomb(&self, tensors: &[&Tensor<'b>], weights: &[f64], out: DType) -> Result<Tensor<'b>> {
        self.require(crate::__entry_end!(BackendVTable, lincomb), "lincomb", 3)?;
        let hs: Vec<TensorHandle> = tensors.iter().map(|t| t.h).collect();
        // SAFETY: handles are live for 'b; slices outlive the call.
        self.wrap(unsafe {
            (self.vt.lincomb)(
                self.vt.ctx,
                RSlice::from_slice(&hs),
                RSlice::from_slice(weights),
                out.code(),
            )
        })
    }

    fn require(&self, end: usize, op: &str, minor: u32) -> Result<()> {
        if self.vt.has(end) {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "backend op `{op}` needs a host with plugin-api ≥ 1.{minor} (this host has 1.{}); upgrade mglue",
                self.vt.api_minor
            )))
        }
    }
}

/// A host-owned tensor. Dropping an owned tensor releases it in the host.
pub struct Tensor<'b> {
    h: TensorHandle,
    backend: Backend<'b>,
    owned: bool,
}

impl Drop for Tensor<'_> {
    fn drop(&mut self) {
        if self.owned && !self.h.is_null() {
            // SAFETY: owned handles are released exactly once, here.
            unsafe { (self.backend.vt.release)(self.backend.vt.ctx, self.h) }
        }
    }
}

impl std::fmt::Debug for Tensor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape())
            .field("dtype", &self.dtype())
            .finish()
    }
}

macro_rules! call {
    ($self:ident, $op:ident $(, $arg:expr)*) => {{
        let vt = $self.backend.vt;
        // SAFETY: the handle is live for 'b and the table comes from the host.
        unsafe { (vt.$op)(vt.ctx $(, $arg)*) }
    }};
}

impl<'b> Tensor<'b> {
    /// The backend this tensor lives in.
    pub fn backend(&self) -> Backend<'b> {
        self.backend
    }

    /// The element type (`F32` for codes this plugin-api does not know).
    pub fn dtype(&self) -> DType {
        DType::from_code(call!(self, dtype, self.h)).unwrap_or(DType::F32)
    }

    /// The dimensions.
    pub fn shape(&self) -> Vec<usize> {
        call!(self, shape, self.h).iter().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape().iter().product()
    }

    /// Hands the tensor to the host (as a merge result). A borrowed input is duplicated first.
    pub fn into_raw(self) -> Result<TensorHandle> {
        let me = if self.owned { self } else { self.dup()? };
        let h = me.h;
        std::mem::forget(me);
        Ok(h)
    }

    /// The raw handle (still owned by this wrapper).
    pub fn handle(&self) -> TensorHandle {
        self.h
    }

    /// A second, owned handle to the same data.
    pub fn dup(&self) -> Result<Tensor<'b>> {
        self.backend.wrap(call!(self, dup, self.h))
    }

    /// Converts to `dtype` (a no-op copy of the handle when already there).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor<'b>> {
        self.backend.wrap(call!(self, to_dtype, self.h, dtype.code()))
    }

    fn unary(&self, op: u32) -> Result<Tensor<'b>> {
        self.backend.wrap(call!(self, unary, op, self.h))
    }
    fn binary(&self, op: u32, other: &Tensor<'b>) -> Result<Tensor<'b>> {
        self.backend.wrap(call!(self, binary, op, self.h, other.h))
    }
    fn compare(&self, op: u32, other: &Tensor<'b>) -> Result<Tensor<'b>> {
        self.backend.wrap(call!(self, compare, op, self.h, other.h))
    }
    fn reduce(&self, op: u32) -> Result<f64> {
        lift(call!(self, reduce, op, self.h))
    }

    /// `-x`
    pub fn neg(&self) -> Result<Tensor<'b>> {
        self.unary(ffi::unary::NEG)
    }
    /// `|x|`
    pub fn abs(&self) -> Result<Tensor<'b>> {
        self.unary(ffi::unary::ABS)
    }
    /// `sign(x)` with sign(0) = 0.
    pub fn sign(&self) -> Result<Tensor<'b>> {
        self.unary(ffi::unary::SIGN)
    }
    /// `sqrt(x)`
    pub fn sqrt(&self) -> Result<Tensor<'b>> {
        self.unary(ffi::unary::SQRT)
    }
    /// `exp(x)`
    pub fn exp(&self) -> Result<Tensor<'b>> {
        self.unary(ffi::unary::EXP)
    }
    /// `ln(x)`
    pub fn log(&self) -> Result<Tensor<'b>> {
        self.unary(ffi::unary::LOG)
    }
    /// `x²`
    pub fn sqr(&self) -> Result<Tensor<'b>> {
        self.unary(ffi::unary::SQR)
    }
    /// `a + b`
    pub fn add(&self, other: &Tensor<'b>) -> Result<Tensor<'b>> {
        self.binary(ffi::binary::ADD, other)
    }
    /// `a − b`
    pub fn sub(&self, other: &Tensor<'b>) -> Result<Tensor<'b>> {
        self.binary(ffi::binary::SUB, other)
    }
    /// `a · b`
    pub fn mul(&self, other: &Tensor<'b>) -> Result<Tensor<'b>> {
        self.binary(ffi::binary::MUL, other)
    }
    /// `a / b`
    pub fn div(&self, other: &Tensor<'b>) -> Result<Tensor<'b>> {
        self.binary(ffi::binary::DIV, other)
    }
    /// `max(a, b)`
    pub fn maximum(&self, other: &Tensor<'b>) -> Result<Tensor<'b>> {
        self.binary(ffi::binary::MAXIMUM, other)
    }
    /// `min(a, b)`
    pub fn minimum(&self, other: &Tensor<'b>) -> Result<Tensor<'b>> {
        self.binary(ffi::binary::MINIMUM, other)
    }
    /// `x · mul + add`
    pub fn affine(&self, mul: f64, add: f64) -> Result<Tensor<'b>> {
        self.backend.wrap(call!(self, affine, self.h, mul, add))
    }
    /// `x · s`
    pub fn scale(&self, s: f64) -> Result<Tensor<'b>> {
        self.affine(s, 0.0)
    }
    /// In place: `self ← self + α · x`.
    pub fn axpy(&mut self, alpha: f64, x: &Tensor<'b>) -> Result<()> {
        if !self.owned {
            *self = self.dup()?;
        }
        lift(call!(self, axpy, self.h, alpha, x.h)).map(|_| ())
    }
    /// `Σ x` (f64 accumulation).
    pub fn sum(&self) -> Result<f64> {
        self.reduce(ffi::reduce::SUM)
    }
    /// `Σ x²`
    pub fn sum_sq(&self) -> Result<f64> {
        self.reduce(ffi::reduce::SUM_SQ)
    }
    /// `Σ |x|`
    pub fn sum_abs(&self) -> Result<f64> {
        self.reduce(ffi::reduce::SUM_ABS)
    }
    /// `‖x‖₂`
    pub fn norm(&self) -> Result<f64> {
        self.sum_sq().map(f64::sqrt)
    }
    /// `max |x|`
    pub fn max_abs(&self) -> Result<f64> {
        self.reduce(ffi::reduce::MAX_ABS)
    }
    /// Number of non-zero elements.
    pub fn count_nonzero(&self) -> Result<u64> {
        self.reduce(ffi::reduce::COUNT_NONZERO).map(|v| v as u64)
    }
    /// `Σ aᵢ bᵢ`
    pub fn dot(&self, other: &Tensor<'b>) -> Result<f64> {
        lift(call!(self, dot, self.h, other.h))
    }
    /// Mask `a == b`.
    pub fn eq(&self, other: &Tensor<'b>) -> Result<Tensor<'b>> {
        self.compare(ffi::compare::EQ, other)
    }
    /// Mask `a != b`.
    pub fn ne(&self, other: &Tensor<'b>) -> Result<Tensor<'b>> {
        self.compare(ffi::compare::NE, other)
    }
    /// Mask `a > b`.
    pub fn gt(&self, other: &Tensor<'b>) -> Result<Tensor<'b>> {
        self.compare(ffi::compare::GT, other)
    }
    /// Mask `a >= b`.
    pub fn ge(&self, other: &Tensor<'b>) -> Result<Tensor<'b>> {
        self.compare(ffi::compare::GE, other)
    }
    /// Mask `a < b`.
    pub fn lt(&self, other: &Tensor<'b>) -> Result<Tensor<'b>> {
        self.compare(ffi::compare::LT, other)
    }
    /// Mask `a <= b`.
    pub fn le(&self, other: &Tensor<'b>) -> Result<Tensor<'b>> {
        self.compare(ffi::compare::LE, other)
    }
    /// `self ≠ 0 ? a : b` (self is the mask).
    pub fn select(&self, a: &Tensor<'b>, b: &Tensor<'b>) -> Result<Tensor<'b>> {
        self.backend.wrap(call!(self, select, self.h, a.h, b.h))
    }
    /// The k-th largest `|x|` (k ≥ 1), by selection.
    pub fn abs_kth_largest(&self, k: usize) -> Result<f64> {
        lift(call!(self, abs_kth_largest, self.h, k as u64))
    }
    /// 0/1 mask keeping exactly the `k` largest magnitudes.
    pub fn topk_abs_mask(&self, k: usize) -> Result<Tensor<'b>> {
        self.backend.wrap(call!(self, topk_abs_mask, self.h, k as u64))
    }
    /// 0/1 mask like `self`, each element kept with probability `p`; reproducible from
    /// `(seed, stream)` whatever the thread count.
    pub fn bernoulli_mask(&self, p: f64, seed: u64, stream: u64) -> Result<Tensor<'b>> {
        self.backend
            .wrap(call!(self, bernoulli_mask, self.h, p, seed, stream))
    }
    /// A tensor like `self` filled with `v`.
    pub fn full_like(&self, v: f64) -> Result<Tensor<'b>> {
        self.backend.wrap(call!(self, full_like, self.h, v))
    }
    /// A tensor like `self` filled with zeros.
    pub fn zeros_like(&self) -> Result<Tensor<'b>> {
        self.full_like(0.0)
    }
    /// The values as f32 (escape hatch).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        lift(call!(self, to_vec_f32, self.h)).map(|v| v.into_vec())
    }
    /// Same data, new shape.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor<'b>> {
        let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        self.backend
            .wrap(call!(self, reshape, self.h, RSlice::from_slice(&dims)))
    }
    /// Matrix product.
    pub fn matmul(&self, other: &Tensor<'b>) -> Result<Tensor<'b>> {
        self.backend.wrap(call!(self, matmul, self.h, other.h))
    }
    /// Softmax over the last dimension.
    pub fn softmax_last(&self) -> Result<Tensor<'b>> {
        self.backend.wrap(call!(self, softmax_last, self.h))
    }
    /// Swaps two dimensions.
    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Tensor<'b>> {
        self.backend
            .wrap(call!(self, transpose, self.h, d0 as u32, d1 as u32))
    }
    /// Rows `[start, start + len)` along `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor<'b>> {
        self.backend
            .wrap(call!(self, narrow, self.h, dim as u32, start as u64, len as u64))
    }
    /// `Σ` over the last dimension, kept as size 1.
    pub fn sum_last(&self) -> Result<Tensor<'b>> {
        self.backend
            .wrap(call!(self, reduce_last, ffi::reduce::SUM, self.h))
    }
    /// `Σ x²` over the last dimension, kept as size 1.
    pub fn sum_sq_last(&self) -> Result<Tensor<'b>> {
        self.backend
            .wrap(call!(self, reduce_last, ffi::reduce::SUM_SQ, self.h))
    }
    /// `(Σ aᵢ², Σ bᵢ², Σ aᵢbᵢ)` of the values as f32, in f64 in index order (the same bits as
    /// `sum_sq`, `sum_sq` and `dot` of f32 tensors), in one pass (plugin-api 1.3).
    pub fn dot_norms(&self, other: &Tensor<'b>) -> Result<(f64, f64, f64)> {
        self.backend
            .require(crate::__entry_end!(BackendVTable, dot_norms), "dot_norms", 3)?;
        let v = lift(call!(self, dot_norms, self.h, other.h))?;
        match v.as_slice() {
            [aa, bb, ab] => Ok((*aa, *bb, *ab)),
            _ => Err(Error::Backend(
                "dot_norms returned the wrong number of values".into(),
            )),
        }
    }
    /// `a + t · (b − a)`, fused (plugin-api 1.1).
    pub fn lerp(&self, other: &Tensor<'b>, t: f64) -> Result<Tensor<'b>> {
        self.backend
            .require(crate::__entry_end!(BackendVTable, lerp), "lerp", 1)?;
        self.backend.wrap(call!(self, lerp, self.h, other.h, t))
    }
    /// The rank (1 = smallest) of `|x|` within each row of the last dimension, as F32; equal
    /// magnitudes are ranked in index order (plugin-api 1.2).
    pub fn abs_rank_last(&self) -> Result<Tensor<'b>> {
        self.backend.require(
            crate::__entry_end!(BackendVTable, abs_rank_last),
            "abs_rank_last",
            2,
        )?;
        self.backend.wrap(call!(self, abs_rank_last, self.h))
    }
    /// 0/1 mask like `self`, element i kept with probability `self[i]`; reproducible from
    /// `(seed, stream)` whatever the thread count, and equal to [`Tensor::bernoulli_mask`] for a
    /// constant probability (plugin-api 1.2).
    pub fn bernoulli_probs(&self, seed: u64, stream: u64) -> Result<Tensor<'b>> {
        self.backend.require(
            crate::__entry_end!(BackendVTable, bernoulli_probs),
            "bernoulli_probs",
            2,
        )?;
        self.backend
            .wrap(call!(self, bernoulli_probs, self.h, seed, stream))
    }
}

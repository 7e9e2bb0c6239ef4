//! Fused multi-tensor kernels behind the plugin-api 1.3 ops `task_merge`, `dot_norms` and
//! `lincomb`: chunked, parallel loops over contiguous CPU storage that reproduce, bit for bit, the
//! op-by-op candle formulas they replace (each elementwise step computed in f32 and rounded to the
//! compute dtype, which for f16/bf16 equals the half-precision op since f32 has > 2p + 2 bits).

use super::kernels::{uniform, FloatSlice, CHUNK};
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use mglue_plugin_api::ffi::{rescale as rescale_code, sparsify as sparsify_code};
use rayon::prelude::*;

/// The dtype the task-vector arithmetic runs in (the base's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compute {
    /// f32: no rounding between steps.
    F32,
    /// IEEE half: every step rounded to f16.
    F16,
    /// bfloat16: every step rounded to bf16.
    BF16,
}

impl Compute {
    fn of(dt: DType) -> Option<Compute> {
        match dt {
            DType::F32 => Some(Compute::F32),
            DType::F16 => Some(Compute::F16),
            DType::BF16 => Some(Compute::BF16),
            _ => None,
        }
    }
}

/// Per-chunk scratch buffers.
struct Bufs {
    h16: Vec<f16>,
    hb16: Vec<bf16>,
    base: Vec<f32>,
    x: Vec<Vec<f32>>,
    keys: Vec<u32>,
    acc: Vec<f32>,
    div: Vec<f32>,
}

impl Bufs {
    fn new(models: usize) -> Bufs {
        Bufs {
            h16: vec![f16::ZERO; CHUNK],
            hb16: vec![bf16::ZERO; CHUNK],
            base: vec![0.0; CHUNK],
            x: (0..models.max(1)).map(|_| vec![0.0; CHUNK]).collect(),
            keys: vec![0; CHUNK],
            acc: vec![0.0; CHUNK],
            div: vec![0.0; CHUNK],
        }
    }
}

/// Rounds f32 values to the compute dtype (in place, as f32).
fn round(c: Compute, xs: &mut [f32], h16: &mut [f16], hb16: &mut [bf16]) {
    match c {
        Compute::F32 => {}
        Compute::F16 => {
            let t = &mut h16[..xs.len()];
            t.convert_from_f32_slice(xs);
            t.convert_to_f32_slice(xs);
        }
        Compute::BF16 => {
            let t = &mut hb16[..xs.len()];
            t.convert_from_f32_slice(xs);
            t.convert_to_f32_slice(xs);
        }
    }
}

/// The magnitude key of a compute-dtype value: its bits without the sign, so that keys order
/// like magnitudes (the f32 `total_cmp` order on `|x|`). For f16, `h16` must already hold `xs`
/// as f16: [`delta_into`] leaves the δ it computed there, and every caller runs right after it.
fn keys_of(c: Compute, xs: &[f32], keys: &mut [u32], h16: &mut [f16]) {
    let keys = &mut keys[..xs.len()];
    match c {
        Compute::F32 => keys
            .iter_mut()
            .zip(xs)
            .for_each(|(k, x)| *k = x.to_bits() & 0x7FFF_FFFF),
        Compute::BF16 => keys
            .iter_mut()
            .zip(xs)
            .for_each(|(k, x)| *k = (x.to_bits() >> 16) & 0x7FFF),
        Compute::F16 => {
            let t = &h16[..xs.len()];
            keys.iter_mut()
                .zip(t.iter())
                .for_each(|(k, h)| *k = (h.to_bits() & 0x7FFF) as u32);
        }
    }
}

/// One task vector's sparsification, resolved to what the main pass needs.
enum Mask {
    All,
    /// Keep keys above `thr`; at `thr`, all (`allow` None) or the first `allow[chunk]` of the chunk.
    TopK {
        thr: u32,
        allow: Option<Vec<u32>>,
    },
    Bernoulli {
        p: f64,
        seed: u64,
        stream: u64,
    },
}

/// One task vector of a [`task_merge`] call.
pub struct Vector<'a> {
    /// The fine-tuned model's tensor.
    pub view: FloatSlice<'a>,
    /// Whether `view` already holds compute-dtype values (no conversion rounding needed).
    pub same_dtype: bool,
    /// Weight, already rounded to the compute dtype.
    pub weight: f64,
    /// [`sparsify_code`].
    pub sparsify: u32,
    /// [`rescale_code`].
    pub rescale: u32,
    /// Top-k count.
    pub k: u64,
    /// Bernoulli keep probability / inverse-density divisor.
    pub p: f64,
    /// Bernoulli seed.
    pub seed: u64,
    /// Bernoulli stream.
    pub stream: u64,
}

/// The global knobs of a [`task_merge`] call.
pub struct Knobs {
    /// Sign consensus.
    pub consensus: bool,
    /// Normalise by the (agreeing) weights.
    pub normalize: bool,
    /// The divisor without consensus (already rounded to the compute dtype).
    pub divisor: f64,
    /// λ.
    pub lambda: f64,
}

fn chunks(n: usize) -> usize {
    n.div_ceil(CHUNK)
}

/// δ = r(r(x) − b) for chunk `ci` into `bufs.x[slot]`; `bufs.base` must hold the base chunk.
fn delta_into(c: Compute, v: &Vector<'_>, start: usize, len: usize, bufs: &mut Bufs, slot: usize) {
    let Bufs {
        h16, hb16, base, x, ..
    } = bufs;
    let x = &mut x[slot][..len];
    v.view.read_f32(start, x);
    if !v.same_dtype {
        round(c, x, h16, hb16);
    }
    for (o, b) in x.iter_mut().zip(&base[..len]) {
        *o -= *b;
    }
    round(c, x, h16, hb16);
}

fn histogram(
    c: Compute,
    base: &FloatSlice<'_>,
    v: &Vector<'_>,
    n: usize,
    bins: usize,
    bin_of: impl Fn(u32) -> Option<usize> + Sync,
) -> Vec<u64> {
    (0..chunks(n))
        .into_par_iter()
        .fold(
            || (vec![0u64; bins], Bufs::new(1)),
            |(mut h, mut bufs), ci| {
                let start = ci * CHUNK;
                let len = CHUNK.min(n - start);
                base.read_f32(start, &mut bufs.base[..len]);
                delta_into(c, v, start, len, &mut bufs, 0);
                let Bufs { h16, x, keys, .. } = &mut bufs;
                keys_of(c, &x[0][..len], keys, h16);
                for &k in &keys[..len] {
                    if let Some(b) = bin_of(k) {
                        h[b] += 1;
                    }
                }
                (h, bufs)
            },
        )
        .map(|(h, _)| h)
        .reduce(
            || vec![0u64; bins],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// The bin holding the k-th largest (k ≥ 1) and the count strictly above it.
fn from_top(hist: &[u64], k: u64) -> (usize, u64) {
    let mut above = 0u64;
    for bin in (0..hist.len()).rev() {
        if above + hist[bin] >= k {
            return (bin, above);
        }
        above += hist[bin];
    }
    (0, above)
}

/// Resolves exact top-k (ties at the threshold kept in index order) to a threshold key and, when
/// only some of the tied elements are kept, a per-chunk allowance.
fn topk_mask(c: Compute, base: &FloatSlice<'_>, v: &Vector<'_>, n: usize) -> Mask {
    let k = v.k;
    if k as usize >= n {
        return Mask::All;
    }
    if k == 0 {
        return Mask::TopK {
            thr: u32::MAX,
            allow: Some(vec![0; chunks(n)]),
        };
    }
    let (thr, above, eq) = match c {
        Compute::F16 | Compute::BF16 => {
            let h = histogram(c, base, v, n, 1 << 15, |key| Some(key as usize));
            let (bin, above) = from_top(&h, k);
            (bin as u32, above, h[bin])
        }
        Compute::F32 => {
            let h1 = histogram(c, base, v, n, 1 << 15, |key| Some((key >> 16) as usize));
            let (hi, above1) = from_top(&h1, k);
            let h2 = histogram(c, base, v, n, 1 << 16, |key| {
                ((key >> 16) as usize == hi).then_some((key & 0xFFFF) as usize)
            });
            let (lo, above2) = from_top(&h2, k - above1);
            (((hi as u32) << 16) | lo as u32, above1 + above2, h2[lo])
        }
    };
    let ties_left = k - above;
    if ties_left >= eq {
        return Mask::TopK { thr, allow: None };
    }
    // Count the tied elements per chunk, then hand out the allowance in index order.
    let per_chunk: Vec<u64> = (0..chunks(n))
        .into_par_iter()
        .map_init(
            || Bufs::new(1),
            |bufs, ci| {
                let start = ci * CHUNK;
                let len = CHUNK.min(n - start);
                base.read_f32(start, &mut bufs.base[..len]);
                delta_into(c, v, start, len, bufs, 0);
                let Bufs { h16, x, keys, .. } = bufs;
                keys_of(c, &x[0][..len], keys, h16);
                keys[..len].iter().filter(|&&k| k == thr).count() as u64
            },
        )
        .collect();
    let mut left = ties_left;
    let allow = per_chunk
        .iter()
        .map(|&e| {
            let a = e.min(left);
            left -= a;
            a as u32
        })
        .collect();
    Mask::TopK {
        thr,
        allow: Some(allow),
    }
}

/// Applies the 0/1 mask as a multiplication (δ · m, as the op-by-op formula did) for chunk `ci`.
fn apply_mask(mask: &Mask, c: Compute, ci: usize, start: usize, bufs: &mut Bufs, slot: usize) {
    let Bufs { h16, x, keys, .. } = bufs;
    let x = &mut x[slot];
    match mask {
        Mask::All => {}
        Mask::TopK { thr, allow } => {
            let n = x.len();
            keys_of(c, x, keys, h16);
            let mut budget = allow.as_ref().map(|a| a[ci]).unwrap_or(u32::MAX);
            for (xv, &k) in x[..n].iter_mut().zip(&keys[..n]) {
                let keep = if k > *thr {
                    true
                } else if k == *thr && budget > 0 {
                    budget -= 1;
                    true
                } else {
                    false
                };
                *xv *= if keep { 1.0 } else { 0.0 };
            }
        }
        Mask::Bernoulli { p, seed, stream } => {
            for (j, xv) in x.iter_mut().enumerate() {
                let keep = uniform(*seed, *stream, (start + j) as u64) < *p;
                *xv *= if keep { 1.0 } else { 0.0 };
            }
        }
    }
}

/// The sparsified, rescaled, weighted task vector `aᵢ` of one chunk into `bufs.x[slot]`.
#[allow(clippy::too_many_arguments)]
fn vector_chunk(
    c: Compute,
    v: &Vector<'_>,
    mask: &Mask,
    factor: Option<f32>,
    ci: usize,
    start: usize,
    len: usize,
    bufs: &mut Bufs,
    slot: usize,
) {
    delta_into(c, v, start, len, bufs, slot);
    bufs.x[slot].truncate(len);
    apply_mask(mask, c, ci, start, bufs, slot);
    let Bufs { h16, hb16, x, .. } = bufs;
    let x = &mut x[slot];
    match (v.rescale, factor) {
        (rescale_code::L1, Some(f)) if v.sparsify != sparsify_code::NONE => {
            // mul_scalar: f32 product, candle's affine adds 0, rounded to the dtype.
            x.iter_mut().for_each(|a| *a = *a * f + 0.0);
            round(c, x, h16, hb16);
        }
        (rescale_code::INVERSE, _) if v.sparsify != sparsify_code::NONE => {
            let p = v.p as f32;
            x.iter_mut().for_each(|a| *a /= p);
            round(c, x, h16, hb16);
        }
        _ => {}
    }
    // `scale(w)` in the dtype: r(a · w) + 0 (candle's affine; the add only turns −0 into +0).
    let w = v.weight as f32;
    x.iter_mut().for_each(|a| *a *= w);
    round(c, x, h16, hb16);
    x.iter_mut().for_each(|a| *a += 0.0);
}

fn write_out<T: Copy + Send>(
    n: usize,
    zero: T,
    conv: impl Fn(&[f32], &mut [T]) + Sync,
    body: impl Fn(usize, usize, usize, &mut Bufs) + Sync,
    models: usize,
) -> Vec<T> {
    let mut out = vec![zero; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each_init(
        || Bufs::new(models),
        |bufs, (ci, o)| {
            let start = ci * CHUNK;
            body(ci, start, o.len(), bufs);
            conv(&bufs.acc[..o.len()], o);
        },
    );
    out
}

/// One task vector's parameters (codes as in `mglue_plugin_api::ffi::TaskVector`).
#[derive(Debug, Clone, Copy)]
pub struct VectorParams {
    /// Weight, already rounded to the compute dtype.
    pub weight: f64,
    /// [`sparsify_code`].
    pub sparsify: u32,
    /// [`rescale_code`].
    pub rescale: u32,
    /// Top-k count.
    pub k: u64,
    /// Bernoulli keep probability / inverse-density divisor.
    pub p: f64,
    /// Bernoulli seed.
    pub seed: u64,
    /// Bernoulli stream.
    pub stream: u64,
}

fn view_of<'a, G: std::ops::Deref<Target = Storage>>(
    g: &'a (G, &'a candle_core::Layout),
) -> candle_core::Result<FloatSlice<'a>> {
    let (storage, layout) = g;
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused op: tensor is not contiguous");
    };
    Ok(match &**storage {
        Storage::Cpu(CpuStorage::F32(v)) => FloatSlice::F32(&v[start..end]),
        Storage::Cpu(CpuStorage::BF16(v)) => FloatSlice::BF16(&v[start..end]),
        Storage::Cpu(CpuStorage::F16(v)) => FloatSlice::F16(&v[start..end]),
        Storage::Cpu(CpuStorage::F64(v)) => FloatSlice::F64(&v[start..end]),
        _ => candle_core::bail!("fused op: not a float tensor"),
    })
}

/// A CPU, contiguous version of `t` (the same tensor, not a copy, when it already is one).
fn cpu(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_device(&Device::Cpu)?.contiguous()
}

/// The generalized task-arithmetic merge in one call (any device: other devices go through the
/// CPU). See `BackendVTable::task_merge` for the exact op order.
pub fn task_merge(
    base: &Tensor,
    models: &[(&Tensor, VectorParams)],
    knobs: &Knobs,
) -> candle_core::Result<Tensor> {
    let Some(c) = Compute::of(base.dtype()) else {
        candle_core::bail!("task_merge computes in f32, f16 or bf16, not {:?}", base.dtype());
    };
    let base_c = cpu(base)?;
    let ms = models
        .iter()
        .map(|(t, _)| {
            if t.dims() != base.dims() {
                candle_core::bail!(
                    "task_merge: a model is {:?} but the base is {:?}",
                    t.dims(),
                    base.dims()
                );
            }
            if !t.dtype().is_float() {
                candle_core::bail!("task_merge: a model is {:?}", t.dtype());
            }
            cpu(t)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let bg = base_c.storage_and_layout();
    let base_view = view_of(&bg)?;
    let guards: Vec<_> = ms.iter().map(|t| t.storage_and_layout()).collect();
    let vectors = guards
        .iter()
        .zip(models)
        .map(|(g, (t, p))| {
            Ok(Vector {
                view: view_of(g)?,
                same_dtype: t.dtype() == base.dtype(),
                weight: p.weight,
                sparsify: p.sparsify,
                rescale: p.rescale,
                k: p.k,
                p: p.p,
                seed: p.seed,
                stream: p.stream,
            })
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let out = task_merge_views(c, &base_view, &vectors, knobs, base.dims())?;
    drop(vectors);
    drop(guards);
    let _ = base_view;
    drop(bg);
    out.to_device(base.device())
}

/// `(Σ aᵢ², Σ bᵢ², Σ aᵢbᵢ)` of the f32 values, each product and sum in f64, in index order (the
/// same bits as three separate sequential reductions).
pub fn dot_norms(a: &Tensor, b: &Tensor) -> candle_core::Result<(f64, f64, f64)> {
    if a.elem_count() != b.elem_count() {
        candle_core::bail!("dot_norms: {:?} vs {:?}", a.dims(), b.dims());
    }
    let (ac, bc) = (cpu(a)?, cpu(b)?);
    let (ga, gb) = (ac.storage_and_layout(), bc.storage_and_layout());
    let (va, vb) = (view_of(&ga)?, view_of(&gb)?);
    let n = va.len();
    let (mut xa, mut xb) = (vec![0f32; CHUNK.min(n)], vec![0f32; CHUNK.min(n)]);
    let (mut aa, mut bb, mut ab) = (0f64, 0f64, 0f64);
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        va.read_f32(start, &mut xa[..len]);
        vb.read_f32(start, &mut xb[..len]);
        for (&x, &y) in xa[..len].iter().zip(&xb[..len]) {
            let (x, y) = (x as f64, y as f64);
            aa += x * x;
            bb += y * y;
            ab += x * y;
        }
        start += len;
    }
    Ok((aa, bb, ab))
}

/// `Σᵢ (f32(wᵢ)·xᵢ + 0)` in f32, left to right, each product rounded before its add (no FMA; the
/// `+ 0` is candle's affine, which turns −0 into +0), written as `dtype`.
pub fn lincomb(tensors: &[&Tensor], weights: &[f64], dtype: DType) -> candle_core::Result<Tensor> {
    if tensors.is_empty() || tensors.len() != weights.len() {
        candle_core::bail!("lincomb: {} tensors, {} weights", tensors.len(), weights.len());
    }
    let shape = tensors[0].dims().to_vec();
    if tensors.iter().any(|t| t.dims() != shape.as_slice()) {
        candle_core::bail!("lincomb: shapes differ");
    }
    let Some(c) = Compute::of(dtype) else {
        candle_core::bail!("lincomb writes f32, f16 or bf16, not {dtype:?}");
    };
    let cs = tensors
        .iter()
        .map(|t| cpu(t))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = cs.iter().map(|t| t.storage_and_layout()).collect();
    let views = guards
        .iter()
        .map(view_of)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let w: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    let n = views[0].len();
    let body = |_ci: usize, start: usize, len: usize, bufs: &mut Bufs| {
        let Bufs { x, acc, .. } = bufs;
        let acc = &mut acc[..len];
        for (i, v) in views.iter().enumerate() {
            let xs = &mut x[0][..len];
            v.read_f32(start, xs);
            if i == 0 {
                acc.iter_mut()
                    .zip(xs.iter())
                    .for_each(|(a, x)| *a = w[0] * *x + 0.0);
            } else {
                acc.iter_mut()
                    .zip(xs.iter())
                    .for_each(|(a, x)| *a += w[i] * *x + 0.0);
            }
        }
    };
    let dev = Device::Cpu;
    let out = match c {
        Compute::F32 => Tensor::from_vec(
            write_out(n, 0f32, |a, o| o.copy_from_slice(a), body, 1),
            shape,
            &dev,
        ),
        Compute::F16 => Tensor::from_vec(
            write_out(n, f16::ZERO, |a, o| o.convert_from_f32_slice(a), body, 1),
            shape,
            &dev,
        ),
        Compute::BF16 => Tensor::from_vec(
            write_out(n, bf16::ZERO, |a, o| o.convert_from_f32_slice(a), body, 1),
            shape,
            &dev,
        ),
    }?;
    drop(views);
    drop(guards);
    out.to_device(tensors[0].device())
}

/// Implementation over borrowed views (see [`task_merge`]).
pub fn task_merge_views(
    c: Compute,
    base: &FloatSlice<'_>,
    vectors: &[Vector<'_>],
    knobs: &Knobs,
    shape: &[usize],
) -> candle_core::Result<Tensor> {
    let n = base.len();
    let m = vectors.len();
    if m == 0 {
        candle_core::bail!("task_merge needs at least one task vector");
    }
    // 1. Masks.
    let masks: Vec<Mask> = vectors
        .iter()
        .map(|v| -> candle_core::Result<Mask> {
            Ok(match v.sparsify {
                sparsify_code::NONE => Mask::All,
                sparsify_code::TOPK => topk_mask(c, base, v, n),
                sparsify_code::BERNOULLI => Mask::Bernoulli {
                    p: v.p,
                    seed: v.seed,
                    stream: v.stream,
                },
                other => candle_core::bail!("task_merge: unknown sparsify code {other}"),
            })
        })
        .collect::<candle_core::Result<_>>()?;
    // 2. L1 rescale factors: ‖δ‖₁ / ‖δ ⊙ M‖₁ (f64 sums per chunk, added in chunk order).
    let mut factors: Vec<Option<f32>> = vec![None; m];
    for (i, v) in vectors.iter().enumerate() {
        if v.rescale != rescale_code::L1 || v.sparsify == sparsify_code::NONE {
            continue;
        }
        let sums: Vec<(f64, f64)> = (0..chunks(n))
            .into_par_iter()
            .map_init(
                || Bufs::new(1),
                |bufs, ci| {
                    let start = ci * CHUNK;
                    let len = CHUNK.min(n - start);
                    base.read_f32(start, &mut bufs.base[..len]);
                    delta_into(c, v, start, len, bufs, 0);
                    let before: f64 = bufs.x[0][..len].iter().map(|x| (*x as f64).abs()).sum();
                    bufs.x[0].truncate(len);
                    apply_mask(&masks[i], c, ci, start, bufs, 0);
                    let after: f64 = bufs.x[0].iter().map(|x| (*x as f64).abs()).sum();
                    bufs.x[0].resize(CHUNK, 0.0);
                    (before, after)
                },
            )
            .collect();
        let before: f64 = sums.iter().map(|s| s.0).sum();
        let after: f64 = sums.iter().map(|s| s.1).sum();
        if !(before < 1e-7 || after < 1e-7) {
            factors[i] = Some((before / after) as f32);
        }
    }
    // 3. One pass: task vectors, consensus, combination, λ, base.
    let lambda = (knobs.lambda != 1.0).then_some(knobs.lambda as f32);
    let divisor = knobs.divisor as f32;
    let body = |ci: usize, start: usize, len: usize, bufs: &mut Bufs| {
        base.read_f32(start, &mut bufs.base[..len]);
        for (i, v) in vectors.iter().enumerate() {
            bufs.x[i].resize(CHUNK, 0.0);
            vector_chunk(c, v, &masks[i], factors[i], ci, start, len, bufs, i);
        }
        let Bufs {
            h16,
            hb16,
            base: b,
            x,
            acc,
            div,
            ..
        } = bufs;
        let acc = &mut acc[..len];
        // Σᵢ aᵢ in f32, left to right, rounded once.
        acc.copy_from_slice(&x[0][..len]);
        for xi in &x[1..m] {
            acc.iter_mut().zip(&xi[..len]).for_each(|(a, x)| *a += *x);
        }
        round(c, acc, h16, hb16);
        if knobs.consensus {
            let div = &mut div[..len];
            div.iter_mut().for_each(|d| *d = 0.0);
            for j in 0..len {
                let majority = if acc[j] >= 0.0 { 1.0f32 } else { -1.0 };
                let mut mixed = 0f32;
                let mut dv = 0f32;
                for (i, xi) in x[..m].iter().enumerate() {
                    let a = xi[j];
                    let sign = f32::from(a > 0.0) - f32::from(a < 0.0);
                    let agree = if sign == majority { 1.0f32 } else { 0.0 };
                    let kept = a * agree;
                    let wa = v_weight(vectors, i) * agree;
                    if i == 0 {
                        mixed = kept;
                        dv = wa;
                    } else {
                        mixed += kept;
                        dv += wa;
                    }
                }
                acc[j] = mixed;
                div[j] = dv;
            }
            round(c, acc, h16, hb16);
            if knobs.normalize {
                round(c, div, h16, hb16);
                div.iter_mut()
                    .for_each(|d| *d += if *d == 0.0 { 1.0 } else { 0.0 });
                round(c, div, h16, hb16);
                acc.iter_mut().zip(div.iter()).for_each(|(a, d)| *a /= *d);
                round(c, acc, h16, hb16);
            }
        } else if knobs.normalize {
            acc.iter_mut().for_each(|a| *a /= divisor);
            round(c, acc, h16, hb16);
        }
        if let Some(l) = lambda {
            acc.iter_mut().for_each(|a| *a = *a * l + 0.0);
            round(c, acc, h16, hb16);
        }
        acc.iter_mut().zip(&b[..len]).for_each(|(a, b)| *a += *b);
        round(c, acc, h16, hb16);
    };
    let dev = Device::Cpu;
    match c {
        Compute::F32 => {
            let out = write_out(n, 0f32, |a, o| o.copy_from_slice(a), body, m);
            Tensor::from_vec(out, shape, &dev)
        }
        Compute::F16 => {
            let out = write_out(n, f16::ZERO, |a, o| o.convert_from_f32_slice(a), body, m);
            Tensor::from_vec(out, shape, &dev)
        }
        Compute::BF16 => {
            let out = write_out(n, bf16::ZERO, |a, o| o.convert_from_f32_slice(a), body, m);
            Tensor::from_vec(out, shape, &dev)
        }
    }
}

fn v_weight(vectors: &[Vector<'_>], i: usize) -> f32 {
    vectors[i].weight as f32
}

//! Fused CPU kernels: single-pass loops over contiguous storage, parallel over chunks, so a
//! merge does not allocate one buffer per elementwise op (DESIGN.md, measured 1.7–2.2×).

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

/// Elements per parallel chunk: large enough to amortise scheduling, small enough for L2.
pub const CHUNK: usize = 1 << 16;

/// A contiguous CPU view of a tensor's elements, in one of the float types.
pub enum FloatSlice<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// bf16 elements.
    BF16(&'a [bf16]),
    /// f16 elements.
    F16(&'a [f16]),
    /// f64 elements.
    F64(&'a [f64]),
}

impl FloatSlice<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            FloatSlice::F32(s) => s.len(),
            FloatSlice::BF16(s) => s.len(),
            FloatSlice::F16(s) => s.len(),
            FloatSlice::F64(s) => s.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes elements `[start, start + out.len())` as f32 into `out`.
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            FloatSlice::F32(s) => out.copy_from_slice(&s[start..end]),
            FloatSlice::BF16(s) => s[start..end].convert_to_f32_slice(out),
            FloatSlice::F16(s) => s[start..end].convert_to_f32_slice(out),
            FloatSlice::F64(s) => {
                for (o, v) in out.iter_mut().zip(&s[start..end]) {
                    *o = *v as f32;
                }
            }
        }
    }
}

/// Runs `f` with a contiguous float view of `t` (CPU only), or returns `None` when `t` is not a
/// contiguous CPU float tensor.
pub fn with_float_slice<R>(t: &Tensor, f: impl FnOnce(FloatSlice<'_>) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(f(FloatSlice::F32(&v[start..end]))),
        Storage::Cpu(CpuStorage::BF16(v)) => Some(f(FloatSlice::BF16(&v[start..end]))),
        Storage::Cpu(CpuStorage::F16(v)) => Some(f(FloatSlice::F16(&v[start..end]))),
        Storage::Cpu(CpuStorage::F64(v)) => Some(f(FloatSlice::F64(&v[start..end]))),
        _ => None,
    }
}

/// Builds a CPU tensor of `dtype` from f32 values (round to nearest even for halves).
pub fn tensor_from_f32(values: Vec<f32>, shape: &[usize], dtype: DType) -> candle_core::Result<Tensor> {
    let dev = Device::Cpu;
    match dtype {
        DType::F32 => Tensor::from_vec(values, shape, &dev),
        DType::BF16 => {
            let mut out = vec![bf16::ZERO; values.len()];
            out.par_chunks_mut(CHUNK)
                .zip(values.par_chunks(CHUNK))
                .for_each(|(o, i)| o.convert_from_f32_slice(i));
            Tensor::from_vec(out, shape, &dev)
        }
        DType::F16 => {
            let mut out = vec![f16::ZERO; values.len()];
            out.par_chunks_mut(CHUNK)
                .zip(values.par_chunks(CHUNK))
                .for_each(|(o, i)| o.convert_from_f32_slice(i));
            Tensor::from_vec(out, shape, &dev)
        }
        other => Tensor::from_vec(values, shape, &dev)?.to_dtype(other),
    }
}

/// Fast dtype conversion for contiguous CPU float tensors; `None` when not applicable.
pub fn convert(t: &Tensor, dtype: DType) -> Option<candle_core::Result<Tensor>> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) || !t.device().is_cpu() {
        return None;
    }
    let shape = t.dims().to_vec();
    with_float_slice(t, |s| {
        let mut vals = vec![0f32; s.len()];
        vals.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, chunk)| s.read_f32(i * CHUNK, chunk));
        tensor_from_f32(vals, &shape, dtype)
    })
}

/// `(Σᵢ f32(wᵢ)·xᵢ) / f32(divisor)` over contiguous CPU float tensors, each product rounded in
/// f32 before the add, added left to right. `None` when some input is not a contiguous CPU float.
pub fn weighted_sum(
    tensors: &[&Tensor],
    weights: &[f64],
    divisor: f64,
    dtype: DType,
) -> Option<candle_core::Result<Tensor>> {
    let n = tensors.first()?.elem_count();
    let shape = tensors[0].dims().to_vec();
    if tensors.iter().any(|t| t.dims() != shape.as_slice()) {
        return Some(Err(candle_core::Error::Msg(format!(
            "weighted_sum: shapes differ ({:?})",
            tensors.iter().map(|t| t.dims().to_vec()).collect::<Vec<_>>()
        ))));
    }
    let w: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    let d = divisor as f32;
    // Borrow every input's storage once; bail out (None) if any is not a CPU float tensor.
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(tensors.len());
    for (storage, layout) in &guards {
        let (start, end) = layout.contiguous_offsets()?;
        views.push(match &**storage {
            Storage::Cpu(CpuStorage::F32(v)) => FloatSlice::F32(&v[start..end]),
            Storage::Cpu(CpuStorage::BF16(v)) => FloatSlice::BF16(&v[start..end]),
            Storage::Cpu(CpuStorage::F16(v)) => FloatSlice::F16(&v[start..end]),
            Storage::Cpu(CpuStorage::F64(v)) => FloatSlice::F64(&v[start..end]),
            _ => return None,
        });
    }
    // One chunk of the result in f32 (a per-chunk buffer, not a whole-tensor intermediate).
    let chunk = |ci: usize, acc: &mut [f32], buf: &mut [f32]| {
        let start = ci * CHUNK;
        for (k, view) in views.iter().enumerate() {
            let xs: &[f32] = match view {
                FloatSlice::F32(s) => &s[start..start + acc.len()],
                other => {
                    other.read_f32(start, &mut buf[..acc.len()]);
                    &buf[..acc.len()]
                }
            };
            if k == 0 {
                scale_into(acc, xs, w[0]);
            } else {
                fma_into(acc, xs, w[k]);
            }
        }
        if d != 1.0 {
            for a in acc.iter_mut() {
                *a /= d;
            }
        }
    };
    let dev = Device::Cpu;
    let result = match dtype {
        DType::F32 => {
            let mut out = vec![0f32; n];
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, acc)| {
                let mut buf = vec![0f32; acc.len()];
                chunk(ci, acc, &mut buf);
            });
            Tensor::from_vec(out, shape.as_slice(), &dev)
        }
        // Halves are written straight from the f32 chunk: no full-size f32 intermediate.
        DType::BF16 => {
            let mut out = vec![bf16::ZERO; n];
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, o)| {
                let (mut acc, mut buf) = (vec![0f32; o.len()], vec![0f32; o.len()]);
                chunk(ci, &mut acc, &mut buf);
                o.convert_from_f32_slice(&acc);
            });
            Tensor::from_vec(out, shape.as_slice(), &dev)
        }
        DType::F16 => {
            let mut out = vec![f16::ZERO; n];
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, o)| {
                let (mut acc, mut buf) = (vec![0f32; o.len()], vec![0f32; o.len()]);
                chunk(ci, &mut acc, &mut buf);
                o.convert_from_f32_slice(&acc);
            });
            Tensor::from_vec(out, shape.as_slice(), &dev)
        }
        other => {
            let mut out = vec![0f32; n];
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, acc)| {
                let mut buf = vec![0f32; acc.len()];
                chunk(ci, acc, &mut buf);
            });
            Tensor::from_vec(out, shape.as_slice(), &dev).and_then(|t| t.to_dtype(other))
        }
    };
    drop(views);
    drop(guards);
    Some(result)
}

fn scale_into(acc: &mut [f32], xs: &[f32], w: f32) {
    for (a, x) in acc.iter_mut().zip(xs) {
        *a = w * *x;
    }
}

/// `acc ← fma(w, x, acc)`: one rounding per step, as torch's CPU kernels do (measured against
/// mergekit's linear outputs: a separate multiply and add differs on ~20% of elements).
fn fma_into(acc: &mut [f32], xs: &[f32], w: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports FMA (checked above).
            unsafe { fma_into_hw(acc, xs, w) };
            return;
        }
    }
    // Without hardware FMA, `mul_add` is a correctly rounded software fma: same bits, slower.
    for (a, x) in acc.iter_mut().zip(xs) {
        *a = w.mul_add(*x, *a);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
unsafe fn fma_into_hw(acc: &mut [f32], xs: &[f32], w: f32) {
    for (a, x) in acc.iter_mut().zip(xs) {
        *a = w.mul_add(*x, *a);
    }
}

/// Uniform in [0, 1) from a counter: SplitMix64 of (seed, stream, index). Independent of
/// thread count and of the order in which tensors are processed.
pub fn uniform(seed: u64, stream: u64, index: u64) -> f64 {
    let mut z = seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A 0/1 f32 mask of `n` elements with keep-probability `p`.
pub fn bernoulli(n: usize, p: f64, seed: u64, stream: u64) -> Vec<f32> {
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, chunk)| {
        let base = (ci * CHUNK) as u64;
        for (j, o) in chunk.iter_mut().enumerate() {
            *o = if uniform(seed, stream, base + j as u64) < p {
                1.0
            } else {
                0.0
            };
        }
    });
    out
}

/// A 0/1 f32 mask with keep-probability `probs[i]` for element i, drawn from the same
/// `(seed, stream, index)` counter as [`bernoulli`] (so a constant `p` gives the same mask).
pub fn bernoulli_probs(probs: &[f32], seed: u64, stream: u64) -> Vec<f32> {
    let mut out = vec![0f32; probs.len()];
    out.par_chunks_mut(CHUNK)
        .zip(probs.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(ci, (chunk, ps))| {
            let base = (ci * CHUNK) as u64;
            for (j, (o, &p)) in chunk.iter_mut().zip(ps).enumerate() {
                *o = if uniform(seed, stream, base + j as u64) < p as f64 {
                    1.0
                } else {
                    0.0
                };
            }
        });
    out
}

/// The 1-based ascending rank of |x| within each row of `row` consecutive elements; equal
/// magnitudes are ranked in index order. Rows are sorted independently (in parallel).
pub fn abs_rank_rows(values: &[f32], row: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    if row == 0 {
        return out;
    }
    out.par_chunks_mut(row)
        .zip(values.par_chunks(row))
        .for_each(|(ranks, v)| {
            let mut order: Vec<usize> = (0..v.len()).collect();
            order.sort_unstable_by(|&a, &b| v[a].abs().total_cmp(&v[b].abs()).then(a.cmp(&b)));
            for (r, &i) in order.iter().enumerate() {
                ranks[i] = (r + 1) as f32;
            }
        });
    out
}

/// The k-th largest |x| (1-based), by `select_nth_unstable` (O(n)).
pub fn abs_kth_largest(values: &[f32], k: usize) -> Option<f32> {
    if k == 0 || k > values.len() {
        return None;
    }
    let mut mags: Vec<f32> = values.iter().map(|v| v.abs()).collect();
    let idx = mags.len() - k;
    let (_, kth, _) = mags.select_nth_unstable_by(idx, |a, b| a.total_cmp(b));
    Some(*kth)
}

/// 0/1 mask keeping exactly the k largest |x|; elements tied at the threshold are kept in index
/// order until k are kept.
pub fn topk_abs_mask(values: &[f32], k: usize) -> Vec<f32> {
    let mut mask = vec![0f32; values.len()];
    let Some(thr) = abs_kth_largest(values, k) else {
        if k >= values.len() {
            mask.iter_mut().for_each(|m| *m = 1.0);
        }
        return mask;
    };
    let above = values.iter().filter(|v| v.abs() > thr).count();
    let mut ties_left = k - above;
    for (m, v) in mask.iter_mut().zip(values) {
        let a = v.abs();
        if a > thr {
            *m = 1.0;
        } else if a == thr && ties_left > 0 {
            *m = 1.0;
            ties_left -= 1;
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_keeps_exactly_k_with_ties_in_index_order() {
        let v = [0.5, -2.0, 1.0, -1.0, 1.0, 0.1];
        assert_eq!(topk_abs_mask(&v, 3), vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(abs_kth_largest(&v, 1), Some(2.0));
        assert_eq!(topk_abs_mask(&v, 6), vec![1.0; 6]);
    }

    #[test]
    fn abs_ranks_are_per_row_ascending_with_ties_in_index_order() {
        let v = [0.5, -2.0, 1.0, -1.0, 3.0, 0.0];
        assert_eq!(abs_rank_rows(&v, 3), vec![1.0, 3.0, 2.0, 2.0, 3.0, 1.0]);
        assert_eq!(abs_rank_rows(&[1.0, -1.0, 0.5], 3), vec![2.0, 3.0, 1.0]);
    }

    #[test]
    fn bernoulli_probs_with_a_constant_matches_bernoulli() {
        let p = vec![0.25f32; 50_000];
        assert_eq!(bernoulli_probs(&p, 42, 3), bernoulli(50_000, 0.25, 42, 3));
        let ramp: Vec<f32> = (0..100_000).map(|i| if i % 2 == 0 { 0.1 } else { 0.9 }).collect();
        let m = bernoulli_probs(&ramp, 7, 0);
        let even = m.iter().step_by(2).sum::<f32>() / 50_000.0;
        let odd = m.iter().skip(1).step_by(2).sum::<f32>() / 50_000.0;
        assert!(
            (even - 0.1).abs() < 0.01 && (odd - 0.9).abs() < 0.01,
            "{even} {odd}"
        );
        assert_eq!(
            bernoulli_probs(&[0.0, 1.0, -1.0, 2.0], 1, 1),
            vec![0.0, 1.0, 0.0, 1.0]
        );
    }

    #[test]
    fn bernoulli_mask_is_reproducible_and_near_p() {
        let a = bernoulli(100_000, 0.3, 42, 7);
        let b = bernoulli(100_000, 0.3, 42, 7);
        assert_eq!(a, b);
        let kept = a.iter().sum::<f32>() / a.len() as f32;
        assert!((kept - 0.3).abs() < 0.01, "kept {kept}");
        assert_ne!(a, bernoulli(100_000, 0.3, 42, 8));
    }
}

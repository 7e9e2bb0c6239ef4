//! Byte-level helpers: typed views of stored bytes, fast dtype conversion, tensor bytes.
//!
//! bf16/f16 <-> f32 go through the `half` crate's slice conversions (SIMD where the CPU has it,
//! 8-11x faster than candle's scalar `to_dtype`), split across rayon for large tensors. Both
//! round to nearest, ties to even, like `torch.Tensor.to`. Values wider than f32 go to half types
//! through f32, as torch does (its `Half`/`BFloat16` constructors take a `float`).

use std::borrow::Cow;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

// Stored bytes are little-endian; viewing them in place is only right on a little-endian host.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "modelglue checkpoint I/O assumes a little-endian host"
);

/// Element types whose every bit pattern is a valid value and that have no padding.
///
/// # Safety
/// Implement only for such plain-old-data types.
unsafe trait Plain: Copy + Send + Sync + 'static {}
// SAFETY: primitive numbers and `half`'s `repr(transparent)` u16 wrappers.
unsafe impl Plain for f32 {}
// SAFETY: as above.
unsafe impl Plain for f64 {}
// SAFETY: as above.
unsafe impl Plain for bf16 {}
// SAFETY: as above.
unsafe impl Plain for f16 {}

/// Views stored little-endian bytes as `T`, in place when aligned, copied otherwise.
fn typed<T: Plain>(bytes: &[u8]) -> Cow<'_, [T]> {
    // SAFETY: `T: Plain`, so any bytes are valid `T`s; `align_to` handles alignment.
    let (head, body, tail) = unsafe { bytes.align_to::<T>() };
    if head.is_empty() && tail.is_empty() {
        return Cow::Borrowed(body);
    }
    let n = bytes.len() / std::mem::size_of::<T>();
    let mut out: Vec<T> = Vec::with_capacity(n);
    // SAFETY: `out` has room for `n` elements = the bytes copied; `T: Plain` makes them valid;
    // the copy goes through `u8` pointers so alignment does not matter.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            out.as_mut_ptr().cast::<u8>(),
            n * std::mem::size_of::<T>(),
        );
        out.set_len(n);
    }
    Cow::Owned(out)
}

/// Below this many elements a conversion runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 18;
const CHUNK: usize = 1 << 16;

fn par_convert<S: Sync, D: Send>(src: &[S], dst: &mut [D], f: impl Fn(&[S], &mut [D]) + Sync) {
    if src.len() < PARALLEL_MIN {
        f(src, dst);
    } else {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| f(s, d));
    }
}

fn to_f32<T: Plain + HalfPrecision>(bytes: &[u8]) -> Vec<f32> {
    let src = typed::<T>(bytes);
    let mut dst = vec![0f32; src.len()];
    par_convert(&src, &mut dst, |s, d| T::to_f32s(s, d));
    dst
}

fn from_f32<T: Plain + HalfPrecision>(src: &[f32]) -> Vec<T> {
    let mut dst = vec![T::ZERO; src.len()];
    par_convert(src, &mut dst, |s, d| T::from_f32s(s, d));
    dst
}

/// The two 16-bit float types, for generic slice conversion.
trait HalfPrecision: Sized {
    const ZERO: Self;
    fn to_f32s(src: &[Self], dst: &mut [f32]);
    fn from_f32s(src: &[f32], dst: &mut [Self]);
    fn to_f64s(src: &[Self], dst: &mut [f64]);
}

impl HalfPrecision for bf16 {
    const ZERO: Self = bf16::ZERO;
    fn to_f32s(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn from_f32s(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
    fn to_f64s(src: &[Self], dst: &mut [f64]) {
        src.convert_to_f64_slice(dst);
    }
}

impl HalfPrecision for f16 {
    const ZERO: Self = f16::ZERO;
    fn to_f32s(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn from_f32s(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
    fn to_f64s(src: &[Self], dst: &mut [f64]) {
        src.convert_to_f64_slice(dst);
    }
}

fn to_f64<T: Plain + HalfPrecision>(bytes: &[u8]) -> Vec<f64> {
    let src = typed::<T>(bytes);
    let mut dst = vec![0f64; src.len()];
    par_convert(&src, &mut dst, |s, d| T::to_f64s(s, d));
    dst
}

fn f64_to_f32(bytes: &[u8]) -> Vec<f32> {
    typed::<f64>(bytes).iter().map(|&x| x as f32).collect()
}

/// Converts stored bytes of `from` into a CPU tensor of `to`, for the float pairs handled here;
/// `None` for other pairs (the caller falls back to candle's `to_dtype`).
pub(crate) fn convert_bytes(
    bytes: &[u8],
    from: DType,
    to: DType,
    shape: &[usize],
) -> Option<candle_core::Result<Tensor>> {
    let cpu = &Device::Cpu;
    let tensor = match (from, to) {
        (DType::BF16, DType::F32) => Tensor::from_vec(to_f32::<bf16>(bytes), shape, cpu),
        (DType::F16, DType::F32) => Tensor::from_vec(to_f32::<f16>(bytes), shape, cpu),
        (DType::BF16, DType::F64) => Tensor::from_vec(to_f64::<bf16>(bytes), shape, cpu),
        (DType::F16, DType::F64) => Tensor::from_vec(to_f64::<f16>(bytes), shape, cpu),
        (DType::F32, DType::BF16) => Tensor::from_vec(from_f32::<bf16>(&typed(bytes)), shape, cpu),
        (DType::F32, DType::F16) => Tensor::from_vec(from_f32::<f16>(&typed(bytes)), shape, cpu),
        (DType::BF16, DType::F16) => Tensor::from_vec(from_f32::<f16>(&to_f32::<bf16>(bytes)), shape, cpu),
        (DType::F16, DType::BF16) => Tensor::from_vec(from_f32::<bf16>(&to_f32::<f16>(bytes)), shape, cpu),
        (DType::F64, DType::F32) => Tensor::from_vec(f64_to_f32(bytes), shape, cpu),
        (DType::F64, DType::BF16) => Tensor::from_vec(from_f32::<bf16>(&f64_to_f32(bytes)), shape, cpu),
        (DType::F64, DType::F16) => Tensor::from_vec(from_f32::<f16>(&f64_to_f32(bytes)), shape, cpu),
        (DType::F32, DType::F64) => {
            let v: Vec<f64> = typed::<f32>(bytes).iter().map(|&x| f64::from(x)).collect();
            Tensor::from_vec(v, shape, cpu)
        }
        _ => return None,
    };
    Some(tensor)
}

/// Views a slice of plain numbers as its bytes.
///
/// # Safety
/// `T` must have no padding (true of every element type of `CpuStorage`).
unsafe fn as_bytes<T>(s: &[T]) -> &[u8] {
    // SAFETY: the caller guarantees no padding; the length is the slice's size in bytes.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// Runs `f` on the contiguous little-endian bytes of `tensor`, moving it to the CPU and making it
/// contiguous first if needed (otherwise without copying).
pub(crate) fn with_tensor_bytes<R>(tensor: &Tensor, f: impl FnOnce(&[u8]) -> R) -> candle_core::Result<R> {
    let tensor = tensor.to_device(&Device::Cpu)?.contiguous()?;
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::Msg(
            "tensor is not on the CPU after to_device(Cpu)".into(),
        ));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(candle_core::Error::Msg(
            "tensor is not contiguous after contiguous()".into(),
        ));
    };
    // SAFETY (every arm): `CpuStorage` holds primitive numbers or `repr(transparent)` wrappers of
    // them, none with padding.
    let bytes: &[u8] = unsafe {
        match cpu {
            CpuStorage::U8(v) => &v[start..end],
            CpuStorage::U32(v) => as_bytes(&v[start..end]),
            CpuStorage::I16(v) => as_bytes(&v[start..end]),
            CpuStorage::I32(v) => as_bytes(&v[start..end]),
            CpuStorage::I64(v) => as_bytes(&v[start..end]),
            CpuStorage::BF16(v) => as_bytes(&v[start..end]),
            CpuStorage::F16(v) => as_bytes(&v[start..end]),
            CpuStorage::F32(v) => as_bytes(&v[start..end]),
            CpuStorage::F64(v) => as_bytes(&v[start..end]),
            CpuStorage::F8E4M3(v) => as_bytes(&v[start..end]),
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "dtype {:?} cannot be written to safetensors",
                    tensor.dtype()
                )))
            }
        }
    };
    Ok(f(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Round to nearest even from f32 to bf16, written out as torch's `round_to_nearest_even`
    /// (c10/util/BFloat16.h) does for finite values.
    fn torch_bf16_bits(x: f32) -> u16 {
        let bits = x.to_bits();
        let rounding_bias = 0x7fff + ((bits >> 16) & 1);
        ((bits + rounding_bias) >> 16) as u16
    }

    #[test]
    fn f32_to_bf16_matches_torch_rounding_on_ties_and_edges() {
        let mut values: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            f32::from_bits(0x3f80_8000), // exact tie, even below: rounds down
            f32::from_bits(0x3f81_8000), // exact tie, odd below: rounds up
            f32::from_bits(0x3f80_8001),
            f32::from_bits(0x3f80_7fff),
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1), // smallest subnormal
            -3.3e-3,
            65504.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        // Enough values to take the parallel path too.
        values.extend(
            (0..PARALLEL_MIN as u32 + 7).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761) & 0x7f7f_ffff)),
        );
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = convert_bytes(&bytes, DType::F32, DType::BF16, &[values.len()])
            .expect("handled pair")
            .expect("converts");
        let got: Vec<bf16> = t.to_vec1().expect("bf16 vec");
        for (x, g) in values.iter().zip(&got) {
            let want = if x.is_infinite() {
                (x.to_bits() >> 16) as u16
            } else {
                torch_bf16_bits(*x)
            };
            assert_eq!(g.to_bits(), want, "x = {x:e} ({:#010x})", x.to_bits());
        }
    }

    #[test]
    fn bf16_to_f32_is_a_shift() {
        let bits: Vec<u16> = (0..=u16::MAX).filter(|b| (b & 0x7f80) != 0x7f80).collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let t = convert_bytes(&bytes, DType::BF16, DType::F32, &[bits.len()])
            .expect("handled pair")
            .expect("converts");
        let got: Vec<f32> = t.to_vec1().expect("f32 vec");
        for (b, g) in bits.iter().zip(&got) {
            assert_eq!(g.to_bits(), u32::from(*b) << 16);
        }
    }

    #[test]
    fn f32_to_f16_rounds_to_nearest_even() {
        // 1 + 2^-11 is exactly halfway between 1 and the next f16: ties to even (1.0);
        // 1 + 3·2^-11 is halfway between two neighbours whose upper is even.
        let values = [1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 70000.0, 6.0e-8];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = convert_bytes(&bytes, DType::F32, DType::F16, &[4])
            .expect("handled pair")
            .expect("converts");
        let got: Vec<u16> = t
            .to_vec1::<f16>()
            .expect("f16")
            .iter()
            .map(|h| h.to_bits())
            .collect();
        assert_eq!(got, [0x3c00, 0x3c02, 0x7c00, 0x0001]);
    }

    #[test]
    fn unaligned_bytes_are_copied_not_misread() {
        let mut buf = vec![0u8; 1];
        buf.extend_from_slice(&1.5f32.to_le_bytes());
        buf.extend_from_slice(&(-2.0f32).to_le_bytes());
        let v = typed::<f32>(&buf[1..]);
        assert_eq!(&*v, &[1.5, -2.0]);
    }

    #[test]
    fn tensor_bytes_of_a_strided_view_are_contiguous() {
        let t = Tensor::arange(0u32, 6, &Device::Cpu)
            .and_then(|t| t.reshape((2, 3)))
            .and_then(|t| t.t())
            .expect("tensor");
        let bytes = with_tensor_bytes(&t, <[u8]>::to_vec).expect("bytes");
        let words: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(words, [0, 3, 1, 4, 2, 5]);
    }
}

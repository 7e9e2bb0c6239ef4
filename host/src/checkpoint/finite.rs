//! Finding NaN and infinite values in stored or loaded tensors, by their bit patterns.
//!
//! A value is non-finite exactly when all its exponent bits are set, so the scan is one mask and
//! compare per element on the raw little-endian bytes (vectorised by the compiler; a few GB/s per
//! core). Only when something is found is the slower pass run that tells NaN from Inf and finds
//! the first index.

use std::fmt;

use candle_core::{DType, Tensor};

use super::convert::with_tensor_bytes;

/// The NaN and infinite values of one tensor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NonFinite {
    /// Number of NaN values.
    pub nan: usize,
    /// Number of +Inf or -Inf values.
    pub inf: usize,
    /// Flat (row-major) index of the first non-finite value.
    pub first: Option<usize>,
}

impl NonFinite {
    /// Whether every value is finite.
    pub fn is_none(&self) -> bool {
        self.nan == 0 && self.inf == 0
    }
}

impl fmt::Display for NonFinite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.nan, self.inf) {
            (0, 0) => f.write_str("no NaN or Inf values")?,
            (n, 0) => write!(f, "{n} NaN value{}", plural(n))?,
            (0, i) => write!(f, "{i} infinite value{}", plural(i))?,
            (n, i) => write!(f, "{n} NaN and {i} infinite value{}", plural(i))?,
        }
        if let Some(i) = self.first {
            write!(f, " (the first at flat index {i})")?;
        }
        Ok(())
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Exponent mask and mantissa mask of a float dtype's little-endian bit pattern, and its width.
fn masks(dtype: DType) -> Option<(u64, u64, usize)> {
    Some(match dtype {
        DType::F64 => (0x7ff0_0000_0000_0000, 0x000f_ffff_ffff_ffff, 8),
        DType::F32 => (0x7f80_0000, 0x007f_ffff, 4),
        DType::F16 => (0x7c00, 0x03ff, 2),
        DType::BF16 => (0x7f80, 0x007f, 2),
        // E4M3FN has no infinities; S.1111.111 is its only NaN (mantissa test below: all ones).
        DType::F8E4M3 => (0x7f, 0, 1),
        _ => return None,
    })
}

fn words(bytes: &[u8], width: usize) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks_exact(width).map(move |c| match width {
        8 => u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
        4 => u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        2 => u64::from(u16::from_le_bytes([c[0], c[1]])),
        _ => u64::from(c[0]),
    })
}

/// Counts the NaN and infinite values in `bytes`, the stored little-endian data of a tensor of
/// `dtype`. Integer and packed sub-byte dtypes cannot hold either and give an empty result.
pub fn scan_bytes(bytes: &[u8], dtype: DType) -> NonFinite {
    let Some((exp, mantissa, width)) = masks(dtype) else {
        return NonFinite::default();
    };
    let bad = match width {
        // Typed loops so each width vectorises on its own.
        4 => bytes
            .chunks_exact(4)
            .filter(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & exp as u32 == exp as u32)
            .count(),
        2 => bytes
            .chunks_exact(2)
            .filter(|c| u16::from_le_bytes([c[0], c[1]]) & exp as u16 == exp as u16)
            .count(),
        _ => words(bytes, width).filter(|w| w & exp == exp).count(),
    };
    if bad == 0 {
        return NonFinite::default();
    }
    let mut out = NonFinite::default();
    for (i, w) in words(bytes, width).enumerate() {
        if w & exp != exp {
            continue;
        }
        out.first.get_or_insert(i);
        // E4M3FN: the all-ones pattern is NaN; with mantissa mask 0 every hit is a NaN.
        if mantissa == 0 || w & mantissa != 0 {
            out.nan += 1;
        } else {
            out.inf += 1;
        }
    }
    out
}

/// [`scan_bytes`] of a tensor (moved to the CPU and made contiguous first if needed).
pub fn scan_tensor(tensor: &Tensor) -> candle_core::Result<NonFinite> {
    let dtype = tensor.dtype();
    if masks(dtype).is_none() {
        return Ok(NonFinite::default());
    }
    with_tensor_bytes(tensor, |bytes| scan_bytes(bytes, dtype))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use half::{bf16, f16};

    #[test]
    fn every_float_dtype_tells_nan_from_inf_and_finds_the_first() {
        let values = [
            1.0f32,
            f32::NAN,
            -0.0,
            f32::INFINITY,
            f32::MAX,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        let t = Tensor::new(&values[..], &Device::Cpu).expect("tensor");
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            // f32::MAX rounds up to Inf in both 16-bit types, so they have one infinity more.
            let extra = usize::from(matches!(dtype, DType::F16 | DType::BF16));
            let found = scan_tensor(&t.to_dtype(dtype).expect("convert")).expect("scan");
            assert_eq!(
                found,
                NonFinite {
                    nan: 2,
                    inf: 2 + extra,
                    first: Some(1)
                },
                "{dtype:?}"
            );
        }
    }

    #[test]
    fn finite_extremes_and_integers_are_clean() {
        let f = [f32::MAX, f32::MIN, f32::MIN_POSITIVE, 1e-45, 0.0];
        let bytes: Vec<u8> = f.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert!(scan_bytes(&bytes, DType::F32).is_none());
        let h: Vec<u8> = [f16::MAX, f16::MIN]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert!(scan_bytes(&h, DType::F16).is_none());
        let b: Vec<u8> = [bf16::MAX, bf16::MIN]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert!(scan_bytes(&b, DType::BF16).is_none());
        assert!(scan_bytes(&[0xff; 16], DType::U8).is_none());
        assert!(scan_bytes(&[0xff; 16], DType::I64).is_none());
        assert_eq!(scan_bytes(&[0x7f, 0x7e, 0xff], DType::F8E4M3).nan, 2);
    }

    #[test]
    fn message_counts_and_locates() {
        let n = NonFinite {
            nan: 3,
            inf: 1,
            first: Some(17),
        };
        assert_eq!(
            n.to_string(),
            "3 NaN and 1 infinite value (the first at flat index 17)"
        );
    }
}

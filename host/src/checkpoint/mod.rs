//! Checkpoint I/O: Hugging Face model directories in, Hugging Face model directories out.
//!
//! [`Checkpoint`] opens a directory (`config.json` plus `model.safetensors` or an index and its
//! shards), memory-maps the weights and validates every header up front, so reading a tensor
//! later cannot fail on layout. [`CheckpointWriter`] plans an output checkpoint, lets many threads
//! write its tensors in any order, and renames it into place only when complete.
//!
//! ```no_run
//! use modelglue::checkpoint::{Checkpoint, CheckpointWriter, DType, OutTensor};
//! # fn main() -> Result<(), modelglue::checkpoint::CheckpointError> {
//! let base = Checkpoint::open("zoo/base".as_ref())?;
//! let plan: Vec<OutTensor> = base
//!     .tensor_names()
//!     .into_iter()
//!     .filter_map(|n| base.info(&n).cloned())
//!     .map(|i| OutTensor { name: i.name, dtype: DType::BF16, shape: i.shape })
//!     .collect();
//! let out = CheckpointWriter::create("out/merged".as_ref(), &plan, 5 << 30, false)?;
//! for t in &plan {
//!     out.write_tensor(&t.name, &base.load_as(&t.name, DType::BF16)?)?;
//! }
//! out.copy_file(&base.dir().join("config.json"), "config.json")?;
//! out.finish()?;
//! # Ok(())
//! # }
//! ```

mod convert;
mod error;
mod finite;
pub mod gguf;
mod header;
mod read;
mod write;

use std::path::{Path, PathBuf};

pub use candle_core::DType;
pub use error::CheckpointError;
pub use finite::{scan_bytes, scan_tensor, NonFinite};
pub use read::Checkpoint;
pub use write::{CheckpointWriter, OutTensor};

/// Where a tensor of an opened [`Checkpoint`] lives and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `model.embed_tokens.weight`.
    pub name: String,
    /// Stored dtype.
    pub dtype: DType,
    /// Shape, row-major.
    pub shape: Vec<usize>,
    /// The safetensors file holding it.
    pub file: PathBuf,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the stored data in bytes.
    pub fn byte_len(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }
}

/// Validates the safetensors image `bytes` (a whole file, as if read from `path`) exactly as
/// [`Checkpoint::open`] validates each weight file, then decodes every tensor to its stored dtype
/// and, for float types, to f32 as [`Checkpoint::load_as`] would. Returns the tensors in offset
/// order.
///
/// The bytes-level entry point of the `safetensors` fuzz target (`fuzz/`): it exercises the same
/// parser and decoders as a real open and load without a file system.
#[doc(hidden)]
pub fn check_safetensors_bytes(bytes: &[u8], path: &Path) -> Result<Vec<TensorInfo>, CheckpointError> {
    let header = header::parse_header(bytes, path)?;
    let mut infos = Vec::with_capacity(header.entries.len());
    for e in header.entries {
        // parse_header checked end <= data section <= bytes.len(), so these fit usize.
        let data = &bytes[(header.data_start + e.start) as usize..(header.data_start + e.end) as usize];
        let candle = |source| CheckpointError::Candle {
            tensor: e.name.clone(),
            source,
        };
        candle_core::Tensor::from_raw_buffer(data, e.dtype, &e.shape, &candle_core::Device::Cpu)
            .map_err(candle)?;
        if let Some(t) = convert::convert_bytes(data, e.dtype, DType::F32, &e.shape) {
            t.map_err(candle)?;
        }
        infos.push(TensorInfo {
            name: e.name,
            dtype: e.dtype,
            shape: e.shape,
            file: path.to_path_buf(),
        });
    }
    Ok(infos)
}

/// The Hugging Face / PyTorch name of a dtype, as in `config.json`'s `torch_dtype`:
/// `"float32"`, `"bfloat16"`, `"float16"`, `"float64"`, `"int64"`, `"uint8"`, ...
pub fn dtype_name(dt: DType) -> &'static str {
    match dt {
        DType::U8 => "uint8",
        DType::U32 => "uint32",
        DType::I16 => "int16",
        DType::I32 => "int32",
        DType::I64 => "int64",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F32 => "float32",
        DType::F64 => "float64",
        DType::F8E4M3 => "float8_e4m3fn",
        DType::F6E2M3 => "float6_e2m3fn",
        DType::F6E3M2 => "float6_e3m2fn",
        DType::F4 => "float4_e2m1fn_x2",
        DType::F8E8M0 => "float8_e8m0fnu",
        // `DType` is non-exhaustive; a future variant has no agreed name yet.
        _ => "unknown",
    }
}

/// Parses a dtype name as written in configs and on command lines, case-insensitively and with an
/// optional `torch.` prefix: `float32`/`fp32`/`f32`/`float`, `bfloat16`/`bf16`,
/// `float16`/`fp16`/`f16`/`half`, `float64`/`fp64`/`f64`/`double`, and the integer names
/// (`int64`/`i64`, `int32`, `int16`, `uint32`, `uint8`/`u8`). `None` for anything else.
pub fn parse_dtype(name: &str) -> Option<DType> {
    let lower = name.trim().to_ascii_lowercase();
    let bare = lower.strip_prefix("torch.").unwrap_or(&lower);
    Some(match bare {
        "float32" | "fp32" | "f32" | "float" => DType::F32,
        "bfloat16" | "bf16" => DType::BF16,
        "float16" | "fp16" | "f16" | "half" => DType::F16,
        "float64" | "fp64" | "f64" | "double" => DType::F64,
        "int64" | "i64" | "long" => DType::I64,
        "int32" | "i32" | "int" => DType::I32,
        "int16" | "i16" | "short" => DType::I16,
        "uint32" | "u32" => DType::U32,
        "uint8" | "u8" => DType::U8,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_round_trip() {
        for dt in [
            DType::F32,
            DType::BF16,
            DType::F16,
            DType::F64,
            DType::I64,
            DType::I32,
            DType::I16,
            DType::U32,
            DType::U8,
        ] {
            assert_eq!(parse_dtype(dtype_name(dt)), Some(dt));
        }
    }

    #[test]
    fn parse_dtype_accepts_the_usual_spellings() {
        for (s, dt) in [
            ("fp32", DType::F32),
            ("F32", DType::F32),
            ("bf16", DType::BF16),
            ("torch.bfloat16", DType::BF16),
            ("fp16", DType::F16),
            ("f16", DType::F16),
            ("float64", DType::F64),
        ] {
            assert_eq!(parse_dtype(s), Some(dt), "{s}");
        }
        assert_eq!(parse_dtype("q4_k"), None);
    }
}

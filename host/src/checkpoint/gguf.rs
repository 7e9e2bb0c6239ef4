//! GGUF → Hugging Face conversion.
//!
//! The real test models ship as llama.cpp GGUF files (see `shared/reference/MODELS.md`);
//! [`convert_gguf`] turns one into a Hugging Face directory that transformers, the `tokenizers`
//! crate and the rest of modelglue read: `config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json` and `generation_config.json`.
//!
//! What the conversion undoes, relative to llama.cpp's `convert_hf_to_gguf.py`:
//!
//! - **Q/K row permutation (llama only).** llama.cpp reorders the rows of each attention head of
//!   `q_proj`/`k_proj` so that the two halves of a RoPE pair sit next to each other (GPT-J
//!   interleaved layout); Hugging Face rotates row `j` with row `j + head_dim/2` (NeoX layout).
//!   qwen2 and gemma3 are stored in NeoX layout and are not permuted.
//! - **Gemma's `1 +` norm weights.** Gemma's RMSNorm multiplies by `1 + w`; llama.cpp stores
//!   `1 + w`, Hugging Face stores `w`.
//! - **Quantisation.** Every tensor is dequantised with candle and written as f32, bf16 or f16;
//!   the 4–8-bit rounding noise of the GGUF stays in the weights.
//! - **The tokenizer.** GGUF embeds the vocabulary; `tokenizer.json` is rebuilt from it as
//!   transformers' converters would write it: byte-level BPE with the pre-tokenizer that
//!   `tokenizer.ggml.pre` names (SmolLM2, Qwen2, Llama 3), or SentencePiece BPE with merges
//!   derived from the piece scores and byte fallback (Gemma, Llama 2).
//!
//! The file is validated before candle reads it (counts against the file size, value types,
//! tensor types, tensor extents), so a truncated or corrupt file is an error that names the file
//! and the key or tensor, never a panic or a huge allocation. The output directory is written
//! beside its target as `.<name>.mglue-partial-<pid>` and renamed into place only when complete.

mod arch;
mod header;
mod output;
mod tokenizer;

use std::collections::HashMap;
use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device};
use rayon::prelude::*;

use self::arch::{Arch, ModelSpec, PlannedTensor};

/// How [`convert_gguf`] writes its output.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertOptions {
    /// Element type of the written weights: [`DType::F32`] (default, exact dequantised values),
    /// [`DType::BF16`] or [`DType::F16`] (half the size, rounded to nearest even).
    pub dtype: DType,
    /// Replace an existing output directory. Without it an existing target is an error and is
    /// left untouched.
    pub overwrite: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            overwrite: false,
        }
    }
}

/// What [`convert_gguf`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertReport {
    /// The GGUF `general.architecture` (`llama`, `qwen2` or `gemma3`).
    pub architecture: String,
    /// Number of tensors written to `model.safetensors`.
    pub tensors: usize,
    /// Rows of the embedding matrix (`vocab_size` in `config.json`).
    pub vocab_size: usize,
    /// The Hugging Face directory that now exists.
    pub out_dir: PathBuf,
}

/// Why a GGUF file could not be converted. Every variant names the file, and the key or tensor
/// where there is one.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// Reading the input or writing the output failed at the operating-system level.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done (`open`, `create`, `write`, …).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The fixed part of the header (magic, version, counts, key/value framing) is malformed.
    #[error(
        "{path} is not a valid GGUF file (byte {offset}: {reason}); if it was downloaded, fetch \
         it again (scripts/fetch-models.sh verifies the checksum)"
    )]
    Header {
        /// The GGUF file.
        path: PathBuf,
        /// Byte offset where the problem was found.
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
    /// A required metadata key is absent.
    #[error(
        "{path}: required GGUF metadata key `{key}` is missing; the file was not written by a \
         llama.cpp converter this tool knows, or it is damaged"
    )]
    MissingKey {
        /// The GGUF file.
        path: PathBuf,
        /// The metadata key.
        key: String,
    },
    /// A metadata key has a value that cannot be used (wrong type, out of range, inconsistent).
    #[error("{path}: GGUF metadata key `{key}` {reason}")]
    BadValue {
        /// The GGUF file.
        path: PathBuf,
        /// The metadata key.
        key: String,
        /// What is wrong with the value, and what is expected.
        reason: String,
    },
    /// `general.architecture` names a model family this converter does not handle.
    #[error(
        "{path}: architecture `{architecture}` (GGUF key `general.architecture`) is not \
         supported; supported: llama, qwen2, gemma3"
    )]
    UnsupportedArchitecture {
        /// The GGUF file.
        path: PathBuf,
        /// The architecture the file declares.
        architecture: String,
    },
    /// The tokenizer metadata describes a tokenizer this converter cannot rebuild.
    #[error("{path}: tokenizer `{value}` (GGUF key `{key}`) is not supported; supported: {supported}")]
    UnsupportedTokenizer {
        /// The GGUF file.
        path: PathBuf,
        /// The metadata key (`tokenizer.ggml.model` or `tokenizer.ggml.pre`).
        key: String,
        /// Its value.
        value: String,
        /// The values this converter knows.
        supported: &'static str,
    },
    /// A tensor uses a ggml type that candle cannot dequantise.
    #[error(
        "{path}: tensor `{tensor}` has ggml type {ggml_type}, which this converter cannot \
         dequantise (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K..Q8_K); \
         re-quantise the model with one of those"
    )]
    UnsupportedTensorType {
        /// The GGUF file.
        path: PathBuf,
        /// The GGUF tensor name.
        tensor: String,
        /// The ggml type id found in the file.
        ggml_type: u32,
    },
    /// A tensor's header entry is inconsistent (dimensions, extent, duplicate name).
    #[error("{path}: tensor `{tensor}` {reason}")]
    BadTensor {
        /// The GGUF file.
        path: PathBuf,
        /// The GGUF tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor the architecture needs is not in the file.
    #[error("{path}: tensor `{tensor}` is missing; the {architecture} model is incomplete")]
    MissingTensor {
        /// The GGUF file.
        path: PathBuf,
        /// The GGUF tensor name that was expected.
        tensor: String,
        /// The architecture that needs it.
        architecture: String,
    },
    /// The file holds a tensor that has no Hugging Face counterpart in this converter; converting
    /// without it would silently change the model.
    #[error(
        "{path}: tensor `{tensor}` has no Hugging Face counterpart for architecture \
         {architecture}; this variant of the model is not supported"
    )]
    UnexpectedTensor {
        /// The GGUF file.
        path: PathBuf,
        /// The GGUF tensor name.
        tensor: String,
        /// The architecture being converted.
        architecture: String,
    },
    /// A tensor's shape disagrees with the shape the metadata implies.
    #[error(
        "{path}: tensor `{tensor}` has shape {found:?}, but the metadata implies {expected:?} \
         (Hugging Face [out, in] order)"
    )]
    TensorShape {
        /// The GGUF file.
        path: PathBuf,
        /// The GGUF tensor name.
        tensor: String,
        /// Shape in the file (row-major, outermost first).
        found: Vec<usize>,
        /// Shape derived from the metadata.
        expected: Vec<usize>,
    },
    /// candle failed to parse the header or to read or dequantise a tensor.
    #[error("{path}: cannot read {what}: {source}")]
    Candle {
        /// The GGUF file.
        path: PathBuf,
        /// `the GGUF header` or `tensor \`NAME\``.
        what: String,
        /// candle's error (boxed: it is large, and this path is rare).
        #[source]
        source: Box<candle_core::Error>,
    },
    /// [`ConvertOptions::dtype`] is not one of F32, BF16, F16.
    #[error("cannot write weights as {dtype:?}: choose f32, bf16 or f16")]
    UnsupportedDType {
        /// The requested element type.
        dtype: DType,
    },
    /// The output directory exists and [`ConvertOptions::overwrite`] is off.
    #[error("{path} already exists; remove it or pass overwrite (`--overwrite`) to replace it")]
    OutputExists {
        /// The output directory.
        path: PathBuf,
    },
    /// The output path has no final component to name the directory by (`/`, `..`).
    #[error("{path} cannot be an output directory: give a path that ends in a directory name")]
    BadOutputPath {
        /// The path given.
        path: PathBuf,
    },
    /// Serialising a JSON output file failed.
    #[error("cannot serialise {path}: {source}")]
    Json {
        /// The JSON file being written.
        path: PathBuf,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
    /// Building the safetensors header failed.
    #[error("cannot build the safetensors header of {path}: {source}")]
    Safetensors {
        /// The safetensors file being written.
        path: PathBuf,
        /// The safetensors crate's error.
        #[source]
        source: safetensors::SafeTensorError,
    },
}

/// Reads the GGUF file `src` and writes the equivalent Hugging Face checkpoint directory `out`:
/// `config.json` (`LlamaForCausalLM`, `Qwen2ForCausalLM` or `Gemma3ForCausalLM`, as the GGUF
/// `general.architecture` says), `model.safetensors` (Hugging Face tensor names, weights
/// dequantised to [`ConvertOptions::dtype`]), `tokenizer.json` and `tokenizer_config.json`
/// rebuilt from the GGUF vocabulary (with the chat template), and `generation_config.json`.
///
/// The directory appears complete or not at all: it is written as `.<name>.mglue-partial-<pid>`
/// beside `out` and renamed when every file is written; on error the partial directory is
/// removed. Everything that can be checked without reading tensor data (metadata, tensor set,
/// shapes, tokenizer) is checked before anything is written.
///
/// # Errors
///
/// A [`GgufError`] naming the file and the key or tensor at fault: unreadable or corrupt file,
/// missing metadata, unsupported architecture, tokenizer or tensor type, missing or unexpected
/// tensors, shape mismatches, an existing output without `overwrite`, or an I/O failure.
pub fn convert_gguf(src: &Path, out: &Path, opts: &ConvertOptions) -> Result<ConvertReport, GgufError> {
    let out_dtype = output::OutDType::from_dtype(opts.dtype)?;
    if !opts.overwrite && out.exists() {
        return Err(GgufError::OutputExists {
            path: out.to_path_buf(),
        });
    }

    let file = File::open(src).map_err(|source| GgufError::Io {
        action: "open",
        path: src.to_path_buf(),
        source,
    })?;
    // SAFETY: the mapping is only read. A concurrent writer truncating the file could fault the
    // process; that is the accepted contract of memory-mapped model files (safetensors does the
    // same) and far cheaper than reading 100s of MB through a buffer.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| GgufError::Io {
        action: "map",
        path: src.to_path_buf(),
        source,
    })?;
    let bytes: &[u8] = &mmap;

    header::validate(bytes, src)?;
    let content = Content::read(&mut Cursor::new(bytes)).map_err(|source| GgufError::Candle {
        path: src.to_path_buf(),
        what: "the GGUF header".to_string(),
        source: Box::new(source),
    })?;
    let md = Metadata {
        map: &content.metadata,
        path: src,
    };

    let arch_name = md.string("general.architecture")?;
    let arch = Arch::from_gguf(arch_name).ok_or_else(|| GgufError::UnsupportedArchitecture {
        path: src.to_path_buf(),
        architecture: arch_name.to_string(),
    })?;
    let shapes: HashMap<&str, Vec<usize>> = content
        .tensor_infos
        .iter()
        .map(|(name, info)| (name.as_str(), info.shape.dims().to_vec()))
        .collect();
    let spec = ModelSpec::from_gguf(arch, &md, &shapes)?;
    let plan = arch::plan_tensors(&spec, &shapes, src)?;
    let tok = tokenizer::build(&md, spec.vocab_size, spec.context_length)?;

    let config = arch::config_json(&spec, &tok.special, out_dtype.hf_name());
    let generation_config = arch::generation_config_json(&tok.special);

    let partial = output::PartialDir::create(out)?;
    output::write_json(&partial.path().join("config.json"), &config)?;
    output::write_json(&partial.path().join("generation_config.json"), &generation_config)?;
    output::write_json(&partial.path().join("tokenizer.json"), &tok.tokenizer_json)?;
    output::write_json(
        &partial.path().join("tokenizer_config.json"),
        &tok.tokenizer_config_json,
    )?;
    write_weights(
        &partial.path().join("model.safetensors"),
        &plan,
        &content,
        bytes,
        src,
        out_dtype,
    )?;
    partial.commit(out, opts.overwrite)?;

    tracing::debug!(src = %src.display(), out = %out.display(), tensors = plan.len(), "converted GGUF");
    Ok(ConvertReport {
        architecture: arch_name.to_string(),
        tensors: plan.len(),
        vocab_size: spec.vocab_size,
        out_dir: out.to_path_buf(),
    })
}

/// Runs every check [`convert_gguf`] makes on the GGUF image `bytes` (a whole file, as if read
/// from `src`): header walk, candle's parse, metadata, tensor plan, shapes and tokenizer; then
/// builds the JSON files and dequantises every planned tensor, writing nothing. The report's
/// `out_dir` is empty.
///
/// The bytes-level entry point of the `gguf` fuzz target (`fuzz/`).
#[doc(hidden)]
pub fn check_gguf_bytes(bytes: &[u8], src: &Path) -> Result<ConvertReport, GgufError> {
    header::validate(bytes, src)?;
    let content = Content::read(&mut Cursor::new(bytes)).map_err(|source| GgufError::Candle {
        path: src.to_path_buf(),
        what: "the GGUF header".to_string(),
        source: Box::new(source),
    })?;
    let md = Metadata {
        map: &content.metadata,
        path: src,
    };
    let arch_name = md.string("general.architecture")?;
    let arch = Arch::from_gguf(arch_name).ok_or_else(|| GgufError::UnsupportedArchitecture {
        path: src.to_path_buf(),
        architecture: arch_name.to_string(),
    })?;
    let shapes: HashMap<&str, Vec<usize>> = content
        .tensor_infos
        .iter()
        .map(|(name, info)| (name.as_str(), info.shape.dims().to_vec()))
        .collect();
    let spec = ModelSpec::from_gguf(arch, &md, &shapes)?;
    let plan = arch::plan_tensors(&spec, &shapes, src)?;
    let tok = tokenizer::build(&md, spec.vocab_size, spec.context_length)?;
    let out_dtype = output::OutDType::from_dtype(DType::F32)?;
    fn json<T: serde::Serialize>(path: &str, value: &T) -> Result<(), GgufError> {
        serde_json::to_vec(value)
            .map(drop)
            .map_err(|source| GgufError::Json {
                path: PathBuf::from(path),
                source,
            })
    }
    json(
        "config.json",
        &arch::config_json(&spec, &tok.special, out_dtype.hf_name()),
    )?;
    json(
        "generation_config.json",
        &arch::generation_config_json(&tok.special),
    )?;
    json("tokenizer.json", &tok.tokenizer_json)?;
    json("tokenizer_config.json", &tok.tokenizer_config_json)?;
    for t in &plan {
        materialise(t, &content, bytes, src, out_dtype)?;
    }
    Ok(ConvertReport {
        architecture: arch_name.to_string(),
        tensors: plan.len(),
        vocab_size: spec.vocab_size,
        out_dir: PathBuf::new(),
    })
}

/// Dequantises the planned tensors a few at a time (one per worker thread, so peak memory is a
/// handful of tensors) and streams them into `model.safetensors` in safetensors order.
fn write_weights(
    path: &Path,
    plan: &[PlannedTensor],
    content: &Content,
    bytes: &[u8],
    src: &Path,
    dtype: output::OutDType,
) -> Result<(), GgufError> {
    let mut order: Vec<&PlannedTensor> = plan.iter().collect();
    order.sort_by(|a, b| a.hf_name.cmp(&b.hf_name));
    let entries: Vec<output::TensorEntry> = order
        .iter()
        .map(|t| output::TensorEntry {
            name: t.hf_name.clone(),
            shape: t.shape.clone(),
        })
        .collect();
    let mut writer = output::SafetensorsWriter::create(path, &entries, dtype)?;
    let batch = rayon::current_num_threads().max(1);
    for chunk in order.chunks(batch) {
        let data: Vec<Vec<u8>> = chunk
            .par_iter()
            .map(|t| materialise(t, content, bytes, src, dtype))
            .collect::<Result<_, _>>()?;
        for d in &data {
            writer.write_tensor(d)?;
        }
    }
    writer.finish()
}

/// Reads one tensor, dequantises it to f32, applies the layout fix-up and encodes it.
fn materialise(
    t: &PlannedTensor,
    content: &Content,
    bytes: &[u8],
    src: &Path,
    dtype: output::OutDType,
) -> Result<Vec<u8>, GgufError> {
    let candle_err = |source| GgufError::Candle {
        path: src.to_path_buf(),
        what: format!("tensor `{}`", t.gguf_name),
        source: Box::new(source),
    };
    let info = content
        .tensor_infos
        .get(&t.gguf_name)
        .ok_or_else(|| GgufError::BadTensor {
            path: src.to_path_buf(),
            tensor: t.gguf_name.clone(),
            reason: "is planned but absent from candle's tensor table (internal error)".into(),
        })?;
    let qtensor = info
        .read(&mut Cursor::new(bytes), content.tensor_data_offset, &Device::Cpu)
        .map_err(candle_err)?;
    let values = qtensor
        .dequantize(&Device::Cpu)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(candle_err)?;
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        // Converting is a faithful change of format, so the values are kept; `mglue merge`
        // refuses them with the tensor's Hugging Face name unless --allow-nonfinite.
        tracing::warn!(
            file = %src.display(),
            tensor = %t.gguf_name,
            "{bad} NaN/Inf values after dequantisation"
        );
    }
    let values = t.transform.apply(values, &t.shape);
    Ok(dtype.encode(&values))
}

/// Typed access to GGUF metadata; every failure names the file and the key.
struct Metadata<'a> {
    map: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl<'a> Metadata<'a> {
    fn path(&self) -> &Path {
        self.path
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    fn require(&self, key: &str) -> Result<&'a Value, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.to_path_buf(),
            key: key.to_string(),
        })
    }

    fn bad(&self, key: &str, reason: String) -> GgufError {
        GgufError::BadValue {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            reason,
        }
    }

    fn string(&self, key: &str) -> Result<&'a str, GgufError> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            v => Err(self.bad(key, format!("should be a string, found {}", describe(v)))),
        }
    }

    fn opt_string(&self, key: &str) -> Result<Option<&'a str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.string(key).map(Some),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, GgufError> {
        let v = self.require(key)?;
        int_value(v).and_then(|i| usize::try_from(i).ok()).ok_or_else(|| {
            self.bad(
                key,
                format!("should be a non-negative integer, found {}", describe(v)),
            )
        })
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.usize(key).map(Some),
        }
    }

    fn opt_u32(&self, key: &str) -> Result<Option<u32>, GgufError> {
        match self.opt_usize(key)? {
            None => Ok(None),
            Some(v) => u32::try_from(v)
                .map(Some)
                .map_err(|_| self.bad(key, format!("is {v}, which does not fit in 32 bits"))),
        }
    }

    fn opt_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(v)) if v.is_finite() => Ok(Some(*v)),
            // GGUF writers store f32; an f64 is accepted and narrowed.
            Some(Value::F64(v)) if v.is_finite() => Ok(Some(*v as f32)),
            Some(v) => Err(self.bad(key, format!("should be a finite float, found {}", describe(v)))),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(key, format!("should be a bool, found {}", describe(v)))),
        }
    }

    fn array(&self, key: &str) -> Result<&'a [Value], GgufError> {
        match self.require(key)? {
            Value::Array(items) => Ok(items),
            v => Err(self.bad(key, format!("should be an array, found {}", describe(v)))),
        }
    }

    fn opt_array(&self, key: &str) -> Result<Option<&'a [Value]>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.array(key).map(Some),
        }
    }

    fn string_array(&self, key: &str) -> Result<Vec<&'a str>, GgufError> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.bad(
                    key,
                    format!("element {i} should be a string, found {}", describe(v)),
                )),
            })
            .collect()
    }
}

/// Any GGUF integer as i128 (wide enough for u64 and i64 alike).
fn int_value(v: &Value) -> Option<i128> {
    Some(match v {
        Value::U8(x) => i128::from(*x),
        Value::I8(x) => i128::from(*x),
        Value::U16(x) => i128::from(*x),
        Value::I16(x) => i128::from(*x),
        Value::U32(x) => i128::from(*x),
        Value::I32(x) => i128::from(*x),
        Value::U64(x) => i128::from(*x),
        Value::I64(x) => i128::from(*x),
        _ => return None,
    })
}

/// A short description of a value for error messages (never the whole of a 49k-entry array).
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) if s.len() > 60 => format!("a string of {} bytes", s.len()),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(items) => format!("an array of {} elements", items.len()),
        Value::Bool(b) => format!("the bool {b}"),
        Value::F32(x) => format!("the f32 {x}"),
        Value::F64(x) => format!("the f64 {x}"),
        other => match int_value(other) {
            Some(i) => format!("the {:?} {i}", other.value_type()),
            None => format!("{:?}", other.value_type()),
        },
    }
}

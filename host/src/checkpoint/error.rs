//! The one error type of checkpoint I/O.

use std::path::PathBuf;

use candle_core::DType;

/// Everything that can go wrong while reading or writing a checkpoint.
///
/// Every variant names the file (and the tensor or key, where there is one) and its message ends
/// with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file-system operation failed.
    #[error("could not {action} {path}: {source}")]
    Io {
        /// What was being attempted ("open", "read", "create", "write to", "rename", ...).
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// Writing failed because the file system is full, a quota is exhausted or the process's
    /// file-size limit (`ulimit -f`) is reached.
    #[error(
        "could not {action} {path}: {source}. Free space on that file system (or raise the limit) \
         and run again; the partial output is removed, nothing is left at the target"
    )]
    NoSpace {
        /// What was being attempted.
        action: &'static str,
        /// The file being written.
        path: PathBuf,
        /// The operating system's error (ENOSPC, EDQUOT or EFBIG).
        #[source]
        source: std::io::Error,
    },

    /// The path given as a model directory is not a directory.
    #[error(
        "{path} is not a directory; pass the Hugging Face model directory (the one holding \
         config.json and the *.safetensors files)"
    )]
    NotADirectory {
        /// The path given.
        path: PathBuf,
    },

    /// The model directory has no `config.json`.
    #[error(
        "{path} does not exist; a Hugging Face checkpoint needs its config.json (copy it from the \
         model this checkpoint was saved from)"
    )]
    ConfigMissing {
        /// Where `config.json` was expected.
        path: PathBuf,
    },

    /// `config.json` is not valid JSON.
    #[error("{path} is not valid JSON ({source}); fix or re-download the file")]
    ConfigInvalid {
        /// The `config.json` file.
        path: PathBuf,
        /// The parser's error, with line and column.
        #[source]
        source: serde_json::Error,
    },

    /// `config.json` is valid JSON but not an object.
    #[error("{path} must hold a JSON object (found {found}); fix or re-download the file")]
    ConfigNotObject {
        /// The `config.json` file.
        path: PathBuf,
        /// The kind of JSON value found instead.
        found: &'static str,
    },

    /// `config.json` states a size that the weights contradict.
    #[error(
        "{path}: `{key}` is {stated}, but {evidence}; the config does not describe these weights \
         (copy the config.json of the model they were saved from)"
    )]
    ConfigShape {
        /// The `config.json` file.
        path: PathBuf,
        /// The key (`vocab_size`, `hidden_size`, `num_hidden_layers`; `text_config.` prefixed
        /// when read from there).
        key: String,
        /// Its value.
        stated: u64,
        /// What the weights say, e.g. "tensor `model.embed_tokens.weight` has shape [1000, 64]".
        evidence: String,
    },

    /// Only pickle (`.bin`, `.pt`) weights were found.
    #[error(
        "{path} is a PyTorch pickle file, which runs arbitrary code when loaded, so it is refused; \
         convert the model to safetensors first, e.g. in Python: \
         `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`"
    )]
    PickleRefused {
        /// The pickle file found.
        path: PathBuf,
    },

    /// The directory holds no weights at all.
    #[error(
        "no weights in {dir}: expected model.safetensors, or model.safetensors.index.json with its \
         shards; check the path, or download the *.safetensors files too"
    )]
    NoWeights {
        /// The model directory.
        dir: PathBuf,
    },

    /// Several `*.safetensors` files but no index saying which belong to the model.
    #[error(
        "{dir} holds {} *.safetensors files ({}) but no model.safetensors.index.json, so it is \
         unclear which are the model; add the index or remove the extra files",
        files.len(),
        files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    AmbiguousWeights {
        /// The model directory.
        dir: PathBuf,
        /// The candidate files (names only).
        files: Vec<PathBuf>,
    },

    /// `model.safetensors.index.json` is malformed.
    #[error("{path} is not a valid safetensors index: {reason}; fix or re-download the index")]
    IndexInvalid {
        /// The index file.
        path: PathBuf,
        /// What is wrong, naming the key.
        reason: String,
    },

    /// The index maps a tensor to a shard file that is not there.
    #[error(
        "{index} maps tensor `{tensor}` to {shard}, which does not exist; download the missing \
         shard or fix the index"
    )]
    IndexMissingShard {
        /// The index file.
        index: PathBuf,
        /// The missing shard file.
        shard: PathBuf,
        /// One tensor the index places in that shard.
        tensor: String,
    },

    /// The index maps a tensor to a shard that does not contain it.
    #[error(
        "{index} maps tensor `{tensor}` to {shard}, but that file has no such tensor; the index \
         and the shards are from different saves: re-download them together"
    )]
    IndexTensorMissing {
        /// The index file.
        index: PathBuf,
        /// The shard named by the index.
        shard: PathBuf,
        /// The tensor the index lists.
        tensor: String,
    },

    /// The file is shorter than a safetensors header.
    #[error(
        "{path} is truncated ({file_len} bytes, a safetensors file starts with an 8-byte header \
         length); re-download or re-save it"
    )]
    HeaderTruncated {
        /// The safetensors file.
        path: PathBuf,
        /// Its size in bytes.
        file_len: u64,
    },

    /// The header length is larger than the safetensors limit.
    #[error(
        "{path} declares a {header_len}-byte header, more than the {limit}-byte limit; the file is \
         corrupt or not safetensors: re-download or re-save it"
    )]
    HeaderTooLarge {
        /// The safetensors file.
        path: PathBuf,
        /// The header length the file declares.
        header_len: u64,
        /// The largest header accepted.
        limit: u64,
    },

    /// The header length runs past the end of the file.
    #[error(
        "{path} declares a {header_len}-byte header but the file has only {file_len} bytes; the \
         file is truncated or corrupt: re-download or re-save it"
    )]
    HeaderBeyondFile {
        /// The safetensors file.
        path: PathBuf,
        /// The header length the file declares.
        header_len: u64,
        /// Its size in bytes.
        file_len: u64,
    },

    /// The header is not the JSON object safetensors prescribes.
    #[error("{path} has an invalid safetensors header: {reason}; re-download or re-save the file")]
    HeaderInvalid {
        /// The safetensors file.
        path: PathBuf,
        /// What is wrong, naming the tensor or key.
        reason: String,
    },

    /// A tensor's dtype is not one this toolkit handles.
    #[error(
        "tensor `{tensor}` in {path} has dtype {dtype}, which is not supported (supported: F32, \
         F16, BF16, F64, I64, I32, I16, U32, U8, F8_E4M3); convert the checkpoint to bf16, f16 or \
         f32 first"
    )]
    UnsupportedDtype {
        /// The safetensors file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype string from the header.
        dtype: String,
    },

    /// A tensor's data range lies (partly) outside the file's data section.
    #[error(
        "tensor `{tensor}` in {path} spans bytes {start}..{end} of the data section, which has \
         only {data_len} bytes; the file is truncated or corrupt: re-download or re-save it"
    )]
    TensorOutOfBounds {
        /// The safetensors file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Start offset in the data section.
        start: u64,
        /// End offset in the data section.
        end: u64,
        /// Size of the data section.
        data_len: u64,
    },

    /// A tensor's byte range does not match its shape and dtype.
    #[error(
        "tensor `{tensor}` in {path} has shape {shape:?} and dtype {dtype:?}, i.e. {expected} \
         bytes, but its data_offsets span {actual} bytes; the header is corrupt: re-download or \
         re-save the file"
    )]
    TensorSizeMismatch {
        /// The safetensors file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: DType,
        /// Its shape.
        shape: Vec<usize>,
        /// Bytes implied by shape and dtype.
        expected: u64,
        /// Bytes spanned by `data_offsets`.
        actual: u64,
    },

    /// A tensor's element count overflows.
    #[error(
        "tensor `{tensor}` in {path} has shape {shape:?}, whose size overflows; the header is \
         corrupt: re-download or re-save the file"
    )]
    ShapeOverflow {
        /// The safetensors file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shape from the header.
        shape: Vec<usize>,
    },

    /// Two tensors of one file share bytes.
    #[error(
        "tensors `{first}` and `{second}` in {path} overlap in the data section; the header is \
         corrupt: re-download or re-save the file"
    )]
    TensorsOverlap {
        /// The safetensors file.
        path: PathBuf,
        /// The tensor that starts first.
        first: String,
        /// The tensor that starts inside it.
        second: String,
    },

    /// One tensor name appears twice (in one header or in two shards).
    #[error(
        "tensor `{tensor}` appears both in {first} and in {second}; remove the stray file or \
         re-save the checkpoint"
    )]
    DuplicateTensor {
        /// The tensor.
        tensor: String,
        /// Where it was seen first.
        first: PathBuf,
        /// Where it was seen again.
        second: PathBuf,
    },

    /// A tensor was asked for that the checkpoint does not have.
    #[error(
        "checkpoint {dir} has no tensor `{tensor}`; list the available names with \
         `Checkpoint::tensor_names`"
    )]
    TensorNotFound {
        /// The model directory.
        dir: PathBuf,
        /// The name asked for.
        tensor: String,
    },

    /// A candle operation on a tensor failed.
    #[error("tensor `{tensor}`: {source}")]
    Candle {
        /// The tensor.
        tensor: String,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },

    /// The output directory already exists.
    #[error("{path} already exists; choose another output path or allow overwriting it")]
    TargetExists {
        /// The output directory.
        path: PathBuf,
    },

    /// The output path has no final component to name the checkpoint after.
    #[error("{path} cannot be an output directory (it has no name); give a path like out/merged")]
    InvalidTarget {
        /// The path given.
        path: PathBuf,
    },

    /// A writer of this process is already writing the same target.
    #[error(
        "another CheckpointWriter of this process is already writing {target} (into {partial}); \
         finish or drop it before creating a new one"
    )]
    PartialInUse {
        /// The output directory.
        target: PathBuf,
        /// The other writer's temporary directory.
        partial: PathBuf,
    },

    /// The writer's plan lists one tensor twice.
    #[error("the output plan for {target} lists tensor `{tensor}` twice; each name must be planned once")]
    DuplicateInPlan {
        /// The output directory.
        target: PathBuf,
        /// The tensor.
        tensor: String,
    },

    /// The plan has a tensor of a dtype that safetensors cannot store.
    #[error(
        "the output plan for {target} gives tensor `{tensor}` dtype {dtype:?}, which safetensors \
         cannot store here; convert it to bf16, f16 or f32"
    )]
    UnsupportedOutputDtype {
        /// The output directory.
        target: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype.
        dtype: DType,
    },

    /// The plan has a tensor whose size overflows.
    #[error(
        "the output plan for {target} gives tensor `{tensor}` shape {shape:?}, whose size \
         overflows; fix the plan"
    )]
    PlanShapeOverflow {
        /// The output directory.
        target: PathBuf,
        /// The tensor.
        tensor: String,
        /// The planned shape.
        shape: Vec<usize>,
    },

    /// A tensor was written that is not in the plan.
    #[error(
        "tensor `{tensor}` is not in the output plan for {target}; add it to the plan given to \
         CheckpointWriter::create"
    )]
    NotInPlan {
        /// The output directory.
        target: PathBuf,
        /// The tensor.
        tensor: String,
    },

    /// A tensor was written twice.
    #[error("tensor `{tensor}` of {target} was already written; write each tensor once")]
    AlreadyWritten {
        /// The output directory.
        target: PathBuf,
        /// The tensor.
        tensor: String,
    },

    /// A tensor's dtype differs from the plan.
    #[error(
        "tensor `{tensor}` of {target} is planned as {expected:?} but was given as {actual:?}; \
         convert it (e.g. `to_dtype`) before writing"
    )]
    DtypeMismatch {
        /// The output directory.
        target: PathBuf,
        /// The tensor.
        tensor: String,
        /// The planned dtype.
        expected: DType,
        /// The dtype given.
        actual: DType,
    },

    /// A tensor's shape differs from the plan.
    #[error(
        "tensor `{tensor}` of {target} is planned with shape {expected:?} but was given shape \
         {actual:?}; fix the plan or the computation"
    )]
    ShapeMismatch {
        /// The output directory.
        target: PathBuf,
        /// The tensor.
        tensor: String,
        /// The planned shape.
        expected: Vec<usize>,
        /// The shape given.
        actual: Vec<usize>,
    },

    /// Raw bytes of the wrong length were given for a tensor.
    #[error(
        "tensor `{tensor}` of {target} needs {expected} bytes (planned shape and dtype) but \
         {actual} were given; pass the tensor's bytes exactly as stored"
    )]
    ByteLengthMismatch {
        /// The output directory.
        target: PathBuf,
        /// The tensor.
        tensor: String,
        /// Bytes the plan implies.
        expected: u64,
        /// Bytes given.
        actual: u64,
    },

    /// `finish` was called before every planned tensor was written.
    #[error(
        "{} of the planned tensors of {target} were never written (first: {}); write them \
         before finish()",
        missing.len(),
        missing.iter().take(5).map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")
    )]
    Incomplete {
        /// The output directory.
        target: PathBuf,
        /// The tensors not written.
        missing: Vec<String>,
    },

    /// A side file name is unusable.
    #[error("cannot write `{name}` into {target}: {reason}")]
    InvalidFileName {
        /// The output directory.
        target: PathBuf,
        /// The relative name given.
        name: String,
        /// Why it is refused and what to use instead.
        reason: &'static str,
    },
}

impl CheckpointError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        use std::io::ErrorKind;
        if matches!(
            source.kind(),
            ErrorKind::StorageFull | ErrorKind::FileTooLarge | ErrorKind::QuotaExceeded
        ) {
            return CheckpointError::NoSpace {
                action,
                path: path.into(),
                source,
            };
        }
        CheckpointError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

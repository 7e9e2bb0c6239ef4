//! Reading a Hugging Face checkpoint directory.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use serde_json::Value;

use super::convert::convert_bytes;
use super::header::parse_header;
use super::{CheckpointError, TensorInfo};

/// Name of the single-file weights.
pub(crate) const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub(crate) const INDEX_FILE: &str = "model.safetensors.index.json";

/// Files copied through unchanged from a model, in the order [`Checkpoint::side_files`] lists them.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "added_tokens.json",
];

/// Extensions of PyTorch pickle checkpoints.
const PICKLE_EXTENSIONS: &[&str] = &["bin", "pt", "pth", "ckpt"];

struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

struct Entry {
    info: TensorInfo,
    shard: usize,
    /// Byte range in the shard's mmap (absolute, header included).
    start: usize,
    end: usize,
}

/// A Hugging Face checkpoint opened for reading: `config.json` parsed, the safetensors files
/// memory-mapped and their headers validated. Tensor data is read only by [`Checkpoint::load`],
/// [`Checkpoint::load_as`] and [`Checkpoint::raw_bytes`].
///
/// The files must not be modified while the checkpoint is open (they are memory-mapped).
pub struct Checkpoint {
    dir: PathBuf,
    config: Value,
    shards: Vec<Shard>,
    order: Vec<String>,
    tensors: HashMap<String, Entry>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("architectures", &self.architectures())
            .field("shards", &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>())
            .field("tensors", &self.order.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens a Hugging Face model directory: `config.json` (required), and either
    /// `model.safetensors`, or `model.safetensors.index.json` with its shards, or (with no index)
    /// a single `*.safetensors` file or a complete `*-NNNNN-of-MMMMM.safetensors` series.
    ///
    /// Memory-maps the files and parses their headers only; no tensor data is read. Everything
    /// about the layout is validated here (header size, JSON, dtypes, offsets within the file,
    /// byte lengths, overlaps, duplicate names across shards, the index against the shards), so
    /// later reads cannot fail on it. Pickle checkpoints (`pytorch_model.bin`, `*.pt`, ...) are
    /// refused: loading them runs arbitrary code.
    pub fn open(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let meta = std::fs::metadata(dir).map_err(|e| CheckpointError::io("open", dir, e))?;
        if !meta.is_dir() {
            return Err(CheckpointError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        let config = read_config(&dir.join("config.json"))?;
        Checkpoint::open_tensors_with(dir, config)
    }

    /// Opens the safetensors files of a directory that has no `config.json` (a PEFT adapter's
    /// `adapter_model.safetensors`, say), found and validated as [`Checkpoint::open`] does; its
    /// [`Checkpoint::config`] is an empty object.
    pub fn open_tensors(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let meta = std::fs::metadata(dir).map_err(|e| CheckpointError::io("open", dir, e))?;
        if !meta.is_dir() {
            return Err(CheckpointError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        Checkpoint::open_tensors_with(dir, Value::Object(Default::default()))
    }

    fn open_tensors_with(dir: &Path, config: Value) -> Result<Checkpoint, CheckpointError> {
        let shard_names = weight_files(dir)?;

        let mut shards = Vec::with_capacity(shard_names.files.len());
        let mut order = Vec::new();
        let mut tensors: HashMap<String, Entry> = HashMap::new();
        for (shard_idx, name) in shard_names.files.iter().enumerate() {
            let path = dir.join(name);
            let mmap = map_file(&path)?;
            let header = parse_header(&mmap, &path)?;
            for e in header.entries {
                if let Some(prev) = tensors.get(&e.name) {
                    return Err(CheckpointError::DuplicateTensor {
                        tensor: e.name,
                        first: prev.info.file.clone(),
                        second: path,
                    });
                }
                // parse_header checked end <= data section <= mmap length, so these fit usize.
                let start = (header.data_start + e.start) as usize;
                let end = (header.data_start + e.end) as usize;
                order.push(e.name.clone());
                tensors.insert(
                    e.name.clone(),
                    Entry {
                        info: TensorInfo {
                            name: e.name,
                            dtype: e.dtype,
                            shape: e.shape,
                            file: path.clone(),
                        },
                        shard: shard_idx,
                        start,
                        end,
                    },
                );
            }
            shards.push(Shard { path, mmap });
        }

        if let Some((index, weight_map)) = &shard_names.index {
            for (tensor, shard) in weight_map {
                let listed = dir.join(shard);
                let found = tensors.get(tensor).map(|e| &e.info.file);
                if found != Some(&listed) {
                    return Err(CheckpointError::IndexTensorMissing {
                        index: index.clone(),
                        shard: listed,
                        tensor: tensor.clone(),
                    });
                }
            }
            let unlisted = order.iter().filter(|n| !weight_map.contains_key(*n)).count();
            if unlisted > 0 {
                tracing::warn!(
                    index = %index.display(),
                    unlisted,
                    "the shards hold tensors the index does not list; they are loaded too"
                );
            }
        }

        tracing::debug!(
            dir = %dir.display(),
            shards = shards.len(),
            tensors = order.len(),
            "opened checkpoint"
        );
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            shards,
            order,
            tensors,
        })
    }

    /// The model directory this checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json` (always a JSON object).
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// `config["architectures"]` (e.g. `["LlamaForCausalLM"]`); empty if absent.
    pub fn architectures(&self) -> Vec<String> {
        self.config
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// `config["num_hidden_layers"]`, else `config["text_config"]["num_hidden_layers"]`
    /// (multimodal configs such as Gemma 3), else `config["n_layer"]` (GPT-2 style).
    pub fn num_hidden_layers(&self) -> Option<usize> {
        let c = &self.config;
        c.get("num_hidden_layers")
            .or_else(|| c.get("text_config").and_then(|t| t.get("num_hidden_layers")))
            .or_else(|| c.get("n_layer"))
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
    }

    /// Every tensor name, in file order: shard by shard (index shards sorted by file name), and
    /// inside a shard by data offset.
    pub fn tensor_names(&self) -> Vec<String> {
        self.order.clone()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether the checkpoint has no tensors at all.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Whether the checkpoint has tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Name, dtype, shape and file of tensor `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name).map(|e| &e.info)
    }

    /// The safetensors files of this checkpoint, in the order their tensors are listed.
    pub fn weight_files(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path.clone()).collect()
    }

    fn entry(&self, name: &str) -> Result<&Entry, CheckpointError> {
        self.tensors
            .get(name)
            .ok_or_else(|| CheckpointError::TensorNotFound {
                dir: self.dir.clone(),
                tensor: name.to_string(),
            })
    }

    /// Raw bytes of tensor `name` as stored (little-endian, row-major), for copying through
    /// without conversion. Borrowed from the memory map: nothing is read until used.
    pub fn raw_bytes(&self, name: &str) -> Result<&[u8], CheckpointError> {
        let e = self.entry(name)?;
        // `open` validated the range against this very mapping.
        Ok(&self.shards[e.shard].mmap[e.start..e.end])
    }

    /// Reads tensor `name` into a CPU tensor of its stored dtype.
    pub fn load(&self, name: &str) -> Result<Tensor, CheckpointError> {
        let e = self.entry(name)?;
        let bytes = &self.shards[e.shard].mmap[e.start..e.end];
        let t = Tensor::from_raw_buffer(bytes, e.info.dtype, &e.info.shape, &Device::Cpu).map_err(|source| {
            CheckpointError::Candle {
                tensor: name.to_string(),
                source,
            }
        });
        self.release_pages(e);
        t
    }

    /// Drops the mapped pages of a tensor that was just copied out from this process's resident
    /// set (they stay in the page cache): a streaming merge then holds only the tensors in
    /// flight, not every input page it has touched.
    fn release_pages(&self, e: &Entry) {
        const PAGE: usize = 4096;
        let start = e.start / PAGE * PAGE;
        let len = e.end - start;
        // SAFETY: the mapping is private and read-only; after DONTNEED the pages read back from
        // the file on the next access, so no data is lost and no borrowed slice is invalidated
        // in content.
        let _ = unsafe {
            self.shards[e.shard]
                .mmap
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
        };
    }

    /// Reads tensor `name` into a CPU tensor converted to `dtype`.
    ///
    /// Conversions between f32, f64, f16 and bf16 round to nearest, ties to even, bit-identical
    /// to `torch.Tensor.to` for finite values and infinities (f64 goes to 16-bit types through
    /// f32, as in torch); bf16/f16 <-> f32 use the `half` crate's SIMD slice conversions. Other
    /// pairs use candle's `to_dtype`.
    pub fn load_as(&self, name: &str, dtype: DType) -> Result<Tensor, CheckpointError> {
        let e = self.entry(name)?;
        if e.info.dtype == dtype {
            return self.load(name);
        }
        let candle = |source| CheckpointError::Candle {
            tensor: name.to_string(),
            source,
        };
        let bytes = &self.shards[e.shard].mmap[e.start..e.end];
        match convert_bytes(bytes, e.info.dtype, dtype, &e.info.shape) {
            Some(t) => {
                self.release_pages(e);
                t.map_err(candle)
            }
            None => self.load(name)?.to_dtype(dtype).map_err(candle),
        }
    }

    /// Checks the sizes `config.json` states against the weights: `vocab_size` and
    /// `hidden_size` against the shape of `model.embed_tokens.weight` (rows and columns), and
    /// `num_hidden_layers` against the decoder layers present (`model.layers.N.`, plus
    /// `num_nextn_predict_layers` prediction blocks where the config has them). Keys found
    /// neither at the top level nor under `text_config`, and tensors that are absent, are not
    /// checked. transformers would fail on any of these mismatches with a less helpful message,
    /// or silently build a different model.
    pub fn check_config_shapes(&self) -> Result<(), CheckpointError> {
        let path = self.dir.join("config.json");
        let stated = |key: &str| -> Option<(String, u64)> {
            match self.config.get(key) {
                Some(v) => v.as_u64().map(|n| (key.to_string(), n)),
                None => self
                    .config
                    .get("text_config")
                    .and_then(|t| t.get(key))
                    .and_then(Value::as_u64)
                    .map(|n| (format!("text_config.{key}"), n)),
            }
        };
        let wrong = |(key, stated): (String, u64), evidence: String| CheckpointError::ConfigShape {
            path: path.clone(),
            key,
            stated,
            evidence,
        };
        const EMBED: &str = "model.embed_tokens.weight";
        if let Some(shape) = self.info(EMBED).map(|i| &i.shape).filter(|s| s.len() == 2) {
            let evidence = || format!("tensor `{EMBED}` has shape {shape:?} ([vocab_size, hidden_size])");
            for (key, dim) in [("vocab_size", shape[0]), ("hidden_size", shape[1])] {
                if let Some(s) = stated(key).filter(|(_, n)| *n != dim as u64) {
                    return Err(wrong(s, evidence()));
                }
            }
        }
        let layers = self
            .order
            .iter()
            .filter_map(|n| n.strip_prefix("model.layers."))
            .filter_map(|rest| rest.split('.').next()?.parse::<u64>().ok())
            .max()
            .map(|l| l + 1);
        // Multi-token-prediction blocks (GLM-4.5, DeepSeek-V3) are stored as layers after the
        // last decoder layer and counted by `num_nextn_predict_layers`.
        let nextn = stated("num_nextn_predict_layers").map_or(0, |(_, n)| n);
        if let (Some(found), Some(s)) = (layers, stated("num_hidden_layers")) {
            if found != s.1 && found != s.1 + nextn {
                return Err(wrong(
                    s,
                    format!(
                        "the weights hold decoder layers `model.layers.0.` to `model.layers.{}.`",
                        found - 1
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The tokenizer and generation files present in the directory, to copy into a derived
    /// checkpoint: `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`,
    /// `tokenizer.model`, `vocab.json`, `merges.txt`, `generation_config.json`,
    /// `chat_template.jinja`, `added_tokens.json`, in that order.
    pub fn side_files(&self) -> Vec<PathBuf> {
        SIDE_FILES
            .iter()
            .map(|n| self.dir.join(n))
            .filter(|p| p.is_file())
            .collect()
    }
}

fn read_config(path: &Path) -> Result<Value, CheckpointError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::ConfigMissing {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(CheckpointError::io("read", path, e)),
    };
    let config: Value = serde_json::from_slice(&text).map_err(|source| CheckpointError::ConfigInvalid {
        path: path.to_path_buf(),
        source,
    })?;
    if !config.is_object() {
        return Err(CheckpointError::ConfigNotObject {
            path: path.to_path_buf(),
            found: json_kind(&config),
        });
    }
    Ok(config)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn map_file(path: &Path) -> Result<Mmap, CheckpointError> {
    let file = File::open(path).map_err(|e| CheckpointError::io("open", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| CheckpointError::io("stat", path, e))?
        .len();
    if len < 8 {
        return Err(CheckpointError::HeaderTruncated {
            path: path.to_path_buf(),
            file_len: len,
        });
    }
    // SAFETY: the mapping is read-only and the documented contract of `Checkpoint` is that its
    // files are not modified while it is open; a concurrent writer truncating the file is the
    // one case memory maps cannot guard against, as with every mmap-based safetensors loader.
    unsafe { Mmap::map(&file) }.map_err(|e| CheckpointError::io("memory-map", path, e))
}

/// The weight files of a directory, and the index's weight map when there is one.
struct WeightFiles {
    /// File names inside the directory, in reading order.
    files: Vec<String>,
    index: Option<(PathBuf, HashMap<String, String>)>,
}

fn weight_files(dir: &Path) -> Result<WeightFiles, CheckpointError> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.is_file() {
        let weight_map = read_index(&index_path)?;
        let files: BTreeSet<&String> = weight_map.values().collect();
        for shard in &files {
            let path = dir.join(shard);
            if !path.is_file() {
                let tensor = weight_map
                    .iter()
                    .filter(|(_, s)| s == shard)
                    .map(|(t, _)| t)
                    .min()
                    .cloned()
                    .unwrap_or_default();
                return Err(CheckpointError::IndexMissingShard {
                    index: index_path,
                    shard: path,
                    tensor,
                });
            }
        }
        let files = files.into_iter().cloned().collect();
        return Ok(WeightFiles {
            files,
            index: Some((index_path, weight_map)),
        });
    }
    if dir.join(SINGLE_FILE).is_file() {
        return Ok(WeightFiles {
            files: vec![SINGLE_FILE.to_string()],
            index: None,
        });
    }

    let mut safetensors = Vec::new();
    let mut pickles = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| CheckpointError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| CheckpointError::io("list", dir, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !entry.path().is_file() {
            continue;
        }
        let ext = Path::new(&name)
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("");
        if ext == "safetensors" {
            safetensors.push(name);
        } else if PICKLE_EXTENSIONS.contains(&ext) {
            pickles.push(name);
        }
    }
    safetensors.sort();
    pickles.sort();
    match safetensors.len() {
        1 => {
            return Ok(WeightFiles {
                files: safetensors,
                index: None,
            })
        }
        0 => {}
        _ if is_complete_series(&safetensors) => {
            return Ok(WeightFiles {
                files: safetensors,
                index: None,
            })
        }
        _ => {
            return Err(CheckpointError::AmbiguousWeights {
                dir: dir.to_path_buf(),
                files: safetensors.into_iter().map(PathBuf::from).collect(),
            })
        }
    }
    let preferred = pickles
        .iter()
        .find(|p| p.as_str() == "pytorch_model.bin" || p.starts_with("pytorch_model-"))
        .or(pickles.first());
    match preferred {
        Some(p) => Err(CheckpointError::PickleRefused { path: dir.join(p) }),
        None => Err(CheckpointError::NoWeights {
            dir: dir.to_path_buf(),
        }),
    }
}

/// Whether sorted `names` are exactly `P-00001-of-0000N.safetensors` .. `P-0000N-of-0000N...`.
fn is_complete_series(names: &[String]) -> bool {
    let parse = |name: &str| -> Option<(String, usize, usize)> {
        let stem = name.strip_suffix(".safetensors")?;
        let (rest, total) = stem.rsplit_once("-of-")?;
        let (prefix, part) = rest.rsplit_once('-')?;
        Some((prefix.to_string(), part.parse().ok()?, total.parse().ok()?))
    };
    let Some(parsed) = names.iter().map(|n| parse(n)).collect::<Option<Vec<_>>>() else {
        return false;
    };
    parsed
        .iter()
        .enumerate()
        .all(|(i, (prefix, part, total))| *prefix == parsed[0].0 && *part == i + 1 && *total == names.len())
}

fn read_index(path: &Path) -> Result<HashMap<String, String>, CheckpointError> {
    let invalid = |reason: String| CheckpointError::IndexInvalid {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read(path).map_err(|e| CheckpointError::io("read", path, e))?;
    let index: Value = serde_json::from_slice(&text).map_err(|e| invalid(format!("not valid JSON ({e})")))?;
    let Some(map) = index.get("weight_map").and_then(Value::as_object) else {
        return Err(invalid("it has no `weight_map` object".into()));
    };
    let mut weight_map = HashMap::with_capacity(map.len());
    for (tensor, shard) in map {
        let Some(shard) = shard.as_str() else {
            return Err(invalid(format!(
                "weight_map[`{tensor}`] must be a file name string"
            )));
        };
        // Only plain names inside the model directory: no `../` escapes, no absolute paths.
        let mut components = Path::new(shard).components();
        let plain = matches!(components.next(), Some(Component::Normal(_))) && components.next().is_none();
        if !plain {
            return Err(invalid(format!(
                "weight_map[`{tensor}`] = `{shard}` is not a file name inside the model directory"
            )));
        }
        weight_map.insert(tensor.clone(), shard.to_string());
    }
    Ok(weight_map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Checkpoint>();
    }

    #[test]
    fn shard_series_must_be_complete_and_consistent() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(is_complete_series(&s(&[
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ])));
        assert!(!is_complete_series(&s(&[
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors"
        ])));
        assert!(!is_complete_series(&s(&[
            "a-00001-of-00002.safetensors",
            "b-00002-of-00002.safetensors"
        ])));
        assert!(!is_complete_series(&s(&["x.safetensors", "y.safetensors"])));
    }
}

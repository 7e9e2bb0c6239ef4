//! Scores cached per model content, so that a search never scores the same model twice.
//!
//! A model is identified by a [`ModelKey`]: for a checkpoint, a sha256 over every tensor's name,
//! dtype, shape and bytes (all of them, not a sample: two merges may differ in a single tensor),
//! plus `config.json` and `tokenizer.json`. Tensors are hashed in parallel, in name order, so
//! the key does not depend on how the weights are sharded (≈1.5 s per GB on this machine's two
//! cores, against minutes of scoring). An in-memory model (a merge during a search) is named by
//! its caller with [`ModelKey::new`], e.g. from its parents' keys and its recipe.
//!
//! Layout: `<cache>/<model key>/<task>-<hash of fingerprint and settings>.json`, one
//! [`TaskResult`] each, written to a temporary file and renamed. A cached result serves any
//! `--limit` up to its item count; a larger limit scores only the missing items.

use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::metrics::TaskResult;
use super::task::{hex, Task};
use super::EvalError;
use crate::checkpoint::{dtype_name, Checkpoint};

/// The identity of a model's scores: equal keys mean equal scores.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModelKey(String);

const KEY_VERSION: &str = "modelglue-model-key-1";

impl ModelKey {
    /// A key chosen by the caller (e.g. `"merge-" + sha256(parents, recipe)`). It names a
    /// directory: characters other than ASCII letters, digits, `-`, `_` and `.` become `_`.
    pub fn new(key: impl Into<String>) -> ModelKey {
        ModelKey(key.into())
    }

    /// `sha256-<hex>` of the checkpoint's content (see the module docs).
    pub fn of_checkpoint(ckpt: &Checkpoint) -> Result<ModelKey, EvalError> {
        let mut names = ckpt.tensor_names();
        names.sort();
        let digests: Vec<[u8; 32]> = names
            .par_iter()
            .map(|name| {
                let mut h = Sha256::new();
                let info = ckpt.info(name);
                h.update((name.len() as u64).to_le_bytes());
                h.update(name.as_bytes());
                if let Some(info) = info {
                    h.update(dtype_name(info.dtype).as_bytes());
                    for d in &info.shape {
                        h.update((*d as u64).to_le_bytes());
                    }
                }
                let bytes = ckpt.raw_bytes(name).map_err(|e| EvalError::Cache {
                    path: ckpt.dir().to_path_buf(),
                    reason: format!("cannot read tensor `{name}` to hash it: {e}"),
                })?;
                h.update(bytes);
                Ok(h.finalize().into())
            })
            .collect::<Result<_, EvalError>>()?;
        let mut h = Sha256::new();
        h.update(KEY_VERSION);
        let config = serde_json::to_vec(ckpt.config()).unwrap_or_default();
        h.update((config.len() as u64).to_le_bytes());
        h.update(&config);
        let tok_path = ckpt.dir().join("tokenizer.json");
        let tokenizer = match std::fs::read(&tok_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(EvalError::io("read", &tok_path, e)),
        };
        h.update((tokenizer.len() as u64).to_le_bytes());
        h.update(&tokenizer);
        for d in &digests {
            h.update(d);
        }
        Ok(ModelKey(format!("sha256-{}", hex(&h.finalize()))))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn dir_name(&self) -> String {
        sanitize(&self.0)
    }
}

impl std::fmt::Display for ModelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a cache file holds.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    model: ModelKey,
    /// What else the scores depend on (dtype, context length).
    settings: String,
    result: TaskResult,
}

/// A directory of cached [`TaskResult`]s.
#[derive(Debug, Clone)]
pub struct ScoreCache {
    dir: PathBuf,
}

impl ScoreCache {
    /// Opens (creating it if needed) a cache directory.
    pub fn open(dir: &Path) -> Result<ScoreCache, EvalError> {
        std::fs::create_dir_all(dir).map_err(|e| EvalError::io("create directory", dir, e))?;
        Ok(ScoreCache {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of `model`'s scores on `task` under `settings`.
    pub fn path(&self, model: &ModelKey, task: &Task, settings: &str) -> PathBuf {
        let mut h = Sha256::new();
        h.update(task.fingerprint());
        h.update([0]);
        h.update(settings);
        let tag = hex(&h.finalize());
        self.dir
            .join(model.dir_name())
            .join(format!("{}-{}.json", sanitize(task.name()), &tag[..16]))
    }

    /// The cached result, if any. An unreadable entry is reported and treated as absent (it is
    /// overwritten by the next [`ScoreCache::store`]).
    pub fn load(
        &self,
        model: &ModelKey,
        task: &Task,
        settings: &str,
    ) -> Result<Option<TaskResult>, EvalError> {
        let path = self.path(model, task, settings);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(EvalError::io("read", &path, e)),
        };
        match serde_json::from_slice::<Entry>(&bytes) {
            Ok(e)
                if e.model == *model
                    && e.settings == settings
                    && e.result.fingerprint == task.fingerprint() =>
            {
                Ok(Some(e.result))
            }
            Ok(_) => Ok(None),
            Err(err) => {
                tracing::warn!(path = %path.display(), "ignoring unreadable score cache entry: {err}");
                Ok(None)
            }
        }
    }

    /// Stores `result` (replacing what was there).
    pub fn store(
        &self,
        model: &ModelKey,
        settings: &str,
        task: &Task,
        result: &TaskResult,
    ) -> Result<(), EvalError> {
        let path = self.path(model, task, settings);
        let dir = path.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(dir).map_err(|e| EvalError::io("create directory", dir, e))?;
        let entry = Entry {
            model: model.clone(),
            settings: settings.to_string(),
            result: result.clone(),
        };
        let json = serde_json::to_vec(&entry).map_err(|e| EvalError::Cache {
            path: path.clone(),
            reason: format!("cannot serialise: {e}"),
        })?;
        let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            EvalError::io("write", &path, e)
        })
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

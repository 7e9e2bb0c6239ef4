//! Writing a Hugging Face checkpoint: planned up front, written in any order, renamed into place.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{DType, Tensor};

use super::convert::with_tensor_bytes;
use super::header::{build_header, byte_len, st_dtype_name, HeaderOut};
use super::read::{INDEX_FILE, SINGLE_FILE};
use super::CheckpointError;

/// One output tensor of a planned checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutTensor {
    /// Tensor name, e.g. `model.layers.0.mlp.up_proj.weight`.
    pub name: String,
    /// Stored dtype.
    pub dtype: DType,
    /// Shape, row-major.
    pub shape: Vec<usize>,
}

const UNWRITTEN: u8 = 0;
const WRITING: u8 = 1;
const WRITTEN: u8 = 2;

#[derive(Debug)]
struct Slot {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    shard: usize,
    /// Absolute offset in the shard file.
    offset: u64,
    len: u64,
    state: AtomicU8,
}

#[derive(Debug)]
struct ShardOut {
    name: String,
    file: File,
}

/// Writes a Hugging Face checkpoint (sharded safetensors, index, side files) into a temporary
/// directory beside the target, renamed into place only by [`CheckpointWriter::finish`].
///
/// Every shard's header is computed from the plan up front and the shard files are created at
/// their final size, so tensors can be written in any order, from many threads at once
/// (`&self` methods, positioned writes). Dropping the writer without `finish` removes the
/// temporary directory, so a merge that fails midway leaves nothing at the target.
#[derive(Debug)]
pub struct CheckpointWriter {
    target: PathBuf,
    temp: PathBuf,
    overwrite: bool,
    shards: Vec<ShardOut>,
    slots: Vec<Slot>,
    by_name: HashMap<String, usize>,
    finished: bool,
}

/// Name of the shard `index` (0-based) of `count`.
fn shard_name(index: usize, count: usize) -> String {
    if count == 1 {
        SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", index + 1, count)
    }
}

fn partial_prefix(target_name: &str) -> String {
    format!(".{target_name}.mglue-partial-")
}

/// Whether process `pid` is running. Where `/proc` is unavailable, assume it is (keep its files).
fn pid_alive(pid: u32) -> bool {
    if !Path::new("/proc/self").exists() {
        return true;
    }
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes partial directories of `target` left by writers whose process is gone.
fn remove_stale_partials(parent: &Path, target_name: &str) -> Result<(), CheckpointError> {
    let prefix = partial_prefix(target_name);
    let entries = match std::fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(CheckpointError::io("list", parent, e)),
    };
    let own = std::process::id();
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Some(pid) = name.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let path = entry.path();
        if pid == own {
            return Err(CheckpointError::PartialInUse {
                target: parent.join(target_name),
                partial: path,
            });
        }
        if pid_alive(pid) {
            tracing::warn!(
                partial = %path.display(),
                pid,
                "another process seems to be writing the same output; leaving its files alone"
            );
            continue;
        }
        tracing::warn!(
            partial = %path.display(),
            pid,
            "removing the partial output of an earlier run that did not finish"
        );
        // Failing to tidy up an old run must not stop this one: it writes to its own directory.
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::warn!(partial = %path.display(), error = %e, "could not remove it");
        }
    }
    Ok(())
}

/// Checks that `name` is a relative path that stays inside the output directory.
fn checked_relative<'a>(target: &Path, name: &'a str) -> Result<&'a Path, CheckpointError> {
    let invalid = |reason| CheckpointError::InvalidFileName {
        target: target.to_path_buf(),
        name: name.to_string(),
        reason,
    };
    let path = Path::new(name);
    if name.is_empty() {
        return Err(invalid("the name is empty; give a file name such as config.json"));
    }
    if !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(invalid(
            "only relative names inside the checkpoint are allowed (no `/` prefix, `.` or `..`)",
        ));
    }
    Ok(path)
}

impl CheckpointWriter {
    /// Plans the checkpoint and creates its shard files in a temporary directory
    /// `.<target-name>.mglue-partial-<pid>` beside `target`.
    ///
    /// Tensors go into shards in plan order; a new shard starts when the next tensor would take
    /// the current one past `max_shard_bytes` (tensor bytes; a tensor larger than the limit gets
    /// a shard of its own). One shard is written as `model.safetensors`; several as
    /// `model-00001-of-0000N.safetensors` plus `model.safetensors.index.json`. Each header lists
    /// its tensors in plan order with metadata `{"format":"pt"}`, padded with spaces to 8 bytes.
    ///
    /// If `target` exists this is an error unless `overwrite` is true; then it is replaced only
    /// at [`finish`](Self::finish). A leftover partial directory of a killed run (its process
    /// gone) is removed, with a warning. Missing parent directories are created.
    pub fn create(
        target: &Path,
        plan: &[OutTensor],
        max_shard_bytes: u64,
        overwrite: bool,
    ) -> Result<CheckpointWriter, CheckpointError> {
        let target_name = target
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| CheckpointError::InvalidTarget {
                path: target.to_path_buf(),
            })?
            .to_string();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if target.symlink_metadata().is_ok() && !overwrite {
            return Err(CheckpointError::TargetExists {
                path: target.to_path_buf(),
            });
        }

        // Validate the plan and lay it out before touching the disk.
        let mut seen = HashSet::with_capacity(plan.len());
        let mut slots = Vec::with_capacity(plan.len());
        let mut shard_sizes: Vec<u64> = Vec::new();
        for t in plan {
            if !seen.insert(t.name.as_str()) {
                return Err(CheckpointError::DuplicateInPlan {
                    target: target.to_path_buf(),
                    tensor: t.name.clone(),
                });
            }
            if st_dtype_name(t.dtype).is_none() {
                return Err(CheckpointError::UnsupportedOutputDtype {
                    target: target.to_path_buf(),
                    tensor: t.name.clone(),
                    dtype: t.dtype,
                });
            }
            let Some(len) = byte_len(t.dtype, &t.shape) else {
                return Err(CheckpointError::PlanShapeOverflow {
                    target: target.to_path_buf(),
                    tensor: t.name.clone(),
                    shape: t.shape.clone(),
                });
            };
            let fits = shard_sizes
                .last()
                .is_some_and(|&used| used == 0 || used.saturating_add(len) <= max_shard_bytes);
            if !fits {
                shard_sizes.push(0);
            }
            let shard = shard_sizes.len() - 1;
            // Offsets are relative to the data section until the header sizes are known.
            slots.push(Slot {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                shard,
                offset: shard_sizes[shard],
                len,
                state: AtomicU8::new(UNWRITTEN),
            });
            shard_sizes[shard] += len;
        }
        if shard_sizes.is_empty() {
            shard_sizes.push(0);
        }
        let count = shard_sizes.len();
        let by_name = slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();

        std::fs::create_dir_all(&parent).map_err(|e| CheckpointError::io("create", &parent, e))?;
        remove_stale_partials(&parent, &target_name)?;
        let temp = parent.join(format!("{}{}", partial_prefix(&target_name), std::process::id()));
        match std::fs::create_dir(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(CheckpointError::PartialInUse {
                    target: target.to_path_buf(),
                    partial: temp,
                })
            }
            Err(e) => return Err(CheckpointError::io("create", &temp, e)),
        }
        // From here on, dropping `writer` on an error removes the temporary directory.
        let mut writer = CheckpointWriter {
            target: target.to_path_buf(),
            temp,
            overwrite,
            shards: Vec::with_capacity(count),
            slots,
            by_name,
            finished: false,
        };

        for (index, data_len) in shard_sizes.iter().enumerate() {
            let header = build_header(
                &writer
                    .slots
                    .iter()
                    .filter(|s| s.shard == index)
                    .filter_map(|s| {
                        Some(HeaderOut {
                            name: &s.name,
                            dtype: st_dtype_name(s.dtype)?,
                            shape: &s.shape,
                            start: s.offset,
                            end: s.offset + s.len,
                        })
                    })
                    .collect::<Vec<_>>(),
            );
            let header_len = header.len() as u64;
            let name = shard_name(index, count);
            let path = writer.temp.join(&name);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| CheckpointError::io("create", &path, e))?;
            file.set_len(header_len + data_len)
                .map_err(|e| CheckpointError::io("allocate", &path, e))?;
            file.write_all_at(&header, 0)
                .map_err(|e| CheckpointError::io("write to", &path, e))?;
            for slot in writer.slots.iter_mut().filter(|s| s.shard == index) {
                slot.offset += header_len;
            }
            writer.shards.push(ShardOut { name, file });
        }
        tracing::debug!(
            target = %writer.target.display(),
            tensors = writer.slots.len(),
            shards = count,
            "planned checkpoint"
        );
        Ok(writer)
    }

    /// The directory the checkpoint will have once finished.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The temporary directory being written.
    pub fn partial_dir(&self) -> &Path {
        &self.temp
    }

    /// File names of the shards, in order.
    pub fn shard_names(&self) -> Vec<String> {
        self.shards.iter().map(|s| s.name.clone()).collect()
    }

    fn slot(&self, name: &str) -> Result<&Slot, CheckpointError> {
        self.by_name
            .get(name)
            .map(|&i| &self.slots[i])
            .ok_or_else(|| CheckpointError::NotInPlan {
                target: self.target.clone(),
                tensor: name.to_string(),
            })
    }

    /// Claims `slot` for writing, runs `write`, and records the outcome: written on success,
    /// free again on failure (so the error is the one reported, not a later "already written").
    fn write_slot(
        &self,
        slot: &Slot,
        write: impl FnOnce(&File, u64) -> Result<(), CheckpointError>,
    ) -> Result<(), CheckpointError> {
        if slot
            .state
            .compare_exchange(UNWRITTEN, WRITING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(CheckpointError::AlreadyWritten {
                target: self.target.clone(),
                tensor: slot.name.clone(),
            });
        }
        let result = write(&self.shards[slot.shard].file, slot.offset);
        let state = if result.is_ok() { WRITTEN } else { UNWRITTEN };
        slot.state.store(state, Ordering::Release);
        result
    }

    fn shard_path(&self, slot: &Slot) -> PathBuf {
        self.temp.join(&self.shards[slot.shard].name)
    }

    /// Writes planned tensor `name` at its place. Thread-safe.
    ///
    /// The tensor must have the planned dtype and shape (nothing is converted); it is moved to
    /// the CPU and made contiguous if needed, otherwise its storage is written without a copy.
    pub fn write_tensor(&self, name: &str, tensor: &Tensor) -> Result<(), CheckpointError> {
        let slot = self.slot(name)?;
        if tensor.dtype() != slot.dtype {
            return Err(CheckpointError::DtypeMismatch {
                target: self.target.clone(),
                tensor: name.to_string(),
                expected: slot.dtype,
                actual: tensor.dtype(),
            });
        }
        if tensor.dims() != slot.shape.as_slice() {
            return Err(CheckpointError::ShapeMismatch {
                target: self.target.clone(),
                tensor: name.to_string(),
                expected: slot.shape.clone(),
                actual: tensor.dims().to_vec(),
            });
        }
        self.write_slot(slot, |file, offset| {
            let written = with_tensor_bytes(tensor, |bytes| {
                if bytes.len() as u64 != slot.len {
                    return Err(CheckpointError::ByteLengthMismatch {
                        target: self.target.clone(),
                        tensor: name.to_string(),
                        expected: slot.len,
                        actual: bytes.len() as u64,
                    });
                }
                file.write_all_at(bytes, offset)
                    .map_err(|e| CheckpointError::io("write to", self.shard_path(slot), e))
            });
            match written {
                Ok(result) => result,
                Err(source) => Err(CheckpointError::Candle {
                    tensor: name.to_string(),
                    source,
                }),
            }
        })
    }

    /// Writes the stored bytes of planned tensor `name` (little-endian, row-major; the length
    /// must match the planned dtype and shape), e.g. from [`Checkpoint::raw_bytes`]. Thread-safe.
    ///
    /// [`Checkpoint::raw_bytes`]: super::Checkpoint::raw_bytes
    pub fn write_raw(&self, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
        let slot = self.slot(name)?;
        if bytes.len() as u64 != slot.len {
            return Err(CheckpointError::ByteLengthMismatch {
                target: self.target.clone(),
                tensor: name.to_string(),
                expected: slot.len,
                actual: bytes.len() as u64,
            });
        }
        self.write_slot(slot, |file, offset| {
            file.write_all_at(bytes, offset)
                .map_err(|e| CheckpointError::io("write to", self.shard_path(slot), e))
        })
    }

    fn side_path(&self, relative_name: &str) -> Result<PathBuf, CheckpointError> {
        let rel = checked_relative(&self.target, relative_name)?;
        let reserved = rel == Path::new(INDEX_FILE)
            || rel == Path::new(SINGLE_FILE)
            || self.shards.iter().any(|s| rel == Path::new(&s.name));
        if reserved {
            return Err(CheckpointError::InvalidFileName {
                target: self.target.clone(),
                name: relative_name.to_string(),
                reason: "the writer produces the weights and their index itself; \
                         write tensors with write_tensor or write_raw",
            });
        }
        let path = self.temp.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| CheckpointError::io("create", dir, e))?;
        }
        Ok(path)
    }

    /// Writes a side file (`config.json`, `README.md`, ...) at `relative_name` inside the
    /// checkpoint. Thread-safe.
    pub fn write_file(&self, relative_name: &str, contents: &[u8]) -> Result<(), CheckpointError> {
        let path = self.side_path(relative_name)?;
        std::fs::write(&path, contents).map_err(|e| CheckpointError::io("write", &path, e))
    }

    /// Copies file `src` to `relative_name` inside the checkpoint (e.g. a tokenizer from
    /// [`Checkpoint::side_files`]). Thread-safe.
    ///
    /// [`Checkpoint::side_files`]: super::Checkpoint::side_files
    pub fn copy_file(&self, src: &Path, relative_name: &str) -> Result<(), CheckpointError> {
        let path = self.side_path(relative_name)?;
        std::fs::copy(src, &path).map_err(|e| CheckpointError::io("copy", src, e))?;
        Ok(())
    }

    /// Verifies every planned tensor was written, writes the index (if sharded), syncs the files
    /// and the directory to disk, and renames the directory into place (replacing an existing
    /// target if `overwrite` was given). Returns the final path.
    pub fn finish(mut self) -> Result<PathBuf, CheckpointError> {
        let result = self.finish_inner();
        if result.is_ok() {
            self.finished = true;
        }
        result
    }

    fn finish_inner(&self) -> Result<PathBuf, CheckpointError> {
        let missing: Vec<String> = self
            .slots
            .iter()
            .filter(|s| s.state.load(Ordering::Acquire) != WRITTEN)
            .map(|s| s.name.clone())
            .collect();
        if !missing.is_empty() {
            return Err(CheckpointError::Incomplete {
                target: self.target.clone(),
                missing,
            });
        }

        if self.shards.len() > 1 {
            let weight_map: serde_json::Map<String, serde_json::Value> = self
                .slots
                .iter()
                .map(|s| (s.name.clone(), self.shards[s.shard].name.clone().into()))
                .collect();
            let total_size: u64 = self.slots.iter().map(|s| s.len).sum();
            let index = serde_json::json!({
                "metadata": { "total_size": total_size },
                "weight_map": weight_map,
            });
            let mut text = serde_json::to_vec_pretty(&index)
                .map_err(|e| CheckpointError::io("serialise", self.temp.join(INDEX_FILE), e.into()))?;
            text.push(b'\n');
            self.write_file_unchecked(INDEX_FILE, &text)?;
        }

        for shard in &self.shards {
            shard
                .file
                .sync_all()
                .map_err(|e| CheckpointError::io("sync", self.temp.join(&shard.name), e))?;
        }
        sync_tree(&self.temp)?;

        let parent = match self.target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let exists = self.target.symlink_metadata().is_ok();
        if exists && !self.overwrite {
            return Err(CheckpointError::TargetExists {
                path: self.target.clone(),
            });
        }
        if exists {
            self.replace_target(&parent)?;
        } else {
            std::fs::rename(&self.temp, &self.target)
                .map_err(|e| CheckpointError::io("rename into place", &self.temp, e))?;
        }
        sync_dir(&parent)?;
        tracing::debug!(target = %self.target.display(), "checkpoint written");
        Ok(self.target.clone())
    }

    /// Moves the existing target aside, the new checkpoint into place, then deletes the old one.
    fn replace_target(&self, parent: &Path) -> Result<(), CheckpointError> {
        let name = self
            .target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let old = parent.join(format!(".{name}.mglue-old-{}", std::process::id()));
        if old.symlink_metadata().is_ok() {
            remove_any(&old)?;
        }
        std::fs::rename(&self.target, &old)
            .map_err(|e| CheckpointError::io("move aside", &self.target, e))?;
        if let Err(e) = std::fs::rename(&self.temp, &self.target) {
            // Put the previous checkpoint back so a failed replace changes nothing.
            if let Err(back) = std::fs::rename(&old, &self.target) {
                tracing::warn!(
                    old = %old.display(),
                    error = %back,
                    "could not restore the previous checkpoint; it is at this path"
                );
            }
            return Err(CheckpointError::io("rename into place", &self.temp, e));
        }
        if let Err(e) = remove_any(&old) {
            tracing::warn!(error = %e, "could not delete the replaced checkpoint");
        }
        Ok(())
    }

    fn write_file_unchecked(&self, name: &str, contents: &[u8]) -> Result<(), CheckpointError> {
        let path = self.temp.join(name);
        std::fs::write(&path, contents).map_err(|e| CheckpointError::io("write", &path, e))
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        match std::fs::remove_dir_all(&self.temp) {
            Ok(()) => tracing::debug!(
                partial = %self.temp.display(),
                "checkpoint not finished; removed its partial output"
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                partial = %self.temp.display(),
                error = %e,
                "could not remove the partial output of an unfinished checkpoint"
            ),
        }
    }
}

fn remove_any(path: &Path) -> Result<(), CheckpointError> {
    let is_dir = path.symlink_metadata().map(|m| m.is_dir()).unwrap_or(false);
    let removed = if is_dir {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    removed.map_err(|e| CheckpointError::io("remove", path, e))
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CheckpointError::io("sync", dir, e))
}

/// Syncs every regular file under `dir` (side files, index) and every directory, `dir` last.
fn sync_tree(dir: &Path) -> Result<(), CheckpointError> {
    let entries = std::fs::read_dir(dir).map_err(|e| CheckpointError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| CheckpointError::io("list", dir, e))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| CheckpointError::io("stat", &path, e))?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| CheckpointError::io("sync", &path, e))?;
        }
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn writer_is_send_and_sync() {
        assert_send_sync::<CheckpointWriter>();
    }

    #[test]
    fn relative_names_cannot_escape() {
        let t = Path::new("out");
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./x"] {
            assert!(checked_relative(t, bad).is_err(), "{bad:?}");
        }
        assert!(checked_relative(t, "sub/README.md").is_ok());
    }

    #[test]
    fn a_tensor_larger_than_the_limit_gets_its_own_shard() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("out");
        let plan: Vec<OutTensor> = [1usize, 10, 1, 1]
            .iter()
            .enumerate()
            .map(|(i, &n)| OutTensor {
                name: format!("t{i}"),
                dtype: DType::F32,
                shape: vec![n],
            })
            .collect();
        // Limit 8 bytes: [t0] [t1 (40 bytes)] [t2 t3].
        let w = CheckpointWriter::create(&target, &plan, 8, false).expect("create");
        let shards: Vec<usize> = w.slots.iter().map(|s| s.shard).collect();
        assert_eq!(shards, [0, 1, 2, 2]);
        assert_eq!(w.shard_names()[2], "model-00003-of-00003.safetensors");
    }
}

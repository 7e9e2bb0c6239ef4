//! Writing the output directory: a partial directory renamed into place when complete, JSON
//! files, and a streaming safetensors writer (one tensor in memory at a time).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::DType;
use half::slice::HalfFloatSliceExt;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use serde::Serialize;

use super::GgufError;

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> GgufError + 'a {
    move |source| GgufError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The element types the converter writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OutDType {
    F32,
    BF16,
    F16,
}

impl OutDType {
    pub(super) fn from_dtype(dtype: DType) -> Result<Self, GgufError> {
        match dtype {
            DType::F32 => Ok(Self::F32),
            DType::BF16 => Ok(Self::BF16),
            DType::F16 => Ok(Self::F16),
            other => Err(GgufError::UnsupportedDType { dtype: other }),
        }
    }

    /// The name transformers uses in `config.json` (`torch_dtype` / `dtype`).
    pub(super) fn hf_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::BF16 => "bfloat16",
            Self::F16 => "float16",
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::BF16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
        }
    }

    fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::BF16 | Self::F16 => 2,
        }
    }

    /// Little-endian bytes of `values` in this type (half types rounded to nearest even).
    pub(super) fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::BF16 => {
                let mut h = vec![half::bf16::ZERO; values.len()];
                h.convert_from_f32_slice(values);
                h.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            Self::F16 => {
                let mut h = vec![half::f16::ZERO; values.len()];
                h.convert_from_f32_slice(values);
                h.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
        }
    }
}

/// The directory being written: `.<name>.mglue-partial-<pid>` beside the target, removed on drop
/// unless [`PartialDir::commit`] renamed it into place.
pub(super) struct PartialDir {
    path: PathBuf,
    committed: bool,
}

/// `(parent, file name)` of an output path, `.` standing for an empty parent.
fn split_out(out: &Path) -> Result<(PathBuf, String), GgufError> {
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| GgufError::BadOutputPath {
            path: out.to_path_buf(),
        })?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_string()))
}

impl PartialDir {
    pub(super) fn create(out: &Path) -> Result<Self, GgufError> {
        let (parent, name) = split_out(out)?;
        fs::create_dir_all(&parent).map_err(io_err("create", &parent))?;
        let path = parent.join(format!(".{name}.mglue-partial-{}", std::process::id()));
        if path.exists() {
            // Left by an earlier run of a process that had this pid and died mid-write.
            fs::remove_dir_all(&path).map_err(io_err("remove the stale", &path))?;
        }
        fs::create_dir(&path).map_err(io_err("create", &path))?;
        Ok(Self {
            path,
            committed: false,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the finished directory to `out`. An existing `out` is an error unless
    /// `overwrite`, in which case it is moved aside first and removed once the new one is in
    /// place (restored if the rename fails).
    pub(super) fn commit(mut self, out: &Path, overwrite: bool) -> Result<(), GgufError> {
        if out.exists() {
            if !overwrite {
                return Err(GgufError::OutputExists {
                    path: out.to_path_buf(),
                });
            }
            let (parent, name) = split_out(out)?;
            let old = parent.join(format!(".{name}.mglue-old-{}", std::process::id()));
            if old.exists() {
                fs::remove_dir_all(&old).map_err(io_err("remove the stale", &old))?;
            }
            fs::rename(out, &old).map_err(io_err("move aside", out))?;
            if let Err(source) = fs::rename(&self.path, out) {
                let _ = fs::rename(&old, out);
                return Err(GgufError::Io {
                    action: "rename into place",
                    path: out.to_path_buf(),
                    source,
                });
            }
            self.committed = true;
            if old.is_dir() {
                fs::remove_dir_all(&old).map_err(io_err("remove the replaced", &old))?;
            } else {
                fs::remove_file(&old).map_err(io_err("remove the replaced", &old))?;
            }
            return Ok(());
        }
        fs::rename(&self.path, out).map_err(io_err("rename into place", out))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PartialDir {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = fs::remove_dir_all(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove partial output directory");
            }
        }
    }
}

/// Writes `value` as pretty-printed JSON with a trailing newline.
pub(super) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), GgufError> {
    let file = File::create(path).map_err(io_err("create", path))?;
    let mut w = BufWriter::new(file);
    serde_json::to_writer_pretty(&mut w, value).map_err(|source| GgufError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    w.write_all(b"\n").map_err(io_err("write", path))?;
    w.flush().map_err(io_err("write", path))
}

/// A tensor of the safetensors file: its name and shape (all share one dtype).
pub(super) struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Writes a safetensors file tensor by tensor, in the order of the entries given to
/// [`SafetensorsWriter::create`] (which must already be sorted by name: that is the order the
/// safetensors library itself uses, so the file is byte-identical to what it would write).
pub(super) struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    sizes: Vec<usize>,
    next: usize,
}

impl SafetensorsWriter {
    pub(super) fn create(path: &Path, entries: &[TensorEntry], dtype: OutDType) -> Result<Self, GgufError> {
        let mut offset = 0usize;
        let mut infos = Vec::with_capacity(entries.len());
        let mut sizes = Vec::with_capacity(entries.len());
        for e in entries {
            let n = e.shape.iter().product::<usize>() * dtype.size();
            infos.push((
                e.name.clone(),
                TensorInfo {
                    dtype: dtype.safetensors(),
                    shape: e.shape.clone(),
                    data_offsets: (offset, offset + n),
                },
            ));
            sizes.push(n);
            offset += n;
        }
        // transformers refuses a safetensors file whose metadata lacks `format`.
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let st_err = |source| GgufError::Safetensors {
            path: path.to_path_buf(),
            source,
        };
        let header = Metadata::new(Some(meta), infos).map_err(st_err)?;
        let mut header = serde_json::to_vec(&header).map_err(|source| GgufError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        // The safetensors library pads the header with spaces to a multiple of 8 bytes.
        header.resize(header.len().next_multiple_of(8), b' ');

        let file = File::create(path).map_err(io_err("create", path))?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        out.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|()| out.write_all(&header))
            .map_err(io_err("write", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            out,
            sizes,
            next: 0,
        })
    }

    /// Appends the next tensor's bytes.
    pub(super) fn write_tensor(&mut self, data: &[u8]) -> Result<(), GgufError> {
        let expected = self.sizes.get(self.next).copied();
        if expected != Some(data.len()) {
            return Err(GgufError::Io {
                action: "write",
                path: self.path.clone(),
                source: std::io::Error::other(format!(
                    "internal error: tensor {} has {} bytes, the header says {expected:?}",
                    self.next,
                    data.len()
                )),
            });
        }
        self.out.write_all(data).map_err(io_err("write", &self.path))?;
        self.next += 1;
        Ok(())
    }

    /// Flushes and syncs the file, after checking every tensor was written.
    pub(super) fn finish(mut self) -> Result<(), GgufError> {
        if self.next != self.sizes.len() {
            return Err(GgufError::Io {
                action: "write",
                path: self.path.clone(),
                source: std::io::Error::other(format!(
                    "internal error: {} of {} tensors written",
                    self.next,
                    self.sizes.len()
                )),
            });
        }
        self.out.flush().map_err(io_err("write", &self.path))?;
        self.out.get_ref().sync_all().map_err(io_err("sync", &self.path))
    }
}

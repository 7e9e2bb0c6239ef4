//! Plugin discovery and loading.
//!
//! Libraries are found in `--plugin-dir` directories (in order), then `MGLUE_PLUGIN_PATH`
//! (`:`-separated), then the directory of the `mglue` executable (so `cargo build` works out of
//! the box). Each library is loaded with abi_stable's `lib_header_from_path` +
//! `init_root_module` (`load_from_file` caches one module per type and so would load only one
//! plugin). Libraries are never unloaded. A file that fails to load becomes a [`LoadProblem`]
//! with a short message naming the file, and loading goes on with the others.

use abi_stable::library::{lib_header_from_path, LibraryError, RootModule};
use abi_stable::std_types::{RResult, RSlice, RStr};
use mglue_plugin_api::ffi::{MergeMethodVTable, MergeRequest, TensorHandle, ValidateRequest};
use mglue_plugin_api::{ApiVersion, LogSink, PluginKind, PluginModuleRef, API_VERSION};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::backend::CandleBackend;

/// Why a library or plugin was refused.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The file could not be opened as a shared library.
    #[error("{path}: not a loadable shared library ({reason})")]
    NotALibrary {
        /// The file.
        path: PathBuf,
        /// The dynamic loader's message.
        reason: String,
    },
    /// A shared library without a modelglue root module.
    #[error("{path}: not a modelglue plugin (it exports no plugin root module); remove it from the plugin directory")]
    NotAPlugin {
        /// The file.
        path: PathBuf,
    },
    /// Built for another ABI generation.
    #[error("{path}: built against plugin-api ABI {found}, this host speaks ABI {expected}; rebuild the plugin against plugin-api {host}")]
    IncompatibleAbi {
        /// The file.
        path: PathBuf,
        /// The plugin's ABI version.
        found: String,
        /// The host's ABI version.
        expected: String,
        /// The host's plugin-api version.
        host: ApiVersion,
    },
    /// The root module's layout differs from the host's.
    #[error("{path}: its plugin-api types have a different layout than this host's (a modified or mismatched plugin-api); rebuild the plugin against plugin-api {host}")]
    IncompatibleLayout {
        /// The file.
        path: PathBuf,
        /// The host's plugin-api version.
        host: ApiVersion,
    },
    /// The library's initialisation failed or panicked.
    #[error("{path}: the plugin failed while loading: {reason}")]
    InitFailed {
        /// The file.
        path: PathBuf,
        /// What it said.
        reason: String,
    },
    /// Two plugins with one name.
    #[error(
        "two plugins are named `{name}`: {first} and {second}; keeping the first — remove one of the files"
    )]
    Duplicate {
        /// The plugin name.
        name: String,
        /// The file that was kept.
        first: PathBuf,
        /// The file that was refused.
        second: PathBuf,
    },
    /// No plugin of that name and kind.
    #[error("no {kind} plugin named `{name}` (loaded: {available}); add its directory with --plugin-dir or MGLUE_PLUGIN_PATH")]
    NotFound {
        /// The requested name.
        name: String,
        /// The requested kind.
        kind: &'static str,
        /// Comma-separated names that are loaded.
        available: String,
    },
    /// The plugin refused parameters or failed during a call.
    #[error("plugin `{plugin}` ({path}): {message}")]
    Call {
        /// The plugin name.
        plugin: String,
        /// Its file.
        path: PathBuf,
        /// Its message.
        message: String,
    },
    /// A directory that cannot be read.
    #[error("plugin directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `--locked` and the library is not in the lock file, or its hash differs.
    #[error(
        "{path}: {reason}; refusing it under --locked (run `mglue plugins lock` to accept the current files)"
    )]
    NotLocked {
        /// The file.
        path: PathBuf,
        /// Not listed, or a different hash.
        reason: String,
    },
    /// The lock file cannot be read or written.
    #[error("lock file {path}: {reason}")]
    LockFile {
        /// The lock file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A world-writable plugin directory.
    #[error("plugin directory {path} is writable by every user, so anyone could plant code in it; fix its permissions (chmod o-w) or pass --allow-insecure-plugin-dir")]
    InsecureDir {
        /// The directory.
        path: PathBuf,
    },
}

/// Metadata of a loaded plugin, as Rust types.
#[derive(Debug, Clone)]
pub struct PluginInfo {
    /// Unique name.
    pub name: String,
    /// Kind.
    pub kind: PluginKind,
    /// The plugin's own version.
    pub version: String,
    /// One line.
    pub description: String,
    /// JSON Schema of the global parameters.
    pub params_schema: serde_json::Value,
    /// JSON Schema of the per-model parameters.
    pub model_params_schema: serde_json::Value,
    /// The file it came from.
    pub path: PathBuf,
    /// The plugin-api version it was built against.
    pub api_version: ApiVersion,
}

#[derive(Clone, Copy)]
enum Table {
    Merge(&'static MergeMethodVTable),
    Other,
}

/// A loaded plugin.
#[derive(Clone)]
pub struct Plugin {
    /// Its metadata.
    pub info: PluginInfo,
    table: Table,
}

/// A file that was not loaded, and why.
#[derive(Debug)]
pub struct LoadProblem {
    /// The error, naming the file.
    pub error: PluginError,
}

/// Where to look for plugins.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    /// `--plugin-dir`, in order.
    pub dirs: Vec<PathBuf>,
    /// Whether to read `MGLUE_PLUGIN_PATH`.
    pub use_env: bool,
    /// Whether to look next to the executable.
    pub use_exe_dir: bool,
    /// Accept world-writable directories.
    pub allow_insecure_dirs: bool,
    /// With `--locked`: only libraries whose sha256 is in this lock are loaded.
    pub lock: Option<PluginLock>,
}

/// The sha256 of every plugin library in use (`mglue plugins lock`), checked with `--locked`
/// before a library is opened (opening one runs its code).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PluginLock {
    /// Format version (1).
    pub version: u32,
    /// One entry per library.
    pub libraries: Vec<LockedLibrary>,
}

/// One locked library.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LockedLibrary {
    /// The file name (not the directory: a lock stays valid when the directory moves).
    pub file: String,
    /// Hex sha256 of the file's bytes.
    pub sha256: String,
    /// The plugins it exports.
    pub plugins: Vec<String>,
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut hasher)?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl PluginLock {
    /// Reads a lock file.
    pub fn read(path: &Path) -> Result<PluginLock, PluginError> {
        let err = |reason: String| PluginError::LockFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(format!("{e}; create it with `mglue plugins lock`")))?;
        let lock: PluginLock =
            serde_json::from_str(&text).map_err(|e| err(format!("not a valid lock file: {e}")))?;
        if lock.version != 1 {
            return Err(err(format!(
                "format version {} is not supported (expected 1)",
                lock.version
            )));
        }
        Ok(lock)
    }

    /// Writes the lock file (whole or not at all).
    pub fn write(&self, path: &Path) -> Result<(), PluginError> {
        let err = |reason: String| PluginError::LockFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = serde_json::to_string_pretty(self).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("lock.partial");
        std::fs::write(&tmp, format!("{text}\n")).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
    }

    fn check(&self, path: &Path) -> Result<(), PluginError> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let refuse = |reason: String| PluginError::NotLocked {
            path: path.to_path_buf(),
            reason,
        };
        let Some(entry) = self.libraries.iter().find(|l| l.file == name) else {
            return Err(refuse("not in the lock file".into()));
        };
        let hash = sha256_file(path).map_err(|e| refuse(format!("cannot hash it: {e}")))?;
        if hash != entry.sha256 {
            return Err(refuse(format!(
                "its sha256 {hash} differs from the locked {}",
                entry.sha256
            )));
        }
        Ok(())
    }
}

impl Discovery {
    /// The directories to search, in order, without duplicates.
    pub fn search_path(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = self.dirs.clone();
        if self.use_env {
            if let Some(v) = std::env::var_os("MGLUE_PLUGIN_PATH") {
                out.extend(std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()));
            }
        }
        if self.use_exe_dir {
            if let Some(dir) = std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
            {
                out.push(dir);
            }
        }
        let mut seen = std::collections::HashSet::new();
        out.retain(|p| seen.insert(p.canonicalize().unwrap_or_else(|_| p.clone())));
        out
    }
}

/// All loaded plugins, and the files that were refused.
#[derive(Default, Clone)]
pub struct Registry {
    plugins: Vec<Plugin>,
    by_name: HashMap<String, usize>,
    /// Refused files, in discovery order.
    pub problems: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    lock: Option<PluginLock>,
}

extern "C" fn host_log(level: u8, target: RStr<'_>, message: RStr<'_>) {
    let (target, message) = (target.as_str(), message.as_str());
    match level {
        0 => tracing::error!(target: "mglue::plugin", plugin_target = target, "{message}"),
        1 => tracing::warn!(target: "mglue::plugin", plugin_target = target, "{message}"),
        2 => tracing::info!(target: "mglue::plugin", plugin_target = target, "{message}"),
        3 => tracing::debug!(target: "mglue::plugin", plugin_target = target, "{message}"),
        _ => tracing::trace!(target: "mglue::plugin", plugin_target = target, "{message}"),
    }
}

fn host_max_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => 0,
        LevelFilter::WARN => 1,
        LevelFilter::INFO => 2,
        LevelFilter::DEBUG => 3,
        _ => 4,
    }
}

fn is_library(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some(std::env::consts::DLL_EXTENSION)
}

fn world_writable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            // The sticky bit (/tmp) does not stop anyone from adding files.
            return m.permissions().mode() & 0o002 != 0;
        }
    }
    false
}

fn classify(path: &Path, err: LibraryError) -> PluginError {
    let path = path.to_path_buf();
    match err {
        LibraryError::OpenError { err, .. } => {
            let reason = err.to_string();
            let reason = reason.rsplit(": ").next().unwrap_or(&reason).to_string();
            PluginError::NotALibrary { path, reason }
        }
        LibraryError::GetSymbolError { .. } => PluginError::NotAPlugin { path },
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => PluginError::IncompatibleAbi {
            path,
            found: actual_version.to_string(),
            expected: expected_version.to_string(),
            host: API_VERSION,
        },
        LibraryError::AbiInstability(_) => PluginError::IncompatibleLayout {
            path,
            host: API_VERSION,
        },
        LibraryError::RootModule { err, .. } => PluginError::InitFailed {
            path,
            reason: err.to_string().lines().next().unwrap_or("").to_string(),
        },
        other => PluginError::InitFailed {
            path,
            reason: other.to_string().lines().next().unwrap_or("").to_string(),
        },
    }
}

fn parse_schema(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or(serde_json::Value::Null)
}

impl Registry {
    /// Loads every plugin library found by `discovery`.
    pub fn discover(discovery: &Discovery) -> Registry {
        let mut reg = Registry {
            lock: discovery.lock.clone(),
            ..Registry::default()
        };
        for dir in discovery.search_path() {
            reg.load_dir(&dir, discovery.allow_insecure_dirs);
        }
        reg
    }

    fn problem(&self, error: PluginError) {
        // Reported once by the caller (the CLI prints every problem as a warning line).
        tracing::debug!("{error}");
        if let Ok(mut p) = self.problems.lock() {
            p.push(error.to_string());
        }
    }

    /// Refused files and their reasons, one line each.
    pub fn problem_messages(&self) -> Vec<String> {
        self.problems.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Loads every library in one directory (sorted by file name). Missing directories are
    /// skipped silently (search paths often name optional places).
    pub fn load_dir(&mut self, dir: &Path, allow_insecure: bool) {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(source) => {
                self.problem(PluginError::Dir {
                    path: dir.to_path_buf(),
                    source,
                });
                return;
            }
        };
        if !allow_insecure && world_writable(dir) {
            self.problem(PluginError::InsecureDir {
                path: dir.to_path_buf(),
            });
            return;
        }
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| is_library(p))
            .collect();
        files.sort();
        for f in files {
            self.load_file(&f);
        }
    }

    /// Loads one library file; problems are recorded, never fatal.
    pub fn load_file(&mut self, path: &Path) {
        if let Some(lock) = &self.lock {
            if let Err(e) = lock.check(path) {
                self.problem(e);
                return;
            }
        }
        let module = lib_header_from_path(path).and_then(|h| h.init_root_module::<PluginModuleRef>());
        match module {
            Ok(m) => self.add_module(m, path),
            Err(e) => self.problem(classify(path, e)),
        }
    }

    /// Registers the plugins of a root module loaded from a library file.
    pub fn add_module(&mut self, module: PluginModuleRef, path: &Path) {
        (module.set_log_sink())(LogSink {
            max_level: host_max_level(),
            log: host_log,
        });
        self.register(module, path);
    }

    /// Registers the plugins of a root module linked into this process (tests): the plugin's
    /// `tracing` is then the host's own, so no log sink is installed.
    pub fn add_in_process(&mut self, module: PluginModuleRef, origin: &str) {
        self.register(module, Path::new(origin));
    }

    fn register(&mut self, module: PluginModuleRef, path: &Path) {
        let api_version = module.api_version();
        if api_version.major != API_VERSION.major {
            self.problem(PluginError::IncompatibleAbi {
                path: path.to_path_buf(),
                found: api_version.to_string(),
                expected: API_VERSION.to_string(),
                host: API_VERSION,
            });
            return;
        }
        if api_version.minor > API_VERSION.minor {
            tracing::debug!(
                path = %path.display(),
                "built against plugin-api {api_version}, newer than this host's {API_VERSION}: ops it needs from a newer host will fail with a message"
            );
        }
        let entries = match std::panic::catch_unwind(|| (module.plugins())()) {
            Ok(e) => e,
            Err(_) => {
                self.problem(PluginError::InitFailed {
                    path: path.to_path_buf(),
                    reason: "panicked while listing its plugins".into(),
                });
                return;
            }
        };
        if entries.is_empty() {
            self.problem(PluginError::InitFailed {
                path: path.to_path_buf(),
                reason: "it exports no plugins (its plugin list is empty or panicked)".into(),
            });
            return;
        }
        for entry in entries {
            let meta = entry.meta;
            let info = PluginInfo {
                name: meta.name.to_string(),
                kind: meta.kind,
                version: meta.version.to_string(),
                description: meta.description.to_string(),
                params_schema: parse_schema(&meta.params_schema),
                model_params_schema: parse_schema(&meta.model_params_schema),
                path: path.to_path_buf(),
                api_version,
            };
            let table = match meta.kind {
                PluginKind::MergeMethod => {
                    // SAFETY: a merge-method entry's table is a `'static MergeMethodVTable`
                    // (export_plugin! builds it); its size is checked below before use.
                    let t = unsafe { &*(entry.vtable.as_ptr() as *const MergeMethodVTable) };
                    if t.struct_size < std::mem::size_of::<MergeMethodVTable>() {
                        self.problem(PluginError::InitFailed {
                            path: path.to_path_buf(),
                            reason: format!("merge method `{}` has a truncated entry table", info.name),
                        });
                        continue;
                    }
                    Table::Merge(t)
                }
                _ => Table::Other,
            };
            if let Some(&i) = self.by_name.get(&info.name) {
                self.problem(PluginError::Duplicate {
                    name: info.name.clone(),
                    first: self.plugins[i].info.path.clone(),
                    second: path.to_path_buf(),
                });
                continue;
            }
            tracing::debug!(plugin = %info.name, path = %path.display(), api = %api_version, "loaded plugin");
            self.by_name.insert(info.name.clone(), self.plugins.len());
            self.plugins.push(Plugin { info, table });
        }
    }

    /// A lock of every library that provided a loaded plugin.
    pub fn to_lock(&self) -> Result<PluginLock, PluginError> {
        let mut libraries: Vec<LockedLibrary> = Vec::new();
        for p in &self.plugins {
            let file = p
                .info
                .path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if let Some(l) = libraries.iter_mut().find(|l| l.file == file) {
                l.plugins.push(p.info.name.clone());
                continue;
            }
            let sha256 = sha256_file(&p.info.path).map_err(|e| PluginError::LockFile {
                path: p.info.path.clone(),
                reason: format!("cannot hash it: {e}"),
            })?;
            libraries.push(LockedLibrary {
                file,
                sha256,
                plugins: vec![p.info.name.clone()],
            });
        }
        Ok(PluginLock {
            version: 1,
            libraries,
        })
    }

    /// Every loaded plugin, in load order.
    pub fn plugins(&self) -> impl Iterator<Item = &Plugin> {
        self.plugins.iter()
    }

    /// A plugin by name, of any kind.
    pub fn get(&self, name: &str) -> Option<&Plugin> {
        self.by_name.get(name).map(|&i| &self.plugins[i])
    }

    /// The merge method called `name`.
    pub fn merge_method(&self, name: &str) -> Result<MergeMethodPlugin, PluginError> {
        match self.get(name) {
            Some(Plugin {
                info,
                table: Table::Merge(t),
            }) => Ok(MergeMethodPlugin {
                info: info.clone(),
                table: t,
            }),
            _ => Err(PluginError::NotFound {
                name: name.to_string(),
                kind: "merge",
                available: self
                    .plugins
                    .iter()
                    .filter(|p| p.info.kind == PluginKind::MergeMethod)
                    .map(|p| p.info.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}

/// A merge method ready to call.
#[derive(Clone)]
pub struct MergeMethodPlugin {
    /// Its metadata.
    pub info: PluginInfo,
    table: &'static MergeMethodVTable,
}

/// One merge call, in host types.
pub struct MergeCall<'a> {
    /// Tensor name.
    pub tensor_name: &'a str,
    /// Decoder layer.
    pub layer: Option<usize>,
    /// Base tensor.
    pub base: Option<&'a candle_core::Tensor>,
    /// Position of the base among `models`.
    pub base_index: Option<usize>,
    /// The models' tensors.
    pub models: &'a [candle_core::Tensor],
    /// Global parameters (JSON object text).
    pub params: &'a str,
    /// Per-model parameters (JSON object text each).
    pub model_params: &'a [String],
    /// Seed for this tensor.
    pub seed: u64,
}

fn to_i64(v: Option<usize>) -> i64 {
    v.map(|i| i as i64).unwrap_or(-1)
}

impl MergeMethodPlugin {
    fn call_error(&self, message: String) -> PluginError {
        PluginError::Call {
            plugin: self.info.name.clone(),
            path: self.info.path.clone(),
            message,
        }
    }

    /// Checks one parameter set (no weights involved).
    pub fn validate(
        &self,
        tensor_name: &str,
        layer: Option<usize>,
        base_index: Option<usize>,
        has_base: bool,
        params: &str,
        model_params: &[String],
    ) -> Result<(), PluginError> {
        let mp: Vec<RStr<'_>> = model_params.iter().map(|s| RStr::from_str(s)).collect();
        let req = ValidateRequest {
            struct_size: std::mem::size_of::<ValidateRequest>(),
            tensor_name: RStr::from_str(tensor_name),
            layer: to_i64(layer),
            base_index: to_i64(base_index),
            has_base: has_base as u8,
            params: RStr::from_str(params),
            model_params: RSlice::from_slice(&mp),
        };
        // SAFETY: the request lives across the call; the plugin contains its own panics.
        match unsafe { (self.table.validate)(&req) } {
            RResult::ROk(_) => Ok(()),
            RResult::RErr(e) => Err(self.call_error(e.into_string())),
        }
    }

    /// Merges one tensor on `backend`.
    pub fn merge(
        &self,
        backend: &CandleBackend,
        call: &MergeCall<'_>,
    ) -> Result<candle_core::Tensor, PluginError> {
        let vt = backend.vtable();
        let handles: Vec<TensorHandle> = call.models.iter().map(|t| backend.share(t)).collect();
        let base = call.base.map(|t| backend.share(t)).unwrap_or(TensorHandle::NULL);
        let mp: Vec<RStr<'_>> = call.model_params.iter().map(|s| RStr::from_str(s)).collect();
        let req = MergeRequest {
            struct_size: std::mem::size_of::<MergeRequest>(),
            tensor_name: RStr::from_str(call.tensor_name),
            layer: to_i64(call.layer),
            base,
            base_index: to_i64(call.base_index),
            models: RSlice::from_slice(&handles),
            params: RStr::from_str(call.params),
            model_params: RSlice::from_slice(&mp),
            seed: call.seed,
        };
        // SAFETY: table, request and handles live across the call; the plugin contains panics.
        let result = unsafe { (self.table.merge_tensor)(&vt, &req) };
        for h in handles {
            // SAFETY: the host created these input handles and releases each once.
            unsafe { backend.release(h) };
        }
        if !base.is_null() {
            // SAFETY: as above.
            unsafe { backend.release(base) };
        }
        match result {
            // SAFETY: the plugin hands over ownership of the returned handle.
            RResult::ROk(h) if !h.is_null() => Ok(unsafe { backend.take(h) }),
            RResult::ROk(_) => Err(self.call_error("returned no tensor".into())),
            RResult::RErr(e) => Err(self.call_error(e.into_string())),
        }
    }
}

/// The ABI version string the host accepts, for messages.
pub fn host_abi() -> String {
    PluginModuleRef::VERSION_STRINGS.version.to_string()
}

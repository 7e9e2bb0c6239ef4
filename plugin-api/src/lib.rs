//! The stable plugin ABI of modelglue: the only crate a plugin depends on.
//!
//! # Shape of the boundary
//!
//! A plugin is a `cdylib` that exports one abi_stable root module, [`PluginModule`]. abi_stable
//! checks that module's layout when the host loads the file, so everything reachable from it is
//! frozen: [`PluginMeta`], [`PluginEntry`], [`LogSink`]. The parts that must grow between
//! plugin-api minor versions — the host's tensor operations ([`ffi::BackendVTable`]) and each
//! plugin kind's entry points ([`ffi::MergeMethodVTable`], …) — are C-style tables that start with
//! their own size, passed as opaque pointers that abi_stable does not inspect. A plugin built
//! against plugin-api 1.0 reads only the prefix of the backend table it knows; a plugin that
//! needs an op added in 1.N asks for it through [`Backend`] and gets a clear error from a host
//! older than 1.N. This is the Vulkan / Linux `struct size` idiom, chosen because abi_stable's
//! own layout check is one-way: a host whose `#[sabi_trait]` gained a method rejects every plugin
//! built before it (see `docs/ARCHITECTURE.md`).
//!
//! Tensors never cross the boundary: the host owns them (candle, CPU or CUDA) and a plugin holds
//! opaque [`ffi::TensorHandle`]s, wrapped in the ergonomic [`Tensor`] type.
//!
//! # Writing a plugin
//!
//! ```ignore
//! use mglue_plugin_api::prelude::*;
//!
//! /// Parameters of the whole merge.
//! #[derive(serde::Deserialize, schemars::JsonSchema)]
//! #[serde(deny_unknown_fields)]
//! pub struct Params { /** Divide by the sum of weights. */ #[serde(default)] pub normalize: bool }
//!
//! pub struct Mean;
//! impl MergeMethod for Mean { /* … */ }
//! mglue_plugin_api::export_plugin!(merge: [Mean]);
//! ```

#![deny(missing_docs)]

pub mod error;
pub mod export;
pub mod ffi;
pub mod log;
pub mod merge;
pub mod tensor;

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    sabi_types::VersionStrings,
    std_types::{RStr, RString, RVec},
    StableAbi,
};

pub use error::{Error, Result};
pub use merge::{MergeContext, MergeInput, MergeMethod, ValidateContext};
pub use tensor::{Backend, DType, Tensor};
/// The `tracing` plugins log with; events are forwarded to the host (see [`log`]).
pub use tracing;

/// Re-exports for the [`export_plugin!`] macro; not part of the public API.
#[doc(hidden)]
pub mod __private {
    pub use abi_stable;
    pub use schemars;
    pub use serde_json;
}

/// Everything a plugin usually needs.
pub mod prelude {
    pub use crate::error::{Error, Result};
    pub use crate::merge::{MergeContext, MergeInput, MergeMethod, ValidateContext};
    pub use crate::tensor::{Backend, DType, Tensor};
}

/// The plugin-api version this crate is (major, minor, patch). Major changes only for an
/// incompatible ABI; minor grows when backend ops or plugin kinds are appended.
pub const API_VERSION: ApiVersion = ApiVersion {
    major: 1,
    minor: 3,
    patch: 0,
};

/// A plugin-api version, recorded by every plugin at build time.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiVersion {
    /// Incompatible ABI generation.
    pub major: u32,
    /// Backwards-compatible additions (backend ops, plugin kinds, fields appended to tables).
    pub minor: u32,
    /// Fixes without ABI change.
    pub patch: u32,
}

impl std::fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The extension point a plugin implements. All four kinds are reserved from plugin-api 1.0 so
/// that adding their traits later does not change this enum's layout.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PluginKind {
    /// Combines the same tensor of several models (linear, ties, …).
    MergeMethod,
    /// Proposes which models and coefficients to merge (heuristics, CMA-ES).
    SelectionStrategy,
    /// Computes gate logits for a mixture.
    Router,
    /// Plans where a mixture routes (ffn, block, model, stacking).
    MixtureLevel,
}

impl PluginKind {
    /// The name used on the command line (`merge`, `select`, `router`, `mix`).
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::MergeMethod => "merge",
            PluginKind::SelectionStrategy => "select",
            PluginKind::Router => "router",
            PluginKind::MixtureLevel => "mix",
        }
    }
}

/// Static description of one plugin.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct PluginMeta {
    /// Unique name used on the command line and in configs, e.g. `ties`.
    pub name: RString,
    /// Which trait the plugin implements.
    pub kind: PluginKind,
    /// The plugin's own version (its crate version).
    pub version: RString,
    /// One line: what the plugin does.
    pub description: RString,
    /// JSON Schema of the global parameters.
    pub params_schema: RString,
    /// JSON Schema of the per-model parameters (`{}` when there are none).
    pub model_params_schema: RString,
}

/// One plugin exported by a library: its metadata and its kind's entry points.
#[repr(C)]
#[derive(StableAbi)]
pub struct PluginEntry {
    /// Name, kind, version, schemas.
    pub meta: PluginMeta,
    /// The kind's table (for [`PluginKind::MergeMethod`]: a `*const ffi::MergeMethodVTable`).
    /// Opaque to abi_stable; each table starts with its own size (see [`ffi`]).
    pub vtable: ffi::OpaqueTable,
}

/// Where a plugin's `tracing` events go: the host's subscriber.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct LogSink {
    /// The most verbose level the host wants (0 error … 4 trace).
    pub max_level: u8,
    /// Receives one formatted event.
    pub log: extern "C" fn(level: u8, target: RStr<'_>, message: RStr<'_>),
}

/// The root module every plugin library exports. A prefix type: fields are only appended, and
/// fields after `last_prefix_field` read as `None` from older plugins.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(option))]
pub struct PluginModule {
    /// The plugin-api version the library was built against.
    pub api_version: ApiVersion,
    /// Installs the host's log sink in the library (called once, right after loading).
    pub set_log_sink: extern "C" fn(LogSink),
    /// The plugins the library exports.
    #[sabi(last_prefix_field)]
    pub plugins: extern "C" fn() -> RVec<PluginEntry>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "mglue_plugin";
    const NAME: &'static str = "mglue_plugin";
    // The ABI generation, not the crate version: abi_stable rejects a library whose minor is
    // below the loader's, and minor additions are handled by the size-prefixed tables instead.
    const VERSION_STRINGS: VersionStrings = VersionStrings::new("1.0.0");
}

/// The symbol abi_stable looks up, spelled out so that [`export_plugin!`] works in a crate
/// that does not depend on abi_stable itself (a unit test pins it to abi_stable's constant).
#[doc(hidden)]
pub const ROOT_MODULE_SYMBOL: &str = "_1as_0lib_1header_0root_bmodule_bloader";

#[cfg(test)]
mod tests {
    #[test]
    fn root_module_symbol_matches_abi_stable() {
        assert_eq!(
            super::ROOT_MODULE_SYMBOL,
            abi_stable::library::ROOT_MODULE_LOADER_NAME
        );
    }
}

//! [`export_plugin!`](crate::export_plugin): the one line that turns a crate into a plugin.

use crate::ffi::{MergeMethodVTable, OpaqueTable};
use crate::merge::{merge_shim, validate_shim, MergeMethod};
use crate::{PluginEntry, PluginKind, PluginMeta};

/// The size-prefixed table of a merge method.
pub struct MergeTable<M>(std::marker::PhantomData<M>);

impl<M: MergeMethod> MergeTable<M> {
    /// One static table per method type.
    pub const TABLE: MergeMethodVTable = MergeMethodVTable {
        struct_size: std::mem::size_of::<MergeMethodVTable>(),
        validate: validate_shim::<M>,
        merge_tensor: merge_shim::<M>,
    };
}

fn schema_of<T: schemars::JsonSchema>() -> String {
    let schema = schemars::schema_for!(T);
    serde_json::to_string_pretty(&schema).unwrap_or_else(|_| "{}".to_string())
}

/// The entry describing merge method `M`, built by [`export_plugin!`](crate::export_plugin).
pub fn merge_entry<M: MergeMethod>(version: &str, table: &'static MergeMethodVTable) -> PluginEntry {
    PluginEntry {
        meta: PluginMeta {
            name: M::NAME.into(),
            kind: PluginKind::MergeMethod,
            version: version.into(),
            description: M::DESCRIPTION.into(),
            params_schema: schema_of::<M::Params>().into(),
            model_params_schema: schema_of::<M::ModelParams>().into(),
            #[cfg(feature = "bad-layout")]
            extra: 0,
        },
        vtable: OpaqueTable::new(table),
    }
}

/// Exports the plugins of a crate. Lists every exported type by kind:
///
/// ```ignore
/// mglue_plugin_api::export_plugin!(merge: [DareLinear, DareTies]);
/// ```
///
/// It defines the abi_stable library header the host looks up, a `mglue_root_module()` function
/// that returns the same root module in-process (for tests through the FFI path), and contains
/// panics in every entry point.
#[macro_export]
macro_rules! export_plugin {
    (merge: [$($method:ty),* $(,)?] $(,)?) => {
        /// The root module of this plugin library, as the host sees it.
        pub fn mglue_root_module() -> $crate::PluginModuleRef {
            use $crate::__private::abi_stable::prefix_type::PrefixTypeTrait as _;
            extern "C" fn plugins() -> $crate::__private::abi_stable::std_types::RVec<$crate::PluginEntry> {
                let list = ::std::panic::catch_unwind(|| {
                    ::std::vec![$(
                        $crate::export::merge_entry::<$method>(
                            env!("CARGO_PKG_VERSION"),
                            {
                                static TABLE: $crate::ffi::MergeMethodVTable =
                                    $crate::export::MergeTable::<$method>::TABLE;
                                &TABLE
                            },
                        )
                    ),*]
                });
                list.unwrap_or_default().into()
            }
            $crate::PluginModule {
                api_version: $crate::API_VERSION,
                set_log_sink: $crate::log::set_log_sink,
                plugins,
            }
            .leak_into_prefix()
        }

        #[doc(hidden)]
        #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
        pub static MGLUE_PLUGIN_LIB_HEADER: $crate::__private::abi_stable::library::LibHeader = {
            extern "C" fn erased() -> $crate::__private::abi_stable::library::RootModuleResult {
                $crate::__private::abi_stable::library::__call_root_module_loader(mglue_root_module)
            }
            // SAFETY: `erased` returns the root module type named here, as abi_stable requires.
            unsafe {
                $crate::__private::abi_stable::library::LibHeader::from_constructor::<$crate::PluginModuleRef>(
                    erased,
                    $crate::__private::abi_stable::library::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

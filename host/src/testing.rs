//! Test helper for plugin crates: runs a plugin's root module through the same JSON + FFI path
//! the host uses for a loaded `.so`, on the real candle backend.
//!
//! A plugin crate is built as `["cdylib", "rlib"]`; its tests link the rlib and pass
//! `my_plugin::mglue_root_module()` here. (It lives in the host rather than in plugin-api
//! because it needs the candle backend, and plugin-api must not link candle.)

use crate::backend::CandleBackend;
use crate::plugins::{MergeCall, MergeMethodPlugin, PluginError, PluginInfo, Registry};
use candle_core::{Device, Tensor};
use mglue_plugin_api::PluginModuleRef;
use serde_json::Value;

/// A registry holding one in-process plugin library, and a CPU backend.
pub struct PluginHarness {
    registry: Registry,
    backend: CandleBackend,
}

/// One model's input to [`PluginHarness::merge`].
pub struct ModelInput {
    /// The tensor.
    pub tensor: Tensor,
    /// The per-model parameters (a JSON object).
    pub params: Value,
}

impl ModelInput {
    /// A model input.
    pub fn new(tensor: Tensor, params: Value) -> Self {
        ModelInput { tensor, params }
    }
}

impl PluginHarness {
    /// Registers the plugins of `module` (a plugin crate's `mglue_root_module()`).
    pub fn new(module: PluginModuleRef) -> Self {
        let mut registry = Registry::default();
        registry.add_in_process(module, "<in-process>");
        PluginHarness {
            registry,
            backend: CandleBackend::new(Device::Cpu),
        }
    }

    /// Metadata of a plugin (name, schemas).
    pub fn info(&self, name: &str) -> Option<PluginInfo> {
        self.registry.get(name).map(|p| p.info.clone())
    }

    fn method(&self, name: &str) -> Result<MergeMethodPlugin, PluginError> {
        self.registry.merge_method(name)
    }

    /// Validates parameters as the host does before reading weights.
    pub fn validate(
        &self,
        method: &str,
        params: &Value,
        model_params: &[Value],
        base_index: Option<usize>,
        has_base: bool,
    ) -> Result<(), PluginError> {
        let mp: Vec<String> = model_params.iter().map(Value::to_string).collect();
        self.method(method)?.validate(
            "model.layers.0.mlp.up_proj.weight",
            Some(0),
            base_index,
            has_base,
            &params.to_string(),
            &mp,
        )
    }

    /// Validates, then merges one tensor.
    pub fn merge(
        &self,
        method: &str,
        params: &Value,
        models: &[ModelInput],
        base: Option<&Tensor>,
        base_index: Option<usize>,
    ) -> Result<Tensor, PluginError> {
        self.merge_named(
            method,
            "model.layers.0.mlp.up_proj.weight",
            params,
            models,
            base,
            base_index,
            42,
        )
    }

    /// [`PluginHarness::merge`] with an explicit tensor name and seed.
    #[allow(clippy::too_many_arguments)]
    pub fn merge_named(
        &self,
        method: &str,
        tensor_name: &str,
        params: &Value,
        models: &[ModelInput],
        base: Option<&Tensor>,
        base_index: Option<usize>,
        seed: u64,
    ) -> Result<Tensor, PluginError> {
        let plugin = self.method(method)?;
        let mp: Vec<String> = models.iter().map(|m| m.params.to_string()).collect();
        let p = params.to_string();
        let layer = crate::merge::layer_of(tensor_name);
        plugin.validate(tensor_name, layer, base_index, base.is_some(), &p, &mp)?;
        let tensors: Vec<Tensor> = models.iter().map(|m| m.tensor.clone()).collect();
        plugin.merge(
            &self.backend,
            &MergeCall {
                tensor_name,
                layer,
                base,
                base_index,
                models: &tensors,
                params: &p,
                model_params: &mp,
                seed,
            },
        )
    }
}

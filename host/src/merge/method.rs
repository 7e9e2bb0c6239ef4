//! What computes an output tensor: a merge-method plugin, or the built-in `passthrough` (a copy
//! of the one source tensor, optionally scaled), which is part of the layout engine rather than a
//! plugin because it does no math across models.

use candle_core::{DType, Tensor};
use serde_json::Value;

use super::MergeError;
use crate::plugins::{MergeMethodPlugin, Registry};

/// The method of a plan.
pub(crate) enum Method {
    /// A loaded merge-method plugin.
    Plugin(MergeMethodPlugin),
    /// mergekit's `passthrough`: exactly one source per tensor, copied (times `scale`).
    Passthrough,
}

/// One tensor's parameters, as [`Method::validate`] checks them.
pub(crate) struct Check<'a> {
    /// The output tensor.
    pub tensor: &'a str,
    /// Its output decoder layer.
    pub layer: Option<usize>,
    /// Position of the base model among the sources.
    pub base_index: Option<usize>,
    /// Whether a base tensor is passed.
    pub has_base: bool,
    /// Method-level parameters (JSON object text).
    pub params: &'a str,
    /// Per-source parameters (JSON object text each).
    pub model_params: &'a [String],
    /// The source models, for messages.
    pub sources: &'a [String],
}

/// The per-model parameter of `passthrough`.
pub(crate) const SCALE: &str = "scale";

impl Method {
    /// `passthrough` is built in; every other name is looked up among the loaded plugins.
    pub fn resolve(name: &str, registry: &Registry) -> Result<Method, MergeError> {
        if name == "passthrough" {
            return Ok(Method::Passthrough);
        }
        Ok(Method::Plugin(registry.merge_method(name)?))
    }

    /// The method name.
    pub fn name(&self) -> &str {
        match self {
            Method::Plugin(p) => &p.info.name,
            Method::Passthrough => "passthrough",
        }
    }

    /// One line on where the method comes from, for the model card.
    pub fn provenance(&self) -> String {
        match self {
            Method::Plugin(p) => format!(
                "plugin version {}, {}; built against plugin-api {}",
                p.info.version, p.info.description, p.info.api_version
            ),
            Method::Passthrough => "built in: each output layer is copied from one source layer".to_string(),
        }
    }

    /// Names of the method-level parameters.
    pub fn global_keys(&self) -> Vec<String> {
        match self {
            Method::Plugin(p) => schema_keys(&p.info.params_schema),
            Method::Passthrough => Vec::new(),
        }
    }

    /// Names of the per-model parameters.
    pub fn model_keys(&self) -> Vec<String> {
        match self {
            Method::Plugin(p) => schema_keys(&p.info.model_params_schema),
            Method::Passthrough => vec![SCALE.to_string()],
        }
    }

    /// Checks one tensor's parameter set (no weights involved).
    pub fn validate(&self, c: &Check<'_>) -> Result<(), MergeError> {
        let (tensor, model_params) = (c.tensor, c.model_params);
        match self {
            Method::Plugin(p) => {
                Ok(p.validate(tensor, c.layer, c.base_index, c.has_base, c.params, model_params)?)
            }
            Method::Passthrough => {
                if model_params.len() != 1 {
                    return Err(MergeError::Plan(format!(
                        "passthrough copies exactly one tensor, but `{tensor}` has {} sources ({}); give each slice a \
                         single source with its `layer_range`, or use a merge method such as linear or slerp",
                        model_params.len(),
                        c.sources.join(", ")
                    )));
                }
                passthrough_scale(&model_params[0])
                    .map(|_| ())
                    .map_err(|m| MergeError::Plan(format!("`{tensor}`: {m}")))
            }
        }
    }
}

/// The `scale` of a passthrough source (`None`: a plain copy).
pub(crate) fn passthrough_scale(model_params: &str) -> Result<Option<f64>, String> {
    let v: Value = serde_json::from_str(model_params).map_err(|e| format!("invalid parameters: {e}"))?;
    match v.get(SCALE) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64().filter(|&s| s != 1.0)),
        Some(other) => Err(format!(
            "passthrough's `scale` must be a number (a multiplier of the copied tensor), found {other}"
        )),
    }
}

/// `t · scale` in the tensor's dtype (computed in f32 and rounded, as torch does for halves).
pub(crate) fn scale_tensor(t: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let dtype = t.dtype();
    if dtype == DType::F64 {
        return t.affine(scale, 0.0);
    }
    let shape = t.dims().to_vec();
    let s = scale as f32;
    let values: Vec<f32> = t
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|x| x * s)
        .collect();
    crate::backend::kernels::tensor_from_f32(values, &shape, dtype)
}

fn schema_keys(schema: &Value) -> Vec<String> {
    schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

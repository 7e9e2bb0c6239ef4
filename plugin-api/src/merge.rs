//! The [`MergeMethod`] trait: one tensor of several models in, one tensor out.

use crate::error::{Error, Result};
use crate::ffi::{BackendVTable, FfiResult, MergeRequest, TensorHandle, ValidateRequest};
use crate::tensor::{Backend, Tensor};
use abi_stable::std_types::{RResult, RSlice, RStr, RString};
use serde::de::DeserializeOwned;

/// What a parameter check knows about the tensor and the merge.
#[derive(Debug, Clone)]
pub struct ValidateContext<'a> {
    /// A tensor the parameters apply to.
    pub tensor_name: &'a str,
    /// Its decoder layer, if any.
    pub layer: Option<usize>,
    /// Number of models (including the base when it is listed among them).
    pub num_models: usize,
    /// Position of the base among the models, when listed there.
    pub base_index: Option<usize>,
    /// Whether the merge has a base model.
    pub has_base: bool,
}

/// Everything a merge call sees besides the models' tensors.
pub struct MergeContext<'b> {
    /// The host's tensor operations.
    pub backend: Backend<'b>,
    /// The tensor's name.
    pub tensor_name: &'b str,
    /// Its decoder layer, if any.
    pub layer: Option<usize>,
    /// The base model's tensor.
    pub base: Option<Tensor<'b>>,
    /// Position of the base among the models, when listed there.
    pub base_index: Option<usize>,
    /// Seed for random methods (already specific to this tensor).
    pub seed: u64,
}

impl<'b> MergeContext<'b> {
    /// The base tensor, or an error naming the method that needs one.
    pub fn require_base(&self, method: &str) -> Result<&Tensor<'b>> {
        self.base.as_ref().ok_or_else(|| {
            Error::params(format!(
                "`{method}` needs a base model: set `base_model:` in the config or --base on the command line"
            ))
        })
    }
}

/// One model's tensor and parameters.
pub struct MergeInput<'b, P> {
    /// The model's tensor (host-owned; borrowed for the call).
    pub tensor: Tensor<'b>,
    /// The model's parameters.
    pub params: P,
    /// Whether this model is the base model.
    pub is_base: bool,
}

/// A merge method. Implement it on a unit struct and export it with
/// [`export_plugin!`](crate::export_plugin).
///
/// Parameters are serde structs with `#[serde(deny_unknown_fields)]` and doc comments on every
/// field: the JSON Schema derived from them is what `mglue plugins show` prints, and the host
/// validates every parameter set against [`MergeMethod::validate`] before reading any weight.
pub trait MergeMethod: 'static {
    /// The name used in configs (`merge_method: linear`).
    const NAME: &'static str;
    /// One line: what it computes.
    const DESCRIPTION: &'static str;
    /// Global parameters (`parameters:` at the top of the config).
    type Params: DeserializeOwned + schemars::JsonSchema;
    /// Per-model parameters (`models[i].parameters`), with globals of the same name as fallback.
    type ModelParams: DeserializeOwned + schemars::JsonSchema;

    /// Checks a parameter set before any weight is read (model count, base, value ranges).
    fn validate(
        _params: &Self::Params,
        _models: &[Self::ModelParams],
        _cx: &ValidateContext<'_>,
    ) -> Result<()> {
        Ok(())
    }

    /// Merges one tensor.
    fn merge<'b>(
        params: &Self::Params,
        models: Vec<MergeInput<'b, Self::ModelParams>>,
        cx: &MergeContext<'b>,
    ) -> Result<Tensor<'b>>;
}

fn parse<T: DeserializeOwned>(json: RStr<'_>, what: &str, method: &str) -> Result<T> {
    let text = if json.as_str().trim().is_empty() {
        "{}"
    } else {
        json.as_str()
    };
    serde_json::from_str(text).map_err(|e| {
        Error::params(format!(
            "{what} of `{method}`: {e} (see `mglue plugins show {method}`)"
        ))
    })
}

fn index(i: i64) -> Option<usize> {
    usize::try_from(i).ok()
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Runs plugin code so that neither an error nor a panic crosses the boundary as anything but
/// a message.
pub(crate) fn contain<T>(plugin: &str, f: impl FnOnce() -> Result<T>) -> FfiResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(RString::from(e.to_string())),
        Err(payload) => RResult::RErr(RString::from(format!(
            "plugin `{plugin}` panicked: {}",
            panic_message(payload.as_ref())
        ))),
    }
}

fn parse_models<M: MergeMethod>(list: RSlice<'_, RStr<'_>>) -> Result<Vec<M::ModelParams>> {
    list.iter()
        .enumerate()
        .map(|(i, p)| parse(*p, &format!("parameters of model #{i}"), M::NAME))
        .collect()
}

/// FFI shim for [`MergeMethod::validate`].
///
/// # Safety
/// `req` must point to a valid request for the duration of the call.
pub unsafe extern "C" fn validate_shim<M: MergeMethod>(req: *const ValidateRequest<'_>) -> FfiResult<u8> {
    contain(M::NAME, || {
        // SAFETY: the caller passes a valid request.
        let req = unsafe { &*req };
        let params: M::Params = parse(req.params, "parameters", M::NAME)?;
        let models = parse_models::<M>(req.model_params)?;
        let cx = ValidateContext {
            tensor_name: req.tensor_name.as_str(),
            layer: index(req.layer),
            num_models: models.len(),
            base_index: index(req.base_index),
            has_base: req.has_base != 0,
        };
        M::validate(&params, &models, &cx).map(|()| 1)
    })
}

/// FFI shim for [`MergeMethod::merge`].
///
/// # Safety
/// `backend` and `req` must be valid for the duration of the call, with live handles.
pub unsafe extern "C" fn merge_shim<M: MergeMethod>(
    backend: *const BackendVTable,
    req: *const MergeRequest<'_>,
) -> FfiResult<TensorHandle> {
    contain(M::NAME, || {
        // SAFETY: the caller passes a valid table and request.
        let (vt, req) = unsafe { (&*backend, &*req) };
        // SAFETY: the table outlives the call.
        let backend = unsafe { Backend::from_raw(vt) };
        let params: M::Params = parse(req.params, "parameters", M::NAME)?;
        let model_params = parse_models::<M>(req.model_params)?;
        if model_params.len() != req.models.len() {
            return Err(Error::Other(format!(
                "host passed {} tensors but {} parameter sets",
                req.models.len(),
                model_params.len()
            )));
        }
        let base_index = index(req.base_index);
        let models = req
            .models
            .iter()
            .zip(model_params)
            .enumerate()
            .map(|(i, (h, params))| MergeInput {
                // SAFETY: host handles stay live for the call.
                tensor: unsafe { backend.borrow_handle(*h) },
                params,
                is_base: Some(i) == base_index,
            })
            .collect();
        let cx = MergeContext {
            backend,
            tensor_name: req.tensor_name.as_str(),
            layer: index(req.layer),
            // SAFETY: host handle stays live for the call.
            base: (!req.base.is_null()).then(|| unsafe { backend.borrow_handle(req.base) }),
            base_index,
            seed: req.seed,
        };
        M::merge(&params, models, &cx)?.into_raw()
    })
}

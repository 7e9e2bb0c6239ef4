//! `old_mean`: the unweighted mean, written against plugin-api 1.0 with ops that existed then
//! (`to_dtype`, in-place `axpy`, `scale`). A newer host must keep loading and running it.

use mglue_plugin_api::prelude::*;

/// No global parameters.
#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {}

/// No per-model parameters.
#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelParams {}

/// Mean of the models.
pub struct OldMean;

impl MergeMethod for OldMean {
    const NAME: &'static str = "old_mean";
    const DESCRIPTION: &'static str = "Unweighted mean, built against plugin-api 1.0";
    type Params = Params;
    type ModelParams = ModelParams;

    fn merge<'b>(
        _: &Params,
        models: Vec<MergeInput<'b, ModelParams>>,
        _cx: &MergeContext<'b>,
    ) -> Result<Tensor<'b>> {
        let dtype = models[0].tensor.dtype();
        let mut acc = models[0].tensor.to_dtype(DType::F32)?;
        for m in &models[1..] {
            acc.axpy(1.0, &m.tensor.to_dtype(DType::F32)?)?;
        }
        acc.scale(1.0 / models.len() as f64)?.to_dtype(dtype)
    }
}

mglue_plugin_api::export_plugin!(merge: [OldMean]);

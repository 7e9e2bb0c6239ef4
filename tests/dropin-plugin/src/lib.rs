//! Three merge methods a user might drop into a plugin directory, for the end-to-end tests:
//! `lerp_pair` (uses the 1.1 `lerp` op), `always_panics`, and `fail_on` (errors on one tensor,
//! to exercise a merge that fails midway).

use mglue_plugin_api::prelude::*;

/// Global parameters of `lerp_pair`.
#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LerpParams {
    /// Interpolation factor: 0 gives the first model, 1 the second.
    pub t: f64,
}

/// No per-model parameters.
#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// `(1 − t)·θ₀ + t·θ₁`.
pub struct LerpPair;

impl MergeMethod for LerpPair {
    const NAME: &'static str = "lerp_pair";
    const DESCRIPTION: &'static str = "Linear interpolation between exactly two models";
    type Params = LerpParams;
    type ModelParams = NoParams;

    fn validate(p: &LerpParams, models: &[NoParams], _cx: &ValidateContext<'_>) -> Result<()> {
        if models.len() != 2 {
            return Err(Error::params(format!(
                "lerp_pair takes exactly 2 models, got {}",
                models.len()
            )));
        }
        if !(0.0..=1.0).contains(&p.t) {
            return Err(Error::params(format!("t = {} is outside [0, 1]", p.t)));
        }
        Ok(())
    }

    fn merge<'b>(
        p: &LerpParams,
        models: Vec<MergeInput<'b, NoParams>>,
        cx: &MergeContext<'b>,
    ) -> Result<Tensor<'b>> {
        mglue_plugin_api::tracing::debug!(tensor = cx.tensor_name, "lerp_pair merging");
        models[0].tensor.lerp(&models[1].tensor, p.t)
    }
}

/// A method whose merge panics: the host must contain it and report it.
pub struct AlwaysPanics;

impl MergeMethod for AlwaysPanics {
    const NAME: &'static str = "always_panics";
    const DESCRIPTION: &'static str = "Panics on every tensor (tests panic containment)";
    type Params = NoParams;
    type ModelParams = NoParams;

    fn merge<'b>(
        _: &NoParams,
        _: Vec<MergeInput<'b, NoParams>>,
        cx: &MergeContext<'b>,
    ) -> Result<Tensor<'b>> {
        panic!("deliberate panic while merging {}", cx.tensor_name)
    }
}

/// Global parameters of `fail_on`.
#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailParams {
    /// The tensor on which to fail.
    pub tensor: String,
    /// Milliseconds to sleep per tensor (to interrupt a run while it is in flight).
    #[serde(default)]
    pub sleep_ms: u64,
}

/// Copies the first model, but fails on one named tensor.
pub struct FailOn;

impl MergeMethod for FailOn {
    const NAME: &'static str = "fail_on";
    const DESCRIPTION: &'static str = "Copies the first model but fails on one tensor (tests atomic output)";
    type Params = FailParams;
    type ModelParams = NoParams;

    fn merge<'b>(
        p: &FailParams,
        models: Vec<MergeInput<'b, NoParams>>,
        cx: &MergeContext<'b>,
    ) -> Result<Tensor<'b>> {
        std::thread::sleep(std::time::Duration::from_millis(p.sleep_ms));
        if cx.tensor_name == p.tensor {
            return Err(Error::Other(format!(
                "refusing to merge {} on purpose",
                cx.tensor_name
            )));
        }
        models[0].tensor.dup()
    }
}

mglue_plugin_api::export_plugin!(merge: [LerpPair, AlwaysPanics, FailOn]);

//! `linear`: the model soup. `out = Σᵢ wᵢ θᵢ / Σᵢ wᵢ` (no division with `normalize: false`).
//!
//! Wortsman et al., "Model soups" (ICML 2022). Matches mergekit 0.1.5 bit for bit in f32: the
//! weights are rounded to f32, accumulated left to right with one rounding per step
//! (`acc = w₀θ₀; acc = fma(wᵢ, θᵢ, acc)`, what torch's CPU kernel does), then divided by
//! `Σ f32(wᵢ)`. Inputs in bf16/f16 are computed in f32 and written back in the widest input
//! dtype.
//!
//! Differences from mergekit: a weight sum of zero with `normalize: true` is refused at
//! validation instead of producing NaN/inf tensors.

use mglue_plugin_api::prelude::*;
use serde::Deserialize;

/// Global parameters of `linear`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Divide by the sum of the weights, so weights need not add up to 1.
    #[serde(default = "default_normalize")]
    pub normalize: bool,
}

fn default_normalize() -> bool {
    true
}

/// Per-model parameters of `linear`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelParams {
    /// The model's weight wᵢ (may vary per layer through a gradient list).
    pub weight: f64,
}

/// The linear merge method.
pub struct Linear;

fn widest(dtypes: impl Iterator<Item = DType>) -> DType {
    let mut out: Option<DType> = None;
    for d in dtypes {
        out = Some(match out {
            None => d,
            Some(o) if o == d => o,
            Some(DType::F64) => DType::F64,
            Some(_) if d == DType::F64 => DType::F64,
            Some(_) => DType::F32,
        });
    }
    out.unwrap_or(DType::F32)
}

impl MergeMethod for Linear {
    const NAME: &'static str = "linear";
    const DESCRIPTION: &'static str = "Weighted average of the models (model soup): Σ wᵢ θᵢ / Σ wᵢ";
    type Params = Params;
    type ModelParams = ModelParams;

    fn validate(params: &Params, models: &[ModelParams], cx: &ValidateContext<'_>) -> Result<()> {
        if models.is_empty() {
            return Err(Error::params("linear needs at least one model"));
        }
        let sum: f32 = models.iter().map(|m| m.weight as f32).sum();
        if params.normalize && sum == 0.0 {
            return Err(Error::params(format!(
                "the weights sum to 0 for `{}` with normalize: true; change a weight or set normalize: false",
                cx.tensor_name
            )));
        }
        Ok(())
    }

    fn merge<'b>(
        params: &Params,
        models: Vec<MergeInput<'b, ModelParams>>,
        cx: &MergeContext<'b>,
    ) -> Result<Tensor<'b>> {
        let out = widest(models.iter().map(|m| m.tensor.dtype()));
        let tensors: Vec<&Tensor<'b>> = models.iter().map(|m| &m.tensor).collect();
        let weights: Vec<f64> = models.iter().map(|m| m.params.weight).collect();
        // torch sums the f32 weight tensor: round each weight first, add left to right.
        let divisor = params
            .normalize
            .then(|| weights.iter().fold(0f32, |acc, &w| acc + w as f32) as f64);
        mglue_plugin_api::tracing::trace!(tensor = cx.tensor_name, ?divisor, "linear");
        cx.backend.weighted_sum(&tensors, &weights, divisor, out)
    }
}

mglue_plugin_api::export_plugin!(merge: [Linear]);

#[cfg(test)]
mod tests {
    use super::*;
    use modelglue::checkpoint::Checkpoint;
    use modelglue::testing::{ModelInput, PluginHarness};
    use serde_json::json;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/mergekit")
    }

    fn harness() -> PluginHarness {
        PluginHarness::new(mglue_root_module())
    }

    #[test]
    fn widest_dtype_promotes_mixed_halves_to_f32() {
        assert_eq!(widest([DType::BF16, DType::BF16].into_iter()), DType::BF16);
        assert_eq!(widest([DType::F32, DType::BF16].into_iter()), DType::F32);
        assert_eq!(widest([DType::F16, DType::BF16].into_iter()), DType::F32);
    }

    #[test]
    fn linear_matches_mergekit_bit_exact_on_every_fixture_tensor() {
        let zoo = fixtures().join("zoo");
        let models: Vec<Checkpoint> = ["ft1", "ft2", "ft3"]
            .iter()
            .map(|m| Checkpoint::open(&zoo.join(m)).expect("fixture model"))
            .collect();
        let expected = Checkpoint::open(&fixtures().join("expected/linear")).expect("fixture output");
        let h = harness();
        for name in expected.tensor_names() {
            let inputs: Vec<ModelInput> = models
                .iter()
                .zip([0.5, 0.3, 0.2])
                .map(|(m, w)| ModelInput::new(m.load(&name).expect("tensor"), json!({ "weight": w })))
                .collect();
            let out = h
                .merge("linear", &json!({"normalize": true}), &inputs, None, None)
                .expect("merge");
            let got = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = expected
                .load(&name)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{name}");
        }
    }

    #[test]
    fn linear_rejects_unknown_parameters_and_documents_its_schema() {
        let h = harness();
        let err = h
            .validate(
                "linear",
                &json!({"normalise": true}),
                &[json!({"weight": 1.0})],
                None,
                false,
            )
            .unwrap_err();
        assert!(err.to_string().contains("normalise"), "{err}");
        let err = h
            .validate("linear", &json!({}), &[json!({})], None, false)
            .unwrap_err();
        assert!(err.to_string().contains("weight"), "{err}");
        let info = h.info("linear").expect("registered");
        assert_eq!(
            info.params_schema["properties"]["normalize"]["default"],
            json!(true)
        );
        assert!(info.model_params_schema["properties"]["weight"]["description"]
            .as_str()
            .unwrap()
            .contains("weight"));
    }

    #[test]
    fn linear_refuses_zero_weight_sum_when_normalizing() {
        let err = harness()
            .validate(
                "linear",
                &json!({}),
                &[json!({"weight": 1.0}), json!({"weight": -1.0})],
                None,
                false,
            )
            .unwrap_err();
        assert!(err.to_string().contains("sum to 0"), "{err}");
    }

    #[test]
    fn linear_of_one_model_returns_it_unchanged() {
        let t =
            candle_core::Tensor::new(&[[1.5f32, -2.25], [3.0, 0.125]], &candle_core::Device::Cpu).unwrap();
        let out = harness()
            .merge(
                "linear",
                &json!({}),
                &[ModelInput::new(t.clone(), json!({"weight": 0.7}))],
                None,
                None,
            )
            .unwrap();
        assert_eq!(out.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    }
}

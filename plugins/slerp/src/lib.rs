//! `slerp` and `nuslerp`: spherical linear interpolation between two models.
//!
//! **slerp** (Shoemake 1985, as popularised for LLMs by mergekit): one angle per whole tensor
//! between the base `v0` and the other model `v1`. With `d = (v0/‖v0‖)·(v1/‖v1‖)` (a norm ≤ 1e-8
//! is left unnormalised) and `θ = acos d`:
//! `out = sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1`, or the lerp `(1−t)·v0 + t·v1` when
//! `|d| > 0.9995` (nearly parallel or anti-parallel). Computed in f32 whatever the input dtype,
//! written in `v0`'s dtype; `t = 0` gives the base, `t = 1` the other model, bit for bit.
//! Matches mergekit 0.1.5 within a few f32 ulp: the norms and the dot product are accumulated in
//! f64 here, in f32 (in numpy's order) there; everything after them follows mergekit's f32 op
//! order (`f32(s0)·v0 + f32(s1)·v1`, two roundings, no FMA), so the lerp fallback is bit-exact.
//!
//! **nuslerp** (mergekit's "new" slerp): interpolates the two models by their weights,
//! `t = w₂/(w₁+w₂)` (0.5 when `|w₁+w₂| < 1e-6`); with a base model it interpolates the task
//! vectors `θᵢ − θ₀` and adds the result back to the base. Vectors are normalised with
//! `x/max(‖x‖, 1e-7)`, `cos θ` is clamped to `[−1, 1]`, and where `|sin θ| < 1e-8` the lerp is
//! used. One angle per tensor (`nuslerp_flatten`, the default), or one per vector along the last
//! dimension, or along the first with `nuslerp_row_wise`.
//!
//! Differences from mergekit's nuslerp (which has no reference fixture; an independent float64
//! script, `tests/nuslerp_reference.py`, pins the numbers): the work is done in f32 (f64 for f64
//! inputs) and the result rounded once to the input dtype, where mergekit computes in the input
//! dtype (so bf16 inputs round at every step there); the per-vector coefficients
//! `sin((1−t)θ)/sin θ` are formed in f64 and applied with one multiply each instead of
//! multiplying by the sines and then dividing by `sin θ`.

use mglue_plugin_api::prelude::*;
use serde::Deserialize;

/// `|d|` above which slerp falls back to the lerp.
const DOT_THRESHOLD: f64 = 0.9995;
/// Norms at or below this are not divided by (slerp).
const SLERP_NORM_EPS: f64 = 1e-8;
/// Lower clamp of the norms (nuslerp).
const NUSLERP_NORM_EPS: f64 = 1e-7;
/// `|sin θ|` below which nuslerp takes the lerp.
const NUSLERP_SIN_EPS: f64 = 1e-8;

/// Global parameters of `slerp`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlerpParams {
    /// Interpolation factor from the base model (t = 0) to the other model (t = 1); may vary per
    /// layer through a gradient list. Values outside [0, 1] extrapolate along the arc.
    pub t: f64,
}

/// Per-model parameters of `slerp` (none: the base model is `v0`, the other model `v1`).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlerpModelParams {}

/// Global parameters of `nuslerp`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NuslerpParams {
    /// Treat each tensor as one flat vector (one angle per tensor). With `false`, every vector
    /// of the tensor gets its own angle (see `nuslerp_row_wise`).
    #[serde(default = "default_flatten")]
    pub nuslerp_flatten: bool,
    /// Only with `nuslerp_flatten: false`: take the vectors along the first dimension
    /// (one angle per column `W[:, j]`) instead of along the last (one per row `W[i, :]`).
    #[serde(default)]
    pub nuslerp_row_wise: bool,
}

fn default_flatten() -> bool {
    true
}

/// Per-model parameters of `nuslerp`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NuslerpModelParams {
    /// The model's weight wᵢ; the interpolation factor is t = w₂/(w₁+w₂). Required for the two
    /// models being interpolated, ignored on the base model.
    #[serde(default)]
    pub weight: Option<f64>,
}

/// Spherical linear interpolation from the base model to one other model.
pub struct Slerp;

/// Spherical interpolation of two models (or of their task vectors) by their weights.
pub struct Nuslerp;

/// Where slerp's two endpoints come from, given the host's model list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlerpLayout {
    /// The base is listed among the two models, at this index.
    Listed(usize),
    /// One model is listed; the base comes from `base_model:` alone.
    BaseOnly,
}

fn slerp_layout(num_models: usize, base_index: Option<usize>, has_base: bool) -> Result<SlerpLayout> {
    match (num_models, base_index, has_base) {
        (2, Some(b), _) if b < 2 => Ok(SlerpLayout::Listed(b)),
        (1, None, true) => Ok(SlerpLayout::BaseOnly),
        _ => {
            let got = match (base_index, has_base) {
                (_, false) => format!("{num_models} model(s) and no base model"),
                (Some(_), true) => format!("{num_models} model(s) including the base"),
                (None, true) => format!("{num_models} model(s) besides the base"),
            };
            Err(Error::params(format!(
                "slerp interpolates between the base model and exactly one other model, but got {got}: \
                 set `base_model:` and list the base plus one other model under `models:`"
            )))
        }
    }
}

/// `(s0, s1)` with `out = s0·v0 + s1·v1`, from `v0·v1` and the squared norms.
fn slerp_coefficients(t: f64, dot: f64, ss0: f64, ss1: f64) -> (f64, f64) {
    let unit = |ss: f64| {
        let n = ss.sqrt();
        if n > SLERP_NORM_EPS {
            n
        } else {
            1.0
        }
    };
    let d = dot / (unit(ss0) * unit(ss1));
    if d.abs() > DOT_THRESHOLD {
        return (1.0 - t, t);
    }
    let theta = d.acos();
    let sin = theta.sin();
    ((theta - t * theta).sin() / sin, (t * theta).sin() / sin)
}

/// `(c0, c1)` with `out = c0·v0 + c1·v1` for one nuslerp vector pair.
fn nuslerp_coefficients(t: f64, dot: f64, ss0: f64, ss1: f64) -> (f64, f64) {
    let n0 = ss0.sqrt().max(NUSLERP_NORM_EPS);
    let n1 = ss1.sqrt().max(NUSLERP_NORM_EPS);
    let theta = (dot / (n0 * n1)).clamp(-1.0, 1.0).acos();
    let sin = theta.sin();
    if sin.abs() < NUSLERP_SIN_EPS {
        (1.0 - t, t)
    } else {
        (((1.0 - t) * theta).sin() / sin, (t * theta).sin() / sin)
    }
}

fn same_shape(a: &Tensor<'_>, b: &Tensor<'_>, method: &str, tensor: &str) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::params(format!(
            "{method}: `{tensor}` has shape {:?} in one model and {:?} in the other; \
             the models must have the same architecture and vocabulary",
            a.shape(),
            b.shape()
        )));
    }
    Ok(())
}

impl MergeMethod for Slerp {
    const NAME: &'static str = "slerp";
    const DESCRIPTION: &'static str =
        "Spherical interpolation from the base model (t = 0) to one other model (t = 1), one angle per tensor";
    type Params = SlerpParams;
    type ModelParams = SlerpModelParams;

    fn validate(params: &SlerpParams, models: &[SlerpModelParams], cx: &ValidateContext<'_>) -> Result<()> {
        slerp_layout(models.len(), cx.base_index, cx.has_base)?;
        if !params.t.is_finite() {
            return Err(Error::params(format!(
                "slerp: t = {} for `{}` is not a finite number",
                params.t, cx.tensor_name
            )));
        }
        Ok(())
    }

    fn merge<'b>(
        params: &SlerpParams,
        models: Vec<MergeInput<'b, SlerpModelParams>>,
        cx: &MergeContext<'b>,
    ) -> Result<Tensor<'b>> {
        let (v0, v1) = match slerp_layout(models.len(), cx.base_index, cx.base.is_some())? {
            SlerpLayout::Listed(b) => (&models[b].tensor, &models[1 - b].tensor),
            SlerpLayout::BaseOnly => (cx.require_base(Self::NAME)?, &models[0].tensor),
        };
        same_shape(v0, v1, Self::NAME, cx.tensor_name)?;
        let t = params.t;
        let out = v0.dtype();
        if cx.backend.has_fused_1_3() && matches!(out, DType::F32 | DType::F16 | DType::BF16) {
            // The same formula in two passes over the inputs (plugin-api 1.3): the sums as f32
            // values in f64, then `s0·a + s1·b` in f32 with each product rounded.
            let (aa, bb, ab) = v0.dot_norms(v1)?;
            let (s0, s1) = slerp_coefficients(t, ab, aa, bb);
            mglue_plugin_api::tracing::trace!(tensor = cx.tensor_name, t, s0, s1, "slerp (fused)");
            return cx.backend.lincomb(&[v0, v1], &[s0, s1], out);
        }
        let a = v0.to_dtype(DType::F32)?;
        let b = v1.to_dtype(DType::F32)?;
        let (s0, s1) = slerp_coefficients(t, a.dot(&b)?, a.sum_sq()?, b.sum_sq()?);
        mglue_plugin_api::tracing::trace!(tensor = cx.tensor_name, t, s0, s1, "slerp");
        // `scale` rounds the coefficient to f32 and each product once, then one rounded add:
        // mergekit's `s0 * v0 + s1 * v1` in f32 (a fused multiply-add would differ in the last bit).
        a.scale(s0)?.add(&b.scale(s1)?)?.to_dtype(v0.dtype())
    }
}

/// The dtype nuslerp works in: f64 stays f64, everything else is computed in f32.
fn work_dtype(d: DType) -> DType {
    if d == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// nuslerp of two equally shaped work-dtype tensors.
fn nuslerp_tensors<'b>(t: f64, a: &Tensor<'b>, b: &Tensor<'b>, params: &NuslerpParams) -> Result<Tensor<'b>> {
    let shape = a.shape();
    let n = a.elem_count();
    if n == 0 {
        return a.dup();
    }
    if params.nuslerp_flatten || shape.len() <= 1 {
        let (c0, c1) = nuslerp_coefficients(t, a.dot(b)?, a.sum_sq()?, b.sum_sq()?);
        return a.scale(c0)?.add(&b.scale(c1)?);
    }
    let last = shape.len() - 1;
    // Vectors run along the last dimension; for row-wise, swap the first dimension there.
    let (a, b) = if params.nuslerp_row_wise {
        (a.transpose(0, last)?, b.transpose(0, last)?)
    } else {
        (a.dup()?, b.dup()?)
    };
    let inner = a.shape();
    let cols = inner[last];
    let rows = n / cols;
    let a = a.reshape(&[rows, cols])?;
    let b = b.reshape(&[rows, cols])?;
    let dots = a.mul(&b)?.sum_last()?.to_vec_f32()?;
    let ss0 = a.sum_sq_last()?.to_vec_f32()?;
    let ss1 = b.sum_sq_last()?.to_vec_f32()?;
    let (c0, c1): (Vec<f32>, Vec<f32>) = (0..rows)
        .map(|r| {
            let (c0, c1) = nuslerp_coefficients(t, dots[r] as f64, ss0[r] as f64, ss1[r] as f64);
            (c0 as f32, c1 as f32)
        })
        .unzip();
    let backend = a.backend();
    let c0 = backend.from_f32(&c0, &[rows, 1], a.dtype())?;
    let c1 = backend.from_f32(&c1, &[rows, 1], a.dtype())?;
    let out = a.mul(&c0)?.add(&b.mul(&c1)?)?.reshape(&inner)?;
    if params.nuslerp_row_wise {
        out.transpose(0, last)
    } else {
        Ok(out)
    }
}

fn nuslerp_models_error(num_models: usize, base_listed: bool, has_base: bool) -> Error {
    let got = match (base_listed, has_base) {
        (_, false) => format!("{num_models} model(s) and no base model"),
        (true, true) => format!("{} model(s) besides the base", num_models - 1),
        (false, true) => format!("{num_models} model(s) besides the base"),
    };
    Error::params(format!(
        "nuslerp interpolates exactly two models (plus an optional base model whose task vectors \
         are used), but got {got}: list two models under `models:`"
    ))
}

impl MergeMethod for Nuslerp {
    const NAME: &'static str = "nuslerp";
    const DESCRIPTION: &'static str =
        "Spherical interpolation of two models (or of their task vectors from a base) by their weights";
    type Params = NuslerpParams;
    type ModelParams = NuslerpModelParams;

    fn validate(
        _params: &NuslerpParams,
        models: &[NuslerpModelParams],
        cx: &ValidateContext<'_>,
    ) -> Result<()> {
        let others: Vec<(usize, &NuslerpModelParams)> = models
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != cx.base_index)
            .collect();
        if others.len() != 2 {
            return Err(nuslerp_models_error(
                models.len(),
                cx.base_index.is_some(),
                cx.has_base,
            ));
        }
        for (i, m) in others {
            match m.weight {
                None => {
                    return Err(Error::params(format!(
                        "nuslerp: model #{i} has no `weight` for `{}`; give each of the two models a weight \
                         (or set a global `weight:`)",
                        cx.tensor_name
                    )))
                }
                Some(w) if !w.is_finite() => {
                    return Err(Error::params(format!(
                        "nuslerp: model #{i} has weight {w} for `{}`, not a finite number",
                        cx.tensor_name
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn merge<'b>(
        params: &NuslerpParams,
        models: Vec<MergeInput<'b, NuslerpModelParams>>,
        cx: &MergeContext<'b>,
    ) -> Result<Tensor<'b>> {
        let others: Vec<&MergeInput<'b, NuslerpModelParams>> = models.iter().filter(|m| !m.is_base).collect();
        let [m1, m2] = others.as_slice() else {
            return Err(nuslerp_models_error(
                models.len(),
                cx.base_index.is_some(),
                cx.base.is_some(),
            ));
        };
        let weight = |m: &MergeInput<'b, NuslerpModelParams>| {
            m.params.weight.ok_or_else(|| {
                Error::params(format!(
                    "nuslerp: a model has no `weight` for `{}`",
                    cx.tensor_name
                ))
            })
        };
        let (w1, w2) = (weight(m1)?, weight(m2)?);
        let total = w1 + w2;
        let t = if total.abs() < 1e-6 { 0.5 } else { w2 / total };
        same_shape(&m1.tensor, &m2.tensor, Self::NAME, cx.tensor_name)?;
        mglue_plugin_api::tracing::trace!(tensor = cx.tensor_name, t, "nuslerp");
        match &cx.base {
            Some(base) => {
                same_shape(base, &m1.tensor, Self::NAME, cx.tensor_name)?;
                let work = work_dtype(base.dtype());
                let base_w = base.to_dtype(work)?;
                let d1 = m1.tensor.to_dtype(work)?.sub(&base_w)?;
                let d2 = m2.tensor.to_dtype(work)?.sub(&base_w)?;
                nuslerp_tensors(t, &d1, &d2, params)?
                    .add(&base_w)?
                    .to_dtype(base.dtype())
            }
            None => {
                let work = work_dtype(m1.tensor.dtype());
                let a = m1.tensor.to_dtype(work)?;
                let b = m2.tensor.to_dtype(work)?;
                nuslerp_tensors(t, &a, &b, params)?.to_dtype(m1.tensor.dtype())
            }
        }
    }
}

mglue_plugin_api::export_plugin!(merge: [Slerp, Nuslerp]);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor as CTensor};
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

    fn values(t: &CTensor) -> Vec<f32> {
        t.flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Largest `|got − want|`, after asserting each is within 4 f32 ulp of `max(1, |want|)`.
    /// Also logs how many elements differ at all, and the largest difference in units of
    /// `f32::EPSILON · max(1, |want|)` (the tolerance is 4 of them).
    fn assert_close(got: &[f32], want: &[f32], what: &str) -> f32 {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let (mut worst, mut differing, mut units) = (0f32, 0usize, 0f32);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let diff = (g - w).abs();
            let tol = 4.0 * f32::EPSILON * w.abs().max(1.0);
            assert!(
                diff <= tol,
                "{what}[{i}]: got {g}, want {w} (|diff| {diff:e} > {tol:e})"
            );
            worst = worst.max(diff);
            if g.to_bits() != w.to_bits() {
                differing += 1;
                units = units.max(diff / (f32::EPSILON * w.abs().max(1.0)));
            }
        }
        if differing > 0 {
            eprintln!(
                "  {what}: {differing}/{} elements differ, max {worst:e} ({units:.2} eps)",
                got.len()
            );
        }
        worst
    }

    /// Merges base (listed first) and `other` with slerp at the t of each tensor, compares with
    /// mergekit's output; returns (max |diff|, tensors bit-equal to base, bit-equal to other).
    fn slerp_case(case: &str, other: &str, t_of: impl Fn(&str) -> f64) -> (f32, usize, usize) {
        let zoo = fixtures().join("zoo");
        let base = Checkpoint::open(&zoo.join("base")).expect("fixture base");
        let other = Checkpoint::open(&zoo.join(other)).expect("fixture model");
        let expected = Checkpoint::open(&fixtures().join("expected").join(case)).expect("fixture output");
        let h = harness();
        let (mut worst, mut as_base, mut as_other) = (0f32, 0, 0);
        let names = expected.tensor_names();
        assert_eq!(names.len(), 21, "{case}: tensor count");
        for name in names {
            let b = base.load(&name).expect("tensor");
            let o = other.load(&name).expect("tensor");
            let inputs = [
                ModelInput::new(b.clone(), json!({})),
                ModelInput::new(o.clone(), json!({})),
            ];
            let t = t_of(&name);
            let out = h
                .merge_named("slerp", &name, &json!({ "t": t }), &inputs, Some(&b), Some(0), 42)
                .expect("merge");
            let want = expected.load(&name).unwrap();
            assert_eq!(out.dims(), want.dims(), "{name}");
            assert_eq!(out.dtype(), want.dtype(), "{name}");
            let (got, want) = (values(&out), values(&want));
            if t == 0.0 {
                assert_eq!(
                    bits(&got),
                    bits(&values(&b)),
                    "{name}: t = 0 must return the base bit for bit"
                );
                assert_eq!(bits(&got), bits(&want), "{name}");
                as_base += 1;
            } else if t == 1.0 {
                assert_eq!(
                    bits(&got),
                    bits(&values(&o)),
                    "{name}: t = 1 must return the other model"
                );
                assert_eq!(bits(&got), bits(&want), "{name}");
                as_other += 1;
            }
            worst = worst.max(assert_close(&got, &want, &format!("{case} {name}")));
        }
        eprintln!(
            "{case}: max |diff| vs mergekit = {worst:e} (t=0 tensors {as_base}, t=1 tensors {as_other})"
        );
        (worst, as_base, as_other)
    }

    #[test]
    fn slerp_matches_mergekit_on_nearly_collinear_pair_via_lerp_fallback() {
        let (worst, _, _) = slerp_case("slerp_ft1", "ft1", |_| 0.3);
        // Every tensor takes the lerp fallback, whose op order is mergekit's: bit-exact.
        assert_eq!(worst, 0.0, "slerp_ft1 should be bit-exact");
    }

    #[test]
    fn slerp_matches_mergekit_on_independent_inits() {
        slerp_case("slerp_alien", "alien", |_| 0.3);
    }

    #[test]
    fn slerp_matches_mergekit_with_gradient_t_and_exact_endpoints() {
        // MANIFEST.md, slerp_gradient, "Resolved t per tensor".
        let t_of = |name: &str| -> f64 {
            let layer = |l: &str| name.starts_with(&format!("model.layers.{l}."));
            match (name.contains("self_attn"), name.contains("mlp")) {
                (true, _) if layer("0") => 0.0,
                (true, _) => 1.0,
                (_, true) if layer("0") => 1.0,
                (_, true) => 0.0,
                _ => 0.3,
            }
        };
        let (_, as_base, as_other) = slerp_case("slerp_gradient", "alien", t_of);
        assert_eq!((as_base, as_other), (7, 7));
    }

    fn ct(v: &[f32], shape: &[usize]) -> CTensor {
        CTensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn slerp_endpoints_return_the_inputs_exactly_and_the_base_may_come_from_base_model_alone() {
        let h = harness();
        let base = ct(&[0.25, -1.5, 3.0, 0.1, -0.7, 2.2], &[2, 3]);
        let other = ct(&[1.0, 0.5, -0.3, 0.9, 1.7, -0.2], &[2, 3]);
        for (t, want) in [(0.0, &base), (1.0, &other)] {
            // Base listed among the models (at index 1 this time) ...
            let listed = [
                ModelInput::new(other.clone(), json!({})),
                ModelInput::new(base.clone(), json!({})),
            ];
            let out = h
                .merge("slerp", &json!({ "t": t }), &listed, Some(&base), Some(1))
                .unwrap();
            assert_eq!(bits(&values(&out)), bits(&values(want)), "t = {t}, base listed");
            // ... or given only as `base_model:`.
            let alone = [ModelInput::new(other.clone(), json!({}))];
            let out = h
                .merge("slerp", &json!({ "t": t }), &alone, Some(&base), None)
                .unwrap();
            assert_eq!(bits(&values(&out)), bits(&values(want)), "t = {t}, base alone");
        }
    }

    #[test]
    fn slerp_keeps_the_norm_of_orthogonal_unit_vectors_and_writes_the_base_dtype() {
        let h = harness();
        let base = ct(&[1.0, 0.0], &[2]).to_dtype(candle_core::DType::BF16).unwrap();
        let other = ct(&[0.0, 1.0], &[2]).to_dtype(candle_core::DType::BF16).unwrap();
        let inputs = [
            ModelInput::new(base.clone(), json!({})),
            ModelInput::new(other, json!({})),
        ];
        let out = h
            .merge("slerp", &json!({ "t": 0.5 }), &inputs, Some(&base), Some(0))
            .unwrap();
        assert_eq!(out.dtype(), candle_core::DType::BF16);
        let v = values(&out);
        let half = std::f32::consts::FRAC_1_SQRT_2;
        assert!((v[0] - half).abs() < 4e-3 && (v[1] - half).abs() < 4e-3, "{v:?}");
    }

    #[test]
    fn slerp_requires_the_base_and_exactly_one_other_model() {
        let h = harness();
        let one = [json!({})];
        let two = [json!({}), json!({})];
        let three = [json!({}), json!({}), json!({})];
        let err = h
            .validate("slerp", &json!({"t": 0.5}), &two, None, false)
            .unwrap_err();
        assert!(err.to_string().contains("no base model"), "{err}");
        let err = h
            .validate("slerp", &json!({"t": 0.5}), &three, Some(0), true)
            .unwrap_err();
        assert!(err.to_string().contains("exactly one other model"), "{err}");
        let err = h
            .validate("slerp", &json!({"t": 0.5}), &two, None, true)
            .unwrap_err();
        assert!(err.to_string().contains("2 model(s) besides the base"), "{err}");
        h.validate("slerp", &json!({"t": 0.5}), &two, Some(1), true)
            .unwrap();
        h.validate("slerp", &json!({"t": 0.5}), &one, None, true).unwrap();
    }

    #[test]
    fn slerp_and_nuslerp_reject_unknown_parameters_and_document_their_schemas() {
        let h = harness();
        let err = h
            .validate(
                "slerp",
                &json!({"t": 0.5, "tt": 1}),
                &[json!({}), json!({})],
                Some(0),
                true,
            )
            .unwrap_err();
        assert!(err.to_string().contains("tt"), "{err}");
        let err = h
            .validate("slerp", &json!({}), &[json!({}), json!({})], Some(0), true)
            .unwrap_err();
        assert!(err.to_string().contains("`t`"), "{err}");
        let err = h
            .validate(
                "slerp",
                &json!({"t": 0.5}),
                &[json!({}), json!({"weight": 1.0})],
                Some(0),
                true,
            )
            .unwrap_err();
        assert!(err.to_string().contains("weight"), "{err}");
        let err = h
            .validate(
                "nuslerp",
                &json!({"nuslerp_flaten": false}),
                &[json!({"weight": 1.0}), json!({"weight": 1.0})],
                None,
                false,
            )
            .unwrap_err();
        assert!(err.to_string().contains("nuslerp_flaten"), "{err}");

        let slerp = h.info("slerp").expect("registered");
        assert!(slerp.params_schema["properties"]["t"]["description"]
            .as_str()
            .unwrap()
            .contains("t = 0"));
        assert_eq!(slerp.params_schema["required"], json!(["t"]));
        let nu = h.info("nuslerp").expect("registered");
        assert_eq!(
            nu.params_schema["properties"]["nuslerp_flatten"]["default"],
            json!(true)
        );
        assert_eq!(
            nu.params_schema["properties"]["nuslerp_row_wise"]["default"],
            json!(false)
        );
        for key in ["nuslerp_flatten", "nuslerp_row_wise"] {
            assert!(
                nu.params_schema["properties"][key]["description"].is_string(),
                "{key}"
            );
        }
        let weight = nu.model_params_schema["properties"]["weight"]["description"]
            .as_str()
            .unwrap();
        assert!(weight.contains("w₂/(w₁+w₂)"), "{weight}");
    }

    #[test]
    fn nuslerp_requires_two_weighted_models_besides_the_base() {
        let h = harness();
        let w = |x: f64| json!({ "weight": x });
        let err = h
            .validate("nuslerp", &json!({}), &[w(1.0)], None, false)
            .unwrap_err();
        assert!(err.to_string().contains("exactly two models"), "{err}");
        let err = h
            .validate("nuslerp", &json!({}), &[w(1.0), w(1.0)], Some(0), true)
            .unwrap_err();
        assert!(err.to_string().contains("1 model(s) besides the base"), "{err}");
        let err = h
            .validate("nuslerp", &json!({}), &[w(1.0), json!({})], None, false)
            .unwrap_err();
        assert!(err.to_string().contains("model #1 has no `weight`"), "{err}");
        // The base may be listed without a weight.
        h.validate("nuslerp", &json!({}), &[json!({}), w(1.0), w(2.0)], Some(0), true)
            .unwrap();
        h.validate("nuslerp", &json!({}), &[w(1.0), w(2.0)], None, true)
            .unwrap();
    }

    /// The dyadic 3×4 inputs of `tests/nuslerp_reference.py` (exact in f32).
    fn reference_inputs() -> (CTensor, CTensor, CTensor) {
        let make = |f: &dyn Fn(i64, i64) -> f32| {
            let v: Vec<f32> = (0..3)
                .flat_map(|i| (0..4).map(move |j| (i, j)))
                .map(|(i, j)| f(i, j))
                .collect();
            ct(&v, &[3, 4])
        };
        let a = make(&|i, j| ((i * 7 + j * 3) % 11 - 5) as f32 / 4.0);
        let b = make(&|i, j| ((i * 5 + j * 2 + 3) % 13 - 6) as f32 / 8.0);
        let base = make(&|i, j| ((i * 3 + j * 5 + 1) % 7 - 3) as f32 / 16.0);
        (a, b, base)
    }

    #[test]
    fn nuslerp_matches_independent_float64_reference() {
        // Printed by `python3 plugins/slerp/tests/nuslerp_reference.py` (numpy, float64).
        // (case, w1, w2, nuslerp_flatten, nuslerp_row_wise, with base, expected output)
        type Case = (&'static str, f64, f64, bool, bool, bool, [f64; 12]);
        #[rustfmt::skip]
        let cases: [Case; 5] = [
            ("flat_w1_3", 1.0, 3.0, true, false, false, [-7.381107511e-01, -2.737365954e-01, 1.906375604e-01, 6.550117161e-01, 3.812751207e-01, 8.456492765e-01, 3.959340470e-01, -5.376926267e-01, -8.114292221e-01, -3.470550664e-01, 1.173190894e-01, -3.323961401e-01]),
            ("rows_w2_1", 2.0, 1.0, false, false, false, [-9.604330526e-01, -3.758127866e-01, 2.088074794e-01, 7.934277455e-01, 5.340715220e-01, 1.276283378e+00, -2.710484410e-01, -2.944771344e-01, -8.080127019e-01, -3.349364905e-02, 7.410254038e-01, -8.660254038e-01]),
            ("cols_w1_1", 1.0, 1.0, false, true, false, [-8.634545221e-01, -3.524747702e-01, 5.478159014e-01, 8.325528464e-01, 3.985174717e-01, 9.869293567e-01, 0.000000000e+00, -3.784331120e-01, -6.641957862e-01, -1.409899081e-01, 1.095631803e+00, -6.054929792e-01]),
            ("base_flat_w03_07", 0.3, 0.7, true, false, true, [-7.806587067e-01, -3.449965502e-01, 1.889698724e-01, 7.229362949e-01, 3.919832113e-01, 9.259496339e-01, 3.615351297e-01, -5.438895703e-01, -7.765383878e-01, -3.408762313e-01, 1.930901913e-01, -3.713243129e-01]),
            ("base_rows_w1_m1", 1.0, -1.0, false, false, true, [-8.199054153e-01, -3.178857566e-01, 1.888464391e-01, 6.955786349e-01, 4.671675149e-01, 1.151502545e+00, 5.530050893e-02, -4.415345208e-01, -8.860390196e-01, -2.741651540e-01, 5.987477310e-01, -7.237477310e-01]),
        ];
        let h = harness();
        let (a, b, base) = reference_inputs();
        let mut worst = 0f32;
        for (name, w1, w2, flatten, row_wise, with_base, want) in cases {
            let inputs = [
                ModelInput::new(a.clone(), json!({ "weight": w1 })),
                ModelInput::new(b.clone(), json!({ "weight": w2 })),
            ];
            let params = json!({ "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise });
            let out = h
                .merge("nuslerp", &params, &inputs, with_base.then_some(&base), None)
                .unwrap();
            assert_eq!(out.dims(), &[3, 4], "{name}");
            let want: Vec<f32> = want.iter().map(|&w| w as f32).collect();
            worst = worst.max(assert_close(&values(&out), &want, name));
        }
        eprintln!("nuslerp: max |diff| vs float64 reference = {worst:e}");
    }

    #[test]
    fn nuslerp_endpoint_weights_return_one_model_and_equal_copies_return_the_copy() {
        let h = harness();
        let (a, b, _) = reference_inputs();
        for params in [
            json!({}),
            json!({"nuslerp_flatten": false}),
            json!({"nuslerp_flatten": false, "nuslerp_row_wise": true}),
        ] {
            for ((w1, w2), want) in [((1.0, 0.0), &a), ((0.0, 2.0), &b)] {
                let inputs = [
                    ModelInput::new(a.clone(), json!({ "weight": w1 })),
                    ModelInput::new(b.clone(), json!({ "weight": w2 })),
                ];
                let out = h.merge("nuslerp", &params, &inputs, None, None).unwrap();
                assert_eq!(
                    bits(&values(&out)),
                    bits(&values(want)),
                    "{params} w = ({w1}, {w2})"
                );
            }
            // Two identical models with equal weights: θ = 0, the result is the model itself.
            let inputs = [
                ModelInput::new(a.clone(), json!({ "weight": 1.0 })),
                ModelInput::new(a.clone(), json!({ "weight": 1.0 })),
            ];
            let out = h.merge("nuslerp", &params, &inputs, None, None).unwrap();
            assert_close(&values(&out), &values(&a), &format!("{params} identical"));
        }
    }

    #[test]
    fn nuslerp_of_identical_task_vectors_returns_the_fine_tune() {
        let h = harness();
        let (a, _, base) = reference_inputs();
        let inputs = [
            ModelInput::new(base.clone(), json!({})),
            ModelInput::new(a.clone(), json!({ "weight": 0.5 })),
            ModelInput::new(a.clone(), json!({ "weight": 0.5 })),
        ];
        let out = h
            .merge("nuslerp", &json!({}), &inputs, Some(&base), Some(0))
            .unwrap();
        assert_close(&values(&out), &values(&a), "identical task vectors");
    }
}

//! Generalized task arithmetic: `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`,
//! `breadcrumbs`, `breadcrumbs_ties`, `della`, `della_linear`.
//!
//! Every method of the family is the same three steps on the task vectors δᵢ = θᵢ − θ₀ (the
//! base θ₀ is required; a base listed among `models:` contributes no task vector):
//!
//! 1. **sparsify** each δᵢ into δ̃ᵢ = δᵢ ⊙ Mᵢ, optionally rescaled:
//!    none (task_arithmetic); magnitude top-k, k = max(1, ⌊density·numel⌋) over the whole tensor
//!    (ties); Bernoulli(density) (dare); magnitude outliers, dropping the ⌊gamma·numel⌋ largest
//!    and keeping the next k (breadcrumbs); MAGPRUNE, Bernoulli(p) with p rising linearly from
//!    density − ε to density + ε with the rank of |δ| in its row (della);
//! 2. **sign consensus** (the `_ties` variants, ties, della): aᵢ = wᵢ δ̃ᵢ, the majority sign is
//!    sign(Σᵢ aᵢ) with a zero sum counted positive, and mᵢ = [sign(aᵢ) = majority] (a zero never
//!    agrees);
//! 3. **combination**: Σᵢ aᵢ mᵢ, divided with `normalize` by Σᵢ wᵢ mᵢ (a zero divisor becomes 1;
//!    without consensus by Σᵢ wᵢ, a divisor below 1e-8 in magnitude becomes 1), times λ, plus θ₀.
//!
//! Papers: Ilharco et al., "Editing models with task arithmetic" (ICLR 2023); Yadav et al.,
//! "TIES-Merging" (NeurIPS 2023); Yu et al., "Language models are Super Mario" (DARE, ICML 2024);
//! Davari & Belilovsky, "Model Breadcrumbs" (ECCV 2024); Deep et al., "DELLA-Merging" (2024).
//!
//! # Numerics
//!
//! As mergekit 0.1.5 (`../shared/reference/ALGORITHMS.md` B.5), the arithmetic runs in the
//! base tensor's dtype: every model is cast to it, and with bf16/f16 inputs each elementwise op
//! rounds in that dtype (the weights too are rounded to it), while sums over the models
//! accumulate in f32, left to right, and round once. Scalar factors (λ, the L1 rescale) multiply
//! in f32 and round, as a torch tensor times a Python float does. In f32 this reproduces
//! mergekit's `task_arithmetic`, `ties`, `breadcrumbs` and `dare_linear` at density 1 bit for bit.
//! Top-k uses selection (O(n)), not a sort; elements tied in magnitude at the cut are kept in
//! index order (torch's argsort is unstable there, so those few elements cannot match).
//!
//! Random masks come from the host's counter-based generator keyed by (the host's per-tensor
//! seed, the model's position in `models:`, the element index): reproducible for any thread
//! count, but not torch's stream, so DARE and DELLA match mergekit in distribution only.
//!
//! # Differences from mergekit 0.1.5
//!
//! - `rescale` takes `"l1"` (mergekit ≥ 0.1.5: multiply by ‖δ‖₁/‖δ⊙M‖₁ per tensor, skipped when
//!   either norm is below 1e-7), `"inverse_density"` (divide by the keep probability: the DARE
//!   paper's 1/p, mergekit up to January 2025 and therefore what Model-GLUE ran; for DELLA the
//!   per-element p) or `"none"`; `true`/`false` mean `"l1"`/`"none"`. dare and della default to
//!   `"l1"`, ties and breadcrumbs to `"none"`.
//! - breadcrumbs: mergekit slices the sorted indices as `[n_bot : -n_top]`, which is empty when
//!   n_top = 0 (gamma = 0, or any tensor with fewer than 1/gamma elements, or density + gamma ≥ 1
//!   after the clamp), silently dropping the whole task vector. Here the kept set is always the
//!   ranks `[n_bot, n_bot + k)`, so gamma = 0 is plain top-k and density 1 keeps everything; k is
//!   at least 1, as for ties.
//! - della: a row of one element has no rank spread, and mergekit's (r − min)/(max − min) is
//!   0/0 = NaN there; here such an element gets p = density.
//! - Parameter ranges are checked before any weight is read (density in (0, 1], gamma in [0, 1],
//!   0 < density ± epsilon < 1 for della, a base model, a weight for every model but the base),
//!   with messages naming the model and tensor, instead of failing mid-merge or producing NaN.

use mglue_plugin_api::prelude::*;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

/// A rescaling rule for a sparsified task vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RescaleRule {
    /// Multiply by ‖δ‖₁ / ‖δ ⊙ M‖₁ per tensor (mergekit ≥ 0.1.5).
    L1,
    /// Divide by the keep probability (the DARE paper's 1/p; mergekit ≤ January 2025, used by
    /// Model-GLUE).
    InverseDensity,
    /// Keep the surviving values as they are.
    None,
}

/// `rescale`: a rule name, or mergekit's boolean (`true` = `"l1"`, `false` = `"none"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Rescale {
    /// `true` = `"l1"`, `false` = `"none"`.
    Flag(bool),
    /// `"l1"`, `"inverse_density"` or `"none"`.
    Rule(RescaleRule),
}

impl Rescale {
    /// The rule this setting selects.
    pub fn rule(self) -> RescaleRule {
        match self {
            Rescale::Flag(true) => RescaleRule::L1,
            Rescale::Flag(false) => RescaleRule::None,
            Rescale::Rule(r) => r,
        }
    }
}

impl<'de> Deserialize<'de> for Rescale {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Rescale;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(r#""l1", "inverse_density", "none", true or false"#)
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> std::result::Result<Rescale, E> {
                Ok(Rescale::Flag(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Rescale, E> {
                match v {
                    "l1" => Ok(Rescale::Rule(RescaleRule::L1)),
                    "inverse_density" => Ok(Rescale::Rule(RescaleRule::InverseDensity)),
                    "none" => Ok(Rescale::Rule(RescaleRule::None)),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

fn yes() -> bool {
    true
}
fn no() -> bool {
    false
}
fn one() -> f64 {
    1.0
}
fn rescale_l1() -> Rescale {
    Rescale::Rule(RescaleRule::L1)
}
fn rescale_none() -> Rescale {
    Rescale::Rule(RescaleRule::None)
}
fn default_gamma() -> f64 {
    0.01
}
fn default_epsilon() -> f64 {
    0.15
}

/// Global parameters of `task_arithmetic`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskArithmeticParams {
    /// Divide the weighted sum of task vectors by Σ wᵢ (a sum below 1e-8 in magnitude counts as 1).
    #[serde(default = "no")]
    pub normalize: bool,
    /// λ, the factor on the combined task vector before it is added to the base.
    #[serde(default = "one")]
    pub lambda: f64,
}

/// Global parameters of `ties`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TiesParams {
    /// Divide, per element, by the sum of the weights of the models that agree with the majority
    /// sign (a zero sum counts as 1).
    #[serde(default = "yes")]
    pub normalize: bool,
    /// λ, the factor on the combined task vector before it is added to the base.
    #[serde(default = "one")]
    pub lambda: f64,
    /// Rescaling of each trimmed task vector: "l1" (keep ‖δ‖₁), "inverse_density" (divide by
    /// density) or "none"; true/false mean "l1"/"none".
    #[serde(default = "rescale_none")]
    pub rescale: Rescale,
}

/// Global parameters of `dare_linear`, `dare_ties` and `della_linear`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DareParams {
    /// Divide by the sum of the weights (per element over the agreeing models with sign
    /// consensus; a zero sum counts as 1).
    #[serde(default = "no")]
    pub normalize: bool,
    /// λ, the factor on the combined task vector before it is added to the base.
    #[serde(default = "one")]
    pub lambda: f64,
    /// Rescaling of each randomly pruned task vector: "l1" (multiply by ‖δ‖₁/‖δ⊙M‖₁ per tensor:
    /// mergekit ≥ 0.1.5, the default), "inverse_density" (divide by the keep probability: the
    /// DARE paper and the mergekit Model-GLUE ran) or "none"; true/false mean "l1"/"none".
    #[serde(default = "rescale_l1")]
    pub rescale: Rescale,
}

/// Global parameters of `breadcrumbs` and `breadcrumbs_ties`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BreadcrumbsParams {
    /// Divide by the sum of the weights (per element over the agreeing models with sign
    /// consensus; a zero sum counts as 1).
    #[serde(default = "no")]
    pub normalize: bool,
    /// λ, the factor on the combined task vector before it is added to the base.
    #[serde(default = "one")]
    pub lambda: f64,
    /// Rescaling of each trimmed task vector: "l1" (keep ‖δ‖₁), "inverse_density" (divide by
    /// density) or "none"; true/false mean "l1"/"none".
    #[serde(default = "rescale_none")]
    pub rescale: Rescale,
}

/// Global parameters of `della`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DellaParams {
    /// Divide, per element, by the sum of the weights of the models that agree with the majority
    /// sign (a zero sum counts as 1).
    #[serde(default = "yes")]
    pub normalize: bool,
    /// λ, the factor on the combined task vector before it is added to the base.
    #[serde(default = "one")]
    pub lambda: f64,
    /// Rescaling of each pruned task vector: "l1" (multiply by ‖δ‖₁/‖δ⊙M‖₁ per tensor, the
    /// default), "inverse_density" (divide each kept element by its keep probability, the DELLA
    /// paper) or "none"; true/false mean "l1"/"none".
    #[serde(default = "rescale_l1")]
    pub rescale: Rescale,
}

/// Per-model parameters of `task_arithmetic`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WeightParams {
    /// The model's weight wᵢ on its task vector (required for every model but the base; may
    /// vary per layer through a gradient list).
    pub weight: Option<f64>,
}

/// Per-model parameters of `ties`, `dare_linear` and `dare_ties`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DensityParams {
    /// The model's weight wᵢ on its task vector (required for every model but the base; its
    /// sign matters for the sign consensus).
    pub weight: Option<f64>,
    /// Fraction of the task vector kept, in (0, 1]: the top-k by magnitude for ties, the
    /// Bernoulli keep probability for dare. 1 keeps everything.
    #[serde(default = "one")]
    pub density: f64,
}

/// Per-model parameters of `breadcrumbs` and `breadcrumbs_ties`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BreadcrumbsModelParams {
    /// The model's weight wᵢ on its task vector (required for every model but the base).
    pub weight: Option<f64>,
    /// Fraction of the task vector kept, in (0, 1], after the largest outliers are dropped.
    #[serde(default = "one")]
    pub density: f64,
    /// Fraction of the largest magnitudes dropped as outliers, in [0, 1] (0 = plain top-k).
    #[serde(default = "default_gamma")]
    pub gamma: f64,
}

/// Per-model parameters of `della` and `della_linear`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DellaModelParams {
    /// The model's weight wᵢ on its task vector (required for every model but the base).
    pub weight: Option<f64>,
    /// Mean keep probability, with 0 < density − epsilon and density + epsilon < 1.
    #[serde(default = "one")]
    pub density: f64,
    /// Half-width ε of the keep probabilities: the smallest |δ| of a row is kept with
    /// probability density − ε, the largest with density + ε, linearly in the rank between.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
}

// ---------------------------------------------------------------------------------------------
// The family, as data
// ---------------------------------------------------------------------------------------------

/// How task vectors are thinned before they are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sparsify {
    /// Keep everything.
    None,
    /// Top-k by magnitude over the whole tensor.
    Magnitude,
    /// Bernoulli(density) per element.
    Random,
    /// Drop the gamma largest, keep the next density (by magnitude).
    MagnitudeOutliers,
    /// Bernoulli with a probability rising with the magnitude's rank in its row.
    MagPrune,
}

/// One member of the family.
#[derive(Debug, Clone, Copy)]
struct Spec {
    name: &'static str,
    sparsify: Sparsify,
    consensus: bool,
}

/// The global knobs every member shares.
#[derive(Debug, Clone, Copy)]
struct Globals {
    normalize: bool,
    lambda: f64,
    rescale: RescaleRule,
}

/// One model's knobs (defaults where a member has no such parameter).
#[derive(Debug, Clone, Copy)]
struct Knobs {
    weight: Option<f64>,
    density: f64,
    gamma: f64,
    epsilon: f64,
}

trait GlobalKnobs {
    fn globals(&self) -> Globals;
}

trait ModelKnobs {
    fn knobs(&self) -> Knobs;
}

impl GlobalKnobs for TaskArithmeticParams {
    fn globals(&self) -> Globals {
        Globals { normalize: self.normalize, lambda: self.lambda, rescale: RescaleRule::None }
    }
}

macro_rules! globals_with_rescale {
    ($($t:ty),*) => {$(
        impl GlobalKnobs for $t {
            fn globals(&self) -> Globals {
                Globals { normalize: self.normalize, lambda: self.lambda, rescale: self.rescale.rule() }
            }
        }
    )*};
}
globals_with_rescale!(TiesParams, DareParams, BreadcrumbsParams, DellaParams);

impl ModelKnobs for WeightParams {
    fn knobs(&self) -> Knobs {
        Knobs { weight: self.weight, density: 1.0, gamma: 0.0, epsilon: 0.0 }
    }
}
impl ModelKnobs for DensityParams {
    fn knobs(&self) -> Knobs {
        Knobs { weight: self.weight, density: self.density, gamma: 0.0, epsilon: 0.0 }
    }
}
impl ModelKnobs for BreadcrumbsModelParams {
    fn knobs(&self) -> Knobs {
        Knobs { weight: self.weight, density: self.density, gamma: self.gamma, epsilon: 0.0 }
    }
}
impl ModelKnobs for DellaModelParams {
    fn knobs(&self) -> Knobs {
        Knobs { weight: self.weight, density: self.density, gamma: 0.0, epsilon: self.epsilon }
    }
}

macro_rules! gta_method {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $desc:literal, $params:ty, $model:ty,
     $sparsify:expr, consensus = $consensus:literal) => {
        $(#[$doc])*
        pub struct $ty;

        impl $ty {
            const SPEC: Spec = Spec { name: $name, sparsify: $sparsify, consensus: $consensus };
        }

        impl MergeMethod for $ty {
            const NAME: &'static str = $name;
            const DESCRIPTION: &'static str = $desc;
            type Params = $params;
            type ModelParams = $model;

            fn validate(params: &$params, models: &[$model], cx: &ValidateContext<'_>) -> Result<()> {
                let knobs: Vec<Knobs> = models.iter().map(ModelKnobs::knobs).collect();
                check(&Self::SPEC, &params.globals(), &knobs, cx)
            }

            fn merge<'b>(
                params: &$params,
                models: Vec<MergeInput<'b, $model>>,
                cx: &MergeContext<'b>,
            ) -> Result<Tensor<'b>> {
                let inputs = models.into_iter().map(|m| (m.tensor, m.params.knobs(), m.is_base)).collect();
                merge_tensor(&Self::SPEC, &params.globals(), inputs, cx)
            }
        }
    };
}

gta_method!(
    /// `task_arithmetic`: θ₀ + λ Σᵢ wᵢ δᵢ.
    TaskArithmetic, "task_arithmetic",
    "Task arithmetic: base + λ · Σ wᵢ (θᵢ − base)",
    TaskArithmeticParams, WeightParams, Sparsify::None, consensus = false
);
gta_method!(
    /// `ties`: top-k trim by magnitude, sign consensus, disjoint mean.
    Ties, "ties",
    "TIES-Merging: trim task vectors to the top density by magnitude, elect signs, average the agreeing",
    TiesParams, DensityParams, Sparsify::Magnitude, consensus = true
);
gta_method!(
    /// `dare_linear`: random drop and rescale, weighted sum.
    DareLinear, "dare_linear",
    "DARE: drop task-vector elements at random (keep density), rescale, weighted sum",
    DareParams, DensityParams, Sparsify::Random, consensus = false
);
gta_method!(
    /// `dare_ties`: random drop and rescale, then TIES sign consensus.
    DareTies, "dare_ties",
    "DARE-TIES: drop task-vector elements at random (keep density), rescale, elect signs, combine the agreeing",
    DareParams, DensityParams, Sparsify::Random, consensus = true
);
gta_method!(
    /// `breadcrumbs`: drop the largest outliers and the smallest values, weighted sum.
    Breadcrumbs, "breadcrumbs",
    "Model Breadcrumbs: drop the gamma largest and keep the next density of each task vector by magnitude, weighted sum",
    BreadcrumbsParams, BreadcrumbsModelParams, Sparsify::MagnitudeOutliers, consensus = false
);
gta_method!(
    /// `breadcrumbs_ties`: breadcrumbs masks, then TIES sign consensus.
    BreadcrumbsTies, "breadcrumbs_ties",
    "Model Breadcrumbs with TIES sign consensus",
    BreadcrumbsParams, BreadcrumbsModelParams, Sparsify::MagnitudeOutliers, consensus = true
);
gta_method!(
    /// `della`: magnitude-ranked random drop (MAGPRUNE), rescale, sign consensus.
    Della, "della",
    "DELLA: drop task-vector elements at random with keep probability rising with magnitude rank, rescale, elect signs, average the agreeing",
    DellaParams, DellaModelParams, Sparsify::MagPrune, consensus = true
);
gta_method!(
    /// `della_linear`: MAGPRUNE drop and rescale, weighted sum.
    DellaLinear, "della_linear",
    "DELLA without sign consensus: magnitude-ranked random drop, rescale, weighted sum",
    DareParams, DellaModelParams, Sparsify::MagPrune, consensus = false
);

mglue_plugin_api::export_plugin!(merge: [
    TaskArithmetic, Ties, DareLinear, DareTies, Breadcrumbs, BreadcrumbsTies, Della, DellaLinear,
]);

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

fn check(spec: &Spec, g: &Globals, models: &[Knobs], cx: &ValidateContext<'_>) -> Result<()> {
    let name = spec.name;
    let tensor = cx.tensor_name;
    if !cx.has_base {
        return Err(Error::params(format!(
            "`{name}` needs a base model: set `base_model:` in the config or --base on the command line"
        )));
    }
    if !g.lambda.is_finite() {
        return Err(Error::params(format!("`lambda` of `{name}` must be a finite number (got {})", g.lambda)));
    }
    let mut task_vectors = 0;
    for (i, k) in models.iter().enumerate() {
        if Some(i) == cx.base_index {
            continue;
        }
        task_vectors += 1;
        let Some(w) = k.weight else {
            return Err(Error::params(format!(
                "model #{i} of `{name}` has no `weight` (for `{tensor}`): set `weight:` in its parameters or globally"
            )));
        };
        if !w.is_finite() {
            return Err(Error::params(format!("`weight` of model #{i} of `{name}` must be finite (got {w})")));
        }
        if spec.sparsify == Sparsify::None {
            continue;
        }
        let d = k.density;
        if !(d > 0.0 && d <= 1.0) {
            return Err(Error::params(format!(
                "`density` of model #{i} of `{name}` must be in (0, 1] (got {d} for `{tensor}`): it is the fraction of the task vector kept"
            )));
        }
        match spec.sparsify {
            Sparsify::MagnitudeOutliers if !(0.0..=1.0).contains(&k.gamma) => {
                return Err(Error::params(format!(
                    "`gamma` of model #{i} of `{name}` must be in [0, 1] (got {} for `{tensor}`): it is the fraction of largest magnitudes dropped",
                    k.gamma
                )));
            }
            Sparsify::MagPrune => {
                let e = k.epsilon;
                if !(e >= 0.0 && d - e > 0.0 && d + e < 1.0) {
                    return Err(Error::params(format!(
                        "`{name}` needs 0 < density − epsilon and density + epsilon < 1, but model #{i} has density {d} and epsilon {e} (for `{tensor}`): the keep probabilities span [density − epsilon, density + epsilon]"
                    )));
                }
            }
            _ => {}
        }
    }
    if task_vectors == 0 {
        return Err(Error::params(format!(
            "`{name}` needs at least one model besides the base (got {} model(s){})",
            models.len(),
            if cx.base_index.is_some() { ", one of them the base" } else { "" }
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Merge
// ---------------------------------------------------------------------------------------------

/// `⌊fraction · n⌋`, as Python's `int(fraction * n)`.
fn count_of(fraction: f64, n: usize) -> usize {
    ((fraction * n as f64).floor().max(0.0) as usize).min(n)
}

/// Rounds values to what `dtype` holds (as `torch.tensor(values, dtype=dtype)` does: via f32).
fn round_to<'b>(backend: Backend<'b>, values: &[f64], dtype: DType) -> Result<Vec<f64>> {
    if dtype == DType::F64 || values.is_empty() {
        return Ok(values.to_vec());
    }
    let f: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    let t = backend.from_f32(&f, &[f.len()], dtype)?;
    Ok(t.to_vec_f32()?.into_iter().map(f64::from).collect())
}

/// `t · s` as a torch tensor times a Python float: the product in f32 (f64 for f64 tensors),
/// rounded to the tensor's dtype.
fn mul_scalar<'b>(t: &Tensor<'b>, s: f64) -> Result<Tensor<'b>> {
    match t.dtype() {
        DType::F64 => t.scale(s),
        DType::F32 => t.scale(s as f32 as f64),
        other => t.to_dtype(DType::F32)?.scale(s as f32 as f64)?.to_dtype(other),
    }
}

/// `t / s` as a torch tensor divided by a Python float (see [`mul_scalar`]).
fn div_scalar<'b>(t: &Tensor<'b>, s: f64) -> Result<Tensor<'b>> {
    match t.dtype() {
        DType::F64 => t.div(&t.full_like(s)?),
        DType::F32 => t.div(&t.full_like(s as f32 as f64)?),
        other => {
            let x = t.to_dtype(DType::F32)?;
            x.div(&x.full_like(s as f32 as f64)?)?.to_dtype(other)
        }
    }
}

/// `Σᵢ xᵢ` over the models, accumulated left to right in f32 (f64 for f64), rounded once to
/// `dtype`, as torch's CPU `sum(dim=0)` of the stacked tensors.
fn sum_models<'b>(backend: Backend<'b>, xs: &[Tensor<'b>], dtype: DType) -> Result<Tensor<'b>> {
    weighted_models(backend, xs, &vec![1.0; xs.len()], dtype)
}

/// `Σᵢ wᵢ xᵢ` where every product `wᵢ xᵢ` is exact (xᵢ a 0/1 mask or wᵢ = 1), so the fused
/// multiply-add of `weighted_sum` rounds exactly like separate ops would.
fn weighted_models<'b>(backend: Backend<'b>, xs: &[Tensor<'b>], ws: &[f64], dtype: DType) -> Result<Tensor<'b>> {
    if dtype == DType::F64 {
        let mut acc = xs[0].scale(ws[0])?;
        for (x, &w) in xs.iter().zip(ws).skip(1) {
            acc = acc.add(&x.scale(w)?)?;
        }
        return Ok(acc);
    }
    let refs: Vec<&Tensor<'b>> = xs.iter().collect();
    backend.weighted_sum(&refs, ws, None, dtype)
}

/// How likely each element was to be kept, for `rescale: inverse_density`.
enum KeepProb<'b> {
    Uniform(f64),
    PerElement(Tensor<'b>),
}

/// δ ⊙ M, rescaled by `rule`.
fn apply_mask<'b>(delta: &Tensor<'b>, mask: &Tensor<'b>, rule: RescaleRule, p: KeepProb<'b>) -> Result<Tensor<'b>> {
    let kept = delta.mul(mask)?;
    match rule {
        RescaleRule::None => Ok(kept),
        RescaleRule::L1 => {
            let before = delta.sum_abs()?;
            let after = kept.sum_abs()?;
            if before < 1e-7 || after < 1e-7 {
                Ok(kept)
            } else {
                mul_scalar(&kept, before / after)
            }
        }
        RescaleRule::InverseDensity => match p {
            KeepProb::Uniform(p) => div_scalar(&kept, p),
            KeepProb::PerElement(p) => kept.div(&p.to_dtype(kept.dtype())?),
        },
    }
}

/// Step 1: δ̃ = sparsify(δ).
fn sparsify<'b>(spec: &Spec, rule: RescaleRule, delta: Tensor<'b>, k: &Knobs, seed: u64, stream: u64) -> Result<Tensor<'b>> {
    let n = delta.elem_count();
    if n == 0 {
        return Ok(delta);
    }
    let d = k.density;
    match spec.sparsify {
        Sparsify::None => Ok(delta),
        Sparsify::Magnitude => {
            if d >= 1.0 {
                return Ok(delta);
            }
            let mask = delta.topk_abs_mask(count_of(d, n).max(1))?;
            apply_mask(&delta, &mask, rule, KeepProb::Uniform(d))
        }
        Sparsify::Random => {
            if d >= 1.0 {
                return Ok(delta);
            }
            let mask = delta.bernoulli_mask(d, seed, stream)?;
            apply_mask(&delta, &mask, rule, KeepProb::Uniform(d))
        }
        Sparsify::MagnitudeOutliers => {
            // Keep the ascending magnitude ranks [n_bot, n_bot + keep): the `keep` largest after
            // the `top` largest, i.e. top-(top + keep) minus top-(top). Both masks break ties in
            // index order, so the second is a subset of the first.
            let keep = count_of(d, n).max(1);
            let top = count_of(k.gamma, n).min(n - keep);
            if top == 0 && keep == n {
                return Ok(delta);
            }
            let upper = delta.topk_abs_mask(top + keep)?;
            let mask = if top == 0 { upper } else { upper.sub(&delta.topk_abs_mask(top)?)? };
            apply_mask(&delta, &mask, rule, KeepProb::Uniform(d))
        }
        Sparsify::MagPrune => {
            let e = k.epsilon;
            let row = delta.shape().last().copied().unwrap_or(1);
            let probs = if row > 1 {
                // p = (d − ε) + 2ε (r − 1)/(n − 1) for the 1-based rank r of |δ| in its row.
                let step = 2.0 * e / (row - 1) as f64;
                delta.abs_rank_last()?.affine(step, d - e - step)?
            } else {
                delta.to_dtype(DType::F32)?.full_like(d)?
            };
            let mask = probs.bernoulli_probs(seed, stream)?.to_dtype(delta.dtype())?;
            apply_mask(&delta, &mask, rule, KeepProb::PerElement(probs))
        }
    }
}

/// Steps 2 and 3: optional sign consensus, then the (normalised) sum, λ and the base.
fn merge_tensor<'b>(
    spec: &Spec,
    g: &Globals,
    models: Vec<(Tensor<'b>, Knobs, bool)>,
    cx: &MergeContext<'b>,
) -> Result<Tensor<'b>> {
    let base = cx.require_base(spec.name)?;
    let dtype = base.dtype();
    if !dtype.is_float() {
        return Err(Error::params(format!("`{}` merges float tensors; `{}` is {dtype:?}", spec.name, cx.tensor_name)));
    }
    let shape = base.shape();
    let mut deltas = Vec::with_capacity(models.len());
    let mut weights = Vec::with_capacity(models.len());
    for (i, (tensor, k, is_base)) in models.into_iter().enumerate() {
        if is_base {
            continue;
        }
        let weight = k.weight.ok_or_else(|| {
            Error::params(format!("model #{i} of `{}` has no `weight` for `{}`", spec.name, cx.tensor_name))
        })?;
        if tensor.shape() != shape {
            return Err(Error::params(format!(
                "`{}` of model #{i} has shape {:?} but the base's is {shape:?}",
                cx.tensor_name,
                tensor.shape()
            )));
        }
        let tensor = if tensor.dtype() == dtype { tensor } else { tensor.to_dtype(dtype)? };
        let delta = tensor.sub(base)?;
        deltas.push(sparsify(spec, g.rescale, delta, &k, cx.seed, i as u64)?);
        weights.push(weight);
    }
    if deltas.is_empty() {
        return Err(Error::params(format!("`{}` needs at least one model besides the base", spec.name)));
    }
    mglue_plugin_api::tracing::trace!(tensor = cx.tensor_name, method = spec.name, models = deltas.len(), "merge");

    // The weights as a tensor of the compute dtype holds them.
    let w = round_to(cx.backend, &weights, dtype)?;
    let weighted: Vec<Tensor<'b>> = deltas.iter().zip(&w).map(|(d, &w)| d.scale(w)).collect::<Result<_>>()?;
    drop(deltas);

    let mixed = if spec.consensus {
        let total = sum_models(cx.backend, &weighted, dtype)?;
        let zero = total.zeros_like()?;
        let majority = total.ge(&zero)?.affine(2.0, -1.0)?;
        let agree: Vec<Tensor<'b>> = weighted.iter().map(|a| a.sign()?.eq(&majority)).collect::<Result<_>>()?;
        let kept: Vec<Tensor<'b>> = weighted.iter().zip(&agree).map(|(a, m)| a.mul(m)).collect::<Result<_>>()?;
        let mixed = sum_models(cx.backend, &kept, dtype)?;
        if g.normalize {
            let divisor = weighted_models(cx.backend, &agree, &w, dtype)?;
            let divisor = divisor.add(&divisor.eq(&zero)?)?;
            mixed.div(&divisor)?
        } else {
            mixed
        }
    } else {
        let mixed = sum_models(cx.backend, &weighted, dtype)?;
        if g.normalize {
            // torch: the weight tensor summed in f32, rounded to the dtype.
            let sum = w.iter().fold(0f32, |acc, &w| acc + w as f32) as f64;
            let sum = if dtype == DType::F64 { w.iter().sum() } else { round_to(cx.backend, &[sum], dtype)?[0] };
            let divisor = if sum.abs() < 1e-8 { 1.0 } else { sum };
            mixed.div(&mixed.full_like(divisor)?)?
        } else {
            mixed
        }
    };
    let mixed = if g.lambda != 1.0 { mul_scalar(&mixed, g.lambda)? } else { mixed };
    base.add(&mixed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType as CDType, Device, Tensor as CTensor};
    use modelglue::checkpoint::Checkpoint;
    use modelglue::testing::{ModelInput, PluginHarness};
    use serde_json::{json, Value};
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/mergekit")
    }

    fn harness() -> PluginHarness {
        PluginHarness::new(mglue_root_module())
    }

    fn open(rel: &str) -> Checkpoint {
        Checkpoint::open(&fixtures().join(rel)).unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
    }

    /// The fixture zoo: base, then ft1, ft2, ft3.
    struct Zoo {
        base: Checkpoint,
        fts: Vec<Checkpoint>,
    }

    fn zoo() -> Zoo {
        Zoo { base: open("zoo/base"), fts: ["zoo/ft1", "zoo/ft2", "zoo/ft3"].iter().map(|m| open(m)).collect() }
    }

    fn load(ck: &Checkpoint, name: &str, dtype: Option<CDType>) -> CTensor {
        match dtype {
            Some(dt) => ck.load_as(name, dt).expect("tensor"),
            None => ck.load(name).expect("tensor"),
        }
    }

    /// A per-tensor seed, as the host derives one from the run's seed and the tensor.
    fn seed_of(run_seed: u64, tensor_index: usize) -> u64 {
        run_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (tensor_index as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
    }

    /// Merges every tensor of the zoo as a host would (`dtype:` casting at load), using the
    /// first `model_params.len()` fine-tunes.
    fn merge_zoo(method: &str, params: &Value, model_params: &[Value], dtype: Option<CDType>, run_seed: u64) -> Vec<(String, CTensor)> {
        let z = zoo();
        let h = harness();
        let mut names = z.base.tensor_names();
        names.sort();
        names
            .into_iter()
            .enumerate()
            .map(|(ti, name)| {
                let inputs: Vec<ModelInput> = z
                    .fts
                    .iter()
                    .zip(model_params)
                    .map(|(m, p)| ModelInput::new(load(m, &name, dtype), p.clone()))
                    .collect();
                let base = load(&z.base, &name, dtype);
                let out = h
                    .merge_named(method, &name, params, &inputs, Some(&base), None, seed_of(run_seed, ti))
                    .unwrap_or_else(|e| panic!("{method} {name}: {e}"));
                (name, out)
            })
            .collect()
    }

    fn values(t: &CTensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_dtype(CDType::F32).unwrap().to_vec1::<f32>().unwrap()
    }

    /// (elements whose bits differ, max |difference|).
    fn diff(got: &CTensor, want: &CTensor) -> (usize, f32) {
        assert_eq!(got.dims(), want.dims());
        assert_eq!(got.dtype(), want.dtype());
        let (g, w) = (values(got), values(want));
        g.iter().zip(&w).fold((0, 0f32), |(n, m), (a, b)| {
            if a.to_bits() == b.to_bits() {
                (n, m)
            } else {
                (n + 1, m.max((a - b).abs()))
            }
        })
    }

    /// Per tensor (differing elements, max |diff|) against `expected/<case>`.
    fn parity(case: &str, outs: &[(String, CTensor)]) -> Vec<(String, usize, f32)> {
        let expected = open(&format!("expected/{case}"));
        assert_eq!(expected.tensor_names().len(), outs.len(), "{case}: tensor count");
        outs.iter()
            .map(|(name, got)| {
                let (n, m) = diff(got, &expected.load(name).expect("expected tensor"));
                (name.clone(), n, m)
            })
            .collect()
    }

    fn assert_bit_exact(case: &str, outs: &[(String, CTensor)]) {
        let report = parity(case, outs);
        let bad: Vec<_> = report.iter().filter(|(_, n, _)| *n > 0).collect();
        assert!(bad.is_empty(), "{case}: {} of {} tensors differ: {bad:?}", bad.len(), report.len());
    }

    fn weights_of(ws: &[f64], extra: Value) -> Vec<Value> {
        ws.iter()
            .map(|w| {
                let mut p = extra.clone();
                p["weight"] = json!(w);
                p
            })
            .collect()
    }

    /// Whole-model statistics of a merge, as `stats/analysis.json` defines them.
    #[derive(Debug)]
    struct Stats {
        /// Fraction of elements with some δᵢ ≠ 0 where the output differs from the base.
        changed_where_any_delta: f64,
        /// Elements with every δᵢ = 0 where the output differs from the base.
        changed_where_no_delta: usize,
        /// ‖out − base‖₁ / ‖Σ wᵢ δᵢ‖₁.
        l1_ratio: f64,
        /// Per tensor, max |‖out − base‖₁ / ‖Σ wᵢ δᵢ‖₁ − 1| (meaningful for one model).
        max_tensor_l1_dev: f64,
        /// Fraction of the nonzero δ₁ whose element changed, overall and for |δ₁| above / below
        /// the median |δ₁| of its row's nonzero elements (meaningful for one model).
        kept_nonzero: f64,
        kept_top_half: f64,
        kept_bottom_half: f64,
    }

    fn stats(outs: &[(String, CTensor)], weights: &[f64]) -> Stats {
        let z = zoo();
        let (mut any, mut changed, mut no_delta) = (0usize, 0usize, 0usize);
        let (mut l1_out, mut l1_ta, mut max_dev) = (0f64, 0f64, 0f64);
        let (mut nz, mut kept, mut top, mut top_kept, mut bot, mut bot_kept) = (0usize, 0usize, 0usize, 0usize, 0usize, 0usize);
        for (name, out) in outs {
            let base = values(&z.base.load(name).unwrap());
            let out = values(out);
            let fts: Vec<Vec<f32>> = z.fts.iter().take(weights.len()).map(|m| values(&m.load(name).unwrap())).collect();
            let (mut t_out, mut t_ta) = (0f64, 0f64);
            for j in 0..base.len() {
                let has = fts.iter().any(|f| f[j] != base[j]);
                let ch = out[j] != base[j];
                if has {
                    any += 1;
                    changed += ch as usize;
                } else if ch {
                    no_delta += 1;
                }
                t_out += (out[j] as f64 - base[j] as f64).abs();
                t_ta += fts.iter().zip(weights).map(|(f, w)| w * (f[j] as f64 - base[j] as f64)).sum::<f64>().abs();
            }
            l1_out += t_out;
            l1_ta += t_ta;
            if t_ta > 0.0 {
                max_dev = max_dev.max((t_out / t_ta - 1.0).abs());
            }
            let row = *z.base.load(name).unwrap().dims().last().unwrap();
            for r in 0..base.len() / row {
                let idx: Vec<usize> = (r * row..(r + 1) * row).filter(|&j| fts[0][j] != base[j]).collect();
                let mut mags: Vec<f32> = idx.iter().map(|&j| (fts[0][j] - base[j]).abs()).collect();
                mags.sort_by(f32::total_cmp);
                let Some(&median) = mags.get(mags.len() / 2) else { continue };
                for &j in &idx {
                    let ch = (out[j] != base[j]) as usize;
                    nz += 1;
                    kept += ch;
                    if (fts[0][j] - base[j]).abs() >= median {
                        top += 1;
                        top_kept += ch;
                    } else {
                        bot += 1;
                        bot_kept += ch;
                    }
                }
            }
        }
        Stats {
            changed_where_any_delta: changed as f64 / any as f64,
            changed_where_no_delta: no_delta,
            l1_ratio: l1_out / l1_ta,
            max_tensor_l1_dev: max_dev,
            kept_nonzero: kept as f64 / nz as f64,
            kept_top_half: top_kept as f64 / top as f64,
            kept_bottom_half: bot_kept as f64 / bot as f64,
        }
    }

    fn expected_outputs(case: &str) -> Vec<(String, CTensor)> {
        let ck = open(&format!("expected/{case}"));
        let mut names = ck.tensor_names();
        names.sort();
        names.into_iter().map(|n| { let t = ck.load(&n).unwrap(); (n, t) }).collect()
    }

    #[test]
    fn random_cases_report() {
        let cases: Vec<(&str, &str, Value, Vec<f64>, Value)> = vec![
            ("dare_linear", "dare_linear", json!({}), vec![0.5, 0.3, 0.2], json!({"density": 0.5})),
            ("dare_ties", "dare_ties", json!({}), vec![1.0, 1.0, 1.0], json!({"density": 0.5})),
            ("dare_linear_single", "dare_linear", json!({}), vec![1.0], json!({"density": 0.5})),
            ("della", "della", json!({}), vec![1.0, 1.0, 1.0], json!({"density": 0.5, "epsilon": 0.1})),
            ("della_single", "della", json!({}), vec![1.0], json!({"density": 0.5, "epsilon": 0.1})),
        ];
        for (case, method, params, ws, extra) in cases {
            let fixture = stats(&expected_outputs(case), &ws);
            let ours = stats(&merge_zoo(method, &params, &weights_of(&ws, extra), None, 42), &ws);
            eprintln!("{case}\n  fixture {fixture:?}\n  ours    {ours:?}");
        }
    }

    #[test]
    fn exact_cases_report() {
        let cases: Vec<(&str, &str, Value, Vec<Value>, Option<CDType>)> = vec![
            ("task_arithmetic", "task_arithmetic", json!({"lambda": 1.0}), weights_of(&[0.5, 0.3, 0.2], json!({})), None),
            ("ties", "ties", json!({}), weights_of(&[1.0, 1.0, 1.0], json!({"density": 0.5})), None),
            ("ties_bf16", "ties", json!({}), weights_of(&[1.0, 1.0, 1.0], json!({"density": 0.5})), Some(CDType::BF16)),
            ("breadcrumbs", "breadcrumbs", json!({}), weights_of(&[0.5, 0.3, 0.2], json!({"density": 0.9, "gamma": 0.01})), None),
            ("dare_linear_d1", "dare_linear", json!({}), weights_of(&[0.5, 0.3, 0.2], json!({"density": 1.0})), None),
        ];
        for (case, method, params, mp, dt) in cases {
            let outs = merge_zoo(method, &params, &mp, dt, 42);
            let rep = parity(case, &outs);
            let total: usize = rep.iter().map(|r| r.1).sum();
            let max = rep.iter().map(|r| r.2).fold(0f32, f32::max);
            eprintln!("{case}: {total} differing elements, max {max:e}; {:?}", rep.iter().filter(|r| r.1 > 0).collect::<Vec<_>>());
        }
    }
}

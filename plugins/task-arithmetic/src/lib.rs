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
use mglue_plugin_api::tensor::{TaskMergeOptions, TaskVectorSpec, TvRescale, TvSparsify};
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
    /// Accepted so that mergekit configs load; it only changed mergekit's memory use and has no
    /// effect here.
    #[serde(default = "no")]
    pub int8_mask: bool,
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
    /// Accepted so that mergekit configs load; it only changed mergekit's memory use and has no
    /// effect here.
    #[serde(default = "no")]
    pub int8_mask: bool,
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
    /// Accepted so that mergekit configs load; it only changed mergekit's memory use and has no
    /// effect here.
    #[serde(default = "no")]
    pub int8_mask: bool,
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
    /// Accepted so that mergekit configs load; it only changed mergekit's memory use and has no
    /// effect here.
    #[serde(default = "no")]
    pub int8_mask: bool,
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
    /// Accepted so that mergekit configs load; it only changed mergekit's memory use and has no
    /// effect here.
    #[serde(default = "no")]
    pub int8_mask: bool,
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
        Globals {
            normalize: self.normalize,
            lambda: self.lambda,
            rescale: RescaleRule::None,
        }
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
        Knobs {
            weight: self.weight,
            density: 1.0,
            gamma: 0.0,
            epsilon: 0.0,
        }
    }
}
impl ModelKnobs for DensityParams {
    fn knobs(&self) -> Knobs {
        Knobs {
            weight: self.weight,
            density: self.density,
            gamma: 0.0,
            epsilon: 0.0,
        }
    }
}
impl ModelKnobs for BreadcrumbsModelParams {
    fn knobs(&self) -> Knobs {
        Knobs {
            weight: self.weight,
            density: self.density,
            gamma: self.gamma,
            epsilon: 0.0,
        }
    }
}
impl ModelKnobs for DellaModelParams {
    fn knobs(&self) -> Knobs {
        Knobs {
            weight: self.weight,
            density: self.density,
            gamma: 0.0,
            epsilon: self.epsilon,
        }
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
        return Err(Error::params(format!(
            "`lambda` of `{name}` must be a finite number (got {})",
            g.lambda
        )));
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
            return Err(Error::params(format!(
                "`weight` of model #{i} of `{name}` must be finite (got {w})"
            )));
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
            if cx.base_index.is_some() {
                ", one of them the base"
            } else {
                ""
            }
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
fn weighted_models<'b>(
    backend: Backend<'b>,
    xs: &[Tensor<'b>],
    ws: &[f64],
    dtype: DType,
) -> Result<Tensor<'b>> {
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
fn apply_mask<'b>(
    delta: &Tensor<'b>,
    mask: &Tensor<'b>,
    rule: RescaleRule,
    p: KeepProb<'b>,
) -> Result<Tensor<'b>> {
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
fn sparsify<'b>(
    spec: &Spec,
    rule: RescaleRule,
    delta: Tensor<'b>,
    k: &Knobs,
    seed: u64,
    stream: u64,
) -> Result<Tensor<'b>> {
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
            let mask = if top == 0 {
                upper
            } else {
                upper.sub(&delta.topk_abs_mask(top)?)?
            };
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

/// The divisor without consensus: torch's weight tensor summed in f32, rounded to the dtype; a
/// magnitude below 1e-8 becomes 1.
fn plain_divisor<'b>(backend: Backend<'b>, w: &[f64], dtype: DType) -> Result<f64> {
    let sum = w.iter().fold(0f32, |acc, &w| acc + w as f32) as f64;
    let sum = if dtype == DType::F64 {
        w.iter().sum()
    } else {
        round_to(backend, &[sum], dtype)?[0]
    };
    Ok(if sum.abs() < 1e-8 { 1.0 } else { sum })
}

/// Steps 1–3 in one host op (plugin-api 1.3 `task_merge`): the same formula and op order as
/// [`sparsify`] and [`merge_tensor`]'s op-by-op path, bit for bit, in a few passes over memory.
fn merge_fused<'b>(
    spec: &Spec,
    g: &Globals,
    base: &Tensor<'b>,
    inputs: &[(Tensor<'b>, Knobs, usize)],
    weights: &[f64],
    cx: &MergeContext<'b>,
) -> Result<Tensor<'b>> {
    let dtype = base.dtype();
    let n = base.elem_count();
    let w = round_to(cx.backend, weights, dtype)?;
    let rescale = |d: f64| match g.rescale {
        RescaleRule::None => TvRescale::None,
        RescaleRule::L1 => TvRescale::L1,
        RescaleRule::InverseDensity => TvRescale::Divide(d),
    };
    let vectors: Vec<TaskVectorSpec<'_, 'b>> = inputs
        .iter()
        .zip(&w)
        .map(|((tensor, k, i), &weight)| {
            let d = k.density;
            let (sparsify, rescale) = match spec.sparsify {
                Sparsify::Magnitude if d < 1.0 => (TvSparsify::TopK(count_of(d, n).max(1)), rescale(d)),
                Sparsify::Random if d < 1.0 => (
                    TvSparsify::Bernoulli {
                        p: d,
                        seed: cx.seed,
                        stream: *i as u64,
                    },
                    rescale(d),
                ),
                _ => (TvSparsify::None, TvRescale::None),
            };
            TaskVectorSpec {
                tensor,
                weight,
                sparsify,
                rescale,
            }
        })
        .collect();
    let divisor = if !spec.consensus && g.normalize {
        plain_divisor(cx.backend, &w, dtype)?
    } else {
        1.0
    };
    mglue_plugin_api::tracing::trace!(
        tensor = cx.tensor_name,
        method = spec.name,
        models = vectors.len(),
        "merge (fused)"
    );
    cx.backend.task_merge(
        base,
        &vectors,
        TaskMergeOptions {
            consensus: spec.consensus,
            normalize: g.normalize,
            divisor,
            lambda: g.lambda,
        },
    )
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
        return Err(Error::params(format!(
            "`{}` merges float tensors; `{}` is {dtype:?}",
            spec.name, cx.tensor_name
        )));
    }
    let shape = base.shape();
    let mut deltas = Vec::with_capacity(models.len());
    let mut weights = Vec::with_capacity(models.len());
    let mut inputs = Vec::with_capacity(models.len());
    for (i, (tensor, k, is_base)) in models.into_iter().enumerate() {
        if is_base {
            continue;
        }
        let weight = k.weight.ok_or_else(|| {
            Error::params(format!(
                "model #{i} of `{}` has no `weight` for `{}`",
                spec.name, cx.tensor_name
            ))
        })?;
        if tensor.shape() != shape {
            return Err(Error::params(format!(
                "`{}` of model #{i} has shape {:?} but the base's is {shape:?}",
                cx.tensor_name,
                tensor.shape()
            )));
        }
        inputs.push((tensor, k, i));
        weights.push(weight);
    }
    if inputs.is_empty() {
        return Err(Error::params(format!(
            "`{}` needs at least one model besides the base",
            spec.name
        )));
    }
    let n: usize = shape.iter().product();
    let fusable = matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        && matches!(
            spec.sparsify,
            Sparsify::None | Sparsify::Magnitude | Sparsify::Random
        )
        && n > 0
        && cx.backend.has_fused_1_3();
    if fusable {
        return merge_fused(spec, g, base, &inputs, &weights, cx);
    }
    for (tensor, k, i) in inputs {
        let tensor = if tensor.dtype() == dtype {
            tensor
        } else {
            tensor.to_dtype(dtype)?
        };
        let delta = tensor.sub(base)?;
        deltas.push(sparsify(spec, g.rescale, delta, &k, cx.seed, i as u64)?);
    }
    if deltas.is_empty() {
        return Err(Error::params(format!(
            "`{}` needs at least one model besides the base",
            spec.name
        )));
    }
    mglue_plugin_api::tracing::trace!(
        tensor = cx.tensor_name,
        method = spec.name,
        models = deltas.len(),
        "merge"
    );

    // The weights rounded to the compute dtype, as torch's weight tensor holds them.
    let w = round_to(cx.backend, &weights, dtype)?;
    let weighted: Vec<Tensor<'b>> = deltas
        .iter()
        .zip(&w)
        .map(|(d, &w)| d.scale(w))
        .collect::<Result<_>>()?;
    drop(deltas);

    let mixed = if spec.consensus {
        let total = sum_models(cx.backend, &weighted, dtype)?;
        let zero = total.zeros_like()?;
        let majority = total.ge(&zero)?.affine(2.0, -1.0)?;
        let agree: Vec<Tensor<'b>> = weighted
            .iter()
            .map(|a| a.sign()?.eq(&majority))
            .collect::<Result<_>>()?;
        let kept: Vec<Tensor<'b>> = weighted
            .iter()
            .zip(&agree)
            .map(|(a, m)| a.mul(m))
            .collect::<Result<_>>()?;
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
            let divisor = plain_divisor(cx.backend, &w, dtype)?;
            mixed.div(&mixed.full_like(divisor)?)?
        } else {
            mixed
        }
    };
    let mixed = if g.lambda != 1.0 {
        mul_scalar(&mixed, g.lambda)?
    } else {
        mixed
    };
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
        Zoo {
            base: open("zoo/base"),
            fts: ["zoo/ft1", "zoo/ft2", "zoo/ft3"]
                .iter()
                .map(|m| open(m))
                .collect(),
        }
    }

    fn load(ck: &Checkpoint, name: &str, dtype: Option<CDType>) -> CTensor {
        match dtype {
            Some(dt) => ck.load_as(name, dt).expect("tensor"),
            None => ck.load(name).expect("tensor"),
        }
    }

    /// A per-tensor seed, as the host derives one from the run's seed and the tensor.
    fn seed_of(run_seed: u64, tensor_index: usize) -> u64 {
        run_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (tensor_index as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
    }

    /// Merges every tensor of the zoo as a host would (`dtype:` casting at load), using the
    /// first `model_params.len()` fine-tunes.
    fn merge_zoo(
        method: &str,
        params: &Value,
        model_params: &[Value],
        dtype: Option<CDType>,
        run_seed: u64,
    ) -> Vec<(String, CTensor)> {
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
                    .merge_named(
                        method,
                        &name,
                        params,
                        &inputs,
                        Some(&base),
                        None,
                        seed_of(run_seed, ti),
                    )
                    .unwrap_or_else(|e| panic!("{method} {name}: {e}"));
                (name, out)
            })
            .collect()
    }

    fn values(t: &CTensor) -> Vec<f32> {
        t.flatten_all()
            .unwrap()
            .to_dtype(CDType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
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
        assert!(
            bad.is_empty(),
            "{case}: {} of {} tensors differ: {bad:?}",
            bad.len(),
            report.len()
        );
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
        let (mut nz, mut kept, mut top, mut top_kept, mut bot, mut bot_kept) =
            (0usize, 0usize, 0usize, 0usize, 0usize, 0usize);
        for (name, out) in outs {
            let base = values(&z.base.load(name).unwrap());
            let out = values(out);
            let fts: Vec<Vec<f32>> = z
                .fts
                .iter()
                .take(weights.len())
                .map(|m| values(&m.load(name).unwrap()))
                .collect();
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
                t_ta += fts
                    .iter()
                    .zip(weights)
                    .map(|(f, w)| w * (f[j] as f64 - base[j] as f64))
                    .sum::<f64>()
                    .abs();
            }
            l1_out += t_out;
            l1_ta += t_ta;
            if t_ta > 0.0 {
                max_dev = max_dev.max((t_out / t_ta - 1.0).abs());
            }
            let row = *z.base.load(name).unwrap().dims().last().unwrap();
            for r in 0..base.len() / row {
                let idx: Vec<usize> = (r * row..(r + 1) * row)
                    .filter(|&j| fts[0][j] != base[j])
                    .collect();
                let mut mags: Vec<f32> = idx.iter().map(|&j| (fts[0][j] - base[j]).abs()).collect();
                mags.sort_by(f32::total_cmp);
                let Some(&median) = mags.get(mags.len() / 2) else {
                    continue;
                };
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
        names
            .into_iter()
            .map(|n| {
                let t = ck.load(&n).unwrap();
                (n, t)
            })
            .collect()
    }

    fn analysis(case: &str) -> Value {
        let text = std::fs::read_to_string(fixtures().join("stats/analysis.json")).expect("analysis.json");
        let all: Value = serde_json::from_str(&text).expect("analysis.json is JSON");
        all["cases"][case].clone()
    }

    fn close(what: &str, got: f64, want: f64, tol: f64) {
        assert!(
            (got - want).abs() <= tol,
            "{what}: {got} vs {want} (tolerance {tol})"
        );
    }

    // ---- (1) exact cases: bit-exact tensor by tensor ----------------------------------------

    #[test]
    fn task_arithmetic_matches_mergekit_bit_exact_on_every_fixture_tensor() {
        let outs = merge_zoo(
            "task_arithmetic",
            &json!({"lambda": 1.0}),
            &weights_of(&[0.5, 0.3, 0.2], json!({})),
            None,
            42,
        );
        assert_bit_exact("task_arithmetic", &outs);
    }

    #[test]
    fn ties_matches_mergekit_bit_exact_on_every_fixture_tensor() {
        let outs = merge_zoo(
            "ties",
            &json!({}),
            &weights_of(&[1.0; 3], json!({"density": 0.5})),
            None,
            42,
        );
        assert_bit_exact("ties", &outs);
    }

    #[test]
    fn breadcrumbs_matches_mergekit_bit_exact_on_every_fixture_tensor() {
        let mp = weights_of(&[0.5, 0.3, 0.2], json!({"density": 0.9, "gamma": 0.01}));
        assert_bit_exact(
            "breadcrumbs",
            &merge_zoo("breadcrumbs", &json!({}), &mp, None, 42),
        );
    }

    #[test]
    fn dare_linear_at_density_1_matches_mergekit_bit_exact() {
        let mp = weights_of(&[0.5, 0.3, 0.2], json!({"density": 1.0}));
        assert_bit_exact(
            "dare_linear_d1",
            &merge_zoo("dare_linear", &json!({}), &mp, None, 42),
        );
    }

    /// MANIFEST: in bf16, 32 (model, tensor) pairs have |δ| ties straddling the top-k cut, which
    /// torch's unstable argsort breaks its own way; a stable tie-break (ours: index order)
    /// changes 4068 output elements by at most 0.0107421875. Everything else must be exact.
    #[test]
    fn ties_bf16_matches_mergekit_except_where_argsort_ties_straddle_the_cut() {
        let outs = merge_zoo(
            "ties",
            &json!({}),
            &weights_of(&[1.0; 3], json!({"density": 0.5})),
            Some(CDType::BF16),
            42,
        );
        let alt = &analysis("ties_bf16")["alt_tiebreak"];
        let allowed = alt["elements_differing_with_stable_sort"]
            .as_u64()
            .expect("count") as usize;
        let allowed_max = alt["max_abs"].as_f64().expect("max") as f32;
        let expected = open("expected/ties_bf16");
        let z = zoo();
        let (mut total, mut max) = (0usize, 0f32);
        for (name, got) in &outs {
            assert_eq!(got.dtype(), CDType::BF16, "{name}: computed in the base dtype");
            let want = values(&expected.load(name).unwrap());
            let got = values(got);
            let base = values(&load(&z.base, name, Some(CDType::BF16)));
            // Each model's |δ| in bf16 and its top-k threshold.
            let deltas: Vec<Vec<f32>> = z
                .fts
                .iter()
                .map(|m| {
                    let t = load(m, name, Some(CDType::BF16))
                        .sub(&load(&z.base, name, Some(CDType::BF16)))
                        .unwrap();
                    values(&t).iter().map(|v| v.abs()).collect()
                })
                .collect();
            let k = count_of(0.5, base.len()).max(1);
            let thresholds: Vec<f32> = deltas
                .iter()
                .map(|d| {
                    let mut s = d.clone();
                    s.sort_by(|a, b| b.total_cmp(a));
                    s[k - 1]
                })
                .collect();
            for j in 0..got.len() {
                if got[j].to_bits() != want[j].to_bits() {
                    total += 1;
                    max = max.max((got[j] - want[j]).abs());
                    let tied = deltas.iter().zip(&thresholds).any(|(d, &t)| d[j] == t);
                    assert!(
                        tied,
                        "{name}[{j}]: differs ({} vs {}) without a magnitude tie at the cut",
                        got[j], want[j]
                    );
                }
            }
        }
        eprintln!("ties_bf16: {total} elements differ (allowed {allowed}), max |diff| {max}");
        assert!(
            total <= allowed,
            "{total} differing elements, MANIFEST allows {allowed}"
        );
        assert!(max <= allowed_max, "max diff {max} > {allowed_max}");
    }

    // ---- (2) random cases: in distribution ----------------------------------------------------

    /// Our statistics on mergekit's output must reproduce `stats/analysis.json`, so that the
    /// comparison below compares like with like.
    fn pin_stats(case: &str, fixture: &Stats) {
        let a = analysis(case);
        if let Some(v) = a["changed_fraction_where_any_delta"].as_f64() {
            close(
                &format!("{case} fixture changed fraction"),
                fixture.changed_where_any_delta,
                v,
                1e-9,
            );
        }
        if let Some(v) = a["L1_merged_delta_over_L1_task_arith_delta"].as_f64() {
            close(&format!("{case} fixture L1 ratio"), fixture.l1_ratio, v, 1e-9);
        }
        if let Some(v) = a["kept_fraction_of_nonzero_delta"].as_f64() {
            close(
                &format!("{case} fixture kept fraction"),
                fixture.kept_nonzero,
                v,
                1e-9,
            );
        }
        if let Some(v) = a["max_abs_L1_ratio_minus_1"].as_f64() {
            close(
                &format!("{case} fixture L1 deviation"),
                fixture.max_tensor_l1_dev,
                v,
                1e-9,
            );
        }
        assert_eq!(
            fixture.changed_where_no_delta, 0,
            "{case}: fixture changes elements without a delta"
        );
    }

    fn random_case(case: &str, method: &str, params: Value, ws: &[f64], extra: Value) -> (Stats, Stats) {
        let fixture = stats(&expected_outputs(case), ws);
        pin_stats(case, &fixture);
        let ours = stats(&merge_zoo(method, &params, &weights_of(ws, extra), None, 42), ws);
        eprintln!("{case}\n  mergekit {fixture:?}\n  ours     {ours:?}");
        assert_eq!(
            ours.changed_where_no_delta, 0,
            "{case}: no change where every δ is 0"
        );
        close(
            &format!("{case} changed fraction"),
            ours.changed_where_any_delta,
            fixture.changed_where_any_delta,
            0.03,
        );
        close(
            &format!("{case} kept fraction"),
            ours.kept_nonzero,
            fixture.kept_nonzero,
            0.03,
        );
        close(
            &format!("{case} L1 ratio"),
            ours.l1_ratio,
            fixture.l1_ratio,
            0.03 * fixture.l1_ratio,
        );
        (fixture, ours)
    }

    #[test]
    fn dare_linear_matches_mergekit_in_distribution() {
        let (_, ours) = random_case(
            "dare_linear",
            "dare_linear",
            json!({}),
            &[0.5, 0.3, 0.2],
            json!({"density": 0.5}),
        );
        let expected = analysis("dare_linear")["expected_changed_fraction"]
            .as_f64()
            .unwrap();
        close(
            "dare_linear changed fraction vs expectation",
            ours.changed_where_any_delta,
            expected,
            0.03,
        );
    }

    #[test]
    fn dare_ties_matches_mergekit_in_distribution() {
        random_case(
            "dare_ties",
            "dare_ties",
            json!({}),
            &[1.0; 3],
            json!({"density": 0.5}),
        );
    }

    #[test]
    fn dare_linear_single_keeps_density_and_preserves_l1_per_tensor() {
        let (_, ours) = random_case(
            "dare_linear_single",
            "dare_linear",
            json!({}),
            &[1.0],
            json!({"density": 0.5}),
        );
        close("kept fraction vs density", ours.kept_nonzero, 0.5, 0.03);
        assert!(
            ours.max_tensor_l1_dev < 1e-5,
            "L1 per tensor off by {}",
            ours.max_tensor_l1_dev
        );
    }

    #[test]
    fn della_matches_mergekit_in_distribution() {
        random_case(
            "della",
            "della",
            json!({}),
            &[1.0; 3],
            json!({"density": 0.5, "epsilon": 0.1}),
        );
    }

    #[test]
    fn della_single_keeps_large_magnitudes_more_often_and_preserves_l1() {
        let (fixture, ours) = random_case(
            "della_single",
            "della",
            json!({}),
            &[1.0],
            json!({"density": 0.5, "epsilon": 0.1}),
        );
        let expected = analysis("della_single")["expected_kept_fraction"]
            .as_f64()
            .unwrap();
        close(
            "della kept fraction vs rank expectation",
            ours.kept_nonzero,
            expected,
            0.03,
        );
        assert!(
            ours.max_tensor_l1_dev < 1e-5,
            "L1 per tensor off by {}",
            ours.max_tensor_l1_dev
        );
        close("top-half kept", ours.kept_top_half, fixture.kept_top_half, 0.03);
        close(
            "bottom-half kept",
            ours.kept_bottom_half,
            fixture.kept_bottom_half,
            0.03,
        );
        assert!(ours.kept_top_half > ours.kept_bottom_half + 0.03, "{ours:?}");
    }

    #[test]
    fn random_methods_are_reproducible_from_the_seed() {
        let bits = |outs: &[(String, CTensor)]| {
            outs.iter()
                .flat_map(|(_, t)| values(t))
                .map(f32::to_bits)
                .collect::<Vec<_>>()
        };
        for (method, extra) in [
            ("dare_ties", json!({"density": 0.3})),
            ("della_linear", json!({"density": 0.5, "epsilon": 0.2})),
        ] {
            let mp = weights_of(&[0.6, 0.4], extra);
            let a = bits(&merge_zoo(method, &json!({}), &mp, None, 42));
            assert_eq!(
                a,
                bits(&merge_zoo(method, &json!({}), &mp, None, 42)),
                "{method}: same seed, same output"
            );
            assert_ne!(
                a,
                bits(&merge_zoo(method, &json!({}), &mp, None, 43)),
                "{method}: another seed, another mask"
            );
        }
    }

    #[test]
    fn dare_keeps_density_of_a_dense_delta_and_its_l1_norm() {
        let n = 200_000;
        let base = CTensor::zeros(n, CDType::F32, &Device::Cpu).unwrap();
        let ft = CTensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap();
        for (rescale, scale) in [
            ("l1", None),
            ("inverse_density", Some(1.0 / 0.3)),
            ("none", Some(1.0)),
        ] {
            let out = harness()
                .merge(
                    "dare_linear",
                    &json!({"rescale": rescale}),
                    &[ModelInput::new(
                        ft.clone(),
                        json!({"weight": 1.0, "density": 0.3}),
                    )],
                    Some(&base),
                    None,
                )
                .unwrap();
            let (o, f) = (values(&out), values(&ft));
            let kept = o.iter().filter(|v| **v != 0.0).count() as f64 / n as f64;
            close(&format!("{rescale}: kept fraction"), kept, 0.3, 0.01);
            let l1 = |v: &[f32]| v.iter().map(|x| x.abs() as f64).sum::<f64>();
            match scale {
                None => close("l1 preserved", l1(&o) / l1(&f), 1.0, 1e-5),
                Some(s) => {
                    for (a, b) in o.iter().zip(&f) {
                        assert!(
                            *a == 0.0 || *a == (*b as f64 * s) as f32 || *a == *b / 0.3f32,
                            "{rescale}: {a} from {b}"
                        );
                    }
                }
            }
        }
    }

    // ---- (3) injected masks: exact ------------------------------------------------------------

    /// The plugin's mask is the host's counter-based Bernoulli stream keyed by (seed, model
    /// position, element); rebuilt here, an independent scalar evaluation of the documented
    /// dare_ties formula reproduces the plugin's output bit for bit.
    #[test]
    fn dare_ties_with_the_host_mask_injected_is_exact() {
        use modelglue::backend::kernels;
        let z = zoo();
        let name = "model.layers.0.mlp.up_proj.weight";
        let (ws, density, seed) = ([1.0f32, 0.7, -0.4], 0.4, 1234u64);
        let base = values(&z.base.load(name).unwrap());
        let fts: Vec<Vec<f32>> = z.fts.iter().map(|m| values(&m.load(name).unwrap())).collect();
        let inputs: Vec<ModelInput> = z
            .fts
            .iter()
            .zip(ws)
            .map(|(m, w)| ModelInput::new(m.load(name).unwrap(), json!({"weight": w, "density": density})))
            .collect();
        let got = values(
            &harness()
                .merge_named(
                    "dare_ties",
                    name,
                    &json!({}),
                    &inputs,
                    Some(&z.base.load(name).unwrap()),
                    None,
                    seed,
                )
                .unwrap(),
        );
        let n = base.len();
        let a: Vec<Vec<f32>> = fts
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let mask = kernels::bernoulli(n, density, seed, i as u64);
                let delta: Vec<f32> = f.iter().zip(&base).map(|(x, b)| x - b).collect();
                let kept: Vec<f32> = delta.iter().zip(&mask).map(|(d, m)| d * m).collect();
                let l1 = |v: &[f32]| v.iter().map(|x| x.abs() as f64).sum::<f64>();
                let factor = (l1(&delta) / l1(&kept)) as f32;
                kept.iter().map(|k| (k * factor) * ws[i]).collect()
            })
            .collect();
        for j in 0..n {
            let sum = a[0][j] + a[1][j] + a[2][j];
            let majority = if sum >= 0.0 { 1.0 } else { -1.0 };
            let mixed = a
                .iter()
                .map(|a| a[j])
                .filter(|v| v.signum() == majority && *v != 0.0)
                .fold(0f32, |acc, v| acc + v);
            let want = base[j] + mixed;
            assert_eq!(
                got[j].to_bits(),
                want.to_bits(),
                "element {j}: {} vs {want}",
                got[j]
            );
        }
    }

    /// With mergekit's own mask, read back from its dare_linear_single output (an element was
    /// kept iff it changed), the plugin's mask-and-rescale step reproduces mergekit's tensors;
    /// only the L1 factor's last bit can differ (torch sums |δ| in f32, the host in f64).
    #[test]
    fn dare_rescale_with_mergekits_mask_injected_matches_mergekit() {
        let cb = modelglue::backend::CandleBackend::new(Device::Cpu);
        let vt = cb.vtable();
        // SAFETY: `vt` and `cb` outlive every tensor made from `be` in this test.
        let be = unsafe { Backend::from_raw(&vt) };
        let z = zoo();
        let expected = open("expected/dare_linear_single");
        let (mut exact, mut tensors, mut differing, mut max_excess) = (0, 0, 0usize, 0f64);
        for name in expected.tensor_names() {
            let base_t = z.base.load(&name).unwrap();
            let ft = z.fts[0].load(&name).unwrap();
            let want_t = expected.load(&name).unwrap();
            let mask_t = want_t.ne(&base_t).unwrap().to_dtype(CDType::F32).unwrap();
            let hs: Vec<_> = [&base_t, &ft, &mask_t].iter().map(|t| cb.share(t)).collect();
            // SAFETY: the shared handles stay live until released below.
            let (base, ft, mask) = unsafe {
                (
                    be.borrow_handle(hs[0]),
                    be.borrow_handle(hs[1]),
                    be.borrow_handle(hs[2]),
                )
            };
            let delta = ft.sub(&base).unwrap();
            let kept = apply_mask(&delta, &mask, RescaleRule::L1, KeepProb::Uniform(0.5)).unwrap();
            let out = base.add(&kept.scale(1.0).unwrap()).unwrap();
            let h = out.into_raw().unwrap();
            // SAFETY: `h` is a live handle of `cb`, taken once.
            let got = values(&unsafe { cb.take(h) });
            drop((base, ft, mask, delta, kept));
            for h in hs {
                // SAFETY: shared handles, released once, no longer used.
                unsafe { cb.release(h) };
            }
            let want = values(&want_t);
            tensors += 1;
            if got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()) {
                exact += 1;
            }
            let b = values(&base_t);
            for ((a, w), b) in got.iter().zip(&want).zip(&b) {
                if a.to_bits() != w.to_bits() {
                    differing += 1;
                    // One ulp of the factor moves the kept δ by ~2⁻²³ of itself; the sum with
                    // the base may then round one ulp of the output the other way.
                    let ulp = f32::from_bits(w.abs().to_bits() + 1) - w.abs();
                    let slack = (a - w).abs() - ulp;
                    max_excess = max_excess.max(slack as f64 / (w - b).abs() as f64);
                }
            }
        }
        eprintln!(
            "dare_linear_single with mergekit's mask: {exact}/{tensors} tensors bit-exact, {differing} elements differ, \
             beyond one output ulp by at most {max_excess:e} of the kept δ"
        );
        assert!(max_excess <= 2.5e-7, "{max_excess}");
        assert!(exact * 2 >= tensors, "only {exact}/{tensors} tensors bit-exact");
    }

    // ---- (4) schema ---------------------------------------------------------------------------

    const METHODS: [&str; 8] = [
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
    ];

    fn model_params_ok(method: &str) -> Value {
        match method {
            "della" | "della_linear" => json!({"weight": 1.0, "density": 0.5}),
            _ => json!({"weight": 1.0}),
        }
    }

    #[test]
    fn every_method_is_exported_with_documented_parameters() {
        let h = harness();
        for m in METHODS {
            let info = h.info(m).unwrap_or_else(|| panic!("{m} is exported"));
            assert!(!info.description.is_empty());
            for (schema, fields) in [
                (
                    &info.params_schema,
                    if m == "task_arithmetic" {
                        &["normalize", "lambda", "int8_mask"][..]
                    } else {
                        &["normalize", "lambda", "rescale", "int8_mask"][..]
                    },
                ),
                (
                    &info.model_params_schema,
                    match m {
                        "task_arithmetic" => &["weight"][..],
                        "breadcrumbs" | "breadcrumbs_ties" => &["weight", "density", "gamma"][..],
                        "della" | "della_linear" => &["weight", "density", "epsilon"][..],
                        _ => &["weight", "density"][..],
                    },
                ),
            ] {
                let props = schema["properties"]
                    .as_object()
                    .unwrap_or_else(|| panic!("{m}: {schema}"));
                let mut names: Vec<&str> = props.keys().map(String::as_str).collect();
                names.sort();
                let mut want = fields.to_vec();
                want.sort();
                assert_eq!(names, want, "{m}");
                for f in fields {
                    let desc = props[*f]["description"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{m}.{f} is documented"));
                    assert!(desc.len() > 20, "{m}.{f}: {desc}");
                }
            }
        }
        let default = |m: &str, scope: &str, f: &str| {
            let info = h.info(m).unwrap();
            let s = if scope == "global" {
                info.params_schema
            } else {
                info.model_params_schema
            };
            s["properties"][f]["default"].clone()
        };
        assert_eq!(default("task_arithmetic", "global", "normalize"), json!(false));
        assert_eq!(default("ties", "global", "normalize"), json!(true));
        assert_eq!(default("ties", "global", "rescale"), json!("none"));
        assert_eq!(default("dare_linear", "global", "rescale"), json!("l1"));
        assert_eq!(default("dare_ties", "global", "normalize"), json!(false));
        assert_eq!(default("breadcrumbs_ties", "global", "normalize"), json!(false));
        assert_eq!(default("della", "global", "normalize"), json!(true));
        assert_eq!(default("della_linear", "global", "normalize"), json!(false));
        assert_eq!(default("ties", "model", "density"), json!(1.0));
        assert_eq!(default("breadcrumbs", "model", "gamma"), json!(0.01));
        assert_eq!(default("della", "model", "epsilon"), json!(0.15));
        assert_eq!(default("task_arithmetic", "global", "lambda"), json!(1.0));
    }

    #[test]
    fn unknown_parameters_are_rejected_by_name() {
        let h = harness();
        for m in METHODS {
            let err = h
                .validate(m, &json!({"normalise": true}), &[model_params_ok(m)], None, true)
                .unwrap_err();
            assert!(err.to_string().contains("normalise"), "{m}: {err}");
            let mut mp = model_params_ok(m);
            mp["densty"] = json!(0.5);
            let err = h.validate(m, &json!({}), &[mp], None, true).unwrap_err();
            assert!(err.to_string().contains("densty"), "{m}: {err}");
            h.validate(m, &json!({}), &[model_params_ok(m)], None, true)
                .unwrap_or_else(|e| panic!("{m}: {e}"));
        }
        // Parameters of another member of the family are unknown here.
        let err = h
            .validate(
                "ties",
                &json!({}),
                &[json!({"weight": 1.0, "gamma": 0.1})],
                None,
                true,
            )
            .unwrap_err();
        assert!(err.to_string().contains("gamma"), "{err}");
        let err = h
            .validate(
                "task_arithmetic",
                &json!({}),
                &[json!({"weight": 1.0, "density": 0.5})],
                None,
                true,
            )
            .unwrap_err();
        assert!(err.to_string().contains("density"), "{err}");
    }

    #[test]
    fn rescale_takes_a_rule_or_mergekits_boolean() {
        let h = harness();
        for ok in [
            json!("l1"),
            json!("inverse_density"),
            json!("none"),
            json!(true),
            json!(false),
        ] {
            h.validate(
                "dare_linear",
                &json!({"rescale": ok}),
                &[json!({"weight": 1.0, "density": 0.5})],
                None,
                true,
            )
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let err = h
            .validate(
                "dare_linear",
                &json!({"rescale": "l2"}),
                &[json!({"weight": 1.0})],
                None,
                true,
            )
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("l2") && msg.contains("inverse_density"), "{msg}");
        assert_eq!(Rescale::Flag(true).rule(), RescaleRule::L1);
        assert_eq!(Rescale::Flag(false).rule(), RescaleRule::None);
    }

    #[test]
    fn out_of_range_parameters_are_refused_with_what_to_do() {
        let h = harness();
        let refuse = |m: &str, g: Value, mp: Vec<Value>, has_base: bool, words: &[&str]| {
            let err = h.validate(m, &g, &mp, None, has_base).unwrap_err().to_string();
            for w in words {
                assert!(err.contains(w), "{m}: `{err}` should mention `{w}`");
            }
        };
        for m in METHODS {
            refuse(m, json!({}), vec![model_params_ok(m)], false, &["base model", m]);
            refuse(
                m,
                json!({}),
                vec![json!({"density": 0.5})]
                    .into_iter()
                    .map(|mut p| {
                        if m == "task_arithmetic" {
                            p = json!({});
                        }
                        if m.starts_with("della") {
                            p["epsilon"] = json!(0.1);
                        }
                        p
                    })
                    .collect(),
                true,
                &["weight", "model #0"],
            );
        }
        for m in [
            "ties",
            "dare_linear",
            "dare_ties",
            "breadcrumbs",
            "breadcrumbs_ties",
        ] {
            for d in [0.0, -0.1, 1.5] {
                refuse(
                    m,
                    json!({}),
                    vec![json!({"weight": 1.0, "density": d})],
                    true,
                    &["density", "(0, 1]"],
                );
            }
        }
        refuse(
            "breadcrumbs",
            json!({}),
            vec![json!({"weight": 1.0, "gamma": -0.1})],
            true,
            &["gamma", "[0, 1]"],
        );
        refuse(
            "breadcrumbs_ties",
            json!({}),
            vec![json!({"weight": 1.0, "gamma": 1.5})],
            true,
            &["gamma"],
        );
        for (d, e) in [(1.0, 0.15), (0.95, 0.1), (0.1, 0.1), (0.5, -0.1)] {
            refuse(
                "della",
                json!({}),
                vec![json!({"weight": 1.0, "density": d, "epsilon": e})],
                true,
                &["density", "epsilon"],
            );
        }
        // A listed base needs no weight, but somebody else must bring a task vector.
        h.validate(
            "ties",
            &json!({}),
            &[json!({}), json!({"weight": 1.0, "density": 0.5})],
            Some(0),
            true,
        )
        .unwrap();
        let err = h
            .validate("ties", &json!({}), &[json!({})], Some(0), true)
            .unwrap_err();
        assert!(err.to_string().contains("besides the base"), "{err}");
    }

    // ---- (5) invariants -----------------------------------------------------------------------

    fn tensor(v: &[f32]) -> CTensor {
        CTensor::new(v, &Device::Cpu).unwrap()
    }

    fn merge1(method: &str, params: Value, models: &[(CTensor, Value)], base: &CTensor) -> Vec<f32> {
        let inputs: Vec<ModelInput> = models
            .iter()
            .map(|(t, p)| ModelInput::new(t.clone(), p.clone()))
            .collect();
        values(
            &harness()
                .merge(method, &params, &inputs, Some(base), None)
                .unwrap_or_else(|e| panic!("{method}: {e}")),
        )
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn one_model_with_weight_1_gives_base_plus_its_delta() {
        let z = zoo();
        let name = "model.layers.1.self_attn.q_proj.weight";
        let (base, ft) = (z.base.load(name).unwrap(), z.fts[2].load(name).unwrap());
        let want = values(&(&base + (&ft - &base).unwrap()).unwrap());
        assert_eq!(
            bits(&want),
            bits(&values(&ft)),
            "fixture: base + δ is the model itself"
        );
        for (m, p) in [
            ("task_arithmetic", json!({"weight": 1.0})),
            ("ties", json!({"weight": 1.0, "density": 1.0})),
            ("dare_linear", json!({"weight": 1.0, "density": 1.0})),
            ("dare_ties", json!({"weight": 1.0, "density": 1.0})),
            ("breadcrumbs", json!({"weight": 1.0, "density": 1.0})),
            (
                "breadcrumbs_ties",
                json!({"weight": 1.0, "density": 1.0, "gamma": 0.2}),
            ),
        ] {
            let got = merge1(m, json!({"lambda": 1.0}), &[(ft.clone(), p)], &base);
            assert_eq!(bits(&got), bits(&want), "{m}");
        }
    }

    #[test]
    fn task_arithmetic_with_lambda_0_returns_the_base() {
        let z = zoo();
        let name = "model.embed_tokens.weight";
        let base = z.base.load(name).unwrap();
        let models: Vec<(CTensor, Value)> = z
            .fts
            .iter()
            .zip([0.5, -0.3, 2.0])
            .map(|(m, w)| (m.load(name).unwrap(), json!({"weight": w})))
            .collect();
        for normalize in [false, true] {
            let got = merge1(
                "task_arithmetic",
                json!({"lambda": 0.0, "normalize": normalize}),
                &models,
                &base,
            );
            assert_eq!(bits(&got), bits(&values(&base)), "normalize {normalize}");
        }
    }

    /// Density 1 trims nothing: every consensus member then reduces to the consensus-only merge.
    #[test]
    fn density_1_trims_nothing_so_ties_is_the_consensus_only_merge() {
        let z = zoo();
        let name = "model.layers.0.mlp.down_proj.weight";
        let base = z.base.load(name).unwrap();
        let models = |extra: Value| -> Vec<(CTensor, Value)> {
            z.fts
                .iter()
                .zip([1.0, 0.5, -0.7])
                .map(|(m, w)| {
                    let mut p = extra.clone();
                    p["weight"] = json!(w);
                    (m.load(name).unwrap(), p)
                })
                .collect()
        };
        let ties = merge1(
            "ties",
            json!({"normalize": true}),
            &models(json!({"density": 1.0})),
            &base,
        );
        for (m, extra) in [
            ("dare_ties", json!({"density": 1.0})),
            ("breadcrumbs_ties", json!({"density": 1.0, "gamma": 0.3})),
        ] {
            assert_eq!(
                bits(&merge1(m, json!({"normalize": true}), &models(extra), &base)),
                bits(&ties),
                "{m}"
            );
        }
        // And the consensus-only merge by hand, in f32 as documented.
        let b = values(&base);
        let a: Vec<Vec<f32>> = z
            .fts
            .iter()
            .zip([1.0f32, 0.5, -0.7])
            .map(|(m, w)| {
                values(&m.load(name).unwrap())
                    .iter()
                    .zip(&b)
                    .map(|(x, b)| (x - b) * w)
                    .collect()
            })
            .collect();
        for j in 0..b.len() {
            let s = a[0][j] + a[1][j] + a[2][j];
            let maj = if s >= 0.0 { 1.0 } else { -1.0 };
            let agree: Vec<bool> = a.iter().map(|a| a[j] != 0.0 && a[j].signum() == maj).collect();
            let mixed = a
                .iter()
                .zip(&agree)
                .fold(0f32, |acc, (a, &g)| if g { acc + a[j] } else { acc + 0.0 });
            let div = [1.0f32, 0.5, -0.7]
                .iter()
                .zip(&agree)
                .fold(0f32, |acc, (w, &g)| if g { acc + w } else { acc });
            let div = if div == 0.0 { 1.0 } else { div };
            assert_eq!(ties[j].to_bits(), (b[j] + mixed / div).to_bits(), "element {j}");
        }
    }

    #[test]
    fn ties_majority_sign_counts_zero_sum_as_positive() {
        let base = tensor(&[1.0, 1.0, 1.0]);
        let up = (tensor(&[2.0, 1.5, 0.0]), json!({"weight": 1.0}));
        let down = (tensor(&[0.0, 0.5, 2.0]), json!({"weight": 1.0}));
        // δ = [+1, +.5, −1] and [−1, −.5, +1]: every sum is 0 → the positive side wins.
        assert_eq!(
            merge1("ties", json!({}), &[up.clone(), down.clone()], &base),
            vec![2.0, 1.5, 2.0]
        );
        // A negative weight flips a task vector's vote: the two now agree everywhere.
        let flipped = (tensor(&[0.0, 0.5, 2.0]), json!({"weight": -1.0}));
        assert_eq!(
            merge1("ties", json!({"normalize": false}), &[up, flipped], &base),
            vec![3.0, 2.0, -1.0]
        );
    }

    #[test]
    fn breadcrumbs_with_no_outliers_to_drop_keeps_the_top_k_instead_of_nothing() {
        // 10 elements, gamma 0.01 → n_top = 0: mergekit's `[n_bot:-0]` slice keeps nothing.
        let base = tensor(&[0.0; 10]);
        let ft = tensor(&[1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0]);
        let got = merge1(
            "breadcrumbs",
            json!({}),
            &[(ft.clone(), json!({"weight": 1.0, "density": 0.5}))],
            &base,
        );
        assert_eq!(got, vec![0.0, 0.0, 0.0, 0.0, 0.0, -6.0, 7.0, -8.0, 9.0, -10.0]);
        // gamma 0.2 drops the two largest and keeps the next five.
        let got = merge1(
            "breadcrumbs",
            json!({}),
            &[(ft.clone(), json!({"weight": 1.0, "density": 0.5, "gamma": 0.2}))],
            &base,
        );
        assert_eq!(got, vec![0.0, 0.0, 0.0, -4.0, 5.0, -6.0, 7.0, -8.0, 0.0, 0.0]);
        // gamma 0 with the _ties variant is exactly ties.
        let z = zoo();
        let name = "model.layers.1.mlp.gate_proj.weight";
        let b = z.base.load(name).unwrap();
        let ms: Vec<(CTensor, Value)> = z
            .fts
            .iter()
            .map(|m| {
                (
                    m.load(name).unwrap(),
                    json!({"weight": 1.0, "density": 0.3, "gamma": 0.0}),
                )
            })
            .collect();
        let ties_ms: Vec<(CTensor, Value)> = ms
            .iter()
            .map(|(t, _)| (t.clone(), json!({"weight": 1.0, "density": 0.3})))
            .collect();
        assert_eq!(
            bits(&merge1("breadcrumbs_ties", json!({"normalize": true}), &ms, &b)),
            bits(&merge1("ties", json!({}), &ties_ms, &b))
        );
    }

    #[test]
    fn della_on_rows_of_one_element_keeps_with_probability_density_not_nan() {
        let n = 50_000;
        let base = CTensor::zeros((n, 1), CDType::F32, &Device::Cpu).unwrap();
        let ft = CTensor::randn(0f32, 1.0, (n, 1), &Device::Cpu).unwrap();
        let got = merge1(
            "della_linear",
            json!({"rescale": "none"}),
            &[(ft, json!({"weight": 1.0, "density": 0.3, "epsilon": 0.2}))],
            &base,
        );
        assert!(got.iter().all(|v| v.is_finite()));
        close(
            "kept fraction",
            got.iter().filter(|v| **v != 0.0).count() as f64 / n as f64,
            0.3,
            0.01,
        );
    }

    #[test]
    fn della_keep_probability_rises_linearly_with_the_rank_in_each_row() {
        // 2000 rows of 5: ranks 1..5 → p = 0.2, 0.35, 0.5, 0.65, 0.8 for density 0.5, ε 0.3.
        let rows = 20_000;
        let row: Vec<f32> = vec![-0.1, 0.5, -0.2, 0.4, 0.3];
        let data: Vec<f32> = (0..rows).flat_map(|_| row.clone()).collect();
        let ft = CTensor::from_vec(data, (rows, 5), &Device::Cpu).unwrap();
        let base = ft.zeros_like().unwrap();
        let got = merge1(
            "della_linear",
            json!({"rescale": "inverse_density"}),
            &[(ft, json!({"weight": 1.0, "density": 0.5, "epsilon": 0.3}))],
            &base,
        );
        let rank_of = [1usize, 5, 2, 4, 3];
        for (col, &rank) in rank_of.iter().enumerate() {
            let p = 0.2 + 0.15 * (rank - 1) as f64;
            let kept: Vec<f32> = (0..rows)
                .map(|r| got[r * 5 + col])
                .filter(|v| *v != 0.0)
                .collect();
            close(
                &format!("column {col} (rank {rank})"),
                kept.len() as f64 / rows as f64,
                p,
                0.015,
            );
            // inverse_density divides each kept element by its own probability.
            let want = row[col] / (p as f32);
            assert!(
                kept.iter().all(|v| (v - want).abs() <= 1e-6 * want.abs()),
                "column {col}: {} vs {want}",
                kept[0]
            );
        }
    }

    #[test]
    fn a_base_listed_among_the_models_brings_no_task_vector() {
        let z = zoo();
        let name = "model.norm.weight";
        let (base, ft) = (z.base.load(name).unwrap(), z.fts[0].load(name).unwrap());
        let h = harness();
        let listed = h
            .merge(
                "ties",
                &json!({}),
                &[
                    ModelInput::new(base.clone(), json!({})),
                    ModelInput::new(ft.clone(), json!({"weight": 0.8, "density": 0.5})),
                ],
                Some(&base),
                Some(0),
            )
            .unwrap();
        let alone = h
            .merge(
                "ties",
                &json!({}),
                &[ModelInput::new(ft, json!({"weight": 0.8, "density": 0.5}))],
                Some(&base),
                None,
            )
            .unwrap();
        assert_eq!(bits(&values(&listed)), bits(&values(&alone)));
    }

    #[test]
    fn bf16_inputs_compute_and_return_bf16_with_models_cast_to_the_base_dtype() {
        let base = tensor(&[1.0, 2.0, 3.0]).to_dtype(CDType::BF16).unwrap();
        let ft = tensor(&[1.5, 2.0, 2.0]);
        let out = harness()
            .merge(
                "task_arithmetic",
                &json!({"lambda": 0.3}),
                &[ModelInput::new(ft, json!({"weight": 1.0}))],
                Some(&base),
                None,
            )
            .unwrap();
        assert_eq!(out.dtype(), CDType::BF16);
        // δ = [0.5, 0, −1]; λδ rounds to bf16 (0.15 → 0.150390625), then base + λδ rounds again.
        assert_eq!(values(&out), vec![1.1484375, 2.0, 2.703125]);
    }
}

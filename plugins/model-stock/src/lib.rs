//! `model_stock`: interpolate between the average of the fine-tunes and the base, by how well the
//! fine-tunes agree.
//!
//! Jang et al., "Model Stock: All we need is just a few fine-tuned models" (ECCV 2024). With the
//! offsets `oᵢ = θᵢ − θ₀` of the N models besides the base, the mean pairwise cosine
//! `c = mean_{i<j} clamp(oᵢ·oⱼ / max(‖oᵢ‖‖oⱼ‖, 1e-6), −1, 1)` gives
//! `t = N·c / (1 + (N−1)·c)` (t = 0, i.e. the base, where `|1 + (N−1)·c| < 1e-6`) and
//! `out = t · mean(θᵢ) + (1 − t) · θ₀`. t is not clamped: disagreeing fine-tunes give t < 0.
//! One t per tensor, or one per row with `filter_wise` (rows along the last dimension; a 1-D
//! tensor is one row).
//!
//! Matches mergekit 0.1.5 within a few f32 ulp: the mean and the final interpolation follow its
//! f32 op order (`(θ₁ + θ₂ + …) / N`, then `f32(t)·avg + f32(1 − t)·θ₀` with two roundings), but
//! the dot products and norms behind t are accumulated in f64 (whole tensor) or by the backend's
//! row sums (`filter_wise`) instead of torch's f32 reductions.
//!
//! Difference from mergekit: bf16/f16 inputs are computed in f32 and rounded once to the base's
//! dtype, where mergekit rounds every intermediate (t included) to the input dtype.

use mglue_plugin_api::prelude::*;
use serde::Deserialize;

/// Lower clamp of `‖oᵢ‖‖oⱼ‖`.
const NORM_PRODUCT_EPS: f64 = 1e-6;
/// `|1 + (N−1)c|` below which t is 0.
const SINGULAR_EPS: f64 = 1e-6;

/// Global parameters of `model_stock`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Compute one interpolation ratio t per row (per output filter, along the last dimension)
    /// instead of one per tensor; a 1-D tensor is one row.
    #[serde(default)]
    pub filter_wise: bool,
}

/// Per-model parameters of `model_stock` (none: every model besides the base counts equally).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelParams {}

/// The Model Stock merge method.
pub struct ModelStock;

/// Number of models besides the base, or an error saying what is missing.
fn count_others(num_models: usize, base_index: Option<usize>, has_base: bool) -> Result<usize> {
    if !has_base {
        return Err(Error::params(
            "`model_stock` needs a base model: set `base_model:` in the config or --base on the command line",
        ));
    }
    let others = num_models - usize::from(base_index.is_some());
    if others < 2 {
        return Err(Error::params(format!(
            "model_stock needs at least two models besides the base (got {others}): \
             list two or more fine-tunes of the base under `models:`"
        )));
    }
    Ok(others)
}

/// One pair's cosine, as the paper's estimate of the angle between two fine-tunes.
fn pair_cosine(dot: f64, norm_i: f64, norm_j: f64) -> f64 {
    (dot / (norm_i * norm_j).max(NORM_PRODUCT_EPS)).clamp(-1.0, 1.0)
}

/// `t = N·c / (1 + (N−1)·c)`, 0 at the singularity.
fn ratio(n: usize, cos: f64) -> f64 {
    let n = n as f64;
    let denominator = 1.0 + (n - 1.0) * cos;
    if denominator.abs() < SINGULAR_EPS {
        0.0
    } else {
        n * cos / denominator
    }
}

/// `(t, 1 − t)` as the work dtype rounds them: t first, then the complement in that dtype.
fn coefficients(t: f64, work: DType) -> (f64, f64) {
    if work == DType::F64 {
        (t, 1.0 - t)
    } else {
        let t = t as f32;
        (t as f64, (1.0 - t) as f64)
    }
}

/// `(θ₁ + θ₂ + …) / N` in the work dtype, left to right.
fn mean<'b>(backend: Backend<'b>, ws: &[Tensor<'b>], work: DType) -> Result<Tensor<'b>> {
    let n = ws.len() as f64;
    if work == DType::F64 {
        // weighted_sum accumulates in f32; keep f64 inputs in f64.
        let mut acc = ws[0].dup()?;
        for w in &ws[1..] {
            acc = acc.add(w)?;
        }
        return acc.div(&acc.full_like(n)?);
    }
    let refs: Vec<&Tensor<'b>> = ws.iter().collect();
    backend.weighted_sum(&refs, &vec![1.0; ws.len()], Some(n), work)
}

/// Mean pairwise cosine per row, from per-pair dot products and per-model squared norms.
fn mean_cosines(dots: &[Vec<f64>], sum_sqs: &[Vec<f64>], rows: usize) -> Vec<f64> {
    let n = sum_sqs.len();
    (0..rows)
        .map(|r| {
            let mut total = 0.0;
            let mut pair = 0;
            for i in 0..n {
                for j in i + 1..n {
                    total += pair_cosine(dots[pair][r], sum_sqs[i][r].sqrt(), sum_sqs[j][r].sqrt());
                    pair += 1;
                }
            }
            total / pair as f64
        })
        .collect()
}

fn as_f64(v: Vec<f32>) -> Vec<f64> {
    v.into_iter().map(f64::from).collect()
}

impl MergeMethod for ModelStock {
    const NAME: &'static str = "model_stock";
    const DESCRIPTION: &'static str =
        "Model Stock: t·mean(θᵢ) + (1−t)·θ₀, t from the mean pairwise cosine of the task vectors";
    type Params = Params;
    type ModelParams = ModelParams;

    fn validate(_params: &Params, models: &[ModelParams], cx: &ValidateContext<'_>) -> Result<()> {
        count_others(models.len(), cx.base_index, cx.has_base).map(|_| ())
    }

    fn merge<'b>(
        params: &Params,
        models: Vec<MergeInput<'b, ModelParams>>,
        cx: &MergeContext<'b>,
    ) -> Result<Tensor<'b>> {
        let base = cx.require_base(Self::NAME)?;
        let n = count_others(models.len(), cx.base_index, true)?;
        let out_dtype = base.dtype();
        let work = if out_dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let shape = base.shape();
        for m in &models {
            if m.tensor.shape() != shape {
                return Err(Error::params(format!(
                    "model_stock: `{}` has shape {:?} in a model but {:?} in the base; \
                     the models must have the base's architecture and vocabulary",
                    cx.tensor_name,
                    m.tensor.shape(),
                    shape
                )));
            }
        }
        let base_w = base.to_dtype(work)?;
        let ws: Vec<Tensor<'b>> = models
            .iter()
            .filter(|m| !m.is_base)
            .map(|m| m.tensor.to_dtype(work))
            .collect::<Result<_>>()?;
        debug_assert_eq!(ws.len(), n);
        let numel = base_w.elem_count();
        if numel == 0 {
            return base.dup();
        }

        if !params.filter_wise {
            let offsets: Vec<Tensor<'b>> = ws.iter().map(|w| w.sub(&base_w)).collect::<Result<_>>()?;
            let sum_sqs: Vec<Vec<f64>> = offsets
                .iter()
                .map(|o| o.sum_sq().map(|s| vec![s]))
                .collect::<Result<_>>()?;
            let mut dots = Vec::new();
            for i in 0..n {
                for j in i + 1..n {
                    dots.push(vec![offsets[i].dot(&offsets[j])?]);
                }
            }
            drop(offsets);
            let t = ratio(n, mean_cosines(&dots, &sum_sqs, 1)[0]);
            mglue_plugin_api::tracing::trace!(tensor = cx.tensor_name, t, "model_stock");
            let (t, rest) = coefficients(t, work);
            let avg = mean(cx.backend, &ws, work)?;
            return avg.scale(t)?.add(&base_w.scale(rest)?)?.to_dtype(out_dtype);
        }

        // One row per vector along the last dimension.
        let cols = shape.last().copied().unwrap_or(1);
        let rows = numel / cols;
        let flat = [rows, cols];
        let base_2d = base_w.reshape(&flat)?;
        let ws_2d: Vec<Tensor<'b>> = ws.iter().map(|w| w.reshape(&flat)).collect::<Result<_>>()?;
        let offsets: Vec<Tensor<'b>> = ws_2d.iter().map(|w| w.sub(&base_2d)).collect::<Result<_>>()?;
        let sum_sqs: Vec<Vec<f64>> = offsets
            .iter()
            .map(|o| o.sum_sq_last()?.to_vec_f32().map(as_f64))
            .collect::<Result<_>>()?;
        let mut dots = Vec::new();
        for i in 0..n {
            for j in i + 1..n {
                dots.push(as_f64(offsets[i].mul(&offsets[j])?.sum_last()?.to_vec_f32()?));
            }
        }
        drop(offsets);
        let (t, rest): (Vec<f32>, Vec<f32>) = mean_cosines(&dots, &sum_sqs, rows)
            .into_iter()
            .map(|c| {
                let (t, rest) = coefficients(ratio(n, c), work);
                (t as f32, rest as f32)
            })
            .unzip();
        mglue_plugin_api::tracing::trace!(tensor = cx.tensor_name, rows, "model_stock filter_wise");
        let t = cx.backend.from_f32(&t, &[rows, 1], work)?;
        let rest = cx.backend.from_f32(&rest, &[rows, 1], work)?;
        let avg = mean(cx.backend, &ws_2d, work)?;
        avg.mul(&t)?
            .add(&base_2d.mul(&rest)?)?
            .reshape(&shape)?
            .to_dtype(out_dtype)
    }
}

mglue_plugin_api::export_plugin!(merge: [ModelStock]);

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

    fn ct(v: &[f32], shape: &[usize]) -> CTensor {
        CTensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn inputs(ts: &[&CTensor]) -> Vec<ModelInput> {
        ts.iter()
            .map(|t| ModelInput::new((*t).clone(), json!({})))
            .collect()
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

    #[test]
    fn model_stock_matches_mergekit_on_every_fixture_tensor() {
        let zoo = fixtures().join("zoo");
        let open = |m: &str| Checkpoint::open(&zoo.join(m)).expect("fixture model");
        let base = open("base");
        let models: Vec<Checkpoint> = ["ft1", "ft2", "ft3"].iter().map(|m| open(m)).collect();
        let expected = Checkpoint::open(&fixtures().join("expected/model_stock")).expect("fixture output");
        let h = harness();
        let names = expected.tensor_names();
        assert_eq!(names.len(), 21);
        let (mut worst, mut listed_worst) = (0f32, 0f32);
        for name in names {
            let b = base.load(&name).expect("tensor");
            let ts: Vec<CTensor> = models.iter().map(|m| m.load(&name).expect("tensor")).collect();
            let want = expected.load(&name).unwrap();
            // As in the fixture's config: the base only as `base_model:`.
            let out = h
                .merge_named(
                    "model_stock",
                    &name,
                    &json!({}),
                    &inputs(&[&ts[0], &ts[1], &ts[2]]),
                    Some(&b),
                    None,
                    42,
                )
                .expect("merge");
            assert_eq!((out.dims(), out.dtype()), (want.dims(), want.dtype()), "{name}");
            worst = worst.max(assert_close(&values(&out), &values(&want), &name));
            // The base listed among the models too: it is not counted as a fine-tune.
            let listed = h
                .merge_named(
                    "model_stock",
                    &name,
                    &json!({}),
                    &inputs(&[&ts[0], &b, &ts[1], &ts[2]]),
                    Some(&b),
                    Some(1),
                    42,
                )
                .expect("merge");
            listed_worst = listed_worst.max(assert_close(&values(&listed), &values(&want), &name));
        }
        eprintln!("model_stock: max |diff| vs mergekit = {worst:e} (base listed too: {listed_worst:e})");
    }

    /// The dyadic 3×4 inputs of `tests/model_stock_reference.py` (exact in f32).
    fn reference_inputs() -> (CTensor, Vec<CTensor>) {
        let grid = |f: &dyn Fn(i64, i64) -> f32| -> Vec<f32> {
            (0..3)
                .flat_map(|i| (0..4).map(move |j| (i, j)))
                .map(|(i, j)| f(i, j))
                .collect()
        };
        let base = grid(&|i, j| ((i * 3 + j * 5 + 1) % 7 - 3) as f32 / 16.0);
        let models = (1..=3)
            .map(|k: i64| {
                let delta = grid(&|i, j| ((k * i * 3 + j * (k + 2) + k) % 9 - 4) as f32 / 32.0);
                let v: Vec<f32> = base.iter().zip(&delta).map(|(b, d)| b + d).collect();
                ct(&v, &[3, 4])
            })
            .collect();
        (ct(&base, &[3, 4]), models)
    }

    #[test]
    fn model_stock_matches_independent_float64_reference() {
        // Printed by `python3 plugins/model-stock/tests/model_stock_reference.py` (numpy, float64);
        // whole tensor: t = -0.2093; filter_wise: t = [0.3616, -0.0244, -3.0] per row.
        #[rustfmt::skip]
        let cases: [(bool, [f64; 12]); 2] = [
            (false, [-1.119196804e-01, 1.744196804e-01, 6.250000000e-02, -4.941968040e-02, 5.595984020e-02, -7.558031960e-02, -1.875000000e-01, 1.380803196e-01, -1.940401598e-01, 1.315401598e-01, 0.000000000e+00, -1.315401598e-01]),
            (true, [-1.476028141e-01, 2.101028141e-01, 6.250000000e-02, -8.510281411e-02, 6.173677802e-02, -6.402644395e-02, -1.875000000e-01, 1.265264440e-01, -2.812500000e-01, 2.187500000e-01, 0.000000000e+00, -2.187500000e-01]),
        ];
        let h = harness();
        let (base, ms) = reference_inputs();
        let mut worst = 0f32;
        for (filter_wise, want) in cases {
            let params = json!({ "filter_wise": filter_wise });
            let out = h
                .merge(
                    "model_stock",
                    &params,
                    &inputs(&[&ms[0], &ms[1], &ms[2]]),
                    Some(&base),
                    None,
                )
                .unwrap();
            assert_eq!(out.dims(), &[3, 4]);
            let want: Vec<f32> = want.iter().map(|&w| w as f32).collect();
            worst = worst.max(assert_close(
                &values(&out),
                &want,
                &format!("filter_wise {filter_wise}"),
            ));
        }
        eprintln!("model_stock: max |diff| vs float64 reference = {worst:e}");
    }

    #[test]
    fn model_stock_of_identical_fine_tunes_returns_the_fine_tune() {
        let h = harness();
        // Offsets of norm exactly 1: cos = 1, t = 1, and the result is bit-exact.
        let base = ct(&[0.0, 1.0, -2.0, 0.5, 0.25, 0.0, 1.0, -1.0], &[2, 4]);
        let ft: Vec<f32> = values(&base).iter().map(|b| b + 0.5).collect();
        let ft = ct(&ft, &[2, 4]);
        for filter_wise in [false, true] {
            let params = json!({ "filter_wise": filter_wise });
            let out = h
                .merge(
                    "model_stock",
                    &params,
                    &inputs(&[&ft, &ft, &ft]),
                    Some(&base),
                    None,
                )
                .unwrap();
            assert_eq!(
                bits(&values(&out)),
                bits(&values(&ft)),
                "filter_wise {filter_wise}"
            );
        }
        // Generic identical fine-tunes: cos = 1 up to rounding, so within a few ulp.
        let (base, ms) = reference_inputs();
        for filter_wise in [false, true] {
            let params = json!({ "filter_wise": filter_wise });
            let out = h
                .merge(
                    "model_stock",
                    &params,
                    &inputs(&[&ms[1], &ms[1]]),
                    Some(&base),
                    None,
                )
                .unwrap();
            assert_close(
                &values(&out),
                &values(&ms[1]),
                &format!("identical, filter_wise {filter_wise}"),
            );
        }
    }

    #[test]
    fn model_stock_keeps_the_base_where_two_task_vectors_are_opposite() {
        // cos = −1 with N = 2: 1 + (N−1)·cos = 0, the singular case, t = 0.
        let h = harness();
        let (base, ms) = reference_inputs();
        let b = values(&base);
        let opposite: Vec<f32> = b.iter().zip(values(&ms[0])).map(|(b, m)| b - (m - b)).collect();
        let opposite = ct(&opposite, &[3, 4]);
        for filter_wise in [false, true] {
            let params = json!({ "filter_wise": filter_wise });
            let out = h
                .merge(
                    "model_stock",
                    &params,
                    &inputs(&[&ms[0], &opposite]),
                    Some(&base),
                    None,
                )
                .unwrap();
            assert_eq!(bits(&values(&out)), bits(&b), "filter_wise {filter_wise}");
        }
    }

    #[test]
    fn model_stock_filter_wise_keeps_shape_and_dtype_of_one_dimensional_and_bf16_tensors() {
        let h = harness();
        let (base, ms) = reference_inputs();
        let flat = |t: &CTensor| t.flatten_all().unwrap();
        let params = json!({ "filter_wise": true });
        // A 1-D tensor is one row: the same t as the whole-tensor mode.
        let one_row = h
            .merge(
                "model_stock",
                &params,
                &inputs(&[&flat(&ms[0]), &flat(&ms[1]), &flat(&ms[2])]),
                Some(&flat(&base)),
                None,
            )
            .unwrap();
        let whole = h
            .merge(
                "model_stock",
                &json!({}),
                &inputs(&[&ms[0], &ms[1], &ms[2]]),
                Some(&base),
                None,
            )
            .unwrap();
        assert_eq!(one_row.dims(), &[12]);
        assert_close(
            &values(&one_row),
            &values(&whole),
            "1-D filter_wise vs whole tensor",
        );
        let bf = |t: &CTensor| t.to_dtype(candle_core::DType::BF16).unwrap();
        let out = h
            .merge(
                "model_stock",
                &params,
                &inputs(&[&bf(&ms[0]), &bf(&ms[1]), &bf(&ms[2])]),
                Some(&bf(&base)),
                None,
            )
            .unwrap();
        assert_eq!(
            (out.dims(), out.dtype()),
            (&[3usize, 4][..], candle_core::DType::BF16)
        );
    }

    #[test]
    fn model_stock_needs_a_base_and_two_fine_tunes() {
        let h = harness();
        let e = json!({});
        let err = h
            .validate("model_stock", &e, &[e.clone(), e.clone()], None, false)
            .unwrap_err();
        assert!(err.to_string().contains("needs a base model"), "{err}");
        let err = h
            .validate("model_stock", &e, &[e.clone(), e.clone()], Some(0), true)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("at least two models besides the base (got 1)"),
            "{err}"
        );
        h.validate("model_stock", &e, &[e.clone(), e.clone()], None, true)
            .unwrap();
        h.validate(
            "model_stock",
            &e,
            &[e.clone(), e.clone(), e.clone()],
            Some(2),
            true,
        )
        .unwrap();
    }

    #[test]
    fn model_stock_rejects_unknown_parameters_and_documents_its_schema() {
        let h = harness();
        let e = json!({});
        let err = h
            .validate(
                "model_stock",
                &json!({"filterwise": true}),
                &[e.clone(), e.clone()],
                None,
                true,
            )
            .unwrap_err();
        assert!(err.to_string().contains("filterwise"), "{err}");
        let err = h
            .validate(
                "model_stock",
                &e,
                &[json!({"weight": 1.0}), e.clone()],
                None,
                true,
            )
            .unwrap_err();
        assert!(err.to_string().contains("weight"), "{err}");
        let info = h.info("model_stock").expect("registered");
        let fw = &info.params_schema["properties"]["filter_wise"];
        assert_eq!(fw["default"], json!(false));
        assert!(fw["description"].as_str().unwrap().contains("per row"), "{fw}");
    }
}

//! Per-item results, per-task metrics (lm-eval's definitions) and the JSON report.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::score::{Loglik, TokenScore};
use super::task::{Metric, TaskFormat};

/// A metric's mean over the items and lm-eval's standard error of that mean (sample standard
/// deviation with n - 1, over √n; 0 for fewer than two items).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricValue {
    /// The mean.
    pub value: f64,
    /// Its standard error.
    pub stderr: f64,
}

/// `(mean, stderr)` of per-item values, as lm-eval's `mean` and `mean_stderr`.
pub fn mean_stderr(values: &[f64]) -> MetricValue {
    let n = values.len() as f64;
    if values.is_empty() {
        return MetricValue {
            value: f64::NAN,
            stderr: f64::NAN,
        };
    }
    let mean = values.iter().sum::<f64>() / n;
    let stderr = if values.len() < 2 {
        0.0
    } else {
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (var / n).sqrt()
    };
    MetricValue { value: mean, stderr }
}

/// One multiple-choice (or partial-scoring) item, with the fields of lm-eval's logged samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceResult {
    /// The item id.
    pub id: String,
    /// Index of the right choice.
    pub gold: usize,
    /// Summed continuation log-probability per choice.
    pub loglik: Vec<f64>,
    /// Per choice: every continuation token is the argmax.
    pub is_greedy: Vec<bool>,
    /// argmax(loglik), first index on ties.
    pub pred_acc: usize,
    /// argmax(loglik / choice_len_chars), first index on ties.
    pub pred_acc_norm: usize,
    /// 1 if `pred_acc == gold`.
    pub acc: f64,
    /// 1 if `pred_acc_norm == gold`.
    pub acc_norm: f64,
    /// The acc_norm normaliser of each choice.
    pub choice_len_chars: Vec<usize>,
    /// Context tokens per choice.
    pub n_ctx_tokens: Vec<usize>,
    /// Continuation token ids per choice.
    pub cont_token_ids: Vec<Vec<u32>>,
}

impl ChoiceResult {
    /// Predictions and per-item metrics from the scores.
    pub fn new(
        id: String,
        gold: usize,
        scores: &[Loglik],
        choice_len_chars: Vec<usize>,
        n_ctx_tokens: Vec<usize>,
        cont_token_ids: Vec<Vec<u32>>,
    ) -> ChoiceResult {
        let loglik: Vec<f64> = scores.iter().map(|s| s.loglik).collect();
        let norm: Vec<f64> = loglik
            .iter()
            .zip(&choice_len_chars)
            .map(|(l, &n)| l / n as f64)
            .collect();
        let (pred_acc, pred_acc_norm) = (argmax(&loglik), argmax(&norm));
        ChoiceResult {
            id,
            gold,
            is_greedy: scores.iter().map(|s| s.is_greedy).collect(),
            pred_acc,
            pred_acc_norm,
            acc: f64::from(u8::from(pred_acc == gold)),
            acc_norm: f64::from(u8::from(pred_acc_norm == gold)),
            loglik,
            choice_len_chars,
            n_ctx_tokens,
            cont_token_ids,
        }
    }
}

/// One log-likelihood item: the continuation's score, token by token summed and counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoglikResult {
    /// The item id.
    pub id: String,
    /// Summed log-probability of the continuation tokens.
    pub loglik: f64,
    /// Continuation tokens scored.
    pub n_tokens: usize,
    /// How many of them are the argmax of their logits.
    pub n_greedy: usize,
    /// Every continuation token is the argmax (`n_greedy == n_tokens`; lm-eval's `is_greedy`).
    pub is_greedy: bool,
    /// Context tokens.
    pub n_ctx_tokens: usize,
    /// Continuation token ids.
    pub cont_token_ids: Vec<u32>,
}

impl LoglikResult {
    /// The result of one request from its per-token scores.
    pub fn new(
        id: String,
        tokens: &[TokenScore],
        n_ctx_tokens: usize,
        cont_token_ids: Vec<u32>,
    ) -> LoglikResult {
        let Loglik { loglik, is_greedy } = Loglik::of_tokens(tokens);
        LoglikResult {
            id,
            loglik,
            n_tokens: tokens.len(),
            n_greedy: tokens.iter().filter(|t| t.is_argmax).count(),
            is_greedy,
            n_ctx_tokens,
            cont_token_ids,
        }
    }
}

/// One generation item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationResult {
    /// The item id.
    pub id: String,
    /// The reference text.
    pub target: String,
    /// The generated text, cut at the first stop string.
    pub generation: String,
    /// The answer extracted from it (`[invalid]` when the regex does not match).
    pub answer: String,
    /// 1 if the normalised answer equals the normalised target.
    pub exact_match: f64,
    /// Prompt tokens.
    pub n_ctx_tokens: usize,
    /// Tokens generated.
    pub n_gen_tokens: usize,
}

/// One code item: the program generated, and what running it with its tests did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodeResult {
    /// The item id.
    pub id: String,
    /// The generation after post-processing (what the program template calls `completion`).
    pub completion: String,
    /// 1 if the program passed its tests (pass@1 of one greedy sample).
    pub pass_at_1: f64,
    /// How the run ended: `exit 0`, `exit 1: AssertionError`, `timed out`, ...
    pub outcome: String,
    /// Wall time of the run, milliseconds.
    pub run_millis: u64,
    /// Prompt tokens.
    pub n_ctx_tokens: usize,
    /// Tokens generated.
    pub n_gen_tokens: usize,
}

/// The result of one item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ItemResult {
    /// Multiple choice or partial scoring.
    Choice(ChoiceResult),
    /// Code generation, run against its tests.
    Code(CodeResult),
    /// Generation.
    Generation(GenerationResult),
    /// A log-likelihood item. Last: the enum is untagged, and a log-likelihood result has none
    /// of the fields the others require.
    Loglik(LoglikResult),
}

impl ItemResult {
    /// The item id.
    pub fn id(&self) -> &str {
        match self {
            ItemResult::Choice(c) => &c.id,
            ItemResult::Generation(g) => &g.id,
            ItemResult::Code(c) => &c.id,
            ItemResult::Loglik(l) => &l.id,
        }
    }

    /// The log-likelihood result, if it is one.
    pub fn as_loglik(&self) -> Option<&LoglikResult> {
        match self {
            ItemResult::Loglik(l) => Some(l),
            _ => None,
        }
    }

    /// The multiple-choice result, if it is one.
    pub fn as_choice(&self) -> Option<&ChoiceResult> {
        match self {
            ItemResult::Choice(c) => Some(c),
            _ => None,
        }
    }

    /// The generation result, if it is one.
    pub fn as_generation(&self) -> Option<&GenerationResult> {
        match self {
            ItemResult::Generation(g) => Some(g),
            _ => None,
        }
    }

    /// The code result, if it is one.
    pub fn as_code(&self) -> Option<&CodeResult> {
        match self {
            ItemResult::Code(c) => Some(c),
            _ => None,
        }
    }

    fn metric(&self, m: Metric) -> Option<f64> {
        match (self, m) {
            (ItemResult::Choice(c), Metric::Acc) => Some(c.acc),
            (ItemResult::Choice(c), Metric::AccNorm) => Some(c.acc_norm),
            (ItemResult::Generation(g), Metric::ExactMatch) => Some(g.exact_match),
            (ItemResult::Code(c), Metric::PassAt1) => Some(c.pass_at_1),
            (ItemResult::Loglik(l), Metric::Acc) => Some(f64::from(u8::from(l.is_greedy))),
            _ => None,
        }
    }
}

/// The scores of one model on one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// Task name.
    pub task: String,
    /// Its format.
    pub format: TaskFormat,
    /// [`super::Task::fingerprint`] of the task scored.
    pub fingerprint: String,
    /// Few-shot examples per item.
    pub num_fewshot: usize,
    /// Items scored (the first `n_items` of the file).
    pub n_items: usize,
    /// Items in the file.
    pub n_items_total: usize,
    /// The metric a search optimises.
    pub primary_metric: Metric,
    /// Metric name -> mean and standard error over the items.
    pub metrics: BTreeMap<String, MetricValue>,
    /// How many items were scored by this run (the rest came from the score cache).
    pub scored_now: usize,
    /// Wall time of this run, seconds.
    pub seconds: f64,
    /// Per-item results, in file order.
    pub items: Vec<ItemResult>,
}

impl TaskResult {
    /// Aggregates `items` over `metrics`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn aggregate(
        task: &str,
        format: TaskFormat,
        fingerprint: &str,
        num_fewshot: usize,
        n_items_total: usize,
        metrics: &[Metric],
        primary_metric: Metric,
        items: Vec<ItemResult>,
    ) -> TaskResult {
        let metrics = metrics
            .iter()
            .map(|&m| (m.name().to_string(), aggregate_metric(m, &items)))
            .collect();
        TaskResult {
            task: task.to_string(),
            format,
            fingerprint: fingerprint.to_string(),
            num_fewshot,
            n_items: items.len(),
            n_items_total,
            primary_metric,
            metrics,
            scored_now: items.len(),
            seconds: 0.0,
            items,
        }
    }

    /// The mean of metric `name` (`acc`, `acc_norm`, `exact_match`, `pass@1`), if reported.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.get(name).map(|m| m.value)
    }

    /// The value of the primary metric.
    pub fn primary(&self) -> f64 {
        self.metric(self.primary_metric.name()).unwrap_or(f64::NAN)
    }

    /// The primary metric oriented so that larger is better ([`Metric::fitness`]: a perplexity
    /// is negated).
    pub fn fitness(&self) -> f64 {
        self.primary_metric.fitness(self.primary())
    }
}

/// The scores of one model on several tasks: what `mglue eval --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The model's content key, when known.
    pub model: Option<String>,
    /// Per task, in the order run.
    pub tasks: Vec<TaskResult>,
    /// Unweighted mean of the tasks' [`TaskResult::fitness`]: their primary metrics, negated
    /// where lower is better (the fitness of a search).
    pub mean_primary: f64,
}

impl EvalReport {
    /// A report of `tasks`.
    pub fn new(model: Option<String>, tasks: Vec<TaskResult>) -> EvalReport {
        let mean_primary = if tasks.is_empty() {
            f64::NAN
        } else {
            tasks.iter().map(TaskResult::fitness).sum::<f64>() / tasks.len() as f64
        };
        EvalReport {
            model,
            tasks,
            mean_primary,
        }
    }
}

/// A metric over the items: the mean of a per-item value, or for the perplexities and
/// `token_acc` a ratio of sums.
fn aggregate_metric(m: Metric, items: &[ItemResult]) -> MetricValue {
    let logliks: Vec<&LoglikResult> = items.iter().filter_map(ItemResult::as_loglik).collect();
    let per_token = |num: &dyn Fn(&LoglikResult) -> f64| {
        let pairs: Vec<(f64, f64)> = logliks.iter().map(|l| (num(l), l.n_tokens as f64)).collect();
        ratio_stderr(&pairs)
    };
    match m {
        Metric::Perplexity => {
            let ll: Vec<f64> = logliks.iter().map(|l| l.loglik).collect();
            exp_neg(mean_stderr(&ll))
        }
        Metric::TokenPerplexity => exp_neg(per_token(&|l| l.loglik)),
        Metric::TokenAcc => per_token(&|l| l.n_greedy as f64),
        _ => {
            let values: Vec<f64> = items.iter().filter_map(|i| i.metric(m)).collect();
            mean_stderr(&values)
        }
    }
}

/// `Σy / Σx` of `(y, x)` pairs and the standard error of that ratio estimator (the delta
/// method: `sqrt(Σ (y - R x)² / (n (n - 1))) / mean(x)`; 0 for fewer than two pairs).
fn ratio_stderr(pairs: &[(f64, f64)]) -> MetricValue {
    let (sy, sx): (f64, f64) = pairs.iter().fold((0.0, 0.0), |(a, b), &(y, x)| (a + y, b + x));
    if pairs.is_empty() || sx == 0.0 {
        return MetricValue {
            value: f64::NAN,
            stderr: f64::NAN,
        };
    }
    let r = sy / sx;
    let n = pairs.len() as f64;
    let stderr = if pairs.len() < 2 {
        0.0
    } else {
        let ss: f64 = pairs.iter().map(|&(y, x)| (y - r * x).powi(2)).sum();
        (ss / (n * (n - 1.0))).sqrt() / (sx / n)
    };
    MetricValue { value: r, stderr }
}

/// `exp(-m)` with its delta-method standard error `exp(-m) · se(m)`.
fn exp_neg(m: MetricValue) -> MetricValue {
    let value = (-m.value).exp();
    MetricValue {
        value,
        stderr: value * m.stderr,
    }
}

/// Index of the first maximum (numpy's `argmax`).
fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_is_lm_evals_sample_std_over_sqrt_n() {
        // lm-eval: mean_stderr([1, 0, 0, 1, 1]) = sqrt(0.3 / 5).
        let m = mean_stderr(&[1.0, 0.0, 0.0, 1.0, 1.0]);
        assert_eq!(m.value, 0.6);
        assert!((m.stderr - (0.3f64 / 5.0).sqrt()).abs() < 1e-15);
        assert_eq!(mean_stderr(&[1.0]).stderr, 0.0);
    }

    #[test]
    fn acc_norm_divides_by_characters_and_ties_go_to_the_first() {
        let s = |l: f64| Loglik {
            loglik: l,
            is_greedy: false,
        };
        let r = ChoiceResult::new(
            "x".into(),
            1,
            &[s(-10.0), s(-12.0), s(-10.0)],
            vec![5, 12, 5],
            vec![3; 3],
            vec![vec![]; 3],
        );
        assert_eq!((r.pred_acc, r.pred_acc_norm), (0, 1));
        assert_eq!((r.acc, r.acc_norm), (0.0, 1.0));
    }
}

//! Task definitions: a TOML file per task, the JSONL items it reads, and the requests it makes
//! of each item (lm-eval's `doc_to_text` / `doc_to_choice` / `doc_to_target`, few-shot context,
//! `construct_requests`).

use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::value::Serde;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::template::Templates;
use super::EvalError;

/// How a task's items are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskFormat {
    /// One log-likelihood request per choice: `context`, then `target_delimiter + choice`.
    MultipleChoice,
    /// One log-likelihood request per item (lm-eval's `output_type: loglikelihood`, LAMBADA):
    /// `context`, then `target_delimiter + target`; perplexity and greedy-token accuracy of the
    /// continuation.
    Loglikelihood,
    /// WinoGrande's partial scoring: the blank of `text` is filled with each choice; the rest of
    /// the sentence after the blank is the continuation, scored after each filled prefix.
    Partial,
    /// Greedy generation until a stop string; exact match of the extracted answer.
    Generate,
    /// Greedy generation of a program, post-processed, completed with its tests and run in the
    /// [`super::sandbox`]; pass@1 (bigcode-evaluation-harness: MBPP, HumanEval, HumanEvalPack).
    Code,
}

impl fmt::Display for TaskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskFormat::MultipleChoice => "multiple_choice",
            TaskFormat::Loglikelihood => "loglikelihood",
            TaskFormat::Partial => "partial",
            TaskFormat::Generate => "generate",
            TaskFormat::Code => "code",
        })
    }
}

/// A metric a task reports, named as lm-eval names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Accuracy of argmax(loglik); for [`TaskFormat::Loglikelihood`], the fraction of items
    /// whose every continuation token is the greedy argmax (lm-eval's `acc` of LAMBADA).
    Acc,
    /// Accuracy of argmax(loglik / length of the choice in characters).
    AccNorm,
    /// Exact match of the extracted, normalised answer (generation tasks).
    ExactMatch,
    /// Fraction of programs that pass their tests, one greedy sample each (code tasks).
    #[serde(rename = "pass@1")]
    PassAt1,
    /// `exp(-mean over items of the continuation's loglik)`: lm-eval's `perplexity`
    /// aggregation (LAMBADA), a per-item, not per-token, perplexity. Lower is better.
    Perplexity,
    /// `exp(-Σ loglik / Σ continuation tokens)`: the perplexity per continuation token. Lower
    /// is better.
    TokenPerplexity,
    /// `Σ greedy continuation tokens / Σ continuation tokens`: next-token accuracy.
    TokenAcc,
}

impl Metric {
    /// The lm-eval name (`acc`, `acc_norm`, `exact_match`).
    pub fn name(self) -> &'static str {
        match self {
            Metric::Acc => "acc",
            Metric::AccNorm => "acc_norm",
            Metric::ExactMatch => "exact_match",
            Metric::PassAt1 => "pass@1",
            Metric::Perplexity => "perplexity",
            Metric::TokenPerplexity => "token_perplexity",
            Metric::TokenAcc => "token_acc",
        }
    }

    /// Whether a larger value is a better model (false for the perplexities), as lm-eval's
    /// `higher_is_better`.
    pub fn higher_is_better(self) -> bool {
        !matches!(self, Metric::Perplexity | Metric::TokenPerplexity)
    }

    /// `value` oriented so that larger is better: negated for a lower-is-better metric.
    pub fn fitness(self, value: f64) -> f64 {
        if self.higher_is_better() {
            value
        } else {
            -value
        }
    }
}

/// Where the choices of an item come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ChoicesSpec {
    /// The name of a field holding a list of strings (`choices = "choices"`).
    Field(String),
    /// One template per choice, rendered with the item's fields (`choices = ["A", "B", "C", "D"]`
    /// for MMLU; plain text is a template that renders to itself).
    Templates(Vec<String>),
}

/// Few-shot examples: the first `num` rows of a JSONL file (lm-eval's `first_n` sampler),
/// optionally only those that share a field's value with the item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FewshotSpec {
    /// JSONL file of examples, with the same fields as the items (resolved like `file`).
    pub file: PathBuf,
    /// Examples per item unless [`TaskOptions::num_fewshot`] says otherwise (default 0).
    #[serde(default)]
    pub num: usize,
    /// Only examples whose value of this field equals the item's, e.g. `subject` for MMLU.
    #[serde(default, rename = "match")]
    pub match_field: Option<String>,
}

/// Generation settings of a [`TaskFormat::Generate`] task (lm-eval's `generation_kwargs`,
/// `filter_list` and `exact_match` arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSpec {
    /// Stop strings; the generation is cut before the first of them. The tokenizer's end-of-text
    /// token also stops it, as in lm-eval.
    pub until: Vec<String>,
    /// At most this many new tokens (lm-eval's default: 256).
    #[serde(default = "default_max_gen_toks")]
    pub max_gen_toks: usize,
    /// The answer is the first match of this regex (its first non-empty capture group, or the
    /// whole match without groups), stripped; `[invalid]` when nothing matches. lm-eval GSM8K's
    /// "strict-match": `#### (\-?[0-9\.\,]+)`. Unused by code tasks.
    #[serde(default)]
    pub answer_regex: String,
    /// Regexes deleted from both the answer and the target before comparing (lm-eval's
    /// `regexes_to_ignore`).
    #[serde(default)]
    pub ignore: Vec<String>,
    /// Compare lower-cased.
    #[serde(default)]
    pub ignore_case: bool,
}

fn default_max_gen_toks() -> usize {
    256
}

/// How a code task's generation is cut before it is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Postprocess {
    /// Before the first of the stop strings `until` (bigcode's `_stop_at_stop_token`; MBPP and
    /// HumanEval).
    #[default]
    Stop,
    /// After the `}` where the braces balance, starting [`CodeSpec::open_braces`] deep; if they
    /// never balance, after the last `}` (HumanEvalPack's `remove_last_block` for JavaScript).
    /// Generation stops as soon as they balance, which changes nothing in the result.
    BraceBalance,
}

/// When a program counts as passing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PassRule {
    /// It exits with status 0 within the time limit (bigcode's `code_eval`: no exception).
    #[default]
    ExitZero,
    /// It ends within the time limit and prints nothing on stdout or stderr (HumanEvalPack's
    /// JavaScript rule: a failed `console.assert` prints to stderr).
    Silent,
}

/// How a code task builds and runs its programs (the `[code]` table).
///
/// ```toml
/// [code]
/// command = ["python3"]
/// file_name = "program.py"
/// program = "{{prompt.strip()}}{{completion}}\n\n{{test}}\ncheck({{entry_point}})"
/// reference = "{{prompt}}{{canonical_solution}}\n\n{{test}}\ncheck({{entry_point}})"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeSpec {
    /// The interpreter and its arguments; the program's file name is appended.
    pub command: Vec<String>,
    /// The program's file name in the sandbox's temporary directory (`program.py`).
    pub file_name: String,
    /// Template of the program run: the item's fields and `completion`, the post-processed
    /// generation.
    pub program: String,
    /// Template of the same program with the dataset's reference solution (no `completion`), to
    /// check the task and the sandbox (`CodeRunner::run_references`).
    #[serde(default)]
    pub reference: Option<String>,
    /// How the generation is cut.
    #[serde(default)]
    pub postprocess: Postprocess,
    /// Braces already open at the end of the prompt, for [`Postprocess::BraceBalance`]
    /// (default 1: the function's own `{`).
    #[serde(default = "default_open_braces")]
    pub open_braces: usize,
    /// When a program passes.
    #[serde(default)]
    pub pass_if: PassRule,
    /// Wall-clock limit per program, seconds (default 3, as bigcode).
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// Address-space limit per program in MiB (`RLIMIT_AS`; default 2048; 0 = none).
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// Programs run at once (default: the number of CPUs).
    #[serde(default)]
    pub jobs: Option<usize>,
}

fn default_open_braces() -> usize {
    1
}

fn default_timeout_s() -> f64 {
    3.0
}

fn default_memory_mb() -> u64 {
    2048
}

fn default_target_delimiter() -> String {
    " ".to_string()
}

fn default_fewshot_delimiter() -> String {
    "\n\n".to_string()
}

fn default_blank() -> String {
    "_".to_string()
}

/// A task as written in its TOML file. Templates are Jinja (lm-eval's syntax); a template that
/// is exactly the name of an item field means that field, as in lm-eval.
///
/// ```toml
/// name = "arc_challenge"
/// format = "multiple_choice"
/// data_dir = "../../shared/data/benchmarks"
/// file = "arc_challenge_test_first300.jsonl"
/// text = "Question: {{question}}\nAnswer:"
/// choices = "choices"
/// target = "answer_index"
/// metrics = ["acc", "acc_norm"]
/// primary_metric = "acc_norm"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// The task's name in results and in the score cache.
    pub name: String,
    /// How items are scored.
    pub format: TaskFormat,
    /// The JSONL items; a relative path is resolved against [`TaskOptions::data_dir`], else
    /// against `data_dir`, else against the TOML file's directory.
    pub file: PathBuf,
    /// Directory of `file` and of the few-shot file, relative to the TOML file's directory.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Field holding an item's id (default `id`; the line number when absent).
    #[serde(default)]
    pub id_field: Option<String>,
    /// Template put before everything else (lm-eval's `description`).
    #[serde(default)]
    pub description: String,
    /// The prompt (lm-eval's `doc_to_text`); for [`TaskFormat::Partial`] the sentence with the
    /// blank.
    pub text: String,
    /// The choices (multiple choice), or the options that fill the blank (partial).
    #[serde(default)]
    pub choices: Option<ChoicesSpec>,
    /// The gold answer (lm-eval's `doc_to_target`): a field or template giving the index of the
    /// right choice or its text; for generation, the reference text; for
    /// [`TaskFormat::Loglikelihood`], the continuation scored (after `target_delimiter`).
    #[serde(default)]
    pub target: Option<String>,
    /// Between the context and a choice or a few-shot target (default `" "`).
    #[serde(default = "default_target_delimiter")]
    pub target_delimiter: String,
    /// After each few-shot example (default `"\n\n"`).
    #[serde(default = "default_fewshot_delimiter")]
    pub fewshot_delimiter: String,
    /// The blank of a partial-scoring sentence (default `"_"`).
    #[serde(default = "default_blank")]
    pub blank: String,
    /// Metrics to report (default: `acc` and `acc_norm` for multiple choice, `acc` for partial,
    /// `exact_match` for generation, `token_perplexity` and `token_acc` for loglikelihood).
    #[serde(default)]
    pub metrics: Vec<Metric>,
    /// The metric a search optimises (default: the first of `metrics`). Searches maximise
    /// [`Metric::fitness`]: a perplexity is minimised.
    #[serde(default)]
    pub primary_metric: Option<Metric>,
    /// Few-shot examples.
    #[serde(default)]
    pub fewshot: Option<FewshotSpec>,
    /// Generation settings (required for [`TaskFormat::Generate`] and [`TaskFormat::Code`]).
    #[serde(default)]
    pub generation: Option<GenerationSpec>,
    /// How programs are built and run (required for [`TaskFormat::Code`]).
    #[serde(default)]
    pub code: Option<CodeSpec>,
}

impl TaskSpec {
    /// Parses a task definition from TOML text.
    pub fn from_toml(text: &str, path: &Path) -> Result<TaskSpec, EvalError> {
        toml::from_str(text).map_err(|source| EvalError::TaskParse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The metrics reported, defaults applied.
    pub fn metrics(&self) -> Vec<Metric> {
        if !self.metrics.is_empty() {
            return self.metrics.clone();
        }
        match self.format {
            TaskFormat::MultipleChoice => vec![Metric::Acc, Metric::AccNorm],
            TaskFormat::Loglikelihood => vec![Metric::TokenPerplexity, Metric::TokenAcc],
            TaskFormat::Partial => vec![Metric::Acc],
            TaskFormat::Generate => vec![Metric::ExactMatch],
            TaskFormat::Code => vec![Metric::PassAt1],
        }
    }

    /// The metric a search optimises.
    pub fn primary_metric(&self) -> Metric {
        self.primary_metric
            .or_else(|| self.metrics().first().copied())
            .unwrap_or(Metric::Acc)
    }
}

/// How tasks are loaded.
#[derive(Debug, Clone, Default)]
pub struct TaskOptions {
    /// Overrides where relative data files are looked for.
    pub data_dir: Option<PathBuf>,
    /// Overrides the few-shot count of the task file.
    pub num_fewshot: Option<usize>,
}

/// One log-likelihood request: the score of `continuation` given `context`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoglikRequest {
    /// The text conditioned on.
    pub context: String,
    /// The text scored.
    pub continuation: String,
}

/// What an item asks of the model.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemRequests {
    /// One request per choice (multiple choice and partial scoring).
    Choices {
        /// Per choice, in order.
        requests: Vec<LoglikRequest>,
        /// Index of the right choice.
        gold: usize,
        /// The acc_norm normaliser of each choice: its length in characters (Unicode scalar
        /// values, as Python's `len`), without the delimiter.
        choice_len_chars: Vec<usize>,
    },
    /// One continuation scored after its context ([`TaskFormat::Loglikelihood`]).
    Continuation {
        /// The request.
        request: LoglikRequest,
    },
    /// A greedy generation.
    Generate {
        /// The prompt.
        context: String,
        /// The reference the extracted answer is compared with.
        target: String,
    },
}

/// One benchmark item with its requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// 0-based position in the data file.
    pub index: usize,
    /// The item's id.
    pub id: String,
    /// Its requests.
    pub requests: ItemRequests,
}

/// One row of a JSONL file.
#[derive(Debug)]
struct Doc {
    id: String,
    fields: serde_json::Map<String, Value>,
    /// The same fields, for templates.
    value: minijinja::Value,
}

/// A task ready to run: its definition, its items and few-shot examples, compiled templates.
#[derive(Debug)]
pub struct Task {
    spec: TaskSpec,
    data_file: PathBuf,
    docs: Vec<Doc>,
    fewshot_docs: Vec<Doc>,
    num_fewshot: usize,
    templates: Templates,
    fingerprint: String,
}

/// Bumped when a change of this module changes the requests or scores of an unchanged task, so
/// that cached scores of the old version are not reused.
const REQUEST_VERSION: &str = "modelglue-eval-requests-1";

/// The metrics of a log-likelihood task.
const LOGLIKELIHOOD_METRICS: [Metric; 4] = [
    Metric::Perplexity,
    Metric::TokenPerplexity,
    Metric::Acc,
    Metric::TokenAcc,
];

impl Task {
    /// Reads a task TOML file and its data.
    pub fn load(path: &Path, opts: &TaskOptions) -> Result<Task, EvalError> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::io("read", path, e))?;
        let spec = TaskSpec::from_toml(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        Task::from_spec(spec, base, opts).map_err(|e| match e {
            EvalError::TaskInvalid { task, reason } => EvalError::TaskFileInvalid {
                path: path.to_path_buf(),
                task,
                reason,
            },
            other => other,
        })
    }

    /// Every `*.toml` of a directory, in file name order.
    pub fn load_dir(dir: &Path, opts: &TaskOptions) -> Result<Vec<Task>, EvalError> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| EvalError::io("list", dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        paths.iter().map(|p| Task::load(p, opts)).collect()
    }

    /// Builds a task from a definition; relative paths in it are resolved against `base` (the
    /// directory of its TOML file).
    pub fn from_spec(spec: TaskSpec, base: &Path, opts: &TaskOptions) -> Result<Task, EvalError> {
        let invalid = |reason: String| EvalError::TaskInvalid {
            task: spec.name.clone(),
            reason,
        };
        let data_dir = match (&opts.data_dir, &spec.data_dir) {
            (Some(d), _) => d.clone(),
            (None, Some(d)) => base.join(d),
            (None, None) => base.to_path_buf(),
        };
        match spec.format {
            TaskFormat::MultipleChoice | TaskFormat::Partial => {
                if spec.choices.is_none() {
                    return Err(invalid(format!("format `{}` needs `choices`", spec.format)));
                }
                if spec.target.is_none() {
                    return Err(invalid(format!(
                        "format `{}` needs `target` (the field or template giving the right choice)",
                        spec.format
                    )));
                }
                if spec.metrics().contains(&Metric::ExactMatch) {
                    return Err(invalid("`exact_match` is a metric of generation tasks".into()));
                }
                if let Some(m) = spec
                    .metrics()
                    .into_iter()
                    .find(|m| !matches!(m, Metric::Acc | Metric::AccNorm))
                {
                    return Err(invalid(format!(
                        "`metrics`: `{}` is not a metric of format `{}` (it has `acc`, `acc_norm`)",
                        m.name(),
                        spec.format
                    )));
                }
            }
            TaskFormat::Loglikelihood => {
                if spec.target.is_none() {
                    return Err(invalid(
                        "format `loglikelihood` needs `target` (the field or template giving the \
                         continuation scored after `text` and `target_delimiter`)"
                            .into(),
                    ));
                }
                if spec.choices.is_some() {
                    return Err(invalid(
                        "format `loglikelihood` scores one continuation, `target`; remove `choices` \
                         (or use format `multiple_choice`)"
                            .into(),
                    ));
                }
                if let Some(m) = spec
                    .metrics()
                    .into_iter()
                    .find(|m| !LOGLIKELIHOOD_METRICS.contains(m))
                {
                    let names: Vec<String> = LOGLIKELIHOOD_METRICS
                        .iter()
                        .map(|m| format!("`{}`", m.name()))
                        .collect();
                    return Err(invalid(format!(
                        "`metrics`: `{}` is not a metric of format `loglikelihood` (it has {})",
                        m.name(),
                        names.join(", ")
                    )));
                }
            }
            TaskFormat::Generate => {
                if spec.generation.is_none() {
                    return Err(invalid("format `generate` needs a [generation] table".into()));
                }
                if spec.target.is_none() {
                    return Err(invalid("format `generate` needs `target` (the reference)".into()));
                }
                if spec.metrics() != [Metric::ExactMatch] {
                    return Err(invalid("generation tasks report `exact_match` only".into()));
                }
            }
            TaskFormat::Code => {
                if spec.generation.is_none() {
                    return Err(invalid(
                        "format `code` needs a [generation] table (stop strings, max_gen_toks)".into(),
                    ));
                }
                let Some(code) = &spec.code else {
                    return Err(invalid(
                        "format `code` needs a [code] table (command, file_name, program)".into(),
                    ));
                };
                if code.command.is_empty() {
                    return Err(invalid("[code] command must name the interpreter".into()));
                }
                if !(code.timeout_s > 0.0 && code.timeout_s.is_finite()) {
                    return Err(invalid(
                        "[code] timeout_s must be a positive number of seconds".into(),
                    ));
                }
                if spec.metrics() != [Metric::PassAt1] {
                    return Err(invalid("code tasks report `pass@1` only".into()));
                }
            }
        }
        if spec.format == TaskFormat::Partial && spec.blank.is_empty() {
            return Err(invalid("`blank` must not be empty".into()));
        }
        let primary = spec.primary_metric();
        if !spec.metrics().contains(&primary) {
            return Err(invalid(format!(
                "primary_metric `{}` is not among the metrics",
                primary.name()
            )));
        }

        let mut templates = Templates::new();
        let mut add = |name: &str, source: &str| {
            templates.add(name, source).map_err(|source| EvalError::Template {
                task: spec.name.clone(),
                template: name.to_string(),
                item: None,
                source,
            })
        };
        add("description", &spec.description)?;
        add("text", &spec.text)?;
        if let Some(t) = &spec.target {
            add("target", t)?;
        }
        if let Some(ChoicesSpec::Templates(list)) = &spec.choices {
            for (i, c) in list.iter().enumerate() {
                add(&format!("choices[{i}]"), c)?;
            }
        }
        if let Some(code) = &spec.code {
            add("code.program", &code.program)?;
            if let Some(r) = &code.reference {
                add("code.reference", r)?;
            }
        }

        let data_file = resolve(&data_dir, &spec.file);
        let id_field = spec.id_field.as_deref().unwrap_or("id");
        let (docs, data_bytes) = read_jsonl(&data_file, id_field)?;
        let (num_fewshot, fewshot_docs, fewshot_bytes) = match &spec.fewshot {
            Some(f) => {
                let path = resolve(&data_dir, &f.file);
                let (docs, bytes) = read_jsonl(&path, id_field)?;
                (opts.num_fewshot.unwrap_or(f.num), docs, bytes)
            }
            None => (opts.num_fewshot.unwrap_or(0), Vec::new(), Vec::new()),
        };
        if num_fewshot > 0 && spec.fewshot.is_none() {
            return Err(invalid(format!(
                "{num_fewshot}-shot asked but the task has no [fewshot] table"
            )));
        }

        let mut h = Sha256::new();
        h.update(REQUEST_VERSION);
        let spec_json = serde_json::to_vec(&spec).map_err(|e| invalid(format!("cannot serialise: {e}")))?;
        for part in [
            &spec_json[..],
            &data_bytes,
            &fewshot_bytes,
            &num_fewshot.to_le_bytes(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        let fingerprint = hex(&h.finalize());

        Ok(Task {
            spec,
            data_file,
            docs,
            fewshot_docs,
            num_fewshot,
            templates,
            fingerprint,
        })
    }

    /// The task's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Its definition.
    pub fn spec(&self) -> &TaskSpec {
        &self.spec
    }

    /// The data file read.
    pub fn data_file(&self) -> &Path {
        &self.data_file
    }

    /// Number of items in the data file.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// Whether the data file has no items.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Few-shot examples per item.
    pub fn num_fewshot(&self) -> usize {
        self.num_fewshot
    }

    /// sha256 (hex) of everything that decides the requests: the definition, the data and
    /// few-shot files' bytes, the few-shot count and the request-building version.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The first `limit` items (all when `None`) with their requests.
    pub fn items(&self, limit: Option<usize>) -> Result<Vec<Item>, EvalError> {
        let n = limit.map_or(self.docs.len(), |l| l.min(self.docs.len()));
        (0..n).map(|i| self.item(i)).collect()
    }

    /// Item `index` with its requests.
    pub fn item(&self, index: usize) -> Result<Item, EvalError> {
        let doc = self.docs.get(index).ok_or_else(|| EvalError::TaskInvalid {
            task: self.spec.name.clone(),
            reason: format!("no item {index} (the file has {})", self.docs.len()),
        })?;
        let prefix = self.fewshot_prefix(doc)?;
        let delim = &self.spec.target_delimiter;
        let requests = match self.spec.format {
            TaskFormat::MultipleChoice => {
                let context = prefix + &self.text(doc)?;
                let choices = self.choices(doc)?;
                let gold = self.gold(doc, &choices)?;
                ItemRequests::Choices {
                    requests: choices
                        .iter()
                        .map(|c| LoglikRequest {
                            context: context.clone(),
                            continuation: format!("{delim}{c}"),
                        })
                        .collect(),
                    gold,
                    choice_len_chars: choices.iter().map(|c| c.chars().count()).collect(),
                }
            }
            TaskFormat::Partial => {
                let options = self.choices(doc)?;
                let (contexts, continuation) = self.partial(doc, &options)?;
                let gold = self.gold(doc, &options)?;
                ItemRequests::Choices {
                    choice_len_chars: contexts.iter().map(|c| c.chars().count()).collect(),
                    requests: contexts
                        .iter()
                        .map(|c| LoglikRequest {
                            context: format!("{prefix}{c}"),
                            continuation: format!("{delim}{continuation}"),
                        })
                        .collect(),
                    gold,
                }
            }
            TaskFormat::Loglikelihood => ItemRequests::Continuation {
                request: LoglikRequest {
                    context: prefix + &self.text(doc)?,
                    continuation: format!("{delim}{}", self.loglik_target(doc)?),
                },
            },
            TaskFormat::Generate | TaskFormat::Code => ItemRequests::Generate {
                context: prefix + &self.text(doc)?,
                target: match &self.spec.target {
                    Some(t) => self.render(doc, "target", t)?,
                    // Code tasks are judged by their tests, not a reference text.
                    None => String::new(),
                },
            },
        };
        Ok(Item {
            index,
            id: doc.id.clone(),
            requests,
        })
    }

    /// Description, then the few-shot examples: `text + delimiter + target + fewshot_delimiter`.
    fn fewshot_prefix(&self, doc: &Doc) -> Result<String, EvalError> {
        let mut out = self.render(doc, "description", &self.spec.description)?;
        if self.num_fewshot == 0 {
            return Ok(out);
        }
        let field = self.spec.fewshot.as_ref().and_then(|f| f.match_field.as_deref());
        let wanted = field.map(|f| doc.fields.get(f));
        let examples: Vec<&Doc> = self
            .fewshot_docs
            .iter()
            .filter(|ex| match (field, wanted) {
                (Some(f), Some(w)) => ex.fields.get(f) == w,
                _ => true,
            })
            // As lm-eval, an example is never the item itself.
            .filter(|ex| ex.id != doc.id)
            .take(self.num_fewshot)
            .collect();
        if examples.len() < self.num_fewshot {
            return Err(self.item_error(
                doc,
                format!(
                    "{} few-shot examples asked, the few-shot file has {}{}",
                    self.num_fewshot,
                    examples.len(),
                    field.map(|f| format!(" with the same `{f}`")).unwrap_or_default()
                ),
            ));
        }
        let delim = &self.spec.target_delimiter;
        for ex in examples {
            let (text, target) = match self.spec.format {
                TaskFormat::MultipleChoice => {
                    let choices = self.choices(ex)?;
                    let gold = self.gold(ex, &choices)?;
                    (self.text(ex)?, choices[gold].clone())
                }
                TaskFormat::Partial => {
                    let options = self.choices(ex)?;
                    let gold = self.gold(ex, &options)?;
                    let (contexts, continuation) = self.partial(ex, &options)?;
                    (contexts[gold].clone(), continuation)
                }
                TaskFormat::Loglikelihood => (self.text(ex)?, self.loglik_target(ex)?),
                TaskFormat::Generate | TaskFormat::Code => (
                    self.text(ex)?,
                    self.render(ex, "target", self.spec.target.as_deref().unwrap_or(""))?,
                ),
            };
            out.push_str(&text);
            out.push_str(delim);
            out.push_str(&target);
            out.push_str(&self.spec.fewshot_delimiter);
        }
        Ok(out)
    }

    /// The program of item `index` of a code task: its `[code] program` template rendered with
    /// `completion` (the post-processed generation), or with `None` its `reference` template
    /// (the dataset's own solution).
    pub fn program(&self, index: usize, completion: Option<&str>) -> Result<String, EvalError> {
        let doc = self.docs.get(index).ok_or_else(|| EvalError::TaskInvalid {
            task: self.spec.name.clone(),
            reason: format!("no item {index} (the file has {})", self.docs.len()),
        })?;
        let code = self.spec.code.as_ref().ok_or_else(|| EvalError::TaskInvalid {
            task: self.spec.name.clone(),
            reason: "not a code task (no [code] table)".into(),
        })?;
        let (name, value) = match completion {
            Some(c) => {
                let mut fields = doc.fields.clone();
                fields.insert("completion".into(), Value::String(c.to_string()));
                ("code.program", minijinja::Value::from(Serde(&fields)))
            }
            None if code.reference.is_some() => ("code.reference", doc.value.clone()),
            None => {
                return Err(EvalError::TaskInvalid {
                    task: self.spec.name.clone(),
                    reason: "the [code] table has no `reference` template".into(),
                })
            }
        };
        self.templates
            .render(name, &value)
            .map_err(|source| EvalError::Template {
                task: self.spec.name.clone(),
                template: name.to_string(),
                item: Some(doc.id.clone()),
                source,
            })
    }

    /// The id of item `index`.
    pub fn item_id(&self, index: usize) -> Option<&str> {
        self.docs.get(index).map(|d| d.id.as_str())
    }

    fn text(&self, doc: &Doc) -> Result<String, EvalError> {
        self.render(doc, "text", &self.spec.text)
    }

    /// lm-eval's rule: a template that is the name of a field is that field; else it is
    /// rendered.
    fn render(&self, doc: &Doc, name: &str, source: &str) -> Result<String, EvalError> {
        if let Some(v) = doc.fields.get(source) {
            return Ok(match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            });
        }
        self.templates
            .render(name, &doc.value)
            .map_err(|source| EvalError::Template {
                task: self.spec.name.clone(),
                template: name.to_string(),
                item: Some(doc.id.clone()),
                source,
            })
    }

    /// The continuation of a log-likelihood item, without the delimiter.
    fn loglik_target(&self, doc: &Doc) -> Result<String, EvalError> {
        let source = self.spec.target.as_deref().unwrap_or("");
        self.render(doc, "target", source)
    }

    fn choices(&self, doc: &Doc) -> Result<Vec<String>, EvalError> {
        match &self.spec.choices {
            Some(ChoicesSpec::Field(field)) => match doc.fields.get(field) {
                Some(Value::Array(list)) => list
                    .iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(s.clone()),
                        Value::Number(n) => Ok(n.to_string()),
                        other => Err(self
                            .item_error(doc, format!("choice {other} of field `{field}` is not a string"))),
                    })
                    .collect(),
                Some(other) => Err(self.item_error(
                    doc,
                    format!("field `{field}` should be a list of choices, found {other}"),
                )),
                None => Err(self.item_error(doc, format!("no field `{field}` (the task's `choices`)"))),
            },
            Some(ChoicesSpec::Templates(list)) => list
                .iter()
                .enumerate()
                .map(|(i, c)| self.render(doc, &format!("choices[{i}]"), c))
                .collect(),
            None => Ok(Vec::new()),
        }
    }

    /// The gold index: an integer, or a choice's text (lm-eval's `doc_to_target`).
    fn gold(&self, doc: &Doc, choices: &[String]) -> Result<usize, EvalError> {
        let source = self.spec.target.as_deref().unwrap_or("");
        let index = match doc.fields.get(source) {
            Some(Value::Number(n)) => n.as_u64().map(|n| n as usize),
            Some(Value::String(s)) => s
                .trim()
                .parse()
                .ok()
                .or_else(|| choices.iter().position(|c| c == s)),
            Some(_) => None,
            None => {
                let s = self.render(doc, "target", source)?;
                s.trim()
                    .parse()
                    .ok()
                    .or_else(|| choices.iter().position(|c| *c == s))
            }
        };
        match index {
            Some(i) if i < choices.len() => Ok(i),
            _ => Err(self.item_error(
                doc,
                format!(
                    "target `{source}` gives no valid choice index (the item has {} choices)",
                    choices.len()
                ),
            )),
        }
    }

    /// The option-filled contexts `sentence[:blank] + option` and the shared continuation
    /// `sentence[blank + 1:].strip()`.
    fn partial(&self, doc: &Doc, options: &[String]) -> Result<(Vec<String>, String), EvalError> {
        let sentence = self.text(doc)?;
        let blank = &self.spec.blank;
        let at = sentence.find(blank.as_str()).ok_or_else(|| {
            self.item_error(doc, format!("the sentence has no blank `{blank}`: {sentence:?}"))
        })?;
        let head = &sentence[..at];
        let rest = sentence[at + blank.len()..].trim().to_string();
        Ok((options.iter().map(|o| format!("{head}{o}")).collect(), rest))
    }

    fn item_error(&self, doc: &Doc, reason: String) -> EvalError {
        EvalError::Item {
            task: self.spec.name.clone(),
            item: doc.id.clone(),
            reason,
        }
    }
}

fn resolve(dir: &Path, file: &Path) -> PathBuf {
    if file.is_absolute() {
        file.to_path_buf()
    } else {
        dir.join(file)
    }
}

/// The rows of a JSONL file and its bytes (for the fingerprint).
fn read_jsonl(path: &Path, id_field: &str) -> Result<(Vec<Doc>, Vec<u8>), EvalError> {
    let bytes = std::fs::read(path).map_err(|e| EvalError::io("read", path, e))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| EvalError::Data {
        path: path.to_path_buf(),
        line: 1 + bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count(),
        reason: "not UTF-8".into(),
    })?;
    let mut docs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |reason: String| EvalError::Data {
            path: path.to_path_buf(),
            line: n + 1,
            reason,
        };
        let fields = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(err("not a JSON object".into())),
            Err(e) => return Err(err(format!("invalid JSON: {e}"))),
        };
        let id = match fields.get(id_field) {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => docs.len().to_string(),
        };
        let value = minijinja::Value::from(Serde(&fields));
        docs.push(Doc { id, fields, value });
    }
    Ok((docs, bytes))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(toml: &str, rows: &str) -> (tempfile::TempDir, Task) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("items.jsonl"), rows).expect("write");
        std::fs::write(
            dir.path().join("shots.jsonl"),
            concat!(
                r#"{"id": "s0", "subject": "math", "question": "1+1?", "choices": ["1", "2"], "answer_index": 1}"#,
                "\n",
                r#"{"id": "s1", "subject": "art", "question": "Red?", "choices": ["yes", "no"], "answer_index": 0}"#,
                "\n",
                r#"{"id": "s2", "subject": "math", "question": "2+2?", "choices": ["4", "5"], "answer_index": 0}"#,
                "\n"
            ),
        )
        .expect("write");
        let path = dir.path().join("t.toml");
        std::fs::write(&path, toml).expect("write");
        let task = Task::load(&path, &TaskOptions::default()).expect("loads");
        (dir, task)
    }

    const MC_ROW: &str =
        r#"{"id": "q1", "subject": "math", "question": " 3+3? ", "choices": ["6", "7"], "answer_index": 0}"#;

    #[test]
    fn mmlu_style_prompt_with_description_and_same_subject_fewshot() {
        let (_d, t) = task(
            r#"
name = "mini_mmlu"
format = "multiple_choice"
file = "items.jsonl"
description = "The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\n\n"
text = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nAnswer:"
choices = ["A", "B"]
target = "answer_index"
metrics = ["acc"]
[fewshot]
file = "shots.jsonl"
num = 2
match = "subject"
"#,
            MC_ROW,
        );
        let item = t.item(0).expect("item");
        let ItemRequests::Choices {
            requests,
            gold,
            choice_len_chars,
        } = item.requests
        else {
            panic!("choices expected")
        };
        let ctx = "The following are multiple choice questions (with answers) about math.\n\n\
                   1+1?\nA. 1\nB. 2\nAnswer: B\n\n2+2?\nA. 4\nB. 5\nAnswer: A\n\n3+3?\nA. 6\nB. 7\nAnswer:";
        assert_eq!(requests[0].context, ctx);
        assert_eq!(requests[1].continuation, " B");
        assert_eq!((gold, choice_len_chars), (0, vec![1, 1]));
    }

    #[test]
    fn arc_style_choices_from_a_field_and_acc_norm_lengths_in_characters() {
        let (_d, t) = task(
            r#"
name = "mini_arc"
format = "multiple_choice"
file = "items.jsonl"
text = "Question: {{question}}\nAnswer:"
choices = "choices"
target = "answer_index"
"#,
            r#"{"id": "a", "question": "Q?", "choices": ["é1", "two"], "answer_index": "1"}"#,
        );
        let item = t.item(0).expect("item");
        let ItemRequests::Choices {
            requests,
            gold,
            choice_len_chars,
        } = item.requests
        else {
            panic!("choices expected")
        };
        assert_eq!(requests[0].context, "Question: Q?\nAnswer:");
        assert_eq!(requests[0].continuation, " é1");
        assert_eq!((gold, choice_len_chars), (1, vec![2, 3]));
        assert_eq!(t.spec().metrics(), vec![Metric::Acc, Metric::AccNorm]);
    }

    #[test]
    fn winogrande_partial_scoring_fills_the_blank_and_shares_the_rest() {
        let (_d, t) = task(
            r#"
name = "mini_wg"
format = "partial"
file = "items.jsonl"
text = "{{question}}"
choices = "choices"
target = "answer_index"
"#,
            r#"{"id": "w", "question": "Sarah beat Maria so _ got  the cup. ", "choices": ["Sarah", "Maria"], "answer_index": 0}"#,
        );
        let ItemRequests::Choices {
            requests,
            choice_len_chars,
            ..
        } = t.item(0).expect("item").requests
        else {
            panic!("choices expected")
        };
        assert_eq!(requests[0].context, "Sarah beat Maria so Sarah");
        assert_eq!(requests[1].context, "Sarah beat Maria so Maria");
        assert_eq!(requests[0].continuation, " got  the cup.");
        assert_eq!(requests[1].continuation, " got  the cup.");
        assert_eq!(choice_len_chars, vec![25, 25]);
    }

    #[test]
    fn gold_out_of_range_names_the_item() {
        let (_d, t) = task(
            r#"
name = "bad"
format = "multiple_choice"
file = "items.jsonl"
text = "{{question}}"
choices = "choices"
target = "answer_index"
"#,
            r#"{"id": "x9", "question": "Q", "choices": ["a"], "answer_index": 3}"#,
        );
        let err = t.item(0).expect_err("gold 3 of 1 choice").to_string();
        assert!(err.contains("x9") && err.contains("1 choices"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused_with_the_file_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.toml");
        std::fs::write(
            &path,
            "name = \"x\"\nformat = \"partial\"\nfile = \"a\"\ntext = \"t\"\nchoise = \"c\"\n",
        )
        .expect("write");
        let err = Task::load(&path, &TaskOptions::default())
            .expect_err("typo")
            .to_string();
        assert!(err.contains("t.toml") && err.contains("choise"), "{err}");
    }

    #[test]
    fn fingerprint_changes_with_the_data_and_the_fewshot_count() {
        let toml = r#"
name = "fp"
format = "multiple_choice"
file = "items.jsonl"
text = "{{question}}"
choices = "choices"
target = "answer_index"
[fewshot]
file = "shots.jsonl"
"#;
        let (d, a) = task(toml, MC_ROW);
        let path = d.path().join("t.toml");
        let b = Task::load(
            &path,
            &TaskOptions {
                num_fewshot: Some(1),
                ..TaskOptions::default()
            },
        )
        .expect("loads");
        assert_ne!(a.fingerprint(), b.fingerprint());
        std::fs::write(d.path().join("items.jsonl"), MC_ROW.replace("3+3", "4+4")).expect("write");
        let c = Task::load(&path, &TaskOptions::default()).expect("loads");
        assert_ne!(a.fingerprint(), c.fingerprint());
        let again = Task::load(&path, &TaskOptions::default()).expect("loads");
        assert_eq!(c.fingerprint(), again.fingerprint());
    }
}

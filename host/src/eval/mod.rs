//! The evaluator: lm-evaluation-harness-compatible scoring of JSONL benchmark tasks, the fitness
//! function of every selection strategy.
//!
//! Tasks are data, not code: one TOML file per task ([`TaskSpec`]) names the JSONL file, the
//! format, the Jinja prompt templates (lm-eval's own `doc_to_text` / `doc_to_choice` /
//! `doc_to_target` syntax, Python string methods included) and the metrics. The shipped
//! definitions live in `tasks/` at the repository root.
//!
//! Formats, each scored as lm-eval 0.4.13 scores it:
//!
//! - [`TaskFormat::MultipleChoice`] (ARC, MMLU): one log-likelihood request per choice, context
//!   then `target_delimiter + choice`; `acc` = argmax of the summed log-probabilities of the
//!   continuation tokens, `acc_norm` = argmax of that sum divided by the choice's length in
//!   characters. `num_fewshot` examples (`text + " " + target + "\n\n"`, after the description)
//!   come from a few-shot file, e.g. MMLU's dev rows of the same subject.
//! - [`TaskFormat::Loglikelihood`] (LAMBADA): one request per item, context then
//!   `target_delimiter + target` (as for a multiple-choice choice: lm-eval's own request has no
//!   delimiter, so its `" " + last word` target is `target = "{{text.split(' ')[-1]}}"` here).
//!   Per item: the continuation's loglik, its token count and how many of its tokens are the
//!   greedy argmax. `perplexity` = exp(−mean of the items' loglik) (lm-eval's aggregation),
//!   `token_perplexity` = exp(−Σ loglik / Σ tokens) (default, primary; lower is better),
//!   `acc` = fraction of items whose every token is greedy (lm-eval's LAMBADA `acc`),
//!   `token_acc` = Σ greedy tokens / Σ tokens (default). Their standard errors are the delta
//!   method's (ratio estimators for the per-token ones). Searches maximise [`Metric::fitness`],
//!   which negates a lower-is-better metric.
//! - [`TaskFormat::Partial`] (WinoGrande): the blank of the sentence is filled with each option;
//!   the shared rest of the sentence is the continuation scored after each option-filled prefix.
//! - [`TaskFormat::Generate`] (GSM8K): greedy generation until a stop string, an answer extracted
//!   by regex, exact match after lm-eval's normalisation.
//!
//! Token ids follow lm-eval's `_encode_pair`: trailing whitespace of the context moves to the
//! continuation, `encode(context + continuation)` is split after `len(encode(context))` tokens,
//! no BOS is added, and the model sees `(context + continuation)[-(max_length + 1):][:-1]`.
//!
//! ```no_run
//! use modelglue::checkpoint::Checkpoint;
//! use modelglue::eval::{EvalOptions, EvalTokenizer, Evaluator, ModelKey, ScoreCache, Task, TaskOptions};
//! use modelglue::runtime::Model;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ckpt = Checkpoint::open("zoo/base".as_ref())?;
//! let model = Model::load(&ckpt)?;
//! let tokenizer = EvalTokenizer::from_checkpoint(&ckpt)?;
//! let task = Task::load("tasks/arc_challenge.toml".as_ref(), &TaskOptions::default())?;
//! let evaluator = Evaluator::new(&model, &tokenizer, EvalOptions { limit: Some(50), ..EvalOptions::default() })
//!     .with_cache(ScoreCache::open(".cache/scores".as_ref())?, ModelKey::of_checkpoint(&ckpt)?);
//! let result = evaluator.run(&task)?;
//! println!("{} acc_norm {:.4}", result.task, result.metric("acc_norm").unwrap_or(f64::NAN));
//! # Ok(())
//! # }
//! ```

mod cache;
mod code;
mod generate;
mod metrics;
mod run;
pub mod sandbox;
mod score;
mod task;
mod template;
mod tokenize;

pub use cache::{ModelKey, ScoreCache};
pub use code::{brace_balanced_prefix, CodeRunner};
pub use generate::{cut_at_stops, normalize_answer, Generation, Generator, INVALID_ANSWER};
pub use metrics::{
    mean_stderr, ChoiceResult, CodeResult, EvalReport, GenerationResult, ItemResult, LoglikResult,
    MetricValue, TaskResult,
};
pub use run::{EvalOptions, Evaluator, DEFAULT_MAX_LENGTH};
pub use score::{Batching, Loglik, Scorer, TokenRequest, TokenScore};
pub use task::{
    ChoicesSpec, CodeSpec, FewshotSpec, GenerationSpec, Item, ItemRequests, LoglikRequest, Metric, PassRule,
    Postprocess, Task, TaskFormat, TaskOptions, TaskSpec,
};
pub use tokenize::EvalTokenizer;

use std::path::PathBuf;

use crate::runtime::RuntimeError;

/// What can go wrong loading tasks, scoring them or caching their scores.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file could not be read or written.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done (`read`, `write`, `create directory`, ...).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A task TOML file is not valid TOML or does not match the task schema.
    #[error("task file {}: {source}", path.display())]
    TaskParse {
        /// The TOML file.
        path: PathBuf,
        /// The parser's message (it names the line and key).
        #[source]
        source: toml::de::Error,
    },
    /// A task definition is well-formed TOML but cannot be used as it is.
    #[error("task `{task}`: {reason}")]
    TaskInvalid {
        /// The task name.
        task: String,
        /// What is wrong and what to do about it.
        reason: String,
    },
    /// A task file is well-formed TOML but cannot be used as it is ([`EvalError::TaskInvalid`]
    /// raised while loading the file).
    #[error("task file {} (task `{task}`): {reason}", path.display())]
    TaskFileInvalid {
        /// The TOML file.
        path: PathBuf,
        /// The task name.
        task: String,
        /// What is wrong (naming the key) and what to do about it.
        reason: String,
    },
    /// A line of a JSONL data file is not a JSON object.
    #[error("{}:{line}: {reason}", path.display())]
    Data {
        /// The JSONL file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A prompt template failed to compile or to render for an item.
    #[error("task `{task}`, template `{template}`{}: {source:#}", item.as_ref().map(|i| format!(", item `{i}`")).unwrap_or_default())]
    Template {
        /// The task name.
        task: String,
        /// Which template (`text`, `description`, `target`, `choices[2]`, ...).
        template: String,
        /// The item being rendered (`None` while compiling).
        item: Option<String>,
        /// minijinja's error, with the template line.
        #[source]
        source: minijinja::Error,
    },
    /// An item's fields do not fit the task (missing field, gold index out of range, no blank).
    #[error("task `{task}`, item `{item}`: {reason}")]
    Item {
        /// The task name.
        task: String,
        /// The item id.
        item: String,
        /// What does not fit.
        reason: String,
    },
    /// The tokenizer could not be loaded or failed on a text.
    #[error("tokenizer: {reason}")]
    Tokenizer {
        /// What failed (the file, or the text being encoded).
        reason: String,
    },
    /// A cached score file is not what this version wrote.
    #[error("score cache entry {} is unreadable ({reason}); delete it to rescore", path.display())]
    Cache {
        /// The cache file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A request cannot be scored by this model (e.g. longer than its context).
    #[error("request {request}: {reason}")]
    Request {
        /// Index of the request in its batch.
        request: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A generated program could not be run (not: it ran and failed its tests).
    #[error("code sandbox: {reason}")]
    Sandbox {
        /// What failed (starting the interpreter, waiting for it, the temporary directory).
        reason: String,
    },
    /// The model failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A tensor operation on the model's output failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl EvalError {
    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> EvalError {
        EvalError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

//! Running tasks on a model: requests -> token ids -> batched scores -> metrics, with the score
//! cache and a progress bar.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::cache::{ModelKey, ScoreCache};
use super::code::{braces_balance, postprocess, CodeRunner};
use super::generate::{AnswerRules, Generator};
use super::metrics::{
    ChoiceResult, CodeResult, EvalReport, GenerationResult, ItemResult, LoglikResult, TaskResult,
};
use super::score::{Batching, Scorer, TokenRequest};
use super::task::{Item, ItemRequests, Postprocess, Task, TaskFormat};
use super::tokenize::EvalTokenizer;
use super::EvalError;
use crate::checkpoint::{dtype_name, Checkpoint};
use crate::runtime::Model;

/// lm-eval's `_DEFAULT_MAX_LENGTH`, used when the config names no context length.
pub const DEFAULT_MAX_LENGTH: usize = 2048;

/// How tasks are run.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Only the first N items of each task (lm-eval's `--limit N`).
    pub limit: Option<usize>,
    /// How requests are packed into forwards.
    pub batching: Batching,
    /// About this many tokens (padding included) per forward pass.
    pub token_budget: usize,
    /// Prompts per generation batch.
    pub generation_batch: usize,
    /// The model's context length: inputs keep their last `max_length` tokens. `None`:
    /// [`DEFAULT_MAX_LENGTH`]; [`EvalOptions::max_length_of`] reads it from a checkpoint as
    /// lm-eval does.
    pub max_length: Option<usize>,
    /// Show a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            limit: None,
            batching: Batching::SharedPrefix,
            token_budget: 1024,
            generation_batch: 8,
            max_length: None,
            progress: true,
        }
    }
}

impl EvalOptions {
    /// lm-eval's HF `max_length`: the first of `n_positions`, `max_position_embeddings`, `n_ctx`
    /// in `config.json`.
    pub fn max_length_of(ckpt: &Checkpoint) -> Option<usize> {
        ["n_positions", "max_position_embeddings", "n_ctx"]
            .iter()
            .find_map(|k| ckpt.config().get(*k)?.as_u64())
            .map(|n| n as usize)
    }
}

/// Runs tasks on one model.
#[derive(Debug)]
pub struct Evaluator<'a> {
    model: &'a Model,
    tokenizer: &'a EvalTokenizer,
    opts: EvalOptions,
    cache: Option<(ScoreCache, ModelKey)>,
}

impl<'a> Evaluator<'a> {
    /// An evaluator without a score cache.
    pub fn new(model: &'a Model, tokenizer: &'a EvalTokenizer, opts: EvalOptions) -> Evaluator<'a> {
        Evaluator {
            model,
            tokenizer,
            opts,
            cache: None,
        }
    }

    /// Reads and writes scores of the model known as `key` in `cache`.
    pub fn with_cache(mut self, cache: ScoreCache, key: ModelKey) -> Evaluator<'a> {
        self.cache = Some((cache, key));
        self
    }

    /// The options.
    pub fn options(&self) -> &EvalOptions {
        &self.opts
    }

    fn max_length(&self) -> usize {
        self.opts.max_length.unwrap_or(DEFAULT_MAX_LENGTH)
    }

    /// What the scores depend on besides the model's content and the task: the dtype the
    /// model computes in and the context length.
    pub fn settings(&self) -> String {
        format!(
            "dtype={};max_length={}",
            dtype_name(self.model.embeddings().dtype()),
            self.max_length()
        )
    }

    /// Every task, in order.
    pub fn run_all(&self, tasks: &[Task]) -> Result<EvalReport, EvalError> {
        let results = tasks.iter().map(|t| self.run(t)).collect::<Result<_, _>>()?;
        Ok(EvalReport::new(
            self.cache.as_ref().map(|(_, k)| k.as_str().to_string()),
            results,
        ))
    }

    /// Scores the first `limit` items of `task`, reusing cached item results.
    pub fn run(&self, task: &Task) -> Result<TaskResult, EvalError> {
        let start = Instant::now();
        let n = self.opts.limit.map_or(task.len(), |l| l.min(task.len()));
        let settings = self.settings();
        let mut items: Vec<ItemResult> = match &self.cache {
            Some((cache, key)) => cache
                .load(key, task, &settings)?
                .map(|r| r.items)
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let cached = items.len();
        items.truncate(n);
        let todo: Vec<Item> = (items.len()..n).map(|i| task.item(i)).collect::<Result<_, _>>()?;
        let scored_now = todo.len();
        if !todo.is_empty() {
            let bar = self.progress_bar(task.name(), todo.len());
            let fresh = match task.spec().format {
                TaskFormat::MultipleChoice | TaskFormat::Partial => self.score_choices(task, &todo, &bar)?,
                TaskFormat::Loglikelihood => self.score_continuations(task, &todo, &bar)?,
                TaskFormat::Generate => self.generate(task, &todo, &bar)?,
                TaskFormat::Code => self.code(task, &todo, &bar)?,
            };
            bar.finish_and_clear();
            items.extend(fresh);
        }
        let spec = task.spec();
        let mut result = TaskResult::aggregate(
            task.name(),
            spec.format,
            task.fingerprint(),
            task.num_fewshot(),
            task.len(),
            &spec.metrics(),
            spec.primary_metric(),
            items,
        );
        if let Some((cache, key)) = &self.cache {
            if result.items.len() > cached {
                cache.store(key, &settings, task, &result)?;
            }
        }
        result.scored_now = scored_now;
        result.seconds = start.elapsed().as_secs_f64();
        tracing::debug!(
            task = task.name(),
            items = result.n_items,
            scored = scored_now,
            seconds = result.seconds,
            "task scored"
        );
        Ok(result)
    }

    fn score_choices(
        &self,
        task: &Task,
        items: &[Item],
        bar: &ProgressBar,
    ) -> Result<Vec<ItemResult>, EvalError> {
        let mut groups = Vec::with_capacity(items.len());
        let mut golds = Vec::with_capacity(items.len());
        for item in items {
            let ItemRequests::Choices {
                requests,
                gold,
                choice_len_chars,
            } = &item.requests
            else {
                return Err(EvalError::Item {
                    task: task.name().to_string(),
                    item: item.id.clone(),
                    reason: "an item without choices in a multiple-choice task".into(),
                });
            };
            let group = requests
                .iter()
                .map(|r| {
                    let (context, continuation) = self.tokenizer.encode_pair(&r.context, &r.continuation)?;
                    Ok(TokenRequest {
                        context,
                        continuation,
                    })
                })
                .collect::<Result<Vec<_>, EvalError>>()?;
            groups.push(group);
            golds.push((*gold, choice_len_chars.clone()));
        }
        let scorer = Scorer::new(
            self.model,
            self.max_length(),
            self.opts.batching,
            self.opts.token_budget,
        );
        let scores = scorer.score(&groups, &mut |n| bar.inc(n as u64))?;
        Ok(items
            .iter()
            .zip(groups.into_iter().zip(golds))
            .zip(scores)
            .map(|((item, (group, (gold, lens))), scores)| {
                ItemResult::Choice(ChoiceResult::new(
                    item.id.clone(),
                    gold,
                    &scores,
                    lens,
                    group.iter().map(|r| r.context.len()).collect(),
                    group.into_iter().map(|r| r.continuation).collect(),
                ))
            })
            .collect())
    }

    /// One request per item, scored token by token (through the same batching as choices).
    fn score_continuations(
        &self,
        task: &Task,
        items: &[Item],
        bar: &ProgressBar,
    ) -> Result<Vec<ItemResult>, EvalError> {
        let groups = items
            .iter()
            .map(|item| {
                let ItemRequests::Continuation { request } = &item.requests else {
                    return Err(EvalError::Item {
                        task: task.name().to_string(),
                        item: item.id.clone(),
                        reason: "an item with choices or a generation in a loglikelihood task".into(),
                    });
                };
                let (context, continuation) = self
                    .tokenizer
                    .encode_pair(&request.context, &request.continuation)?;
                Ok(vec![TokenRequest {
                    context,
                    continuation,
                }])
            })
            .collect::<Result<Vec<_>, EvalError>>()?;
        let scorer = Scorer::new(
            self.model,
            self.max_length(),
            self.opts.batching,
            self.opts.token_budget,
        );
        let scores = scorer.score_tokens(&groups, &mut |n| bar.inc(n as u64))?;
        Ok(items
            .iter()
            .zip(groups)
            .zip(scores)
            .map(|((item, mut group), tokens)| {
                let r = group.remove(0);
                ItemResult::Loglik(LoglikResult::new(
                    item.id.clone(),
                    &tokens[0],
                    r.context.len(),
                    r.continuation,
                ))
            })
            .collect())
    }

    fn generate(&self, task: &Task, items: &[Item], bar: &ProgressBar) -> Result<Vec<ItemResult>, EvalError> {
        let invalid = |reason: String| EvalError::TaskInvalid {
            task: task.name().to_string(),
            reason,
        };
        let spec = task
            .spec()
            .generation
            .as_ref()
            .ok_or_else(|| invalid("no [generation] table".into()))?;
        let rules = AnswerRules::new(spec).map_err(invalid)?;
        let mut contexts = Vec::with_capacity(items.len());
        let mut targets = Vec::with_capacity(items.len());
        for item in items {
            match &item.requests {
                ItemRequests::Generate { context, target } => {
                    contexts.push(context.clone());
                    targets.push(target.clone());
                }
                ItemRequests::Choices { .. } | ItemRequests::Continuation { .. } => {
                    return Err(invalid(format!(
                        "item `{}` has log-likelihood requests in a generation task",
                        item.id
                    )))
                }
            }
        }
        let generator = Generator::new(
            self.model,
            self.tokenizer,
            self.max_length(),
            self.opts.generation_batch,
        );
        let generations = generator.generate_until(&contexts, &spec.until, spec.max_gen_toks, &mut |n| {
            bar.inc(n as u64)
        })?;
        Ok(items
            .iter()
            .zip(targets)
            .zip(generations)
            .map(|((item, target), g)| {
                let answer = rules.extract(&g.text);
                ItemResult::Generation(GenerationResult {
                    id: item.id.clone(),
                    exact_match: f64::from(u8::from(rules.matches(&answer, &target))),
                    target,
                    generation: g.text,
                    answer,
                    n_ctx_tokens: g.n_ctx_tokens,
                    n_gen_tokens: g.n_gen_tokens,
                })
            })
            .collect())
    }

    /// Greedy generations, post-processed, completed into programs and run in the sandbox.
    fn code(&self, task: &Task, items: &[Item], bar: &ProgressBar) -> Result<Vec<ItemResult>, EvalError> {
        let invalid = |reason: &str| EvalError::TaskInvalid {
            task: task.name().to_string(),
            reason: reason.to_string(),
        };
        let spec = task.spec();
        let gen = spec
            .generation
            .as_ref()
            .ok_or_else(|| invalid("no [generation] table"))?;
        let code = spec.code.as_ref().ok_or_else(|| invalid("no [code] table"))?;
        let contexts = items
            .iter()
            .map(|item| match &item.requests {
                ItemRequests::Generate { context, .. } => Ok(context.clone()),
                ItemRequests::Choices { .. } | ItemRequests::Continuation { .. } => {
                    Err(invalid("an item with log-likelihood requests in a code task"))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let generator = Generator::new(
            self.model,
            self.tokenizer,
            self.max_length(),
            self.opts.generation_batch,
        );
        let open = code.open_braces;
        let stop = |text: &str| code.postprocess == Postprocess::BraceBalance && braces_balance(text, open);
        // The bar counts generations; running the programs is quick next to them.
        let generations =
            generator.generate_until_or(&contexts, &gen.until, gen.max_gen_toks, &stop, &mut |n| {
                bar.inc(n as u64)
            })?;
        let completions: Vec<String> = generations.iter().map(|g| postprocess(code, &g.text)).collect();
        let programs = items
            .iter()
            .zip(&completions)
            .map(|(item, c)| task.program(item.index, Some(c)))
            .collect::<Result<Vec<_>, _>>()?;
        let runs = CodeRunner::new(code).run_all(&programs)?;
        Ok(items
            .iter()
            .zip(completions)
            .zip(generations.into_iter().zip(runs))
            .map(|((item, completion), (g, run))| {
                ItemResult::Code(CodeResult {
                    id: item.id.clone(),
                    completion,
                    pass_at_1: f64::from(u8::from(run.passed)),
                    outcome: run.outcome.summary(),
                    run_millis: run.outcome.millis,
                    n_ctx_tokens: g.n_ctx_tokens,
                    n_gen_tokens: g.n_gen_tokens,
                })
            })
            .collect())
    }

    fn progress_bar(&self, task: &str, len: usize) -> ProgressBar {
        if !self.opts.progress || !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} items {per_sec} eta {eta}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(task.to_string());
        bar
    }
}

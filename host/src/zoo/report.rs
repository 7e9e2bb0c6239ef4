//! `mglue zoo report`: every model of a zoo scored on every skill by the evaluator.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

use super::{Manifest, Role, Split, ZooError};
use crate::checkpoint::Checkpoint;
use crate::eval::{EvalOptions, EvalTokenizer, Evaluator, Task, TaskFormat, TaskOptions};
use crate::runtime::Model;

/// Scores of every model on every skill (0–1).
#[derive(Debug, Clone, Serialize)]
pub struct ZooReport {
    /// The split scored.
    pub split: Split,
    /// The metric: `acc` (multiple choice) or `exact_match` (generation); `mixed` when the
    /// columns differ.
    pub metric: String,
    /// Column names, in order: a skill's name, or `skill metric` where a skill has two columns
    /// (log-likelihood tasks: `token_perplexity` and `token_acc`).
    pub skills: Vec<String>,
    /// Per column: whether lower is better (perplexities).
    pub lower_is_better: Vec<bool>,
    /// One row per model.
    pub rows: Vec<ReportRow>,
}

/// One model's row.
#[derive(Debug, Clone, Serialize)]
pub struct ReportRow {
    /// The model.
    pub model: String,
    /// Its role.
    pub role: Role,
    /// Its specialities.
    pub speciality: Vec<String>,
    /// The metric per column, in [`ZooReport::skills`] order (fractions; perplexities as they
    /// are).
    pub scores: Vec<f64>,
    /// Mean over the higher-is-better columns.
    pub mean: f64,
}

impl ZooReport {
    /// The score of `model` on `skill`.
    pub fn score(&self, model: &str, skill: &str) -> Option<f64> {
        let col = self.skills.iter().position(|s| s == skill)?;
        self.rows.iter().find(|r| r.model == model).map(|r| r.scores[col])
    }

    /// A Markdown table: the best score of each column in bold.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| model | role | trained on | {} | mean |",
            self.skills.join(" | ")
        );
        let _ = writeln!(s, "|---|---|---|{}---|", "---:|".repeat(self.skills.len()));
        let lower = |c: usize| self.lower_is_better.get(c).copied().unwrap_or(false);
        let best: Vec<f64> = (0..=self.skills.len())
            .map(|c| {
                let values = self.rows.iter().map(|r| {
                    if c < self.skills.len() {
                        r.scores[c]
                    } else {
                        r.mean
                    }
                });
                if lower(c) {
                    values.fold(f64::MAX, f64::min)
                } else {
                    values.fold(f64::MIN, f64::max)
                }
            })
            .collect();
        for r in &self.rows {
            let cell = |v: f64, c: usize| {
                let text = if lower(c) {
                    format!("{v:.2}")
                } else {
                    format!("{:.1}", 100.0 * v)
                };
                if v == best[c] {
                    format!("**{text}**")
                } else {
                    text
                }
            };
            let cells: Vec<String> = r.scores.iter().enumerate().map(|(c, &v)| cell(v, c)).collect();
            let role = serde_json::to_value(r.role)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            let trained = match (r.speciality.is_empty(), r.role) {
                (false, _) => r.speciality.join(", "),
                (true, Role::Base) => "all".to_string(),
                (true, _) => "—".to_string(),
            };
            let _ = writeln!(
                s,
                "| {} | {role} | {trained} | {} | {} |",
                r.model,
                cells.join(" | "),
                cell(r.mean, self.skills.len())
            );
        }
        s
    }
}

/// Scores every model of `manifest` on every skill's `split` task: multiple-choice accuracy, or
/// with `generate` the exact match of greedy generations.
pub fn report(manifest: &Manifest, split: Split, generate: bool) -> Result<ZooReport, ZooError> {
    report_models(manifest, split, generate, None, &[])
}

/// [`report`] plus rows for other checkpoints scored on the same tasks (merges of zoo models,
/// role [`Role::Merged`]), given as `(name, directory)`.
pub fn report_with(
    manifest: &Manifest,
    split: Split,
    generate: bool,
    extra: &[(String, PathBuf)],
) -> Result<ZooReport, ZooError> {
    let mut entries: Vec<Entry> = manifest
        .models
        .iter()
        .map(|m| (m.name.clone(), m.role, m.skills.clone(), manifest.model_dir(m)))
        .collect();
    entries.extend(
        extra
            .iter()
            .map(|(n, d)| (n.clone(), Role::Merged, Vec::new(), d.clone())),
    );
    score_entries(manifest, split, generate, None, &entries)
}

/// [`report`] on the first `limit` items of each task, and only on the models named in `only`
/// (all when empty).
pub fn report_models(
    manifest: &Manifest,
    split: Split,
    generate: bool,
    limit: Option<usize>,
    only: &[String],
) -> Result<ZooReport, ZooError> {
    let entries: Vec<Entry> = manifest
        .models
        .iter()
        .filter(|m| only.is_empty() || only.contains(&m.name))
        .map(|m| (m.name.clone(), m.role, m.skills.clone(), manifest.model_dir(m)))
        .collect();
    score_entries(manifest, split, generate, limit, &entries)
}

/// A row to score: name, role, specialities, checkpoint directory.
type Entry = (String, Role, Vec<String>, PathBuf);

fn score_entries(
    manifest: &Manifest,
    split: Split,
    generate: bool,
    limit: Option<usize>,
    entries: &[Entry],
) -> Result<ZooReport, ZooError> {
    let task_opts = TaskOptions::default();
    let tasks: Vec<Task> = manifest
        .tasks(split, generate)
        .iter()
        .map(|p| Task::load(p, &task_opts))
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    // (column name, lower is better, metric)
    let mut columns: Vec<(String, bool, String)> = Vec::new();
    for (name, role, speciality, dir) in entries {
        let ckpt = Checkpoint::open(dir)?;
        let model = Model::load(&ckpt)?;
        let tok = EvalTokenizer::from_checkpoint(&ckpt)?;
        let opts = EvalOptions {
            progress: false,
            generation_batch: 64,
            limit,
            ..EvalOptions::default()
        };
        let eval = Evaluator::new(&model, &tok, opts);
        let mut scores = Vec::new();
        columns.clear();
        for (t, skill) in tasks.iter().zip(&manifest.skills) {
            let r = eval.run(t)?;
            if r.format == TaskFormat::Loglikelihood {
                for (metric, lower) in [("token_perplexity", true), ("token_acc", false)] {
                    let v = r
                        .metric(metric)
                        .ok_or_else(|| crate::eval::EvalError::TaskInvalid {
                            task: t.name().to_string(),
                            reason: format!("a zoo log-likelihood task must report `{metric}`"),
                        })?;
                    scores.push(v);
                    let short = if lower { "ppl" } else { "acc" };
                    columns.push((format!("{} {short}", skill.name), lower, metric.to_string()));
                }
            } else {
                scores.push(r.primary());
                columns.push((skill.name.clone(), false, r.primary_metric.name().to_string()));
            }
        }
        let up: Vec<f64> = scores
            .iter()
            .zip(&columns)
            .filter(|(_, c)| !c.1)
            .map(|(v, _)| *v)
            .collect();
        let mean = up.iter().sum::<f64>() / up.len().max(1) as f64;
        rows.push(ReportRow {
            model: name.clone(),
            role: *role,
            speciality: speciality.clone(),
            scores,
            mean,
        });
    }
    let mut metrics: Vec<&str> = columns.iter().map(|c| c.2.as_str()).collect();
    metrics.dedup();
    let metric = match metrics.as_slice() {
        [one] => one.to_string(),
        _ => "mixed".to_string(),
    };
    Ok(ZooReport {
        split,
        metric,
        skills: columns.iter().map(|c| c.0.clone()).collect(),
        lower_is_better: columns.iter().map(|c| c.1).collect(),
        rows,
    })
}

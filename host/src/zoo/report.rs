//! `mglue zoo report`: every model of a zoo scored on every skill by the evaluator.

use std::fmt::Write as _;

use serde::Serialize;

use super::{Manifest, Role, Split, ZooError};
use crate::checkpoint::Checkpoint;
use crate::eval::{EvalOptions, EvalTokenizer, Evaluator, Task, TaskOptions};
use crate::runtime::Model;

/// Scores of every model on every skill (0–1).
#[derive(Debug, Clone, Serialize)]
pub struct ZooReport {
    /// The split scored.
    pub split: Split,
    /// The metric: `acc` (multiple choice) or `exact_match` (generation).
    pub metric: String,
    /// Skill names, in column order.
    pub skills: Vec<String>,
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
    /// The metric per skill, in [`ZooReport::skills`] order.
    pub scores: Vec<f64>,
    /// Mean over the skills.
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
        let best: Vec<f64> = (0..=self.skills.len())
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| {
                        if c < self.skills.len() {
                            r.scores[c]
                        } else {
                            r.mean
                        }
                    })
                    .fold(f64::MIN, f64::max)
            })
            .collect();
        for r in &self.rows {
            let cell = |v: f64, c: usize| {
                if v == best[c] {
                    format!("**{:.1}**", 100.0 * v)
                } else {
                    format!("{:.1}", 100.0 * v)
                }
            };
            let cells: Vec<String> = r.scores.iter().enumerate().map(|(c, &v)| cell(v, c)).collect();
            let role = serde_json::to_value(r.role)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            let trained = if r.speciality.is_empty() {
                "all".to_string()
            } else {
                r.speciality.join(", ")
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
    let task_opts = TaskOptions::default();
    let tasks: Vec<Task> = manifest
        .tasks(split, generate)
        .iter()
        .map(|p| Task::load(p, &task_opts))
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    for m in &manifest.models {
        let ckpt = Checkpoint::open(&manifest.model_dir(m))?;
        let model = Model::load(&ckpt)?;
        let tok = EvalTokenizer::from_checkpoint(&ckpt)?;
        let opts = EvalOptions {
            progress: false,
            generation_batch: 64,
            ..EvalOptions::default()
        };
        let eval = Evaluator::new(&model, &tok, opts);
        let scores: Vec<f64> = tasks
            .iter()
            .map(|t| eval.run(t).map(|r| r.primary()))
            .collect::<Result<_, _>>()?;
        let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
        rows.push(ReportRow {
            model: m.name.clone(),
            role: m.role,
            speciality: m.skills.iter().map(|s| s.name().to_string()).collect(),
            scores,
            mean,
        });
    }
    let metric = if generate { "exact_match" } else { "acc" }.to_string();
    Ok(ZooReport {
        split,
        metric,
        skills: manifest
            .skills
            .iter()
            .map(|s| s.name.name().to_string())
            .collect(),
        rows,
    })
}

//! The demo job: trains the synthetic-skills zoo ([`crate::zoo`]), merges the experts of its
//! one family with merge-method plugins loaded from their `.so` files, and scores every model and
//! every merge on the held-out test split — the merging half of the Model-GLUE recipe on the
//! built-in zoo, with the table that says whether merging beat the best single model. It also
//! shows the two ways merging goes wrong: an over-trained member dragging a merge down, and a
//! model of another shape refused by the merge plan.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::{MergeConfig, ParamMap, ParamValue};
use crate::merge::{MergeOptions, MergePlan};
use crate::plugins::Registry;
use crate::zoo::{self, Manifest, Preset, Role, Split, ZooReport};

/// One merge of the demo: a method, its members and their parameters.
struct DemoMerge {
    name: String,
    method: &'static str,
    members: Vec<String>,
    params: Vec<(&'static str, f64)>,
    base: bool,
}

fn params(pairs: &[(&str, f64)]) -> ParamMap {
    let mut m = ParamMap::new();
    for (k, v) in pairs {
        m.insert((*k).into(), ParamValue::Number(*v));
    }
    m
}

/// Runs the demo under `out` (the zoo in `out/zoo`, merges in `out/merged/`, the scores in
/// `out/report.json`) and returns the comparison (Markdown). `progress` gets one line per step.
pub fn run(
    registry: &Registry,
    out: &Path,
    preset: Preset,
    progress: &mut dyn FnMut(&str),
) -> Result<String> {
    let plan = zoo::synth_plan(preset, 0);
    progress(&format!(
        "training the synthetic zoo ({} models, about {:.0}s on 2 cores)",
        plan.models.len(),
        zoo::estimate_seconds(&plan)
    ));
    let manifest =
        zoo::build_synth(&plan, &out.join("zoo"), true, progress).context("building the demo zoo")?;
    let experts: Vec<String> = manifest
        .models
        .iter()
        .filter(|m| m.role == Role::Expert)
        .map(|m| m.name.clone())
        .collect();
    let overtrained: Vec<String> = manifest
        .models
        .iter()
        .filter(|m| m.role == Role::Overtrained)
        .map(|m| m.name.clone())
        .collect();
    let n = experts.len() as f64;
    let mut merges = vec![
        DemoMerge {
            name: "linear (mean)".into(),
            method: "linear",
            members: experts.clone(),
            params: vec![("weight", 1.0)],
            base: false,
        },
        DemoMerge {
            name: format!("task_arithmetic λ={:.2}", 1.0 / n),
            method: "task_arithmetic",
            members: experts.clone(),
            params: vec![("weight", 1.0 / n)],
            base: true,
        },
        DemoMerge {
            name: "ties d=0.5".into(),
            method: "ties",
            members: experts.clone(),
            params: vec![("weight", 1.0), ("density", 0.5)],
            base: true,
        },
    ];
    if !overtrained.is_empty() {
        let mut members = experts.clone();
        members.extend(overtrained.iter().cloned());
        merges.push(DemoMerge {
            name: format!("ties d=0.5 + {}", overtrained.join(", ")),
            method: "ties",
            members,
            params: vec![("weight", 1.0), ("density", 0.5)],
            base: true,
        });
    }
    let dir_of = |name: &str| -> Result<PathBuf> {
        let m = manifest
            .model(name)
            .with_context(|| format!("the demo zoo has no model `{name}`"))?;
        Ok(manifest.model_dir(m))
    };
    let base_dir = dir_of("base")?;
    let mut merged = Vec::new();
    for m in &merges {
        let models: Vec<(PathBuf, ParamMap)> = m
            .members
            .iter()
            .map(|n| Ok((dir_of(n)?, params(&m.params))))
            .collect::<Result<_>>()?;
        let config = MergeConfig::from_flags(
            m.method,
            &models,
            m.base.then(|| base_dir.clone()),
            ParamMap::new(),
            None,
            None,
        );
        let slug: String = m
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let mut opts = MergeOptions::new(out.join("merged").join(slug));
        opts.overwrite = true;
        let report = MergePlan::new(&config, registry)
            .with_context(|| format!("planning the merge `{}`", m.name))?
            .run(&opts, None)
            .with_context(|| format!("merging `{}`", m.name))?;
        progress(&format!(
            "merged `{}` ({} of {}) with the `{}` plugin in {:.2}s",
            m.name,
            m.members.len(),
            m.members.join(", "),
            m.method,
            report.seconds
        ));
        merged.push((m.name.clone(), report.out_dir));
    }
    // A model of another shape cannot be merged: the plan refuses it before reading a weight.
    let refused = {
        let wide = manifest
            .models
            .iter()
            .find(|m| m.role == Role::OtherShape)
            .map(|m| manifest.model_dir(m));
        wide.map(|w| {
            let config = MergeConfig::from_flags(
                "linear",
                &[
                    (base_dir.clone(), params(&[("weight", 1.0)])),
                    (w, params(&[("weight", 1.0)])),
                ],
                None,
                ParamMap::new(),
                None,
                None,
            );
            match MergePlan::new(&config, registry) {
                Ok(_) => "the plan accepted a model of another shape (a bug)".to_string(),
                Err(e) => e.to_string(),
            }
        })
    };

    progress("scoring every model and merge on the held-out test split");
    let report = zoo::report_with(&manifest, Split::Test, true, &merged)?;
    let json = out.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    Ok(summary(&manifest, &report, refused.as_deref()))
}

fn summary(manifest: &Manifest, report: &ZooReport, refused: Option<&str>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Synthetic zoo ({} models, family `a` mergeable) and merges of its experts: exact match % \
         of greedy answers on the held-out test split.\n",
        manifest.models.len()
    );
    s.push_str(&report.to_markdown());
    let best_single = report
        .rows
        .iter()
        .filter(|r| r.role != Role::Merged)
        .max_by(|a, b| a.mean.total_cmp(&b.mean));
    let best_merge = report
        .rows
        .iter()
        .filter(|r| r.role == Role::Merged)
        .max_by(|a, b| a.mean.total_cmp(&b.mean));
    if let (Some(single), Some(merge)) = (best_single, best_merge) {
        let _ = writeln!(
            s,
            "\nbest single model: `{}` (mean {:.1}); best merge: `{}` (mean {:.1}), {:+.1} points",
            single.model,
            100.0 * single.mean,
            merge.model,
            100.0 * merge.mean,
            100.0 * (merge.mean - single.mean)
        );
    }
    if let Some(e) = refused {
        let _ = writeln!(s, "merging `base` with `wide` (another shape) is refused: {e}");
    }
    s
}

//! `mglue zoo smollm2`: a zoo of real same-initialisation checkpoints — SmolLM2-135M-Instruct
//! and LoRA fine-tunes of it on three domains of `shared/data/train` (math: GSM8K worked
//! solutions; code: MBPP train programs; science: ARC validation questions), merged back into
//! full checkpoints — plus Qwen2.5-Coder-0.5B-Instruct and Gemma-3-270M, which share nothing with
//! it and can only be mixed.
//!
//! The adapters are trained once (the time is printed up front) and kept in the repository
//! (`zoo/smollm2/adapters/<domain>/`, PEFT layout), so building the zoo only merges them. Each
//! domain's last items are held out of training; the zoo's tasks score them by perplexity and
//! next-token accuracy of the reference continuation (format `loglikelihood`), and the held-out
//! ARC questions also as multiple choice.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::lora::{merge_adapter, Adapter, LoraConfig, LoraModel, LoraTrain, Row};
use super::{io, task_writer, Manifest, Role, ZooError, ZooModel, ZooSkill};
use crate::checkpoint::gguf::{convert_gguf, ConvertOptions};
use crate::checkpoint::{Checkpoint, DType};
use crate::eval::EvalTokenizer;

/// One training domain: where its text comes from and how it is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Domain {
    /// GSM8K worked solutions after `Question: …\nAnswer:` (the `gsm8k` task's prompt).
    Math,
    /// MBPP train programs after the bigcode docstring prompt (the `mbpp` task's prompt).
    Code,
    /// ARC-Easy and ARC-Challenge validation answers after `Question: …\nAnswer:` (the ARC tasks'
    /// prompt).
    Science,
}

impl Domain {
    /// Every domain, in table order.
    pub const ALL: [Domain; 3] = [Domain::Math, Domain::Code, Domain::Science];

    /// Its name in file names and tables.
    pub fn name(self) -> &'static str {
        match self {
            Domain::Math => "math",
            Domain::Code => "code",
            Domain::Science => "science",
        }
    }

    /// Items held out of training (the last ones of the domain's file).
    pub fn held_out(self) -> usize {
        match self {
            Domain::Math => 100,
            Domain::Code => 50,
            Domain::Science => 100,
        }
    }
}

/// A `context` → `continuation` pair of a domain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pair {
    /// Its id in the source file.
    pub id: String,
    /// What the model is given.
    pub context: String,
    /// What it should continue with (scored, and trained on).
    pub continuation: String,
    /// For ARC: the choices and the right one (the multiple-choice form of held-out items).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choices: Option<(Vec<String>, usize)>,
}

fn read_jsonl(path: &Path) -> Result<Vec<Value>, ZooError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| ZooError::Manifest {
                path: path.to_path_buf(),
                reason: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

fn field<'a>(row: &'a Value, key: &str, path: &Path) -> Result<&'a str, ZooError> {
    row[key].as_str().ok_or_else(|| ZooError::Manifest {
        path: path.to_path_buf(),
        reason: format!("an item has no string `{key}`"),
    })
}

/// The domain's pairs from `data_dir` (`shared/data/train`), split into (train, held out).
pub fn domain_pairs(domain: Domain, data_dir: &Path) -> Result<(Vec<Pair>, Vec<Pair>), ZooError> {
    let mut pairs = Vec::new();
    let mut held = Vec::new();
    match domain {
        Domain::Math => {
            let path = data_dir.join("gsm8k_train.jsonl");
            for row in read_jsonl(&path)? {
                pairs.push(Pair {
                    id: field(&row, "id", &path)?.to_string(),
                    context: format!("Question: {}\nAnswer:", field(&row, "prompt", &path)?),
                    continuation: format!(" {}", field(&row, "solution", &path)?),
                    choices: None,
                });
            }
        }
        Domain::Code => {
            let path = data_dir.join("mbpp_train.jsonl");
            for row in read_jsonl(&path)? {
                let test = row["test_list"][0].as_str().unwrap_or_default();
                pairs.push(Pair {
                    id: field(&row, "id", &path)?.to_string(),
                    context: format!("\"\"\"\n{}\n{test}\n\"\"\"\n", field(&row, "prompt", &path)?),
                    continuation: field(&row, "code", &path)?.replace("\r\n", "\n"),
                    choices: None,
                });
            }
        }
        Domain::Science => {
            // Easy first: the held-out items are the last ARC-Challenge ones.
            for file in ["arc_easy_validation.jsonl", "arc_challenge_validation.jsonl"] {
                let path = data_dir.join(file);
                for row in read_jsonl(&path)? {
                    let choices: Vec<String> = row["choices"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|c| c.as_str().map(String::from)).collect())
                        .unwrap_or_default();
                    let answer = row["answer_index"].as_u64().unwrap_or(u64::MAX) as usize;
                    let right = choices.get(answer).cloned().ok_or_else(|| ZooError::Manifest {
                        path: path.clone(),
                        reason: format!("item {}: answer_index out of range", row["id"]),
                    })?;
                    pairs.push(Pair {
                        id: field(&row, "id", &path)?.to_string(),
                        context: format!("Question: {}\nAnswer:", field(&row, "question", &path)?),
                        continuation: format!(" {right}"),
                        choices: Some((choices, answer)),
                    });
                }
            }
        }
    }
    let n = domain.held_out().min(pairs.len() / 2);
    held.extend(pairs.split_off(pairs.len() - n));
    Ok((pairs, held))
}

/// How the SmolLM2 zoo's adapters are trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmolPlan {
    /// The adapters' shape.
    pub lora: LoraConfig,
    /// The training of each domain's adapter (`steps` is the most; see `tokens`).
    pub train: LoraTrain,
    /// Training sequences are cut to this many tokens.
    pub max_tokens: usize,
    /// Sequence tokens each domain trains on: a domain of short items takes more steps, so every
    /// adapter costs about the same.
    pub tokens: usize,
}

impl SmolPlan {
    /// Optimiser steps for a domain whose sequences have `mean_tokens` tokens on average.
    pub fn steps(&self, mean_tokens: f64) -> usize {
        let steps = self.tokens as f64 / (self.train.batch as f64 * mean_tokens.max(1.0));
        (steps.round() as usize).clamp(1, self.train.steps)
    }
}

/// The plan the committed adapters were trained with.
pub fn smol_plan() -> SmolPlan {
    SmolPlan {
        lora: LoraConfig {
            rank: 8,
            alpha: 16.0,
            targets: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
            first_layer: 20,
        },
        train: LoraTrain {
            steps: 200,
            lr: 1.5e-3,
            warmup: 3,
            batch: 8,
            seed: 0,
        },
        max_tokens: 192,
        tokens: 60_000,
    }
}

/// Seconds of training per sequence token on 2 cores (measured on SmolLM2-135M with the top 10
/// blocks adapted).
const SECONDS_PER_TOKEN: f64 = 6.0e-3;

/// Training sequences (token ids, first predicted index) of a domain's training pairs.
pub fn rows(tok: &EvalTokenizer, pairs: &[Pair], max_tokens: usize) -> Result<Vec<Row>, ZooError> {
    pairs
        .iter()
        .map(|p| {
            let (mut ids, cont) = tok.encode_pair(&p.context, &p.continuation)?;
            let first = ids.len();
            ids.extend(cont);
            ids.truncate(max_tokens);
            Ok((ids, first.min(max_tokens.saturating_sub(1)).max(1)))
        })
        .collect()
}

/// The expected training time of the adapters of `domains`, in seconds.
pub fn estimate_seconds(plan: &SmolPlan, domains: usize) -> f64 {
    plan.tokens as f64 * SECONDS_PER_TOKEN * domains as f64
}

/// Trains one adapter per domain on the base checkpoint and writes them under
/// `adapters/<domain>/`.
pub fn train_adapters(
    base: &Checkpoint,
    data_dir: &Path,
    adapters: &Path,
    plan: &SmolPlan,
    domains: &[Domain],
    progress: &mut dyn FnMut(&str),
) -> Result<(), ZooError> {
    let tok = EvalTokenizer::from_checkpoint(base)?;
    progress(&format!(
        "training {} LoRA adapters on {} tokens each: about {:.0} min on 2 cores",
        domains.len(),
        plan.tokens,
        estimate_seconds(plan, domains.len()) / 60.0
    ));
    for &d in domains {
        let (train, _) = domain_pairs(d, data_dir)?;
        let rows = rows(&tok, &train, plan.max_tokens)?;
        let mean = rows.iter().map(|r| r.0.len()).sum::<usize>() as f64 / rows.len().max(1) as f64;
        let steps = plan.steps(mean);
        progress(&format!(
            "training the {} adapter: {} steps of {} sequences ({} training items, {:.0} tokens each on \
             average); about {:.0}s on 2 cores",
            d.name(),
            steps,
            plan.train.batch,
            rows.len(),
            mean,
            (steps * plan.train.batch) as f64 * mean * SECONDS_PER_TOKEN
        ));
        let start = Instant::now();
        let mut model = LoraModel::new(base, plan.lora.clone(), plan.train.seed + d as u64)?;
        let spec = LoraTrain {
            steps,
            seed: plan.train.seed + 10 * d as u64,
            ..plan.train.clone()
        };
        let mut step_seconds = Vec::with_capacity(steps);
        let mut last = Instant::now();
        let losses = model.train(&rows, &spec, &mut |step, loss| {
            step_seconds.push(last.elapsed().as_secs_f64());
            last = Instant::now();
            if step % 10 == 0 {
                tracing::info!(domain = d.name(), step, loss, "LoRA step");
            }
        })?;
        let first = losses.iter().take(10).sum::<f32>() / losses.len().clamp(1, 10) as f32;
        let last = losses.iter().rev().take(10).sum::<f32>() / losses.len().clamp(1, 10) as f32;
        let dir = model.save_adapter(&adapters.join(d.name()), "SmolLM2-135M-Instruct", DType::F16)?;
        let log = serde_json::json!({
            "domain": d.name(), "plan": plan, "steps": steps, "training_items": rows.len(),
            "mean_tokens": mean, "seconds": start.elapsed().as_secs_f64(), "losses": losses,
            "step_seconds": step_seconds, "trainable": model.trainable(),
        });
        let path = dir.join("training_log.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&log).expect("JSON serialises"),
        )
        .map_err(io(&path))?;
        progress(&format!(
            "trained the {} adapter ({} parameters) in {:.0}s: loss {first:.3} -> {last:.3}",
            d.name(),
            model.trainable(),
            start.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

/// Where the three source models are.
#[derive(Debug, Clone)]
pub struct Sources {
    /// SmolLM2-135M-Instruct GGUF.
    pub smollm2: PathBuf,
    /// Qwen2.5-Coder-0.5B-Instruct GGUF.
    pub qwen: PathBuf,
    /// Gemma-3-270M GGUF.
    pub gemma: PathBuf,
}

impl Sources {
    /// The files as `scripts/fetch-models.sh --qwen --gemma` leaves them in `cache`.
    pub fn in_cache(cache: &Path) -> Sources {
        Sources {
            smollm2: cache.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
            qwen: cache.join("Qwen2.5-Coder-0.5B-Instruct.gguf"),
            gemma: cache.join("gemma-3-270m-q4_k_m.gguf"),
        }
    }

    /// An error naming every missing file and the command that fetches it.
    pub fn check(&self) -> Result<(), ZooError> {
        let missing: Vec<String> = [&self.smollm2, &self.qwen, &self.gemma]
            .iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(ZooError::Io {
            path: PathBuf::from(missing.join(", ")),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not found; run `scripts/fetch-models.sh --qwen --gemma` (or pass --models-dir)",
            ),
        })
    }
}

fn loglik_toml(name: &str, file: &str) -> String {
    format!(
        "# A SmolLM2-zoo domain, held out of training: log-likelihood of the reference continuation;\n\
         # token_perplexity and token_acc (next-token accuracy) of its tokens.\n\
         name = \"{name}\"\nformat = \"loglikelihood\"\nfile = \"{file}\"\ntext = \"{{{{context}}}}\"\n\
         target = \"{{{{continuation}}}}\"\ntarget_delimiter = \"\"\nmetrics = [\"token_perplexity\", \"token_acc\"]\n"
    )
}

fn arc_toml(name: &str, file: &str) -> String {
    format!(
        "# Held-out ARC-Challenge validation questions, multiple choice as lm-eval's arc_challenge.\n\
         name = \"{name}\"\nformat = \"multiple_choice\"\nfile = \"{file}\"\n\
         text = \"Question: {{{{question}}}}\\nAnswer:\"\nchoices = \"choices\"\ntarget = \"answer_index\"\n\
         metrics = [\"acc\", \"acc_norm\"]\nprimary_metric = \"acc_norm\"\n"
    )
}

fn write_tasks(dir: &Path, data_dir: &Path) -> Result<Vec<ZooSkill>, ZooError> {
    let write = task_writer(dir)?;
    let mut skills = Vec::new();
    for d in Domain::ALL {
        let (_, held) = domain_pairs(d, data_dir)?;
        // The first half is the proxy split (what searches optimise), the rest the test split.
        let (proxy, test) = held.split_at(held.len() / 2);
        let n = d.name();
        for (split, items) in [("proxy", proxy), ("test", test)] {
            let mut jsonl = String::new();
            for p in items {
                let _ = writeln!(
                    jsonl,
                    "{}",
                    serde_json::json!({"id": p.id, "context": p.context, "continuation": p.continuation})
                );
            }
            write(&format!("{n}_{split}.jsonl"), &jsonl)?;
            write(
                &format!("{n}_{split}.toml"),
                &loglik_toml(&format!("smollm2_{n}_{split}"), &format!("{n}_{split}.jsonl")),
            )?;
            if d == Domain::Science {
                let mut mc = String::new();
                for p in items {
                    let (choices, answer) = p.choices.clone().unwrap_or_default();
                    let question = p
                        .context
                        .trim_start_matches("Question: ")
                        .trim_end_matches("\nAnswer:");
                    let _ = writeln!(
                        mc,
                        "{}",
                        serde_json::json!({"id": p.id, "question": question, "choices": choices, "answer_index": answer})
                    );
                }
                write(&format!("arc_{split}.jsonl"), &mc)?;
                write(
                    &format!("arc_{split}.toml"),
                    &arc_toml(&format!("smollm2_arc_{split}"), &format!("arc_{split}.jsonl")),
                )?;
            }
        }
        skills.push(ZooSkill {
            name: n.to_string(),
            description: format!("held-out {n} text: token perplexity and next-token accuracy"),
            proxy: PathBuf::from(format!("tasks/{n}_proxy.toml")),
            test: PathBuf::from(format!("tasks/{n}_test.toml")),
            proxy_generate: None,
            test_generate: None,
        });
    }
    skills.push(ZooSkill {
        name: "arc".into(),
        description: "held-out ARC-Challenge validation questions, multiple choice (acc_norm)".into(),
        proxy: PathBuf::from("tasks/arc_proxy.toml"),
        test: PathBuf::from("tasks/arc_test.toml"),
        proxy_generate: None,
        test_generate: None,
    });
    Ok(skills)
}

/// Builds the SmolLM2 zoo into `out`: the three source models converted, one expert per adapter
/// under `adapters/` merged into SmolLM2, the held-out tasks and `zoo.toml`. Built in a
/// temporary directory beside `out` and renamed into place when whole.
pub fn build_smollm2(
    sources: &Sources,
    adapters: &Path,
    data_dir: &Path,
    out: &Path,
    overwrite: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Manifest, ZooError> {
    sources.check()?;
    super::atomic_build(out, overwrite, |dir| {
        let skills = write_tasks(dir, data_dir)?;
        let models_dir = dir.join("models");
        let mut models = Vec::new();
        // SmolLM2 in float32, so its experts are exactly base + adapter; the others in bfloat16
        // (half the disk; their GGUF weights are 4- to 8-bit quantised anyway).
        let mut convert = |name: &str, src: &Path, role: Role, family: &str| -> Result<(), ZooError> {
            let start = Instant::now();
            let path = PathBuf::from("models").join(name);
            let opts = ConvertOptions {
                dtype: if family == "smollm2" {
                    DType::F32
                } else {
                    DType::BF16
                },
                overwrite: false,
            };
            convert_gguf(src, &dir.join(&path), &opts).map_err(|e| ZooError::Manifest {
                path: src.to_path_buf(),
                reason: format!("cannot convert: {e}"),
            })?;
            progress(&format!(
                "converted {} into `{name}` in {:.0}s",
                src.display(),
                start.elapsed().as_secs_f64()
            ));
            models.push(ZooModel {
                name: name.into(),
                path,
                role,
                family: family.into(),
                parent: None,
                skills: Vec::new(),
                steps: 0,
                final_loss: None,
            });
            Ok(())
        };
        convert("smollm2", &sources.smollm2, Role::Base, "smollm2")?;
        convert("qwen2.5_coder", &sources.qwen, Role::OtherShape, "qwen2")?;
        convert("gemma3", &sources.gemma, Role::OtherShape, "gemma3")?;
        let base = Checkpoint::open(&models_dir.join("smollm2"))?;
        let mut experts = 0;
        for d in Domain::ALL {
            let adir = adapters.join(d.name());
            if !adir.join("adapter_config.json").is_file() {
                progress(&format!("no {} adapter at {}; skipped", d.name(), adir.display()));
                continue;
            }
            let adapter = Adapter::load(&adir)?;
            let name = format!("smollm2_{}", d.name());
            let path = PathBuf::from("models").join(&name);
            merge_adapter(&base, &adapter, &dir.join(&path), false)?;
            progress(&format!("merged the {} adapter into `{name}`", d.name()));
            experts += 1;
            let mut skills = vec![d.name().to_string()];
            if d == Domain::Science {
                skills.push("arc".into());
            }
            models.insert(
                experts,
                ZooModel {
                    name,
                    path,
                    role: Role::Expert,
                    family: "smollm2".into(),
                    parent: Some("smollm2".into()),
                    skills,
                    steps: 0,
                    final_loss: None,
                },
            );
        }
        Ok(Manifest {
            kind: "smollm2".into(),
            seed: 0,
            preset: None,
            skills,
            models,
            dir: dir.to_path_buf(),
        })
    })
}

//! Model zoos made here: `mglue zoo synth` trains a tiny-Llama zoo on procedurally generated
//! skills in minutes on CPU — a base, domain experts fine-tuned from it (mergeable), an
//! over-trained expert (harmful to merge), a model of another initialisation and one of another
//! shape (mixable only) — and writes it with a manifest ([`Manifest`], `zoo.toml`) and the proxy
//! and test task files every other command takes as input. `mglue zoo report` scores every model
//! on every skill.
//!
//! ```no_run
//! use modelglue::zoo::{self, Preset};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let manifest = zoo::build_synth(&zoo::synth_plan(Preset::Ci, 0), "zoo".as_ref(), true, &mut |l| eprintln!("{l}"))?;
//! let report = zoo::report(&manifest, zoo::Split::Test, false)?;
//! println!("{}", report.to_markdown());
//! # Ok(())
//! # }
//! ```

mod autograd;
pub mod lora;
mod report;
pub mod skills;
pub mod smollm2;
mod train;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use report::{report, report_models, report_with, ReportRow, ZooReport};
pub use skills::{Example, Rng, Skill};
pub use train::{Shape, TrainModel, TrainSpec};

use crate::checkpoint::{Checkpoint, CheckpointError};

/// What can go wrong making or reading a zoo.
#[derive(Debug, thiserror::Error)]
pub enum ZooError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is malformed or names something that is not there.
    #[error("zoo manifest {path}: {reason}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Training produced a non-finite loss.
    #[error("training diverged at step {step} (loss {loss}); lower the learning rate")]
    Diverged {
        /// The step.
        step: usize,
        /// The loss seen.
        loss: f32,
    },
    /// Text outside the zoo vocabulary.
    #[error("{text:?} has characters outside the zoo vocabulary")]
    Vocabulary {
        /// The text.
        text: String,
    },
    /// Reading or writing a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Scoring a model failed.
    #[error(transparent)]
    Eval(Box<crate::eval::EvalError>),
    /// Running a model failed.
    #[error(transparent)]
    Runtime(Box<crate::runtime::RuntimeError>),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<crate::eval::EvalError> for ZooError {
    fn from(e: crate::eval::EvalError) -> ZooError {
        ZooError::Eval(Box::new(e))
    }
}

impl From<crate::runtime::RuntimeError> for ZooError {
    fn from(e: crate::runtime::RuntimeError) -> ZooError {
        ZooError::Runtime(Box::new(e))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ZooError + '_ {
    move |source| ZooError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How big a synthetic zoo is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// The full zoo (the demo's and the recipe's input): about 5 minutes on 2 cores.
    Full,
    /// A reduced zoo for tests: a base, two experts, an alien and a wide model, in about a
    /// minute.
    Ci,
}

/// What a model is in the zoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The shared initialisation of its family.
    Base,
    /// Fine-tuned from a base on one or two skills: merges well with its siblings.
    Expert,
    /// Fine-tuned far too long at too high a rate: its skill is strong but it is harmful to merge.
    Overtrained,
    /// Same shape as the base, another initialisation: cannot be merged, only mixed.
    Alien,
    /// Another shape: cannot be merged, only mixed.
    OtherShape,
    /// Made by merging models of the zoo (reports of merges; not built by `zoo synth`).
    Merged,
}

/// Where a model's training starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// Fresh random weights from this seed.
    Fresh(u64),
    /// Another model of the zoo (built before it).
    From(String),
}

/// One model of a zoo plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPlan {
    /// Its name (also its directory under `models/`).
    pub name: String,
    /// What it is.
    pub role: Role,
    /// Models of one family share an initialisation (merge candidates).
    pub family: String,
    /// Its shape.
    pub shape: Shape,
    /// Where training starts.
    pub init: Init,
    /// How it is trained.
    pub train: TrainSpec,
}

impl ModelPlan {
    /// The skills it was trained on with weight ≥ 0.5 of the largest (its specialities).
    pub fn skills(&self) -> Vec<Skill> {
        let max = self.train.mixture.iter().map(|m| m.1).fold(0.0, f64::max);
        self.train
            .mixture
            .iter()
            .filter(|m| m.1 >= 0.5 * max)
            .map(|m| m.0)
            .collect()
    }
}

/// A whole synthetic zoo: what to train, and the evaluation splits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthPlan {
    /// The preset it came from.
    pub preset: Preset,
    /// Seed of everything (data, initialisations, splits).
    pub seed: u64,
    /// Proxy items per skill.
    pub proxy_items: usize,
    /// Test items per skill.
    pub test_items: usize,
    /// The models, in build order.
    pub models: Vec<ModelPlan>,
}

impl SynthPlan {
    /// Optimiser steps of all models together, weighted by their cost.
    pub fn work(&self) -> f64 {
        self.models
            .iter()
            .map(|m| (m.train.steps * m.train.batch * m.shape.parameters()) as f64)
            .sum()
    }
}

/// Seconds the plan takes to train on 2 cores (measured rate of this trainer).
pub fn estimate_seconds(plan: &SynthPlan) -> f64 {
    plan.work() / SECONDS_RATE
}

/// Parameter-examples per second the trainer sustains on 2 cores (measured, `zoo synth`).
const SECONDS_RATE: f64 = 2.0e8;

/// The plan of a synthetic zoo.
pub fn synth_plan(preset: Preset, seed: u64) -> SynthPlan {
    let small = Shape {
        hidden: 64,
        layers: 4,
        heads: 4,
        ffn: 192,
    };
    let wide = Shape {
        hidden: 96,
        layers: 3,
        heads: 4,
        ffn: 256,
    };
    let all: Vec<(Skill, f64)> = Skill::ALL.iter().map(|&s| (s, 1.0)).collect();
    // The base sees little of the easiest skill, so that its expert has something to add.
    let base_mix: Vec<(Skill, f64)> = Skill::ALL
        .iter()
        .map(|&s| (s, if s == Skill::Swap { 0.2 } else { 1.0 }))
        .collect();
    let (base_steps, ft_steps, proxy_items, test_items) = match preset {
        Preset::Full => (250, 400, 100, 200),
        Preset::Ci => (250, 300, 40, 60),
    };
    let spec = |steps: usize, lr: f64, mixture: Vec<(Skill, f64)>, seed: u64| TrainSpec {
        steps,
        lr,
        warmup: (steps / 10).max(1),
        batch: 64,
        weight_decay: 0.0,
        mixture,
        seed,
    };
    let model =
        |name: &str, role: Role, family: &str, shape: Shape, init: Init, train: TrainSpec| ModelPlan {
            name: name.to_string(),
            role,
            family: family.to_string(),
            shape,
            init,
            train,
        };
    let base = |name: &str| Init::From(name.to_string());
    let expert = |name: &str, skills: &[Skill], k: u64| {
        // Mostly the speciality, a little replay of everything so the expert stays near the base.
        let mut mix: Vec<(Skill, f64)> = Skill::ALL.iter().map(|&s| (s, 0.05)).collect();
        for m in &mut mix {
            if skills.contains(&m.0) {
                m.1 = 1.0;
            }
        }
        model(
            name,
            Role::Expert,
            "a",
            small,
            base("base"),
            spec(ft_steps, 2e-3, mix, seed + 100 + k),
        )
    };
    let mut models = vec![model(
        "base",
        Role::Base,
        "a",
        small,
        Init::Fresh(seed + 1),
        spec(base_steps, 3e-3, base_mix, seed + 2),
    )];
    match preset {
        Preset::Full => {
            models.push(expert("pred", &[Skill::Predecessor], 0));
            models.push(expert("rev", &[Skill::Reverse], 1));
            models.push(expert("succ", &[Skill::Successor], 2));
            models.push(expert("swap", &[Skill::Swap], 3));
            models.push(expert("dup", &[Skill::Double], 4));
            models.push(expert("rev_swap", &[Skill::Reverse, Skill::Swap], 5));
            models.push(model(
                "rev_overtrained",
                Role::Overtrained,
                "a",
                small,
                base("base"),
                spec(ft_steps * 2, 1e-2, vec![(Skill::Reverse, 1.0)], seed + 106),
            ));
        }
        Preset::Ci => {
            models.push(expert("rev", &[Skill::Reverse], 1));
            models.push(expert("dup", &[Skill::Double], 4));
        }
    }
    // The models that merge with nothing: trained on everything, as long as the base (a third
    // of that in the reduced zoo).
    let outsider_steps = if preset == Preset::Full {
        base_steps
    } else {
        base_steps / 3
    };
    let outsider = |name: &str, role: Role, family: &str, shape: Shape, k: u64| {
        let train = spec(outsider_steps, 3e-3, all.clone(), seed + k + 1);
        model(name, role, family, shape, Init::Fresh(seed + k), train)
    };
    models.push(outsider("alien", Role::Alien, "b", small, 7));
    models.push(outsider("wide", Role::OtherShape, "c", wide, 9));
    SynthPlan {
        preset,
        seed,
        proxy_items,
        test_items,
        models,
    }
}

/// One model of a built zoo, as its manifest lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZooModel {
    /// Its name.
    pub name: String,
    /// Its checkpoint directory, relative to the manifest.
    pub path: PathBuf,
    /// What it is.
    pub role: Role,
    /// Models of one family share an initialisation.
    pub family: String,
    /// The model it was fine-tuned from, if any.
    #[serde(default)]
    pub parent: Option<String>,
    /// Its specialities (skill names of the manifest).
    #[serde(default)]
    pub skills: Vec<String>,
    /// Optimiser steps it was trained for here (0: made without training).
    #[serde(default)]
    pub steps: usize,
    /// Final training loss (mean of the last 20 steps), if trained here.
    #[serde(default)]
    pub final_loss: Option<f32>,
}

/// One skill of a built zoo and its task files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZooSkill {
    /// The skill's name (a [`Skill::name`] in a synthetic zoo, a domain in the SmolLM2 zoo).
    pub name: String,
    /// What it asks.
    pub description: String,
    /// The proxy task (TOML, relative to the manifest): what searches optimise.
    pub proxy: PathBuf,
    /// The held-out test task (TOML, relative to the manifest): what reports show.
    pub test: PathBuf,
    /// The proxy items as a generation task (greedy, exact match), where there is one.
    #[serde(default)]
    pub proxy_generate: Option<PathBuf>,
    /// The test items as a generation task (greedy, exact match), where there is one.
    #[serde(default)]
    pub test_generate: Option<PathBuf>,
}

/// `zoo.toml`: the models of a zoo, their skills and the task files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The zoo's kind (`synth`, `smollm2`).
    pub kind: String,
    /// The seed it was built from.
    pub seed: u64,
    /// The preset it was built from (synthetic zoos).
    #[serde(default)]
    pub preset: Option<Preset>,
    /// The skills.
    #[serde(rename = "skill")]
    pub skills: Vec<ZooSkill>,
    /// The models.
    #[serde(rename = "model")]
    pub models: Vec<ZooModel>,
    /// Where the manifest was read from (directory paths are relative to).
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Manifest {
    /// Reads `zoo.toml` (or the `zoo.toml` inside a directory) and checks the files it names.
    pub fn load(path: &Path) -> Result<Manifest, ZooError> {
        let path = if path.is_dir() {
            path.join("zoo.toml")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let mut m: Manifest = toml::from_str(&text).map_err(|e| ZooError::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        m.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        for model in &m.models {
            if !m.dir.join(&model.path).join("config.json").is_file() {
                return Err(ZooError::Manifest {
                    path: path.clone(),
                    reason: format!(
                        "model `{}`: {} has no config.json; rebuild the zoo",
                        model.name,
                        m.dir.join(&model.path).display()
                    ),
                });
            }
        }
        for skill in &m.skills {
            let generated = [&skill.proxy_generate, &skill.test_generate];
            for task in [&skill.proxy, &skill.test]
                .into_iter()
                .chain(generated.into_iter().flatten())
            {
                if !m.dir.join(task).is_file() {
                    return Err(ZooError::Manifest {
                        path: path.clone(),
                        reason: format!("skill `{}`: task file {} is missing", skill.name, task.display()),
                    });
                }
            }
        }
        Ok(m)
    }

    /// The model called `name`.
    pub fn model(&self, name: &str) -> Option<&ZooModel> {
        self.models.iter().find(|m| m.name == name)
    }

    /// A model's checkpoint directory.
    pub fn model_dir(&self, model: &ZooModel) -> PathBuf {
        self.dir.join(&model.path)
    }

    /// The task files of a split, in skill order: the skill's own task, or with `generate` the
    /// same items generated greedily (exact match) where the skill has that form.
    pub fn tasks(&self, split: Split, generate: bool) -> Vec<PathBuf> {
        self.skills
            .iter()
            .map(|s| {
                let (own, generated) = match split {
                    Split::Proxy => (&s.proxy, &s.proxy_generate),
                    Split::Test => (&s.test, &s.test_generate),
                };
                self.dir.join(match generated {
                    Some(g) if generate => g,
                    _ => own,
                })
            })
            .collect()
    }
}

/// Which evaluation split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// What searches optimise.
    Proxy,
    /// Held out for final reports.
    Test,
}

fn mc_toml(name: &str, file: &str) -> String {
    format!(
        "# A synthetic-zoo skill, multiple choice: the log-likelihood of each answer (and its newline)\n\
         # after the prompt; acc is the fraction of items whose right answer scores highest.\n\
         name = \"{name}\"\nformat = \"multiple_choice\"\nfile = \"{file}\"\ntext = \"{{{{prompt}}}}\"\n\
         choices = \"choices\"\ntarget = \"answer_index\"\ntarget_delimiter = \"\"\nmetrics = [\"acc\"]\n"
    )
}

fn generate_toml(name: &str, file: &str) -> String {
    format!(
        "# A synthetic-zoo skill, generated: greedy generation until the newline, exact match.\n\
         name = \"{name}\"\nformat = \"generate\"\nfile = \"{file}\"\ntext = \"{{{{prompt}}}}\"\n\
         target = \"{{{{answer}}}}\"\nmetrics = [\"exact_match\"]\n\n[generation]\nuntil = [\"\\n\"]\n\
         max_gen_toks = 8\nanswer_regex = '.*'\n"
    )
}

/// Creates `dir/tasks` and returns a function writing a named file into it.
fn task_writer(dir: &Path) -> Result<impl Fn(&str, &str) -> Result<(), ZooError>, ZooError> {
    let tasks = dir.join("tasks");
    std::fs::create_dir_all(&tasks).map_err(io(&tasks))?;
    Ok(move |name: &str, text: &str| {
        let path = tasks.join(name);
        std::fs::write(&path, text).map_err(io(&path))
    })
}

fn write_tasks(
    dir: &Path,
    plan: &SynthPlan,
    held_out: &mut HashSet<String>,
) -> Result<Vec<ZooSkill>, ZooError> {
    let write = task_writer(dir)?;
    let mut out = Vec::new();
    for skill in Skill::ALL {
        let s = skills::splits(skill, plan.seed, plan.proxy_items, plan.test_items, held_out);
        let mut rng = Rng::new(plan.seed ^ 0xc401ce ^ skill as u64);
        for (split, items) in [("proxy", &s.proxy), ("test", &s.test)] {
            let mut jsonl = String::new();
            for (i, e) in items.iter().enumerate() {
                let mut choices: Vec<String> = e.wrong.iter().map(|w| format!("{w}\n")).collect();
                let answer_index = rng.below(choices.len() + 1);
                choices.insert(answer_index, format!("{}\n", e.answer));
                let row = serde_json::json!({
                    "id": format!("{}-{split}-{i}", skill.name()), "prompt": e.prompt, "answer": e.answer,
                    "choices": choices, "answer_index": answer_index
                });
                let _ = writeln!(jsonl, "{row}");
            }
            let (n, file) = (skill.name(), format!("{}_{split}.jsonl", skill.name()));
            write(&file, &jsonl)?;
            write(
                &format!("{n}_{split}.toml"),
                &mc_toml(&format!("synth_{n}_{split}"), &file),
            )?;
            write(
                &format!("{n}_{split}_gen.toml"),
                &generate_toml(&format!("synth_{n}_{split}_gen"), &file),
            )?;
        }
        let n = skill.name();
        out.push(ZooSkill {
            name: n.to_string(),
            description: skill.description().to_string(),
            proxy: PathBuf::from(format!("tasks/{n}_proxy.toml")),
            test: PathBuf::from(format!("tasks/{n}_test.toml")),
            proxy_generate: Some(PathBuf::from(format!("tasks/{n}_proxy_gen.toml"))),
            test_generate: Some(PathBuf::from(format!("tasks/{n}_test_gen.toml"))),
        });
    }
    Ok(out)
}

fn train_one(m: &ModelPlan, dir: &Path, held_out: &HashSet<String>) -> Result<(ZooModel, String), ZooError> {
    let start = Instant::now();
    let mut model = match &m.init {
        Init::Fresh(seed) => TrainModel::init(m.shape, *seed)?,
        Init::From(parent) => {
            let ckpt = Checkpoint::open(&dir.join("models").join(parent))?;
            TrainModel::from_checkpoint(&ckpt, m.shape)?
        }
    };
    let losses = model.train(&m.train, held_out)?;
    let tail = &losses[losses.len().saturating_sub(20)..];
    let final_loss = tail.iter().sum::<f32>() / tail.len().max(1) as f32;
    let path = PathBuf::from("models").join(&m.name);
    model.save(&dir.join(&path), false)?;
    let line = format!(
        "trained `{}` ({:?}, {} parameters): {} steps in {:.1}s, loss {:.3} -> {:.3}",
        m.name,
        m.role,
        m.shape.parameters(),
        m.train.steps,
        start.elapsed().as_secs_f64(),
        losses.first().copied().unwrap_or(f32::NAN),
        final_loss
    );
    let zm = ZooModel {
        name: m.name.clone(),
        path,
        role: m.role,
        family: m.family.clone(),
        parent: match &m.init {
            Init::From(p) => Some(p.clone()),
            Init::Fresh(_) => None,
        },
        skills: if m.role == Role::Base {
            Vec::new()
        } else {
            m.skills().iter().map(|s| s.name().to_string()).collect()
        },
        steps: m.train.steps,
        final_loss: Some(final_loss),
    };
    Ok((zm, line))
}

/// Trains the zoo of `plan` into `out` (models under `models/`, tasks under `tasks/`, manifest
/// `zoo.toml`), logging each model's time and loss. The zoo is built in a temporary directory
/// beside `out` and renamed into place when complete; an existing `out` is an error unless
/// `overwrite`.
pub fn build_synth(
    plan: &SynthPlan,
    out: &Path,
    overwrite: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Manifest, ZooError> {
    atomic_build(out, overwrite, |dir| build_into(plan, dir, progress))
}

/// Runs `build` on a fresh temporary directory beside `out`, writes the manifest it returns as
/// `zoo.toml` there, and renames the directory to `out` (replacing it only with `overwrite`); on
/// failure the temporary directory is removed and `out` is untouched.
fn atomic_build(
    out: &Path,
    overwrite: bool,
    build: impl FnOnce(&Path) -> Result<Manifest, ZooError>,
) -> Result<Manifest, ZooError> {
    if out.exists() && !overwrite {
        return Err(ZooError::Io {
            path: out.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists; pass --overwrite to replace it",
            ),
        });
    }
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("zoo");
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = parent.join(format!(".{name}.mglue-partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let result = build(&tmp).and_then(|manifest| {
        let header = match manifest.preset {
            Some(p) => format!(
                "# A synthetic-skills zoo made by `mglue zoo synth` (preset {p:?}, seed {}).\n",
                manifest.seed
            ),
            None => format!("# A model zoo made by `mglue zoo {}`.\n", manifest.kind),
        };
        let text = header + &toml::to_string_pretty(&manifest).expect("the manifest serialises");
        let path = tmp.join("zoo.toml");
        std::fs::write(&path, text).map_err(io(&path))?;
        Ok(manifest)
    });
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(io(out))?;
    }
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(Manifest {
        dir: out.to_path_buf(),
        ..manifest
    })
}

fn build_into(plan: &SynthPlan, dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<Manifest, ZooError> {
    let mut held_out = HashSet::new();
    let skills = write_tasks(dir, plan, &mut held_out)?;
    // One model per core: the models are far too small for candle's intra-op threads, whose
    // spinning barrier costs more than the arithmetic (measured: 6x slower on a loaded machine).
    // The pool is created on first use, so this only takes effect before any tensor work.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut done: Vec<Option<ZooModel>> = vec![None; plan.models.len()];
    while done.iter().any(Option::is_none) {
        let ready: Vec<usize> = (0..plan.models.len())
            .filter(|&i| done[i].is_none())
            .filter(|&i| match &plan.models[i].init {
                Init::Fresh(_) => true,
                Init::From(p) => plan
                    .models
                    .iter()
                    .zip(&done)
                    .any(|(m, d)| &m.name == p && d.is_some()),
            })
            .take(jobs)
            .collect();
        if ready.is_empty() {
            return Err(ZooError::Manifest {
                path: dir.join("zoo.toml"),
                reason: "a model starts from a model the plan does not build".into(),
            });
        }
        let results: Vec<Result<(ZooModel, String), ZooError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = ready
                .iter()
                .map(|&i| {
                    let (m, held) = (&plan.models[i], &held_out);
                    scope.spawn(move || train_one(m, dir, held))
                })
                .collect();
            handles
                .into_iter()
                // A panic in training is a bug: it goes on as that same panic, not as an error.
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        for (&i, r) in ready.iter().zip(results) {
            let (model, line) = r?;
            progress(&line);
            done[i] = Some(model);
        }
    }
    let models: Vec<ZooModel> = done.into_iter().flatten().collect();
    Ok(Manifest {
        kind: "synth".into(),
        seed: plan.seed,
        preset: Some(plan.preset),
        skills,
        models,
        dir: dir.to_path_buf(),
    })
}

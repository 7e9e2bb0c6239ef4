//! The command line: the only file that knows clap. Prints results on stdout, logs and
//! progress on stderr; errors print their whole chain and exit with status 2.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use modelglue::checkpoint::{self, DType};
use modelglue::config::{parse_model_flag, parse_param_flag, MergeConfig, ParamMap};
use modelglue::merge::{MergeOptions, MergePlan};
use modelglue::plugins::{Discovery, PluginLock, Registry};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "mglue",
    version,
    about = "Merge, mix and search LLM checkpoints with plugins (Model-GLUE in Rust)"
)]
struct Cli {
    /// A directory to load plugins from (repeatable; searched before MGLUE_PLUGIN_PATH and the executable's directory).
    #[arg(long = "plugin-dir", global = true, value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// Load plugins from directories that every user can write to.
    #[arg(long, global = true)]
    allow_insecure_plugin_dir: bool,
    /// Load only the plugin libraries whose sha256 is in this lock file (see `mglue plugins lock`).
    #[arg(long, global = true, value_name = "LOCKFILE", num_args = 0..=1, default_missing_value = "mglue-plugins.lock")]
    locked: Option<PathBuf>,
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge models with a merge-method plugin, from a mergekit YAML config or from flags.
    Merge(MergeArgs),
    /// List or inspect the loaded plugins.
    #[command(subcommand)]
    Plugins(PluginsCommand),
    /// Convert a GGUF file into a Hugging Face safetensors directory.
    Convert(ConvertArgs),
    /// Generate text with a model (greedy or sampled; chat template when the model has one).
    Generate(GenerateArgs),
    /// Score a model on benchmark tasks as lm-evaluation-harness does (tasks are TOML files).
    Eval(EvalArgs),
    /// Per-token log-probabilities and perplexity of a text under a model.
    Score(ScoreArgs),
    /// Run the demo: train the synthetic zoo, merge its experts with plugins, compare them all.
    Demo(DemoArgs),
    /// Make a model zoo (a synthetic-skills zoo trained here on CPU) or report on one.
    #[command(subcommand)]
    Zoo(ZooCommand),
}

#[derive(Subcommand)]
enum ZooCommand {
    /// Train the synthetic-skills zoo: a tiny-Llama base, skill experts fine-tuned from it, an
    /// over-trained expert, a model of another initialisation and one of another shape.
    Synth {
        /// Where to write the zoo (models/, tasks/, zoo.toml).
        #[arg(long, default_value = "target/zoo/synth")]
        out: PathBuf,
        /// How big: `full` (about 5 minutes on 2 cores) or `ci` (under a minute).
        #[arg(long, value_enum, default_value = "full")]
        preset: modelglue::zoo::Preset,
        /// Seed of the data, the initialisations and the splits.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Replace an existing zoo at `--out`.
        #[arg(long)]
        overwrite: bool,
        /// Skip the report after building.
        #[arg(long)]
        no_report: bool,
        /// Train this plan (TOML, as `--print-plan` writes it) instead of a preset's.
        #[arg(long, conflicts_with_all = ["preset", "seed"])]
        plan: Option<PathBuf>,
        /// Print the plan as TOML (edit it and pass it back with `--plan`) and train nothing.
        #[arg(long)]
        print_plan: bool,
    },
    /// Build the SmolLM2 zoo: SmolLM2-135M-Instruct, its LoRA experts (math, code, science)
    /// merged into full checkpoints, and Qwen2.5-Coder-0.5B and Gemma-3-270M as unmergeable
    /// members. Needs `scripts/fetch-models.sh --qwen --gemma`.
    Smollm2 {
        /// Where to write the zoo (models/, tasks/, zoo.toml).
        #[arg(long, default_value = "target/zoo/smollm2")]
        out: PathBuf,
        /// The LoRA adapters, one directory per domain (PEFT layout).
        #[arg(long, default_value = "zoo/smollm2/adapters")]
        adapters: PathBuf,
        /// The training text (`shared/data/train`).
        #[arg(long, default_value = "../shared/data/train")]
        data: PathBuf,
        /// Where the GGUF files are (default: $MGLUE_MODEL_CACHE, else .cache/models).
        #[arg(long)]
        models_dir: Option<PathBuf>,
        /// Train the adapters again into `--adapters` first (slow: the time is printed first).
        #[arg(long)]
        train: bool,
        /// Only train the adapters; build no zoo.
        #[arg(long, requires = "train")]
        train_only: bool,
        /// Optimiser steps per adapter (default: the plan's).
        #[arg(long)]
        steps: Option<usize>,
        /// With `--train`: only these domains (repeatable; default: math, code, science).
        #[arg(long = "domain", value_enum)]
        domains: Vec<modelglue::zoo::smollm2::Domain>,
        /// Replace an existing zoo at `--out`.
        #[arg(long)]
        overwrite: bool,
        /// Skip the report after building.
        #[arg(long)]
        no_report: bool,
    },
    /// Score every model of a zoo on every skill (exact match, %).
    Report {
        /// The zoo's manifest (`zoo.toml`) or its directory.
        #[arg(long, default_value = "target/zoo/synth")]
        zoo: PathBuf,
        /// Which split: `test` (held out) or `proxy` (what searches optimise).
        #[arg(long, value_enum, default_value = "test")]
        split: modelglue::zoo::Split,
        /// Score the multiple-choice form (acc over four answers) instead of greedy generations
        /// (exact match).
        #[arg(long)]
        choice: bool,
        /// Only the first N items of each task.
        #[arg(long)]
        limit: Option<usize>,
        /// Only these models (repeatable; default: all).
        #[arg(long = "model")]
        models: Vec<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// Name, kind, version and file of every plugin found.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write the sha256 of every plugin library in use to a lock file (for `--locked`).
    Lock {
        /// The lock file.
        #[arg(long, default_value = "mglue-plugins.lock")]
        out: PathBuf,
    },
    /// A plugin's description and parameter schema.
    Show {
        /// The plugin name.
        name: String,
        /// Print the JSON Schemas as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct MergeArgs {
    /// A mergekit YAML config (model paths relative to the file).
    config: Option<PathBuf>,
    /// The output directory (written whole or not at all).
    #[arg(long, short)]
    out: PathBuf,
    /// The merge method (flag form), e.g. linear.
    #[arg(long)]
    method: Option<String>,
    /// A model and its parameters (flag form): PATH or PATH:weight=0.5,density=0.3 (repeatable).
    #[arg(long = "model", value_name = "PATH[:K=V,...]")]
    models: Vec<String>,
    /// The base model (flag form).
    #[arg(long)]
    base: Option<PathBuf>,
    /// A global parameter (flag form), e.g. normalize=false or t=[0,0.5,1] (repeatable).
    #[arg(long = "param", value_name = "K=V")]
    params: Vec<String>,
    /// Cast every input to this dtype at load (float32, bfloat16, float16).
    #[arg(long)]
    dtype: Option<String>,
    /// Cast the output to this dtype.
    #[arg(long)]
    out_dtype: Option<String>,
    /// Maximum size of one output shard (e.g. 5GB, 500MB, 1000000).
    #[arg(long, default_value = "5GB")]
    out_shard_size: String,
    /// Replace the output directory if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Seed for random methods (DARE, DELLA).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Validate and print the plan without reading any weight.
    #[arg(long)]
    dry_run: bool,
    /// Merge inputs holding NaN/Inf (and write outputs holding them) with a warning instead of
    /// stopping with an error that names the file and tensor.
    #[arg(long)]
    allow_nonfinite: bool,
}

#[derive(Args)]
struct ConvertArgs {
    /// The GGUF file.
    input: PathBuf,
    /// The output directory.
    out: PathBuf,
    /// Stored dtype of the converted weights.
    #[arg(long, default_value = "float32")]
    dtype: String,
    /// Replace the output directory if it exists.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// The model directory (Hugging Face layout).
    #[arg(long)]
    model: PathBuf,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the output contains this string (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Use the prompt as is, without the model's chat template.
    #[arg(long)]
    raw: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// The model directory (Hugging Face layout).
    #[arg(long)]
    model: PathBuf,
    /// A task: a TOML file, or the name of one in ./tasks or $MGLUE_TASKS (repeatable).
    #[arg(long = "task", required = true)]
    tasks: Vec<String>,
    /// Only the first N items of each task.
    #[arg(long)]
    limit: Option<usize>,
    /// Overrides the task's few-shot count.
    #[arg(long)]
    num_fewshot: Option<usize>,
    /// Where per-model scores are cached (by the model's content hash).
    #[arg(long, default_value = ".cache/scores")]
    cache_dir: PathBuf,
    /// Do not read or write the score cache.
    #[arg(long)]
    no_cache: bool,
    /// Print the full report (per-item results) as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ScoreArgs {
    /// The model directory (Hugging Face layout).
    #[arg(long)]
    model: PathBuf,
    /// The text to score.
    #[arg(long)]
    text: String,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Where to write the demo zoo and the merges.
    #[arg(long, default_value = "target/demo")]
    out: PathBuf,
    /// The zoo to train: `full` (a few minutes on 2 cores) or `ci` (about a minute).
    #[arg(long, value_enum, default_value = "full")]
    preset: modelglue::zoo::Preset,
}

fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (_, 0) => "warn",
        (_, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim().to_ascii_uppercase();
    let (num, mult) = [
        ("TB", 1e12),
        ("GB", 1e9),
        ("MB", 1e6),
        ("KB", 1e3),
        ("T", 1e12),
        ("G", 1e9),
        ("M", 1e6),
        ("K", 1e3),
        ("B", 1.0),
    ]
    .iter()
    .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n.trim().to_string(), *m)))
    .unwrap_or((t.clone(), 1.0));
    let v: f64 = num.parse().with_context(|| {
        format!("--out-shard-size {text:?}: expected a size such as 5GB, 500MB or 1000000")
    })?;
    if v <= 0.0 {
        bail!("--out-shard-size {text:?} must be positive");
    }
    Ok((v * mult) as u64)
}

fn parse_dtype_flag(flag: &str, v: &Option<String>) -> Result<Option<DType>> {
    v.as_deref()
        .map(|s| {
            checkpoint::parse_dtype(s)
                .with_context(|| format!("{flag} {s:?}: expected float32, bfloat16 or float16"))
        })
        .transpose()
}

/// Discovers plugins and prints one warning line per refused file (the run goes on).
fn registry(cli: &Cli) -> Result<Registry> {
    let lock = cli.locked.as_deref().map(PluginLock::read).transpose()?;
    let reg = Registry::discover(&Discovery {
        dirs: cli.plugin_dirs.clone(),
        use_env: true,
        use_exe_dir: true,
        allow_insecure_dirs: cli.allow_insecure_plugin_dir,
        lock,
    });
    for p in reg.problem_messages() {
        eprintln!("warning: {p}");
    }
    Ok(reg)
}

fn cmd_merge(cli: &Cli, a: &MergeArgs) -> Result<()> {
    let config = match (&a.config, &a.method) {
        (Some(_), Some(_)) => {
            bail!("give either a config file or --method with --model flags, not both")
        }
        (Some(path), None) => MergeConfig::from_yaml_file(path)?,
        (None, Some(method)) => {
            if a.models.is_empty() {
                bail!("--method {method} needs at least one --model PATH[:weight=…]");
            }
            let models = a
                .models
                .iter()
                .map(|m| parse_model_flag(m))
                .collect::<Result<Vec<_>, _>>()?;
            let mut global = ParamMap::new();
            for p in &a.params {
                let (k, v) = parse_param_flag(p)?;
                global.insert(k, v);
            }
            MergeConfig::from_flags(
                method,
                &models,
                a.base.clone(),
                global,
                parse_dtype_flag("--dtype", &a.dtype)?,
                parse_dtype_flag("--out-dtype", &a.out_dtype)?,
            )
        }
        (None, None) => bail!("give a mergekit YAML config, or --method NAME with --model flags"),
    };
    let reg = registry(cli)?;
    let plan =
        MergePlan::new(&config, &reg).context("the merge plan is invalid; nothing was read or written")?;
    let threads = a.threads.unwrap_or_else(rayon::current_num_threads);
    eprintln!(
        "plan: {} tensors with `{}`; peak memory bound ≈ {:.1} MB with {threads} threads",
        plan.len(),
        config.merge_method,
        plan.peak_estimate_bytes(threads) as f64 / 1e6
    );
    if a.dry_run {
        println!(
            "valid: {} tensors would be written to {}",
            plan.len(),
            a.out.display()
        );
        return Ok(());
    }
    let mut opts = MergeOptions::new(&a.out);
    opts.shard_bytes = parse_size(&a.out_shard_size)?;
    opts.overwrite = a.overwrite;
    opts.seed = a.seed;
    opts.threads = a.threads;
    opts.progress = !cli.quiet;
    opts.allow_nonfinite = a.allow_nonfinite;
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = cancel.clone();
    // On Ctrl-C the workers stop, the partial directory is removed, and nothing appears at --out.
    let _ = ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::Relaxed));
    let r = plan.run(&opts, Some(&cancel))?;
    println!(
        "wrote {} ({} tensors, {:.1} MB) in {:.2}s",
        r.out_dir.display(),
        r.tensors,
        r.bytes as f64 / 1e6,
        r.seconds
    );
    Ok(())
}

fn cmd_plugins(cli: &Cli, c: &PluginsCommand) -> Result<()> {
    let reg = registry(cli)?;
    match c {
        PluginsCommand::List { json } => {
            if *json {
                let list: Vec<_> = reg
                    .plugins()
                    .map(|p| {
                        serde_json::json!({
                            "name": p.info.name, "kind": p.info.kind.as_str(), "version": p.info.version,
                            "api_version": p.info.api_version.to_string(), "file": p.info.path,
                            "description": p.info.description,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<20} {:<7} {:<9} {:<6} FILE", "NAME", "KIND", "VERSION", "API");
                for p in reg.plugins() {
                    println!(
                        "{:<20} {:<7} {:<9} {:<6} {}",
                        p.info.name,
                        p.info.kind.as_str(),
                        p.info.version,
                        format!("{}.{}", p.info.api_version.major, p.info.api_version.minor),
                        p.info.path.display()
                    );
                }
            }
        }
        PluginsCommand::Lock { out } => {
            let lock = reg.to_lock()?;
            lock.write(out)?;
            println!("locked {} libraries in {}", lock.libraries.len(), out.display());
        }
        PluginsCommand::Show { name, json } => {
            let p = reg.get(name).with_context(|| {
                let names: Vec<_> = reg.plugins().map(|p| p.info.name.clone()).collect();
                format!("no plugin named `{name}` (loaded: {})", names.join(", "))
            })?;
            if *json {
                let v = serde_json::json!({
                    "name": p.info.name, "kind": p.info.kind.as_str(), "version": p.info.version,
                    "description": p.info.description, "file": p.info.path,
                    "api_version": p.info.api_version.to_string(),
                    "params_schema": p.info.params_schema, "model_params_schema": p.info.model_params_schema,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{} ({} plugin, version {}, plugin-api {})",
                    p.info.name,
                    p.info.kind.as_str(),
                    p.info.version,
                    p.info.api_version
                );
                println!("{}", p.info.description);
                println!("file: {}\n", p.info.path.display());
                print_params("Global parameters (`parameters:`)", &p.info.params_schema);
                print_params(
                    "Per-model parameters (`models[].parameters`)",
                    &p.info.model_params_schema,
                );
            }
        }
    }
    Ok(())
}

fn print_params(title: &str, schema: &serde_json::Value) {
    println!("{title}:");
    let props = schema.get("properties").and_then(|p| p.as_object());
    let required: Vec<&str> = schema
        .get("required")
        .and_then(|r| r.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    match props {
        Some(props) if !props.is_empty() => {
            for (name, p) in props {
                let ty = p
                    .get("type")
                    .map(|t| match t {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .unwrap_or_else(|| "any".into());
                let default = p
                    .get("default")
                    .map(|d| format!(", default {d}"))
                    .unwrap_or_default();
                let req = if required.contains(&name.as_str()) {
                    ", required"
                } else {
                    ""
                };
                let desc = p.get("description").and_then(|d| d.as_str()).unwrap_or("");
                println!("  {name} ({ty}{req}{default})\n      {desc}");
            }
        }
        _ => println!("  (none)"),
    }
    println!();
}

fn cmd_convert(a: &ConvertArgs) -> Result<()> {
    let dtype = checkpoint::parse_dtype(&a.dtype)
        .with_context(|| format!("--dtype {:?}: expected float32, bfloat16 or float16", a.dtype))?;
    let opts = checkpoint::gguf::ConvertOptions {
        dtype,
        overwrite: a.overwrite,
    };
    let r = checkpoint::gguf::convert_gguf(&a.input, &a.out, &opts)?;
    println!(
        "wrote {} ({} architecture, {} tensors, vocabulary {})",
        r.out_dir.display(),
        r.architecture,
        r.tensors,
        r.vocab_size
    );
    Ok(())
}

struct LoadedModel {
    model: modelglue::runtime::Model,
    tokenizer: tokenizers::Tokenizer,
    tokenizer_config: serde_json::Value,
    config: serde_json::Value,
}

fn load_model(dir: &std::path::Path) -> Result<LoadedModel> {
    let ckpt = modelglue::checkpoint::Checkpoint::open(dir)?;
    let model = modelglue::runtime::Model::load(&ckpt)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: cannot load the tokenizer: {e}", tok_path.display()))?;
    let tokenizer_config = std::fs::read(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    Ok(LoadedModel {
        model,
        tokenizer,
        tokenizer_config,
        config: ckpt.config().clone(),
    })
}

fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

/// Renders the model's chat template (tokenizer_config.json `chat_template`) for one user turn.
fn chat_prompt(tc: &serde_json::Value, user: &str) -> Result<Option<String>> {
    let Some(template) = tc.get("chat_template").and_then(|t| t.as_str()) else {
        return Ok(None);
    };
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_template("chat", template)
        .context("the model's chat_template does not parse")?;
    let bos = tc.get("bos_token").and_then(token_text).unwrap_or_default();
    let eos = tc.get("eos_token").and_then(token_text).unwrap_or_default();
    let text = env
        .get_template("chat")?
        .render(minijinja::context! {
            messages => vec![minijinja::context! { role => "user", content => user }],
            add_generation_prompt => true,
            bos_token => bos,
            eos_token => eos,
        })
        .context("rendering the model's chat_template")?;
    Ok(Some(text))
}

fn eos_ids(m: &LoadedModel) -> Vec<u32> {
    let mut ids = Vec::new();
    match m.config.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => ids.extend(n.as_u64().map(|v| v as u32)),
        Some(serde_json::Value::Array(a)) => {
            ids.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
        }
        _ => {}
    }
    if let Some(id) = m
        .tokenizer_config
        .get("eos_token")
        .and_then(token_text)
        .and_then(|t| m.tokenizer.token_to_id(&t))
    {
        ids.push(id);
    }
    ids
}

fn cmd_generate(a: &GenerateArgs) -> Result<()> {
    let m = load_model(&a.model)?;
    let prompt = if a.raw {
        None
    } else {
        chat_prompt(&m.tokenizer_config, &a.prompt)?
    };
    let (text, special) = match &prompt {
        Some(p) => (p.as_str(), false),
        None => (a.prompt.as_str(), true),
    };
    let enc = m
        .tokenizer
        .encode(text, special)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let opts = modelglue::runtime::GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        stop: a.stop.clone(),
        eos: eos_ids(&m),
    };
    let tok = &m.tokenizer;
    let g = modelglue::runtime::generate(&m.model, enc.get_ids(), &opts, |ids| {
        tok.decode(ids, true).unwrap_or_default()
    })?;
    println!("{}", g.text);
    Ok(())
}

fn task_path(name: &str) -> PathBuf {
    let p = PathBuf::from(name);
    if p.extension().is_some() || p.exists() {
        return p;
    }
    let dirs = std::env::var_os("MGLUE_TASKS")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("tasks")]);
    for d in dirs {
        let candidate = d.join(format!("{name}.toml"));
        if candidate.exists() {
            return candidate;
        }
    }
    p
}

fn cmd_eval(a: &EvalArgs, quiet: bool) -> Result<()> {
    use modelglue::eval::{EvalOptions, EvalTokenizer, Evaluator, ModelKey, ScoreCache, Task, TaskOptions};
    let ckpt = modelglue::checkpoint::Checkpoint::open(&a.model)?;
    let topts = TaskOptions {
        data_dir: None,
        num_fewshot: a.num_fewshot,
    };
    let tasks = a
        .tasks
        .iter()
        .map(|t| Task::load(&task_path(t), &topts).map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    let model = modelglue::runtime::Model::load(&ckpt)?;
    let tokenizer = EvalTokenizer::from_checkpoint(&ckpt)?;
    let opts = EvalOptions {
        limit: a.limit,
        max_length: EvalOptions::max_length_of(&ckpt),
        progress: !quiet,
        ..EvalOptions::default()
    };
    let mut ev = Evaluator::new(&model, &tokenizer, opts);
    if !a.no_cache {
        ev = ev.with_cache(ScoreCache::open(&a.cache_dir)?, ModelKey::of_checkpoint(&ckpt)?);
    }
    let report = ev.run_all(&tasks)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    // `↓`: lower is better (perplexities); `*`: the primary metric.
    println!(
        "{:<32} {:>6} {:<20} {:>10} {:>10}",
        "TASK", "ITEMS", "METRIC", "VALUE", "STDERR"
    );
    for r in &report.tasks {
        for (name, m) in &r.metrics {
            let primary = if name == r.primary_metric.name() { "*" } else { "" };
            let lower = name == "perplexity" || name == "token_perplexity";
            let label = format!("{name}{}{primary}", if lower { " ↓" } else { "" });
            println!(
                "{:<32} {:>6} {:<20} {:>10.4} {:>10.4}",
                r.task, r.n_items, label, m.value, m.stderr
            );
        }
    }
    Ok(())
}

fn cmd_score(a: &ScoreArgs) -> Result<()> {
    let m = load_model(&a.model)?;
    let enc = m
        .tokenizer
        .encode(a.text.as_str(), true)
        .map_err(|e| anyhow::anyhow!("tokenizing the text: {e}"))?;
    let ids = enc.get_ids();
    if ids.len() < 2 {
        bail!(
            "the text is {} token(s) long; scoring needs at least 2",
            ids.len()
        );
    }
    let lp = m.model.log_likelihood(ids)?;
    let mean = lp.iter().sum::<f64>() / lp.len() as f64;
    let ppl = (-mean).exp();
    if a.json {
        let tokens: Vec<_> = ids[1..]
            .iter()
            .zip(&lp)
            .map(|(id, l)| serde_json::json!({"id": id, "token": m.tokenizer.id_to_token(*id), "logprob": l}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"tokens": tokens, "mean_logprob": mean, "perplexity": ppl})
            )?
        );
    } else {
        println!("{:>8}  {:>10}  TOKEN", "ID", "LOGPROB");
        for (id, l) in ids[1..].iter().zip(&lp) {
            println!(
                "{id:>8}  {l:>10.4}  {:?}",
                m.tokenizer.id_to_token(*id).unwrap_or_default()
            );
        }
        println!(
            "\nmean log-prob {mean:.4} over {} tokens; perplexity {ppl:.3}",
            lp.len()
        );
    }
    Ok(())
}

fn cmd_demo(cli: &Cli, a: &DemoArgs) -> Result<()> {
    let reg = registry(cli)?;
    let mut progress = |line: &str| {
        if !cli.quiet {
            eprintln!("{line}");
        }
    };
    let table = modelglue::demo::run(&reg, &a.out, a.preset, &mut progress)?;
    print!("{table}");
    Ok(())
}

fn cmd_zoo(c: &ZooCommand, quiet: bool) -> Result<()> {
    use modelglue::zoo;
    match c {
        ZooCommand::Synth {
            out,
            preset,
            seed,
            overwrite,
            no_report,
            plan,
            print_plan,
        } => {
            let plan = match plan {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading the zoo plan {}", path.display()))?;
                    toml::from_str::<zoo::SynthPlan>(&text)
                        .with_context(|| format!("zoo plan {}", path.display()))?
                }
                None => zoo::synth_plan(*preset, *seed),
            };
            if *print_plan {
                print!("{}", toml::to_string_pretty(&plan)?);
                return Ok(());
            }
            if !quiet {
                eprintln!(
                    "training {} models ({} optimiser steps) into {}; about {:.0}s on 2 cores",
                    plan.models.len(),
                    plan.models.iter().map(|m| m.train.steps).sum::<usize>(),
                    out.display(),
                    zoo::estimate_seconds(&plan)
                );
            }
            let mut progress = |line: &str| {
                if !quiet {
                    eprintln!("{line}");
                }
            };
            let manifest = zoo::build_synth(&plan, out, *overwrite, &mut progress)?;
            println!("zoo written to {}", out.join("zoo.toml").display());
            if !no_report {
                let report = zoo::report(&manifest, zoo::Split::Test, true)?;
                println!(
                    "\nheld-out test split, exact match % of greedy answers:\n\n{}",
                    report.to_markdown()
                );
            }
            Ok(())
        }
        ZooCommand::Smollm2 {
            out,
            adapters,
            data,
            models_dir,
            train,
            train_only,
            steps,
            domains,
            overwrite,
            no_report,
        } => {
            use zoo::smollm2;
            let cache = models_dir.clone().unwrap_or_else(|| {
                std::env::var_os("MGLUE_MODEL_CACHE")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from(".cache/models"))
            });
            let sources = smollm2::Sources::in_cache(&cache);
            let mut progress = |line: &str| {
                if !quiet {
                    eprintln!("{line}");
                }
            };
            if *train {
                let mut plan = smollm2::smol_plan();
                if let Some(s) = steps {
                    // A fixed number of steps: the token budget no longer limits it.
                    plan.train.steps = *s;
                    plan.tokens = usize::MAX / 2;
                }
                let parent = out
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
                let base = tempfile::Builder::new()
                    .prefix(".smollm2-base-")
                    .tempdir_in(parent)
                    .context("making a temporary directory for the converted base model")?;
                let base_dir = base.path().join("smollm2");
                modelglue::checkpoint::gguf::convert_gguf(&sources.smollm2, &base_dir, &Default::default())
                    .with_context(|| format!("converting {}", sources.smollm2.display()))?;
                let ckpt = modelglue::checkpoint::Checkpoint::open(&base_dir)?;
                let domains = if domains.is_empty() {
                    smollm2::Domain::ALL.to_vec()
                } else {
                    domains.clone()
                };
                smollm2::train_adapters(&ckpt, data, adapters, &plan, &domains, &mut progress)?;
                if *train_only {
                    return Ok(());
                }
            }
            let manifest = smollm2::build_smollm2(&sources, adapters, data, out, *overwrite, &mut progress)?;
            println!("zoo written to {}", out.join("zoo.toml").display());
            if !no_report {
                let report = zoo::report(&manifest, zoo::Split::Test, false)?;
                println!(
                    "\nheld-out test split (ppl: token perplexity, lower is better; acc: next-token \
                     accuracy %; arc: acc_norm %):\n\n{}",
                    report.to_markdown()
                );
            }
            Ok(())
        }
        ZooCommand::Report {
            zoo: path,
            split,
            choice,
            limit,
            models,
            json,
        } => {
            let manifest = zoo::Manifest::load(path)?;
            for m in models {
                if manifest.model(m).is_none() {
                    bail!("the zoo {} has no model `{m}`", path.display());
                }
            }
            let report = zoo::report_models(&manifest, *split, !*choice, *limit, models)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_markdown());
            }
            Ok(())
        }
    }
}

/// Runs the CLI and returns the process exit status.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    let result = match &cli.command {
        Command::Merge(a) => cmd_merge(&cli, a),
        Command::Plugins(c) => cmd_plugins(&cli, c),
        Command::Convert(a) => cmd_convert(a),
        Command::Generate(a) => cmd_generate(a),
        Command::Score(a) => cmd_score(a),
        Command::Eval(a) => cmd_eval(a, cli.quiet),
        Command::Demo(a) => cmd_demo(&cli, a),
        Command::Zoo(c) => cmd_zoo(c, cli.quiet),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            2
        }
    }
}

/// The error and its causes, `: `-separated like `{:#}`, but skipping a cause whose text the
/// message before it already contains (most library errors embed their source in their own
/// message, so `{:#}` would print it twice).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    let mut previous = out.clone();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !previous.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        previous = text;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_prints_each_cause_once() {
        let inner = std::io::Error::other("disk full");
        let e =
            anyhow::Error::new(std::io::Error::other(format!("writing x: {inner}"))).context("merge failed");
        assert_eq!(error_chain(&e), "merge failed: writing x: disk full");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&e), "outer: inner");
    }

    #[test]
    fn shard_sizes_parse_with_units() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("500mb").unwrap(), 500_000_000);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
    }
}

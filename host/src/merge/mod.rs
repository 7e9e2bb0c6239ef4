//! The merge engine: plans a merge from a [`MergeConfig`], validates all of it before any weight
//! is read, then streams tensor by tensor — in parallel across tensors, with memory bounded by
//! the tensors in flight — through a merge-method plugin into a [`CheckpointWriter`].

mod card;

use crate::backend::CandleBackend;
use crate::checkpoint::{dtype_name, Checkpoint, CheckpointError, CheckpointWriter, DType, OutTensor};
use crate::config::{MergeConfig, TensorSite};
use crate::plugins::{MergeCall, MergeMethodPlugin, PluginError, Registry};
use candle_core::Device;
use rayon::prelude::*;
use serde_json::{Map, Value};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Default `--out-shard-size`: 5 GB, as mergekit and transformers.
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// Why a merge could not be planned or run.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// A checkpoint could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The plugin is missing or refused the parameters or a tensor.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The config does not describe a merge this engine can run.
    #[error("{0}")]
    Plan(String),
    /// Models that cannot be merged tensor by tensor.
    #[error("{model}: tensor `{tensor}` {problem}")]
    Mismatch {
        /// The model directory.
        model: PathBuf,
        /// The tensor.
        tensor: String,
        /// What differs and what to do.
        problem: String,
    },
    /// A parameter that the method does not take.
    #[error("parameter `{name}` ({scope}) is not a parameter of `{method}`; it takes {known} (see `mglue plugins show {method}`)")]
    UnknownParameter {
        /// The parameter.
        name: String,
        /// Where it was set.
        scope: String,
        /// The method.
        method: String,
        /// Parameters the method declares.
        known: String,
    },
    /// A tensor failed to merge.
    #[error("merging `{tensor}`: {source}")]
    Tensor {
        /// The tensor.
        tensor: String,
        /// The cause.
        #[source]
        source: Box<MergeError>,
    },
    /// A candle error outside a plugin (dtype conversion).
    #[error("tensor `{tensor}`: {message}")]
    Backend {
        /// The tensor.
        tensor: String,
        /// The message.
        message: String,
    },
    /// The run was interrupted (Ctrl-C).
    #[error("interrupted; nothing was written at the target")]
    Interrupted,
}

/// How to run a merge.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// The output directory.
    pub out: PathBuf,
    /// Maximum bytes per output shard.
    pub shard_bytes: u64,
    /// Replace an existing output directory.
    pub overwrite: bool,
    /// Seed for random methods.
    pub seed: u64,
    /// Worker threads (`None`: rayon's default, one per core).
    pub threads: Option<usize>,
    /// Show a progress bar on stderr (hidden anyway when stderr is not a terminal).
    pub progress: bool,
}

impl MergeOptions {
    /// Defaults for writing to `out`.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        MergeOptions {
            out: out.into(),
            shard_bytes: DEFAULT_SHARD_BYTES,
            overwrite: false,
            seed: 42,
            threads: None,
            progress: false,
        }
    }
}

/// What a merge did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// The output directory.
    pub out_dir: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

/// The decoder layer a tensor belongs to (`model.layers.N.…`), if any.
pub fn layer_of(name: &str) -> Option<usize> {
    let rest = name.split("layers.").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

/// One tensor of the plan.
struct TensorJob {
    name: String,
    layer: Option<usize>,
    out_dtype: DType,
    params: String,
    model_params: Vec<String>,
}

/// A validated merge, ready to run.
pub struct MergePlan {
    method: MergeMethodPlugin,
    config: MergeConfig,
    checkpoints: Vec<Checkpoint>,
    /// Index into `checkpoints` of each `models:` entry.
    model_ckpt: Vec<usize>,
    base_ckpt: Option<usize>,
    base_index: Option<usize>,
    jobs: Vec<TensorJob>,
    /// Output tensor layout, in plan order.
    layout: Vec<OutTensor>,
    /// Where config.json, the tokenizer and generation config come from.
    donor: usize,
}

fn schema_keys(schema: &Value) -> Vec<String> {
    schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn widest(dtypes: &[DType]) -> DType {
    let mut out = dtypes[0];
    for &d in &dtypes[1..] {
        if d != out {
            out = if d == DType::F64 || out == DType::F64 { DType::F64 } else { DType::F32 };
        }
    }
    out
}

fn seed_for(seed: u64, name: &str) -> u64 {
    // FNV-1a of the tensor name, mixed with the run's seed: masks depend on (seed, tensor), not
    // on the order tensors are processed in.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl MergePlan {
    /// Opens every model, checks architectures, tensor names and shapes, resolves and validates
    /// every tensor's parameters with the plugin — all before reading any weight.
    pub fn new(config: &MergeConfig, registry: &Registry) -> Result<MergePlan, MergeError> {
        if !config.slices.is_empty() {
            return Err(MergeError::Plan(
                "`slices:` (passthrough / frankenmerge layouts) is not supported by this version of mglue yet; \
                 use the `models:` form"
                    .into(),
            ));
        }
        if config.models.is_empty() {
            return Err(MergeError::Plan("the config lists no models (`models:` is empty)".into()));
        }
        let method = registry.merge_method(&config.merge_method)?;

        // Open each distinct model once.
        let mut checkpoints: Vec<Checkpoint> = Vec::new();
        let mut index_of: HashMap<PathBuf, usize> = HashMap::new();
        let mut open = |p: &Path| -> Result<usize, MergeError> {
            if let Some(&i) = index_of.get(p) {
                return Ok(i);
            }
            let ck = Checkpoint::open(p)?;
            checkpoints.push(ck);
            index_of.insert(p.to_path_buf(), checkpoints.len() - 1);
            Ok(checkpoints.len() - 1)
        };
        let model_ckpt = config
            .models
            .iter()
            .map(|m| open(&m.model))
            .collect::<Result<Vec<_>, _>>()?;
        let base_ckpt = config.base_model.as_deref().map(&mut open).transpose()?;
        let base_index = base_ckpt.and_then(|b| model_ckpt.iter().position(|&c| c == b));
        let donor = base_ckpt.unwrap_or(model_ckpt[0]);

        // Architectures must agree.
        let reference = &checkpoints[donor];
        let arch = reference.architectures();
        for ck in &checkpoints {
            if ck.architectures() != arch {
                return Err(MergeError::Plan(format!(
                    "{} is {:?} but {} is {:?}: models of different architectures cannot be merged tensor by tensor \
                     (mix them instead)",
                    ck.dir().display(),
                    ck.architectures(),
                    reference.dir().display(),
                    arch
                )));
            }
        }

        // Parameters the method declares, by scope.
        let global_keys = schema_keys(&method.info.params_schema);
        let model_keys = schema_keys(&method.info.model_params_schema);
        let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
        seen.extend(config.parameters.keys().map(|k| (k.clone(), "global".to_string())));
        for (i, m) in config.models.iter().enumerate() {
            seen.extend(m.parameters.keys().map(|k| (k.clone(), format!("model #{i} {}", m.model.display()))));
        }
        for (name, scope) in seen {
            if !global_keys.contains(&name) && !model_keys.contains(&name) {
                let mut known: Vec<&str> = global_keys.iter().chain(&model_keys).map(String::as_str).collect();
                known.sort();
                return Err(MergeError::UnknownParameter {
                    name,
                    scope,
                    method: method.info.name.clone(),
                    known: if known.is_empty() { "no parameters".into() } else { known.join(", ") },
                });
            }
        }
        let model_key_refs: Vec<&str> = model_keys.iter().map(String::as_str).collect();

        let num_layers = reference.num_hidden_layers().unwrap_or(0);
        let mut jobs = Vec::new();
        let mut layout = Vec::new();
        let mut validated: HashSet<(String, Vec<String>)> = HashSet::new();
        for name in reference.tensor_names() {
            let Some(ref_info) = reference.info(&name) else { continue };
            let mut dtypes = Vec::new();
            for &c in &model_ckpt {
                let ck = &checkpoints[c];
                let info = ck.info(&name).ok_or_else(|| MergeError::Mismatch {
                    model: ck.dir().to_path_buf(),
                    tensor: name.clone(),
                    problem: format!("is missing (present in {})", reference.dir().display()),
                })?;
                if info.shape != ref_info.shape {
                    let vocab = name.contains("embed_tokens") || name.contains("lm_head");
                    return Err(MergeError::Mismatch {
                        model: ck.dir().to_path_buf(),
                        tensor: name.clone(),
                        problem: format!(
                            "has shape {:?} but {:?} in {}{}",
                            info.shape,
                            ref_info.shape,
                            reference.dir().display(),
                            if vocab {
                                "; the vocabularies differ: set `tokenizer_source: base` or `union` (vocabulary policies arrive with the merge-methods release)"
                            } else {
                                ""
                            }
                        ),
                    });
                }
                dtypes.push(config.dtype.unwrap_or(info.dtype));
            }
            let layer = layer_of(&name);
            let site = match layer {
                Some(l) => TensorSite::in_layer(&name, l, num_layers.max(l + 1)),
                None => TensorSite { name: &name, layer: None, num_layers: num_layers.max(1) },
            };
            let mut global = config.global_params(&site);
            global.retain(|k, _| global_keys.contains(k));
            let params = Value::Object(global).to_string();
            let model_params: Vec<String> = (0..config.models.len())
                .map(|i| Value::Object(config.model_params_for(i, &site, &model_key_refs)).to_string())
                .collect();
            let key = (params.clone(), model_params.clone());
            if !validated.contains(&key) {
                method.validate(&name, layer, base_index, base_ckpt.is_some(), &params, &model_params)?;
                validated.insert(key);
            }
            let base_dtype = base_ckpt.and_then(|b| checkpoints[b].info(&name)).map(|i| config.dtype.unwrap_or(i.dtype));
            let out_dtype = config.out_dtype.or(config.dtype).or(base_dtype).unwrap_or_else(|| widest(&dtypes));
            layout.push(OutTensor { name: name.clone(), dtype: out_dtype, shape: ref_info.shape.clone() });
            jobs.push(TensorJob { name, layer, out_dtype, params, model_params });
        }
        Ok(MergePlan {
            method,
            config: config.clone(),
            checkpoints,
            model_ckpt,
            base_ckpt,
            base_index,
            jobs,
            layout,
            donor,
        })
    }

    /// Number of output tensors.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether the plan has no tensors.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// An upper bound of the memory the run holds at once: the inputs and output of the largest
    /// tensors, one set per worker thread.
    pub fn peak_estimate_bytes(&self, threads: usize) -> u64 {
        let mut per: Vec<u64> = self
            .layout
            .iter()
            .map(|t| {
                let n: usize = t.shape.iter().product();
                // inputs as f32 in the worst case, plus the f32 result and the output copy
                (n * 4 * (self.model_ckpt.len() + 3)) as u64
            })
            .collect();
        per.sort_unstable_by(|a, b| b.cmp(a));
        per.iter().take(threads.max(1)).sum()
    }

    fn load(&self, ckpt: usize, name: &str) -> Result<candle_core::Tensor, MergeError> {
        let ck = &self.checkpoints[ckpt];
        Ok(match self.config.dtype {
            Some(dt) => ck.load_as(name, dt)?,
            None => ck.load(name)?,
        })
    }

    fn merge_one(&self, backend: &CandleBackend, job: &TensorJob, seed: u64) -> Result<candle_core::Tensor, MergeError> {
        let models = self
            .model_ckpt
            .iter()
            .map(|&c| self.load(c, &job.name))
            .collect::<Result<Vec<_>, _>>()?;
        let base = self.base_ckpt.map(|b| self.load(b, &job.name)).transpose()?;
        let out = self.method.merge(
            backend,
            &MergeCall {
                tensor_name: &job.name,
                layer: job.layer,
                base: base.as_ref(),
                base_index: self.base_index,
                models: &models,
                params: &job.params,
                model_params: &job.model_params,
                seed: seed_for(seed, &job.name),
            },
        )?;
        let expected: &[usize] = &self.layout_of(&job.name).shape;
        if out.dims() != expected {
            return Err(MergeError::Plugin(PluginError::Call {
                plugin: self.method.info.name.clone(),
                path: self.method.info.path.clone(),
                message: format!("returned shape {:?} for `{}`, expected {:?}", out.dims(), job.name, expected),
            }));
        }
        if out.dtype() == job.out_dtype {
            return Ok(out);
        }
        crate::backend::kernels::convert(&out, job.out_dtype)
            .unwrap_or_else(|| out.to_dtype(job.out_dtype))
            .map_err(|e| MergeError::Backend {
            tensor: job.name.clone(),
            message: e.to_string(),
        })
    }

    fn layout_of(&self, name: &str) -> &OutTensor {
        self.layout
            .iter()
            .find(|t| t.name == name)
            .expect("every job has a layout entry (built together in MergePlan::new)")
    }

    /// Runs the plan: writes into a temporary directory beside `opts.out` and renames it into
    /// place only when every tensor and side file is written.
    pub fn run(&self, opts: &MergeOptions, cancel: Option<&AtomicBool>) -> Result<MergeReport, MergeError> {
        let start = Instant::now();
        let writer = CheckpointWriter::create(&opts.out, &self.layout, opts.shard_bytes, opts.overwrite)?;
        let backend = CandleBackend::new(Device::Cpu);
        let bar = if opts.progress {
            indicatif::ProgressBar::new(self.jobs.len() as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} merging [{bar:40}] {pos}/{len} tensors {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let work = || {
            self.jobs.par_iter().try_for_each(|job| -> Result<(), MergeError> {
                if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                    return Err(MergeError::Interrupted);
                }
                let t = self.merge_one(&backend, job, opts.seed).map_err(|e| MergeError::Tensor {
                    tensor: job.name.clone(),
                    source: Box::new(e),
                })?;
                writer.write_tensor(&job.name, &t)?;
                bar.inc(1);
                Ok(())
            })
        };
        match opts.threads {
            Some(n) => rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| MergeError::Plan(format!("cannot start {n} worker threads: {e}")))?
                .install(work)?,
            None => work()?,
        }
        bar.finish_and_clear();
        self.write_side_files(&writer)?;
        let bytes = self
            .layout
            .iter()
            .map(|t| (t.shape.iter().product::<usize>() * t.dtype.size_in_bytes()) as u64)
            .sum();
        let out_dir = writer.finish()?;
        Ok(MergeReport { out_dir, tensors: self.jobs.len(), bytes, seconds: start.elapsed().as_secs_f64() })
    }

    fn write_side_files(&self, writer: &CheckpointWriter) -> Result<(), MergeError> {
        let donor = &self.checkpoints[self.donor];
        let mut config = donor.config().clone();
        let out_dtype = self.layout.iter().find(|t| t.dtype.is_float()).map(|t| t.dtype);
        if let (Some(obj), Some(dt)) = (config.as_object_mut(), out_dtype) {
            let name = Value::String(dtype_name(dt).to_string());
            if obj.contains_key("torch_dtype") {
                obj.insert("torch_dtype".into(), name.clone());
            }
            obj.insert("dtype".into(), name);
        }
        let text = serde_json::to_string_pretty(&config).map_err(|e| MergeError::Plan(e.to_string()))?;
        writer.write_file("config.json", format!("{text}\n").as_bytes())?;
        let tokenizer_donor = match &self.config.tokenizer_source {
            Some(crate::config::TokenizerSource::Model(p)) => Checkpoint::open(p)?.dir().to_path_buf(),
            _ => donor.dir().to_path_buf(),
        };
        let tokenizer_ck;
        let side_source = if tokenizer_donor == donor.dir() {
            donor
        } else {
            tokenizer_ck = Checkpoint::open(&tokenizer_donor)?;
            &tokenizer_ck
        };
        for f in side_source.side_files() {
            if let Some(name) = f.file_name().and_then(|n| n.to_str()) {
                writer.copy_file(&f, name)?;
            }
        }
        writer.write_file("mergekit_config.yml", self.config.source_text.as_bytes())?;
        let card = card::model_card(&self.config, &self.method.info, &self.model_dirs(), self.base_dir().as_deref());
        writer.write_file("README.md", card.as_bytes())?;
        Ok(())
    }

    fn model_dirs(&self) -> Vec<PathBuf> {
        self.model_ckpt.iter().map(|&c| self.checkpoints[c].dir().to_path_buf()).collect()
    }

    fn base_dir(&self) -> Option<PathBuf> {
        self.base_ckpt.map(|b| self.checkpoints[b].dir().to_path_buf())
    }
}

/// Plans and runs a merge in one call.
pub fn run_merge(config: &MergeConfig, registry: &Registry, opts: &MergeOptions) -> Result<MergeReport, MergeError> {
    MergePlan::new(config, registry)?.run(opts, None)
}

/// Resolved parameters of one tensor, for `--dry-run` style inspection.
pub fn describe_params(params: &str) -> Map<String, Value> {
    serde_json::from_str(params).unwrap_or_default()
}

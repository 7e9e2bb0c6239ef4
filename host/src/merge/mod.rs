//! The merge engine: plans a merge from a [`MergeConfig`], validates all of it before any weight
//! is read, then streams tensor by tensor — in parallel across tensors, with memory bounded by
//! the tensors in flight — through a merge-method plugin into a [`CheckpointWriter`].
//!
//! Planning, in order (nothing reads a weight until [`MergePlan::run`]):
//!
//! 1. the layout (`layout.rs`): which output tensors exist and which input tensors feed each —
//!    the `models:` form, or `slices:` (layer ranges merged per output layer, renumbered;
//!    `passthrough` frankenmerges);
//! 2. the vocabulary (`vocab.rs`): with `tokenizer_source:`, the output vocabulary and each
//!    model's row permutation; embedding-like tensors are aligned in the host, before the
//!    method sees them, so every method gets tensors of one shape;
//! 3. names, shapes, architectures and every tensor's parameters, validated by the method.
//!
//! `passthrough` is built in (`method.rs`): a copy of the single source tensor (bytes straight
//! from the memory map when neither dtype, `scale` nor vocabulary changes it).

mod card;
mod layout;
mod method;
mod vocab;

use crate::backend::CandleBackend;
use crate::checkpoint::{
    dtype_name, scan_bytes, scan_tensor, Checkpoint, CheckpointError, CheckpointWriter, DType, NonFinite,
    OutTensor,
};
use crate::config::{MergeConfig, TensorSite};
use crate::plugins::{MergeCall, PluginError, Registry};
use candle_core::Device;
use layout::{Input, Layout, Planned, Scope};
use method::{Check, Method};
use rayon::prelude::*;
use serde_json::{Map, Value};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use vocab::{TokenizerFiles, VocabPlan};

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
    /// A tokenizer file needed to align vocabularies is missing or unusable.
    #[error("{}: {message}", path.display())]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// The run was interrupted (Ctrl-C).
    #[error("interrupted; nothing was written at the target")]
    Interrupted,
    /// An input tensor holds NaN or infinite values (refused unless
    /// [`MergeOptions::allow_nonfinite`]).
    #[error(
        "{}: tensor `{tensor}` holds {found}{converted}; merging would carry them into the output. \
         Repair or re-export the model, or pass --allow-nonfinite to merge anyway (with a warning)",
        file.display()
    )]
    NonFiniteInput {
        /// The safetensors file holding the tensor.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// What was found.
        found: NonFinite,
        /// ` after conversion to float16` when `dtype:` converted it at load, else empty.
        converted: String,
    },
    /// The merged tensor holds NaN or infinite values although every input was finite (refused
    /// unless [`MergeOptions::allow_nonfinite`]).
    #[error(
        "method `{method}` produced {found} in `{tensor}`{cause}; nothing was written. Pass \
         --allow-nonfinite to write it anyway (with a warning)"
    )]
    NonFiniteOutput {
        /// The merge method.
        method: String,
        /// The output tensor.
        tensor: String,
        /// What was found.
        found: NonFinite,
        /// Why, when known: the conversion to a narrower `out_dtype` overflowed.
        cause: String,
    },
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
    /// Merge inputs holding NaN/Inf and write outputs holding them, with a warning naming the
    /// file and tensor, instead of stopping with [`MergeError::NonFiniteInput`] /
    /// [`MergeError::NonFiniteOutput`].
    pub allow_nonfinite: bool,
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
            allow_nonfinite: false,
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

/// Resolved parameters of one output tensor: method-level, then one object per source.
pub type TensorParams = (Map<String, Value>, Vec<Map<String, Value>>);

/// One output tensor of the plan, validated.
struct TensorJob {
    name: String,
    layer: Option<usize>,
    inputs: Vec<Input>,
    base: Option<Input>,
    base_index: Option<usize>,
    /// Rows go through the vocabulary plan before the method sees them.
    vocab: bool,
    out_dtype: DType,
    shape: Vec<usize>,
    params: String,
    model_params: Vec<String>,
    /// passthrough: the multiplier (`None`: a copy).
    scale: Option<f64>,
}

/// A validated merge, ready to run.
pub struct MergePlan {
    method: Method,
    config: MergeConfig,
    checkpoints: Vec<Checkpoint>,
    /// The config's base model.
    base_ckpt: Option<usize>,
    jobs: Vec<TensorJob>,
    /// Output tensor layout, in plan order.
    layout: Vec<OutTensor>,
    /// Where config.json and the generation config come from.
    donor: usize,
    /// `slices:` form: the source (checkpoint, layer) of each output layer.
    out_layers: Option<Vec<(usize, usize)>>,
    /// `tokenizer_source:` given: the output vocabulary.
    vocab: Option<VocabPlan>,
}

fn widest(dtypes: &[DType]) -> DType {
    let mut out = dtypes[0];
    for &d in &dtypes[1..] {
        if d != out {
            out = if d == DType::F64 || out == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
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

/// Sets `key` in a config.json: where it already is (top level, else `text_config`), else at
/// the top level.
fn set_config_field(config: &mut Value, key: &str, value: Value) {
    let Some(obj) = config.as_object_mut() else { return };
    if !obj.contains_key(key) {
        if let Some(Value::Object(text)) = obj.get_mut("text_config") {
            if text.contains_key(key) {
                text.insert(key.to_string(), value);
                return;
            }
        }
    }
    obj.insert(key.to_string(), value);
}

fn config_field<'a>(config: &'a Value, key: &str) -> Option<&'a Value> {
    config
        .get(key)
        .or_else(|| config.get("text_config").and_then(|t| t.get(key)))
}

/// Every parameter name set anywhere in the config, with where it was set.
fn parameter_scopes(config: &MergeConfig) -> BTreeSet<(String, String)> {
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    seen.extend(
        config
            .parameters
            .keys()
            .map(|k| (k.clone(), "global `parameters:`".to_string())),
    );
    for (i, m) in config.models.iter().enumerate() {
        seen.extend(
            m.parameters
                .keys()
                .map(|k| (k.clone(), format!("models[{i}] {}", m.model.display()))),
        );
    }
    for (i, s) in config.slices.iter().enumerate() {
        seen.extend(s.parameters.keys().map(|k| (k.clone(), format!("slices[{i}]"))));
        for (j, src) in s.sources.iter().enumerate() {
            seen.extend(src.parameters.keys().map(|k| {
                (
                    k.clone(),
                    format!("slices[{i}].sources[{j}] {}", src.model.display()),
                )
            }));
        }
    }
    seen
}

impl MergePlan {
    /// Opens every model, lays out the output (`models:` or `slices:`), builds the output
    /// vocabulary (`tokenizer_source:`), checks architectures, tensor names and shapes, and
    /// resolves and validates every tensor's parameters with the method — all before reading
    /// any weight.
    pub fn new(config: &MergeConfig, registry: &Registry) -> Result<MergePlan, MergeError> {
        if config.models.is_empty() && config.slices.is_empty() {
            return Err(MergeError::Plan(
                "the config lists no models (`models:` and `slices:` are empty)".into(),
            ));
        }
        if config.tokenizer_tokens.is_some() {
            return Err(MergeError::Plan(
                "`tokenizer.tokens` (per-token embedding sources) is not supported yet; remove it — with \
                 `tokenizer.source` alone, a token one model lacks takes the row of the model that has it, \
                 else the base model's, else the mean"
                    .into(),
            ));
        }
        let method = Method::resolve(&config.merge_method, registry)?;

        // Open each distinct model once, in config order (the base last).
        let mut checkpoints: Vec<Checkpoint> = Vec::new();
        let mut index_of: HashMap<PathBuf, usize> = HashMap::new();
        for p in config.referenced_models() {
            if let std::collections::hash_map::Entry::Vacant(e) = index_of.entry(p) {
                let ck = Checkpoint::open(e.key())?;
                ck.check_config_shapes()?;
                checkpoints.push(ck);
                e.insert(checkpoints.len() - 1);
            }
        }
        let base_ckpt = config.base_model.as_ref().map(|b| index_of[b]);
        let first = config
            .models
            .first()
            .map(|m| &m.model)
            .or_else(|| {
                config
                    .slices
                    .first()
                    .and_then(|s| s.sources.first())
                    .map(|s| &s.model)
            })
            .map(|p| index_of[p])
            .expect("a config with models or slices references a model");
        // mergekit copies config.json from the base model, else from the first referenced model.
        let donor = base_ckpt.unwrap_or(first);

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

        let Layout {
            tensors: planned,
            layers: out_layers,
        } = if config.slices.is_empty() {
            let model_ckpt: Vec<usize> = config.models.iter().map(|m| index_of[&m.model]).collect();
            layout::models(&checkpoints, &model_ckpt, base_ckpt, donor)?
        } else {
            layout::slices(config, &checkpoints, &index_of)?
        };

        let vocab = match &config.tokenizer_source {
            Some(policy) => {
                let order: Vec<usize> = (0..checkpoints.len()).collect();
                let plan = VocabPlan::build(policy, &checkpoints, donor, &order, config.pad_to_multiple_of)?;
                tracing::debug!("{}", plan.summary);
                Some(plan)
            }
            None => None,
        };

        // Parameters the method declares, by scope.
        let global_keys = method.global_keys();
        let model_keys = method.model_keys();
        for (name, scope) in parameter_scopes(config) {
            if !global_keys.contains(&name) && !model_keys.contains(&name) {
                let mut known: Vec<&str> = global_keys
                    .iter()
                    .chain(&model_keys)
                    .map(String::as_str)
                    .collect();
                known.sort();
                return Err(MergeError::UnknownParameter {
                    name,
                    scope,
                    method: method.name().to_string(),
                    known: if known.is_empty() {
                        "no parameters".into()
                    } else {
                        known.join(", ")
                    },
                });
            }
        }
        let model_key_refs: Vec<&str> = model_keys.iter().map(String::as_str).collect();

        let mut jobs = Vec::with_capacity(planned.len());
        let mut layout = Vec::with_capacity(planned.len());
        let mut validated: HashSet<(String, Vec<String>, Option<usize>, bool)> = HashSet::new();
        for p in planned {
            let (shape, is_vocab) = Self::check_shapes(&checkpoints, &p, vocab.as_ref())?;
            let (params, model_params) = Self::resolve_params(config, &p, &global_keys, &model_key_refs);
            let has_base = p.base.is_some();
            let key = (params.clone(), model_params.clone(), p.base_index, has_base);
            if !validated.contains(&key) {
                let sources: Vec<String> = p
                    .inputs
                    .iter()
                    .map(|i| checkpoints[i.ckpt].dir().display().to_string())
                    .collect();
                let check = Check {
                    tensor: &p.name,
                    layer: p.layer,
                    base_index: p.base_index,
                    has_base,
                    params: &params,
                    model_params: &model_params,
                    sources: &sources,
                };
                method.validate(&check).map_err(|e| match &p.base_outside {
                    Some(b) => MergeError::Plan(format!(
                        "{e} (note: base_model {} is not a source of the slice that makes `{}`, so no base tensor \
                         is passed; add it to that slice's sources with a layer_range)",
                        b.display(),
                        p.name
                    )),
                    None => e,
                })?;
                validated.insert(key);
            }
            let scale = match &method {
                Method::Passthrough => {
                    method::passthrough_scale(&model_params[0]).map_err(MergeError::Plan)?
                }
                Method::Plugin(_) => None,
            };
            let dtype_of = |i: &Input| {
                let info = checkpoints[i.ckpt]
                    .info(&i.tensor)
                    .expect("the layout checked every input exists");
                config.dtype.unwrap_or(info.dtype)
            };
            let dtypes: Vec<DType> = p.inputs.iter().map(dtype_of).collect();
            let base_dtype = p.base.as_ref().map(dtype_of);
            let out_dtype = config
                .out_dtype
                .or(config.dtype)
                .or(base_dtype)
                .unwrap_or_else(|| widest(&dtypes));
            layout.push(OutTensor {
                name: p.name.clone(),
                dtype: out_dtype,
                shape: shape.clone(),
            });
            jobs.push(TensorJob {
                name: p.name,
                layer: p.layer,
                inputs: p.inputs,
                base: p.base,
                base_index: p.base_index,
                vocab: is_vocab,
                out_dtype,
                shape,
                params,
                model_params,
                scale,
            });
        }
        let mut names = HashSet::new();
        if let Some(dup) = jobs.iter().find(|j| !names.insert(j.name.as_str())) {
            return Err(MergeError::Plan(format!(
                "the layout produces `{}` twice",
                dup.name
            )));
        }
        Ok(MergePlan {
            method,
            config: config.clone(),
            checkpoints,
            base_ckpt,
            jobs,
            layout,
            donor,
            out_layers,
            vocab,
        })
    }

    /// The output shape of a planned tensor, and whether its rows are aligned by the vocabulary
    /// plan. Every input (and the base) must have one shape, except the rows of embedding-like
    /// tensors when a `tokenizer_source` is given.
    fn check_shapes(
        checkpoints: &[Checkpoint],
        p: &Planned,
        vocab: Option<&VocabPlan>,
    ) -> Result<(Vec<usize>, bool), MergeError> {
        let all: Vec<&Input> = p.inputs.iter().chain(p.base.as_ref()).collect();
        let info = |i: &Input| {
            checkpoints[i.ckpt]
                .info(&i.tensor)
                .expect("the layout checked every input exists")
        };
        let first = info(all[0]);
        let is_vocab = vocab::is_vocab_tensor(&p.name) && first.shape.len() == 2;
        if let (true, Some(plan)) = (is_vocab, vocab) {
            for i in &all[1..] {
                let s = &info(i).shape;
                if s.len() != 2 || s[1] != first.shape[1] {
                    return Err(MergeError::Mismatch {
                        model: checkpoints[i.ckpt].dir().to_path_buf(),
                        tensor: i.tensor.clone(),
                        problem: format!(
                            "has shape {s:?} but {:?} in {}; vocabularies can be aligned only when the embedding \
                             width (hidden size) is the same",
                            first.shape,
                            checkpoints[all[0].ckpt].dir().display()
                        ),
                    });
                }
            }
            return Ok((vec![plan.rows, first.shape[1]], true));
        }
        for i in &all[1..] {
            let s = &info(i).shape;
            if *s != first.shape {
                let hint = if is_vocab {
                    "; the vocabularies differ: set `tokenizer_source: base` (keep the base model's vocabulary), \
                     `tokenizer_source: union` (all models' tokens) or `tokenizer_source: PATH` (that model's)"
                } else {
                    ""
                };
                return Err(MergeError::Mismatch {
                    model: checkpoints[i.ckpt].dir().to_path_buf(),
                    tensor: i.tensor.clone(),
                    problem: format!(
                        "has shape {s:?} but {:?} in {} (`{}`){hint}",
                        first.shape,
                        checkpoints[all[0].ckpt].dir().display(),
                        all[0].tensor
                    ),
                });
            }
        }
        Ok((first.shape.clone(), false))
    }

    /// The method-level parameters (JSON object text) and per-input parameters of one tensor.
    fn resolve_params(
        config: &MergeConfig,
        p: &Planned,
        global_keys: &[String],
        model_keys: &[&str],
    ) -> (String, Vec<String>) {
        let (mut global, per_input): (Map<String, Value>, Vec<Map<String, Value>>) = match p.scope {
            Scope::Models { layer, num_layers } => {
                let site = TensorSite {
                    name: &p.name,
                    layer,
                    num_layers,
                };
                let per = (0..p.inputs.len())
                    .map(|i| config.model_params_for(i, &site, model_keys))
                    .collect();
                (config.global_params(&site), per)
            }
            Scope::Slice {
                slice,
                layer,
                num_layers,
            } => {
                // mergekit matches method-level filters against the output name and per-source
                // ones against the source's own tensor name.
                let site = TensorSite {
                    name: &p.name,
                    layer,
                    num_layers,
                };
                let per = p
                    .inputs
                    .iter()
                    .enumerate()
                    .map(|(j, input)| {
                        let site = TensorSite {
                            name: &input.tensor,
                            layer,
                            num_layers,
                        };
                        let mut m = config.source_params(slice, j, &site);
                        m.retain(|k, _| model_keys.contains(&k.as_str()));
                        m
                    })
                    .collect();
                (config.slice_params(slice, &site), per)
            }
        };
        global.retain(|k, _| global_keys.contains(k));
        (
            Value::Object(global).to_string(),
            per_input
                .into_iter()
                .map(|m| Value::Object(m).to_string())
                .collect(),
        )
    }

    /// Number of output tensors.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether the plan has no tensors.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// The output tensors (name, dtype, shape), in write order.
    pub fn outputs(&self) -> &[OutTensor] {
        &self.layout
    }

    /// The input tensors of output tensor `name`: (model directory, tensor name) per source.
    pub fn sources_of(&self, name: &str) -> Option<Vec<(PathBuf, String)>> {
        let job = self.jobs.iter().find(|j| j.name == name)?;
        Some(
            job.inputs
                .iter()
                .map(|i| (self.checkpoints[i.ckpt].dir().to_path_buf(), i.tensor.clone()))
                .collect(),
        )
    }

    /// The resolved parameters of output tensor `name`: method-level, then one object per source.
    pub fn params_of(&self, name: &str) -> Option<TensorParams> {
        let job = self.jobs.iter().find(|j| j.name == name)?;
        Some((
            describe_params(&job.params),
            job.model_params.iter().map(|p| describe_params(p)).collect(),
        ))
    }

    /// An upper bound of the memory the run holds at once: the inputs and output of the largest
    /// tensors, one set per worker thread.
    pub fn peak_estimate_bytes(&self, threads: usize) -> u64 {
        let mut per: Vec<u64> = self
            .jobs
            .iter()
            .map(|j| {
                let n: usize = j.shape.iter().product();
                // inputs as f32 in the worst case, plus the f32 result and the output copy
                // (aligned embeddings: once more per input)
                let copies = j.inputs.len() * if j.vocab { 2 } else { 1 } + 3;
                (n * 4 * copies) as u64
            })
            .collect();
        per.sort_unstable_by(|a, b| b.cmp(a));
        per.iter().take(threads.max(1)).sum()
    }

    fn load(&self, input: &Input, allow_nonfinite: bool) -> Result<candle_core::Tensor, MergeError> {
        let ck = &self.checkpoints[input.ckpt];
        let t = match self.config.dtype {
            Some(dt) => ck.load_as(&input.tensor, dt)?,
            None => ck.load(&input.tensor)?,
        };
        let found = scan_tensor(&t).map_err(|e| MergeError::Backend {
            tensor: input.tensor.clone(),
            message: e.to_string(),
        })?;
        self.check_input(input, found, t.dtype(), allow_nonfinite)?;
        Ok(t)
    }

    /// Refuses (or, when allowed, warns about) an input tensor holding NaN/Inf; `loaded` is the
    /// dtype it was scanned in.
    fn check_input(
        &self,
        input: &Input,
        found: NonFinite,
        loaded: DType,
        allow_nonfinite: bool,
    ) -> Result<(), MergeError> {
        if found.is_none() {
            return Ok(());
        }
        let info = self.checkpoints[input.ckpt]
            .info(&input.tensor)
            .expect("the layout checked every input exists");
        let converted = if info.dtype == loaded {
            String::new()
        } else {
            format!(" after conversion to {}", dtype_name(loaded))
        };
        if allow_nonfinite {
            tracing::warn!(
                file = %info.file.display(),
                tensor = %input.tensor,
                "input holds {found}{converted}; merging anyway (--allow-nonfinite)"
            );
            return Ok(());
        }
        Err(MergeError::NonFiniteInput {
            file: info.file.clone(),
            tensor: input.tensor.clone(),
            found,
            converted,
        })
    }

    /// Refuses (or, when allowed, warns about) a merged tensor holding NaN/Inf. `merged` is the
    /// method's result before the conversion to the output dtype, scanned only to tell the cause.
    fn check_output(
        &self,
        job: &TensorJob,
        written: &candle_core::Tensor,
        merged: Option<&candle_core::Tensor>,
        allow_nonfinite: bool,
    ) -> Result<(), MergeError> {
        let backend = |e: candle_core::Error| MergeError::Backend {
            tensor: job.name.clone(),
            message: e.to_string(),
        };
        let found = scan_tensor(written).map_err(backend)?;
        if found.is_none() {
            return Ok(());
        }
        let cause = match merged {
            Some(m) if scan_tensor(m).map_err(backend)?.is_none() => format!(
                " when converting the merged {} values to out_dtype {}, which overflows; choose a \
                 wider out_dtype (bfloat16 or float32)",
                dtype_name(m.dtype()),
                dtype_name(job.out_dtype)
            ),
            _ => String::new(),
        };
        if allow_nonfinite {
            tracing::warn!(
                tensor = %job.name,
                "method `{}` produced {found}{cause}; writing it anyway (--allow-nonfinite)",
                self.method.name()
            );
            return Ok(());
        }
        Err(MergeError::NonFiniteOutput {
            method: self.method.name().to_string(),
            tensor: job.name.clone(),
            found,
            cause,
        })
    }

    /// The job's input tensors and base tensor, loaded (each distinct tensor once) and, for
    /// embedding-like tensors under a vocabulary policy, aligned to the output vocabulary.
    fn load_inputs(
        &self,
        job: &TensorJob,
        allow_nonfinite: bool,
    ) -> Result<(Vec<candle_core::Tensor>, Option<candle_core::Tensor>), MergeError> {
        let all: Vec<&Input> = job.inputs.iter().chain(job.base.as_ref()).collect();
        let mut loaded: Vec<candle_core::Tensor> = Vec::with_capacity(all.len());
        for (k, i) in all.iter().enumerate() {
            let t = match all[..k].iter().position(|p| p == i) {
                Some(prev) => loaded[prev].clone(),
                None => self.load(i, allow_nonfinite)?,
            };
            loaded.push(t);
        }
        if job.vocab {
            let plan = self
                .vocab
                .as_ref()
                .expect("vocabulary jobs exist only with a vocabulary plan");
            // One participant per distinct model, in config order (base last when not listed).
            let mut parts: Vec<(usize, candle_core::Tensor)> = Vec::new();
            let mut part_of: Vec<usize> = Vec::with_capacity(all.len());
            for (i, t) in all.iter().zip(&loaded) {
                match parts.iter().position(|(c, _)| *c == i.ckpt) {
                    Some(p) => part_of.push(p),
                    None => {
                        parts.push((i.ckpt, t.clone()));
                        part_of.push(parts.len() - 1);
                    }
                }
            }
            let base = self
                .base_ckpt
                .and_then(|b| parts.iter().position(|(c, _)| *c == b));
            let aligned = plan.align(&job.name, &parts, base)?;
            loaded = part_of.iter().map(|&p| aligned[p].clone()).collect();
        }
        let base = job
            .base
            .as_ref()
            .map(|_| loaded.pop().expect("the base was loaded last"));
        Ok((loaded, base))
    }

    fn to_out_dtype(
        &self,
        job: &TensorJob,
        t: candle_core::Tensor,
    ) -> Result<candle_core::Tensor, MergeError> {
        if t.dtype() == job.out_dtype {
            return Ok(t);
        }
        crate::backend::kernels::convert(&t, job.out_dtype)
            .unwrap_or_else(|| t.to_dtype(job.out_dtype))
            .map_err(|e| MergeError::Backend {
                tensor: job.name.clone(),
                message: e.to_string(),
            })
    }

    /// Passthrough without conversion: the stored bytes, straight from the memory map.
    fn raw_copy(&self, job: &TensorJob) -> Option<&[u8]> {
        if !matches!(self.method, Method::Passthrough) || job.scale.is_some() || job.vocab {
            return None;
        }
        let input = &job.inputs[0];
        let ck = &self.checkpoints[input.ckpt];
        let stored = ck.info(&input.tensor)?.dtype;
        let loaded = self.config.dtype.unwrap_or(stored);
        (stored == job.out_dtype && loaded == stored)
            .then(|| ck.raw_bytes(&input.tensor).ok())
            .flatten()
    }

    fn merge_one(
        &self,
        backend: &CandleBackend,
        job: &TensorJob,
        seed: u64,
        allow_nonfinite: bool,
    ) -> Result<candle_core::Tensor, MergeError> {
        let (models, base) = self.load_inputs(job, allow_nonfinite)?;
        let out = match &self.method {
            Method::Passthrough => {
                let t = models
                    .into_iter()
                    .next()
                    .expect("passthrough jobs have one input (validated)");
                match job.scale {
                    Some(s) => method::scale_tensor(&t, s).map_err(|e| MergeError::Backend {
                        tensor: job.name.clone(),
                        message: e.to_string(),
                    })?,
                    None => t,
                }
            }
            Method::Plugin(plugin) => {
                let out = plugin.merge(
                    backend,
                    &MergeCall {
                        tensor_name: &job.name,
                        layer: job.layer,
                        base: base.as_ref(),
                        base_index: job.base_index,
                        models: &models,
                        params: &job.params,
                        model_params: &job.model_params,
                        seed: seed_for(seed, &job.name),
                    },
                )?;
                if out.dims() != job.shape.as_slice() {
                    return Err(MergeError::Plugin(PluginError::Call {
                        plugin: plugin.info.name.clone(),
                        path: plugin.info.path.clone(),
                        message: format!(
                            "returned shape {:?} for `{}`, expected {:?}",
                            out.dims(),
                            job.name,
                            job.shape
                        ),
                    }));
                }
                out
            }
        };
        // Inputs were checked at load, so a non-finite value here is the method's (or the output
        // conversion's) doing.
        let converted = out.dtype() != job.out_dtype;
        let written = self.to_out_dtype(job, out.clone())?;
        self.check_output(job, &written, converted.then_some(&out), allow_nonfinite)?;
        Ok(written)
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
            indicatif::ProgressStyle::with_template(
                "{spinner} merging [{bar:40}] {pos}/{len} tensors {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let work = || {
            self.jobs
                .par_iter()
                .try_for_each(|job| -> Result<(), MergeError> {
                    if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                        return Err(MergeError::Interrupted);
                    }
                    match self.raw_copy(job) {
                        Some(bytes) => {
                            let found = scan_bytes(bytes, job.out_dtype);
                            self.check_input(&job.inputs[0], found, job.out_dtype, opts.allow_nonfinite)
                                .map_err(|e| MergeError::Tensor {
                                    tensor: job.name.clone(),
                                    source: Box::new(e),
                                })?;
                            writer.write_raw(&job.name, bytes)?
                        }
                        None => {
                            let t = self
                                .merge_one(&backend, job, opts.seed, opts.allow_nonfinite)
                                .map_err(|e| MergeError::Tensor {
                                    tensor: job.name.clone(),
                                    source: Box::new(e),
                                })?;
                            writer.write_tensor(&job.name, &t)?;
                        }
                    }
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
        Ok(MergeReport {
            out_dir,
            tensors: self.jobs.len(),
            bytes,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// The merged model's config.json: the donor's, with dtype, the layer count (slices) and the
    /// vocabulary size (tokenizer_source) updated.
    pub fn output_config(&self) -> Value {
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
        if let Some(layers) = &self.out_layers {
            set_config_field(&mut config, "num_hidden_layers", Value::from(layers.len()));
            // Per-layer entries (e.g. `layer_types` of sliding/full attention) follow their layers.
            if config_field(&config, "layer_types").is_some() {
                let types: Option<Vec<Value>> = layers
                    .iter()
                    .map(|&(c, l)| {
                        config_field(self.checkpoints[c].config(), "layer_types")
                            .and_then(Value::as_array)
                            .and_then(|a| a.get(l))
                            .cloned()
                    })
                    .collect();
                match types {
                    Some(t) => set_config_field(&mut config, "layer_types", Value::Array(t)),
                    None => {
                        tracing::warn!("`layer_types` in config.json could not be rebuilt for the new layers")
                    }
                }
            }
        }
        if let Some(v) = &self.vocab {
            set_config_field(&mut config, "vocab_size", Value::from(v.rows));
        }
        config
    }

    fn write_side_files(&self, writer: &CheckpointWriter) -> Result<(), MergeError> {
        let donor = &self.checkpoints[self.donor];
        let text = serde_json::to_string_pretty(&self.output_config())
            .map_err(|e| MergeError::Plan(e.to_string()))?;
        writer.write_file("config.json", format!("{text}\n").as_bytes())?;
        let copy_from = |dir: &Path, names: &[&str]| -> Result<(), MergeError> {
            for name in names {
                let src = dir.join(name);
                if src.is_file() {
                    writer.copy_file(&src, name)?;
                }
            }
            Ok(())
        };
        match self.vocab.as_ref().map(|v| &v.files) {
            None => {
                for f in donor.side_files() {
                    if let Some(name) = f.file_name().and_then(|n| n.to_str()) {
                        writer.copy_file(&f, name)?;
                    }
                }
            }
            Some(files) => {
                match files {
                    TokenizerFiles::Copy(dir) => copy_from(dir, vocab::TOKENIZER_FILES)?,
                    TokenizerFiles::Write {
                        dir,
                        tokenizer_json,
                        tokenizer_config,
                    } => {
                        writer.write_file("tokenizer.json", tokenizer_json.as_bytes())?;
                        if let Some(c) = tokenizer_config {
                            writer.write_file("tokenizer_config.json", c.as_bytes())?;
                        }
                        // Files that encode the old vocabulary (tokenizer.model, vocab.json, ...)
                        // are left out: tokenizer.json alone describes the new one.
                        let keep: Vec<&str> = vocab::TOKENIZER_FILES
                            .iter()
                            .copied()
                            .filter(|n| !vocab::VOCAB_FILES.contains(n))
                            .collect();
                        copy_from(dir, &keep)?;
                    }
                }
                for f in donor.side_files() {
                    if let Some(name) = f.file_name().and_then(|n| n.to_str()) {
                        if !vocab::TOKENIZER_FILES.contains(&name) {
                            writer.copy_file(&f, name)?;
                        }
                    }
                }
            }
        }
        writer.write_file("mergekit_config.yml", self.config.source_text.as_bytes())?;
        let card = card::model_card(
            &self.config,
            self.method.name(),
            &self.method.provenance(),
            &self.model_dirs(),
            self.base_dir().as_deref(),
        );
        writer.write_file("README.md", card.as_bytes())?;
        Ok(())
    }

    fn model_dirs(&self) -> Vec<PathBuf> {
        let mut seen = HashSet::new();
        self.jobs
            .iter()
            .flat_map(|j| j.inputs.iter().map(|i| i.ckpt))
            .filter(|c| seen.insert(*c))
            .map(|c| self.checkpoints[c].dir().to_path_buf())
            .collect()
    }

    fn base_dir(&self) -> Option<PathBuf> {
        self.base_ckpt.map(|b| self.checkpoints[b].dir().to_path_buf())
    }
}

/// Plans and runs a merge in one call.
pub fn run_merge(
    config: &MergeConfig,
    registry: &Registry,
    opts: &MergeOptions,
) -> Result<MergeReport, MergeError> {
    MergePlan::new(config, registry)?.run(opts, None)
}

/// Resolved parameters of one tensor, for `--dry-run` style inspection.
pub fn describe_params(params: &str) -> Map<String, Value> {
    serde_json::from_str(params).unwrap_or_default()
}

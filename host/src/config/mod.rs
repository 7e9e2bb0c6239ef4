//! mergekit YAML merge configurations: parsing into a typed plan, and per-tensor parameters.
//!
//! [`MergeConfig`] reads the schema of mergekit 0.1.5's `mergekit-yaml` (`merge_method`,
//! `base_model`, `models:` or `slices:`, `parameters`, `dtype`, `out_dtype`, `tokenizer_source` /
//! `tokenizer`, `chat_template`); [`MoeConfig`] reads `mergekit-moe` configs, which
//! [`MergeConfig`] refuses with a message that says so; [`AnyConfig`] takes either.
//!
//! # Parameters, as mergekit 0.1.5 resolves them
//!
//! * A setting is a scalar, a gradient list, or filtered entries ([`ParamValue`]).
//! * Gradients are evaluated at `t` = [`TensorSite::gradient_position`]: layer `i` of an
//!   `n`-layer slice at `i/(n−1)`, a one-layer slice at `1`, and every tensor outside the layers
//!   (embed_tokens, the final norm, lm_head) at `0`, i.e. the first entry of the list. (mergekit
//!   0.1.5 builds the reader for the pre- and post-layer weights with `t = 0`; older mergekit
//!   releases used `t = 1` for the post-layer weights.)
//! * Filters are substrings of the tensor name, tried in YAML order; the entry without a filter
//!   (or with `*`) matches everything; when none matches, the setting is absent at that level.
//! * Scopes: a per-model (per-source) setting wins over the slice's, which wins over the global
//!   one; the fall-through is per name *and* per tensor, so a filtered per-model setting that
//!   does not match a tensor falls back to the global setting of the same name
//!   ([`MergeConfig::model_params`]). Method-level (shared) parameters never come from the
//!   per-model scope ([`MergeConfig::global_params`]).
//! * Tensors outside the layers take their slice scope from the first slice (embed_tokens) or the
//!   last slice (norm, lm_head), as mergekit plans them.
//!
//! # Differences from mergekit
//!
//! * Relative model paths are resolved against the directory of the YAML file (mergekit resolves
//!   them against the working directory), so `mglue merge configs/x.yml` works from anywhere.
//!   Hugging Face hub ids are not fetched (no network): they are resolved like paths, and the
//!   engine reports a missing directory.
//! * Unknown keys are errors (pydantic in mergekit ignores them silently), with a "did you mean".
//! * Not supported, with an error saying so: `modules:` (multi-module merges) and `MODEL+LORA`
//!   references. Gradient lists must be numbers (mergekit also allows lists of booleans or
//!   strings, selected by index). `residual_weight` on a slice is accepted and ignored (as in
//!   mergekit 0.1.5).
//! * YAML is read as YAML 1.2 (serde_yaml), mergekit uses PyYAML (YAML 1.1): `1e-5` is a number
//!   here and a string there (which mergekit converts back for numeric parameters, so numeric
//!   parameters agree), and `yes`/`no`/`on`/`off` are strings here, not booleans.

mod error;
mod flags;
mod moe;
mod params;
mod yaml;

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde_json::{Map, Value as Json};

pub use error::ConfigError;
pub use flags::{parse_model_flag, parse_param_flag, parse_param_value};
pub use moe::{AnyConfig, GateMode, MoeConfig, MoeExpert};
pub use params::{resolve_layered, resolve_params, ConditionalValue, ParamMap, ParamValue, TensorSite};

/// One entry of `models:`: a model and its model-specific parameters (weight, density, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    /// The model directory (resolved against the YAML file's directory).
    pub model: PathBuf,
    /// Its per-model parameters.
    pub parameters: ParamMap,
}

/// One source of a slice: a layer range of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceSource {
    /// The model directory (resolved against the YAML file's directory).
    pub model: PathBuf,
    /// Layers `[start, end)` of the model.
    pub layer_range: (usize, usize),
    /// Per-source (per-model) parameters.
    pub parameters: ParamMap,
}

impl SliceSource {
    /// Number of layers this source contributes.
    pub fn num_layers(&self) -> usize {
        self.layer_range.1 - self.layer_range.0
    }
}

/// One output slice: its sources (all spanning the same number of layers) merged layer by layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    /// The sources merged into this slice.
    pub sources: Vec<SliceSource>,
    /// Slice-level parameters (between per-source and global in precedence).
    pub parameters: ParamMap,
    /// A base model for this slice only, overriding the config's `base_model`.
    pub base_model: Option<PathBuf>,
}

impl Slice {
    /// Number of layers of the slice (that of its first source; all are equal once parsed).
    pub fn num_layers(&self) -> usize {
        self.sources.first().map_or(0, SliceSource::num_layers)
    }
}

/// Where the merged model's tokenizer comes from (`tokenizer_source:` / `tokenizer.source`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// The base model's tokenizer; embedding rows are cut to its vocabulary.
    Base,
    /// The union of all models' vocabularies.
    Union,
    /// The tokenizer of this model.
    Model(PathBuf),
}

/// A parsed `mergekit-yaml` merge configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeConfig {
    /// The method name (`linear`, `slerp`, `ties`, ...): the plugin to run.
    pub merge_method: String,
    /// The base model, if any.
    pub base_model: Option<PathBuf>,
    /// From `models:`; empty when `slices:` is used.
    pub models: Vec<ModelEntry>,
    /// From `slices:`; empty when `models:` is used.
    pub slices: Vec<Slice>,
    /// Global (method-level) parameters: normalize, t, lambda, ... and fallbacks for per-model ones.
    pub parameters: ParamMap,
    /// `dtype:`: every input tensor is cast to it at load.
    pub dtype: Option<DType>,
    /// `out_dtype:`: the output tensors are cast to it when saved.
    pub out_dtype: Option<DType>,
    /// The tokenizer source, from `tokenizer_source: X` or `tokenizer: {source: X}`.
    pub tokenizer_source: Option<TokenizerSource>,
    /// `chat_template:` (a template name or a Jinja template).
    pub chat_template: Option<String>,
    /// The exact YAML text (for the model card).
    pub source_text: String,
    /// `tokenizer.tokens` as written (per-token embedding sources), as JSON.
    pub tokenizer_tokens: Option<Json>,
    /// `tokenizer.pad_to_multiple_of`.
    pub pad_to_multiple_of: Option<usize>,
}

impl MergeConfig {
    /// Reads and parses a YAML file; relative model paths are resolved against its directory
    /// (mergekit resolves them against the working directory; absolute paths are kept). Whether
    /// the models exist is checked later, by the engine.
    pub fn from_yaml_file(path: &Path) -> Result<MergeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new(""));
        Self::from_yaml_str(&text, dir).map_err(|e| e.with_file(path))
    }

    /// Parses YAML text; relative model paths are resolved against `base_dir`.
    ///
    /// Unknown keys are errors naming the key (with a "did you mean" when it is close to a known
    /// one); a mergekit-moe config is refused with [`ConfigError::MoeConfig`].
    pub fn from_yaml_str(text: &str, base_dir: &Path) -> Result<MergeConfig, ConfigError> {
        yaml::parse_merge_config(text, base_dir)
    }

    /// Builds a config from command-line flags (`--method`, `--model PATH:k=v`, `--base`,
    /// `--param k=v`, `--dtype`, `--out-dtype`); `source_text` is an equivalent YAML rendering.
    /// Paths are kept as given.
    pub fn from_flags(
        method: &str,
        models: &[(PathBuf, ParamMap)],
        base: Option<PathBuf>,
        global: ParamMap,
        dtype: Option<DType>,
        out_dtype: Option<DType>,
    ) -> MergeConfig {
        let mut cfg = MergeConfig {
            merge_method: method.to_string(),
            base_model: base,
            models: models
                .iter()
                .map(|(model, parameters)| ModelEntry {
                    model: model.clone(),
                    parameters: parameters.clone(),
                })
                .collect(),
            slices: Vec::new(),
            parameters: global,
            dtype,
            out_dtype,
            tokenizer_source: None,
            chat_template: None,
            source_text: String::new(),
            tokenizer_tokens: None,
            pad_to_multiple_of: None,
        };
        cfg.source_text = format!("# rendered by mglue from command-line flags\n{}", cfg.to_yaml());
        cfg
    }

    /// Renders the config as mergekit YAML (paths as they are stored, i.e. resolved).
    pub fn to_yaml(&self) -> String {
        flags::render_yaml(self)
    }

    /// Every model the config merges (models, slices' sources and slice base models, base),
    /// deduplicated, in that order of first appearance. mergekit returns a set (arbitrary order);
    /// here, without a base model, the first entry is the first listed model.
    pub fn referenced_models(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        let mut push = |p: &PathBuf| {
            if !out.contains(p) {
                out.push(p.clone());
            }
        };
        self.models.iter().for_each(|m| push(&m.model));
        for s in &self.slices {
            s.sources.iter().for_each(|src| push(&src.model));
            if let Some(b) = &s.base_model {
                push(b);
            }
        }
        if let Some(b) = &self.base_model {
            push(b);
        }
        out
    }

    /// Global (method-level) parameters that apply to this tensor: `parameters:` resolved for
    /// `site` (use the output tensor name). For a `slices:` config use [`Self::slice_params`],
    /// which adds the slice scope.
    pub fn global_params(&self, site: &TensorSite) -> Map<String, Json> {
        resolve_params(&self.parameters, site)
    }

    /// Parameters of `models[model_index]` for this tensor: its own `parameters:` over the
    /// global ones (per name, the model's wins when it resolves for this tensor; otherwise the
    /// global setting of the same name applies, as in mergekit). Every name of both scopes is
    /// included; use [`Self::model_params_for`] to keep only a method's per-model parameter
    /// names. An index past the end (e.g. a base model that is not listed in `models:`) has no
    /// model scope, so only the global parameters apply.
    pub fn model_params(&self, model_index: usize, site: &TensorSite) -> Map<String, Json> {
        match self.models.get(model_index) {
            Some(m) => resolve_layered(&[&m.parameters, &self.parameters], site),
            None => self.global_params(site),
        }
    }

    /// [`Self::model_params`] restricted to `names` (the per-model parameters a method declares,
    /// e.g. `["weight", "density"]`), so method-level settings such as `normalize` are not passed
    /// as per-model parameters.
    pub fn model_params_for(
        &self,
        model_index: usize,
        site: &TensorSite,
        names: &[&str],
    ) -> Map<String, Json> {
        let mut all = self.model_params(model_index, site);
        all.retain(|k, _| names.contains(&k.as_str()));
        all
    }

    /// Method-level parameters of slice `slice_index` for this tensor: the slice's `parameters:`
    /// over the global ones. An index past the end gives the global parameters.
    pub fn slice_params(&self, slice_index: usize, site: &TensorSite) -> Map<String, Json> {
        match self.slices.get(slice_index) {
            Some(s) => resolve_layered(&[&s.parameters, &self.parameters], site),
            None => self.global_params(site),
        }
    }

    /// Per-model parameters of source `source_index` of slice `slice_index`: the source's own
    /// parameters, then the slice's, then the global ones (mergekit's precedence). Indices past
    /// the end drop the missing scopes.
    pub fn source_params(
        &self,
        slice_index: usize,
        source_index: usize,
        site: &TensorSite,
    ) -> Map<String, Json> {
        let Some(slice) = self.slices.get(slice_index) else {
            return self.global_params(site);
        };
        match slice.sources.get(source_index) {
            Some(src) => resolve_layered(&[&src.parameters, &slice.parameters, &self.parameters], site),
            None => resolve_layered(&[&slice.parameters, &self.parameters], site),
        }
    }
}

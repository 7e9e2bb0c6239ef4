//! `mergekit-moe` configurations (schema of mergekit 0.1.5's `MoEMergeConfig`), kept apart from
//! [`MergeConfig`]: they build a Mixtral-style mixture from experts instead of merging tensors.

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::Deserialize;

use super::error::{from_yaml_error, ConfigError};
use super::yaml::{doc_kind, dtype_from_name, model_path, top_level_line, DocKind};
use super::MergeConfig;

/// How the router (gate) weights of a mergekit-moe build are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateMode {
    /// Hidden states of the base model for each expert's prompts (mergekit's default).
    Hidden,
    /// Averaged raw token embeddings of the prompts, the same for every layer.
    CheapEmbed,
    /// Standard normal random weights.
    Random,
    /// torch's default `nn.Linear` initialisation.
    UniformRandom,
}

impl GateMode {
    fn parse(s: &str) -> Option<GateMode> {
        Some(match s {
            "hidden" => GateMode::Hidden,
            "cheap_embed" => GateMode::CheapEmbed,
            "random" => GateMode::Random,
            "uniform_random" => GateMode::UniformRandom,
            _ => return None,
        })
    }

    /// Whether this mode needs prompts for every expert.
    pub fn needs_prompts(self) -> bool {
        matches!(self, GateMode::Hidden | GateMode::CheapEmbed)
    }
}

/// One expert of a mergekit-moe config.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeExpert {
    /// The model whose MLPs become this expert (resolved against the YAML file's directory).
    pub source_model: PathBuf,
    /// Prompts that should route to this expert.
    pub positive_prompts: Vec<String>,
    /// Prompts that should not.
    pub negative_prompts: Vec<String>,
    /// `noise_scale`, as written.
    pub noise_scale: Option<f64>,
    /// `residual_scale`, as written.
    pub residual_scale: Option<f64>,
}

/// A parsed `mergekit-moe` configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// The model that provides everything but the experts' MLPs.
    pub base_model: PathBuf,
    /// The routed experts, in order.
    pub experts: Vec<MoeExpert>,
    /// Router initialisation (`gate_mode`, default `hidden`).
    pub gate_mode: GateMode,
    /// `dtype:` of the output.
    pub dtype: Option<DType>,
    /// Experts used per token (`experts_per_token`, default 2).
    pub experts_per_token: usize,
    /// Always-active experts (Qwen2-MoE style), if any.
    pub shared_experts: Vec<MoeExpert>,
    /// `architecture:` of the output, as written (e.g. `mixtral`).
    pub architecture: Option<String>,
    /// The exact YAML text.
    pub source_text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMoe {
    base_model: String,
    experts: Vec<RawExpert>,
    gate_mode: Option<String>,
    dtype: Option<String>,
    experts_per_token: Option<usize>,
    shared_experts: Option<Vec<RawExpert>>,
    architecture: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpert {
    source_model: String,
    positive_prompts: Option<Vec<String>>,
    negative_prompts: Option<Vec<String>>,
    noise_scale: Option<f64>,
    residual_scale: Option<f64>,
}

impl MoeConfig {
    /// Reads and parses a mergekit-moe YAML file; relative paths are resolved against its
    /// directory, as for [`MergeConfig::from_yaml_file`].
    pub fn from_yaml_file(path: &Path) -> Result<MoeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new(""));
        Self::from_yaml_str(&text, dir).map_err(|e| e.with_file(path))
    }

    /// Parses mergekit-moe YAML text, checking what mergekit checks before building
    /// (`experts_per_token >= 1`, at least that many experts, prompts for every expert when the
    /// gate mode needs them, and not the same prompts for all experts). mergekit's refusal of
    /// experts that are all the same model is left to the caller (mergekit has a flag for it).
    pub fn from_yaml_str(text: &str, base_dir: &Path) -> Result<MoeConfig, ConfigError> {
        if doc_kind(text)? == DocKind::Merge {
            return Err(ConfigError::NotMoeConfig { file: None });
        }
        let raw: RawMoe = serde_yaml::from_str(text).map_err(|e| from_yaml_error(&e))?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            file: None,
            line: top_level_line(text, key.split(['[', '.']).next().unwrap_or(key)),
            key: key.to_string(),
            message,
        };
        let path = |key: &str, s: &str| {
            model_path(s, base_dir).map_err(|m| ConfigError::Unsupported {
                file: None,
                line: top_level_line(text, key.split(['[', '.']).next().unwrap_or(key)),
                key: key.to_string(),
                message: m,
            })
        };
        let gate_mode = match raw.gate_mode.as_deref() {
            None => GateMode::Hidden,
            Some(g) => GateMode::parse(g).ok_or_else(|| {
                invalid(
                    "gate_mode",
                    format!("unknown gate mode {g:?}; use hidden, cheap_embed, random or uniform_random"),
                )
            })?,
        };
        let dtype = raw
            .dtype
            .map(|d| {
                dtype_from_name(&d).ok_or_else(|| {
                    invalid(
                        "dtype",
                        format!("unsupported dtype {d:?}; use float32, bfloat16 or float16"),
                    )
                })
            })
            .transpose()?;
        let expert = |key: String, e: RawExpert| -> Result<MoeExpert, ConfigError> {
            Ok(MoeExpert {
                source_model: path(&key, &e.source_model)?,
                positive_prompts: e.positive_prompts.unwrap_or_default(),
                negative_prompts: e.negative_prompts.unwrap_or_default(),
                noise_scale: e.noise_scale,
                residual_scale: e.residual_scale,
            })
        };
        let experts = raw
            .experts
            .into_iter()
            .enumerate()
            .map(|(i, e)| expert(format!("experts[{i}].source_model"), e))
            .collect::<Result<Vec<_>, _>>()?;
        let shared_experts = raw
            .shared_experts
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, e)| expert(format!("shared_experts[{i}].source_model"), e))
            .collect::<Result<Vec<_>, _>>()?;
        let experts_per_token = raw.experts_per_token.unwrap_or(2);
        if experts_per_token < 1 {
            return Err(invalid("experts_per_token", "must be at least 1".into()));
        }
        if experts.len() < experts_per_token {
            return Err(invalid(
                "experts",
                format!(
                    "{} experts but experts_per_token is {experts_per_token}; list at least as many \
                     experts as are used per token",
                    experts.len()
                ),
            ));
        }
        if gate_mode.needs_prompts() {
            if let Some(i) = experts.iter().position(|e| e.positive_prompts.is_empty()) {
                return Err(invalid(
                    &format!("experts[{i}].positive_prompts"),
                    "this gate mode builds the router from prompts: give each expert one or more \
                     positive_prompts (or use gate_mode: random)"
                        .into(),
                ));
            }
            let same = |a: &MoeExpert, b: &MoeExpert| {
                a.positive_prompts == b.positive_prompts && a.negative_prompts == b.negative_prompts
            };
            if experts.len() > 1 && experts[1..].iter().all(|e| same(e, &experts[0])) {
                return Err(invalid(
                    "experts",
                    "every expert has the same positive and negative prompts, so the router \
                     could not tell them apart; give each expert prompts of what it should get"
                        .into(),
                ));
            }
        }
        Ok(MoeConfig {
            base_model: path("base_model", &raw.base_model)?,
            experts,
            gate_mode,
            dtype,
            experts_per_token,
            shared_experts,
            architecture: raw.architecture,
            source_text: text.to_string(),
        })
    }

    /// Every model the config uses (base, experts, shared experts), deduplicated, in that order.
    pub fn referenced_models(&self) -> Vec<PathBuf> {
        let mut out = vec![self.base_model.clone()];
        for e in self.experts.iter().chain(&self.shared_experts) {
            if !out.contains(&e.source_model) {
                out.push(e.source_model.clone());
            }
        }
        out
    }
}

/// Either kind of mergekit config, told apart by its keys (`experts:` and no `merge_method:` is
/// mergekit-moe).
#[derive(Debug, Clone, PartialEq)]
pub enum AnyConfig {
    /// A `mergekit-yaml` merge.
    Merge(MergeConfig),
    /// A `mergekit-moe` mixture build.
    Moe(MoeConfig),
}

impl AnyConfig {
    /// Reads a YAML file of either kind.
    pub fn from_yaml_file(path: &Path) -> Result<AnyConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new(""));
        Self::from_yaml_str(&text, dir).map_err(|e| e.with_file(path))
    }

    /// Parses YAML text of either kind.
    pub fn from_yaml_str(text: &str, base_dir: &Path) -> Result<AnyConfig, ConfigError> {
        Ok(match doc_kind(text)? {
            DocKind::Merge => AnyConfig::Merge(MergeConfig::from_yaml_str(text, base_dir)?),
            DocKind::Moe => AnyConfig::Moe(MoeConfig::from_yaml_str(text, base_dir)?),
        })
    }
}

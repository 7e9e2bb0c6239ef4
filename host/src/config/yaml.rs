//! The raw serde shape of a mergekit 0.1.5 `mergekit-yaml` config, and its conversion into
//! [`MergeConfig`]. Unknown keys are rejected everywhere (`deny_unknown_fields`), so serde_yaml
//! reports them with their position.

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::Deserialize;
use serde_yaml::Value as Yaml;

use super::error::{from_yaml_error, ConfigError};
use super::params::YamlParams;
use super::{MergeConfig, ModelEntry, Slice, SliceSource, TokenizerSource};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    modules: Option<Yaml>,
    slices: Option<Vec<RawSlice>>,
    models: Option<Vec<RawModel>>,
    merge_method: Option<String>,
    base_model: Option<String>,
    dtype: Option<String>,
    tokenizer_source: Option<String>,
    tokenizer: Option<RawTokenizer>,
    chat_template: Option<String>,
    out_dtype: Option<String>,
    parameters: Option<YamlParams>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    model: String,
    parameters: Option<YamlParams>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlice {
    sources: Vec<RawSource>,
    base_model: Option<String>,
    residual_weight: Option<f64>,
    parameters: Option<YamlParams>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    model: String,
    layer_range: (usize, usize),
    parameters: Option<YamlParams>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenizer {
    source: Option<String>,
    tokens: Option<Yaml>,
    pad_to_multiple_of: Option<usize>,
}

/// What kind of config a YAML document is, judged from its top-level keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DocKind {
    Merge,
    Moe,
}

/// Parses the text to a YAML value (reporting syntax errors with their position) and tells a
/// mergekit-moe config (`experts:`, no `merge_method:`) from a mergekit-yaml one.
pub(crate) fn doc_kind(text: &str) -> Result<DocKind, ConfigError> {
    let doc: Yaml = serde_yaml::from_str(text).map_err(|e| from_yaml_error(&e))?;
    let Yaml::Mapping(map) = doc else {
        return Err(ConfigError::Invalid {
            file: None,
            line: None,
            key: "(document)".into(),
            message: "a merge config is a YAML mapping with `merge_method:` and `models:` or \
                      `slices:`; this document is empty or not a mapping"
                .into(),
        });
    };
    let has = |k: &str| map.contains_key(Yaml::String(k.into()));
    Ok(if !has("merge_method") && has("experts") {
        DocKind::Moe
    } else {
        DocKind::Merge
    })
}

/// The 1-based line where the top-level key `key` is written, if it can be found.
pub(crate) fn top_level_line(text: &str, key: &str) -> Option<u32> {
    text.lines()
        .position(|l| {
            let l = l.strip_prefix(['"', '\'']).unwrap_or(l);
            l.strip_prefix(key)
                .map(|rest| rest.trim_start_matches(['"', '\'']).trim_start().starts_with(':'))
                .unwrap_or(false)
        })
        .and_then(|i| u32::try_from(i + 1).ok())
}

pub(crate) fn parse_merge_config(text: &str, base_dir: &Path) -> Result<MergeConfig, ConfigError> {
    if doc_kind(text)? == DocKind::Moe {
        return Err(ConfigError::MoeConfig { file: None });
    }
    let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| from_yaml_error(&e))?;
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        file: None,
        line: top_level_line(text, key.split(['[', '.']).next().unwrap_or(key)),
        key: key.to_string(),
        message,
    };
    let unsupported = |key: &str, message: String| ConfigError::Unsupported {
        file: None,
        line: top_level_line(text, key.split(['[', '.']).next().unwrap_or(key)),
        key: key.to_string(),
        message,
    };

    let merge_method = match raw.merge_method {
        Some(m) if !m.trim().is_empty() => m,
        _ => {
            return Err(invalid(
                "merge_method",
                "missing; add the method to run, e.g. `merge_method: linear` (or slerp, ties, \
                 task_arithmetic, dare_ties, model_stock, passthrough, ...)"
                    .into(),
            ))
        }
    };
    if raw.modules.is_some() {
        return Err(unsupported(
            "modules",
            "multi-module merges (`modules:`) are not supported; write the merge with `models:` \
             or `slices:`"
                .into(),
        ));
    }

    let resolve = |key: &str, s: &str| -> Result<PathBuf, ConfigError> {
        model_path(s, base_dir).map_err(|m| unsupported(key, m))
    };

    let raw_models = raw.models.unwrap_or_default();
    let raw_slices = raw.slices.unwrap_or_default();
    match (raw_models.is_empty(), raw_slices.is_empty()) {
        (true, true) => {
            return Err(invalid(
                "models",
                "the config lists no models; give either `models:` (a list of `- model: PATH`) \
                 or `slices:`"
                    .into(),
            ))
        }
        (false, false) => {
            return Err(invalid(
                "slices",
                "the config has both `models:` and `slices:`; mergekit takes exactly one of them, \
                 so keep one"
                    .into(),
            ))
        }
        _ => {}
    }

    let mut models = Vec::with_capacity(raw_models.len());
    for (i, m) in raw_models.into_iter().enumerate() {
        models.push(ModelEntry {
            model: resolve(&format!("models[{i}].model"), &m.model)?,
            parameters: m.parameters.map(|p| p.0).unwrap_or_default(),
        });
    }

    let mut slices = Vec::with_capacity(raw_slices.len());
    for (i, s) in raw_slices.into_iter().enumerate() {
        if s.sources.is_empty() {
            return Err(invalid(
                &format!("slices[{i}].sources"),
                "a slice needs at least one source (`- model: PATH` with `layer_range: [START, END]`)".into(),
            ));
        }
        if s.residual_weight.is_some() {
            tracing::warn!(
                slice = i,
                "`residual_weight` is ignored (mergekit 0.1.5 ignores it too)"
            );
        }
        let mut sources = Vec::with_capacity(s.sources.len());
        for (j, src) in s.sources.into_iter().enumerate() {
            let (start, end) = src.layer_range;
            if start > end {
                return Err(invalid(
                    &format!("slices[{i}].sources[{j}].layer_range"),
                    format!("[{start}, {end}] is reversed; write [START, END) with START <= END"),
                ));
            }
            sources.push(SliceSource {
                model: resolve(&format!("slices[{i}].sources[{j}].model"), &src.model)?,
                layer_range: (start, end),
                parameters: src.parameters.map(|p| p.0).unwrap_or_default(),
            });
        }
        let len0 = sources[0].layer_range.1 - sources[0].layer_range.0;
        if let Some((j, bad)) = sources
            .iter()
            .enumerate()
            .find(|(_, s)| s.layer_range.1 - s.layer_range.0 != len0)
        {
            return Err(invalid(
                &format!("slices[{i}].sources[{j}].layer_range"),
                format!(
                    "spans {} layers but sources[0] spans {len0}; all sources of a slice must \
                     contain the same number of layers",
                    bad.layer_range.1 - bad.layer_range.0
                ),
            ));
        }
        slices.push(Slice {
            sources,
            parameters: s.parameters.map(|p| p.0).unwrap_or_default(),
            base_model: s
                .base_model
                .map(|b| resolve(&format!("slices[{i}].base_model"), &b))
                .transpose()?,
        });
    }

    let base_model = raw.base_model.map(|b| resolve("base_model", &b)).transpose()?;

    let parse_dtype = |key: &str, name: Option<String>| -> Result<Option<DType>, ConfigError> {
        name.map(|n| {
            dtype_from_name(&n).ok_or_else(|| {
                invalid(
                    key,
                    format!(
                        "unsupported dtype {n:?}; use float32, bfloat16 or float16 (or fp32, bf16, fp16)"
                    ),
                )
            })
        })
        .transpose()
    };
    let dtype = parse_dtype("dtype", raw.dtype)?;
    let out_dtype = parse_dtype("out_dtype", raw.out_dtype)?;

    if raw.tokenizer_source.is_some() && raw.tokenizer.is_some() {
        return Err(invalid(
            "tokenizer",
            "both `tokenizer_source:` and `tokenizer:` are given; keep one (`tokenizer: {source: X}` \
             is the newer form of `tokenizer_source: X`)"
                .into(),
        ));
    }
    let tokenizer_source_of = |key: &str, s: &str| -> Result<TokenizerSource, ConfigError> {
        Ok(match s {
            "base" => TokenizerSource::Base,
            "union" => TokenizerSource::Union,
            model => TokenizerSource::Model(resolve(key, model)?),
        })
    };
    let (tokenizer_source, tokenizer_tokens, pad_to_multiple_of) = match (raw.tokenizer_source, raw.tokenizer)
    {
        (Some(s), _) => (Some(tokenizer_source_of("tokenizer_source", &s)?), None, None),
        (None, Some(t)) => {
            // mergekit's TokenizerConfig defaults `source` to "union".
            let source = tokenizer_source_of("tokenizer.source", t.source.as_deref().unwrap_or("union"))?;
            let tokens = t
                .tokens
                .filter(|v| !v.is_null())
                .map(|v| {
                    serde_json::to_value(&v).map_err(|e| {
                        invalid(
                            "tokenizer.tokens",
                            format!("cannot be represented as JSON ({e}); use string keys"),
                        )
                    })
                })
                .transpose()?;
            (Some(source), tokens, t.pad_to_multiple_of)
        }
        (None, None) => (None, None, None),
    };

    Ok(MergeConfig {
        merge_method,
        base_model,
        models,
        slices,
        parameters: raw.parameters.map(|p| p.0).unwrap_or_default(),
        dtype,
        out_dtype,
        tokenizer_source,
        chat_template: raw.chat_template,
        source_text: text.to_string(),
        tokenizer_tokens,
        pad_to_multiple_of,
    })
}

/// Resolves a model reference from a config against `base_dir` (absolute paths are kept).
pub(crate) fn model_path(s: &str, base_dir: &Path) -> Result<PathBuf, String> {
    if s.trim().is_empty() {
        return Err("the model path is empty; give a directory with config.json and safetensors".into());
    }
    if s.contains('+') {
        return Err(format!(
            "{s:?} is a mergekit `MODEL+LORA` reference; LoRA adapters are not supported: merge \
             the adapter into its model first and point at the result"
        ));
    }
    let p = Path::new(s);
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    })
}

/// candle's dtype for a mergekit dtype name (`bfloat16`, `torch.float16`, `fp32`, ...).
pub(crate) fn dtype_from_name(name: &str) -> Option<DType> {
    let n = name.trim();
    let n = n.strip_prefix("torch.").unwrap_or(n);
    Some(match n {
        "float32" | "fp32" | "f32" | "float" => DType::F32,
        "bfloat16" | "bf16" => DType::BF16,
        "float16" | "fp16" | "f16" | "half" => DType::F16,
        "float64" | "fp64" | "f64" | "double" => DType::F64,
        "int64" | "i64" => DType::I64,
        _ => return None,
    })
}

/// The mergekit name of a dtype (`float32`, `bfloat16`, ...), for rendering configs.
pub(crate) fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        DType::I64 => "int64",
        other => other.as_str(),
    }
}

//! Command-line forms of models and parameters (`--model PATH:weight=0.5`, `--param t=0.3`), and
//! rendering a config back to YAML.

use std::path::PathBuf;

use serde_yaml::{Mapping, Value as Yaml};

use super::params::{ParamMap, ParamValue};
use super::yaml::dtype_name;
use super::{ConfigError, MergeConfig, TokenizerSource};

/// Parses `PATH[:key=value,key=value...]` into a model path and its parameters.
///
/// The path may contain `:` itself: the split is at the *last* `:` that is followed by
/// `key=` (a key is `[A-Za-z_][A-Za-z0-9_]*`); without one the whole text is the path. Values
/// are read by [`parse_param_value`]; commas inside a gradient `[0,0.5,1]` do not split.
///
/// ```
/// # use modelglue::config::{parse_model_flag, ParamValue};
/// let (path, params) = parse_model_flag("runs/v2:best:weight=0.5,t=[0,1]").unwrap();
/// assert_eq!(path.to_str(), Some("runs/v2:best"));
/// assert_eq!(params["weight"], ParamValue::Number(0.5));
/// assert_eq!(params["t"], ParamValue::List(vec![0.0, 1.0]));
/// ```
pub fn parse_model_flag(flag: &str) -> Result<(PathBuf, ParamMap), ConfigError> {
    let err = |message: String| ConfigError::Flag {
        flag: flag.to_string(),
        message,
    };
    let split = flag
        .char_indices()
        .filter(|&(_, c)| c == ':')
        .map(|(i, _)| i)
        .rfind(|&i| starts_with_key_eq(&flag[i + 1..]));
    let (path, params_text) = match split {
        Some(i) => (&flag[..i], Some(&flag[i + 1..])),
        None => (flag, None),
    };
    if path.is_empty() {
        return Err(err(
            "the model path is missing; write PATH:weight=0.5,density=0.3".into(),
        ));
    }
    let mut params = ParamMap::new();
    if let Some(text) = params_text {
        for item in split_top_level(text) {
            let (key, value) = parse_key_value(item).map_err(&err)?;
            if params.insert(key.clone(), value).is_some() {
                return Err(err(format!("parameter `{key}` is given twice")));
            }
        }
    }
    Ok((PathBuf::from(path), params))
}

/// Parses one `key=value` parameter flag (`t=0.3`, `normalize=false`, `t=[0,0.5,1]`).
pub fn parse_param_flag(flag: &str) -> Result<(String, ParamValue), ConfigError> {
    parse_key_value(flag).map_err(|message| ConfigError::Flag {
        flag: flag.to_string(),
        message,
    })
}

/// Parses a flag value: `true`/`false` are booleans, a finite number is a number, `[a,b,...]`
/// is a gradient of numbers, `'...'` or `"..."` is a string with the quotes removed, and anything
/// else is a string as written.
pub fn parse_param_value(text: &str) -> Result<ParamValue, ConfigError> {
    value_of(text).map_err(|message| ConfigError::Flag {
        flag: text.to_string(),
        message,
    })
}

fn parse_key_value(item: &str) -> Result<(String, ParamValue), String> {
    let Some((key, value)) = item.split_once('=') else {
        return Err(format!("`{item}` is not `key=value` (e.g. weight=0.5)"));
    };
    let key = key.trim();
    if !is_key(key) {
        return Err(format!(
            "`{key}` is not a parameter name (letters, digits and `_`, not starting with a digit)"
        ));
    }
    Ok((key.to_string(), value_of(value)?))
}

fn value_of(text: &str) -> Result<ParamValue, String> {
    let v = text.trim();
    if v.is_empty() {
        return Err("the value is empty".into());
    }
    if let Some(inner) = v.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| format!("gradient `{v}` has no closing `]`"))?;
        if inner.trim().is_empty() {
            return Err("the gradient list is empty; give numbers, e.g. [0, 0.5, 1]".into());
        }
        return inner
            .split(',')
            .map(|x| {
                number(x.trim())
                    .ok_or_else(|| format!("gradient entry `{}` is not a finite number", x.trim()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(ParamValue::List);
    }
    for q in ['"', '\''] {
        if let Some(s) = v.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return Ok(ParamValue::String(s.to_string()));
        }
    }
    match v {
        "true" | "True" => return Ok(ParamValue::Bool(true)),
        "false" | "False" => return Ok(ParamValue::Bool(false)),
        _ => {}
    }
    if let Ok(x) = v.parse::<f64>() {
        return if x.is_finite() {
            Ok(ParamValue::Number(x))
        } else {
            Err(format!("`{v}` is not a finite number"))
        };
    }
    Ok(ParamValue::String(v.to_string()))
}

fn number(s: &str) -> Option<f64> {
    s.parse::<f64>().ok().filter(|x| x.is_finite())
}

fn is_key(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn starts_with_key_eq(s: &str) -> bool {
    s.split_once('=').is_some_and(|(k, _)| is_key(k))
}

/// Splits at commas that are not inside `[...]`.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

/// Renders a config as mergekit YAML.
pub(crate) fn render_yaml(cfg: &MergeConfig) -> String {
    let key = |k: &str| Yaml::String(k.to_string());
    let path = |p: &std::path::Path| Yaml::String(p.to_string_lossy().into_owned());
    let params = |p: &ParamMap| {
        Yaml::Mapping(
            p.iter()
                .map(|(k, v)| (Yaml::String(k.clone()), v.to_yaml()))
                .collect::<Mapping>(),
        )
    };

    let mut top = Mapping::new();
    top.insert(key("merge_method"), Yaml::String(cfg.merge_method.clone()));
    if let Some(b) = &cfg.base_model {
        top.insert(key("base_model"), path(b));
    }
    if !cfg.models.is_empty() {
        let models = cfg
            .models
            .iter()
            .map(|m| {
                let mut e = Mapping::new();
                e.insert(key("model"), path(&m.model));
                if !m.parameters.is_empty() {
                    e.insert(key("parameters"), params(&m.parameters));
                }
                Yaml::Mapping(e)
            })
            .collect();
        top.insert(key("models"), Yaml::Sequence(models));
    }
    if !cfg.slices.is_empty() {
        let slices = cfg
            .slices
            .iter()
            .map(|s| {
                let sources = s
                    .sources
                    .iter()
                    .map(|src| {
                        let mut e = Mapping::new();
                        e.insert(key("model"), path(&src.model));
                        e.insert(
                            key("layer_range"),
                            Yaml::Sequence(vec![
                                Yaml::Number(src.layer_range.0.into()),
                                Yaml::Number(src.layer_range.1.into()),
                            ]),
                        );
                        if !src.parameters.is_empty() {
                            e.insert(key("parameters"), params(&src.parameters));
                        }
                        Yaml::Mapping(e)
                    })
                    .collect();
                let mut e = Mapping::new();
                e.insert(key("sources"), Yaml::Sequence(sources));
                if let Some(b) = &s.base_model {
                    e.insert(key("base_model"), path(b));
                }
                if !s.parameters.is_empty() {
                    e.insert(key("parameters"), params(&s.parameters));
                }
                Yaml::Mapping(e)
            })
            .collect();
        top.insert(key("slices"), Yaml::Sequence(slices));
    }
    if !cfg.parameters.is_empty() {
        top.insert(key("parameters"), params(&cfg.parameters));
    }
    if let Some(d) = cfg.dtype {
        top.insert(key("dtype"), Yaml::String(dtype_name(d).into()));
    }
    if let Some(d) = cfg.out_dtype {
        top.insert(key("out_dtype"), Yaml::String(dtype_name(d).into()));
    }
    if let Some(t) = &cfg.tokenizer_source {
        let source = match t {
            TokenizerSource::Base => Yaml::String("base".into()),
            TokenizerSource::Union => Yaml::String("union".into()),
            TokenizerSource::Model(p) => path(p),
        };
        if cfg.tokenizer_tokens.is_some() || cfg.pad_to_multiple_of.is_some() {
            let mut e = Mapping::new();
            e.insert(key("source"), source);
            if let Some(tokens) = cfg
                .tokenizer_tokens
                .as_ref()
                .and_then(|t| serde_yaml::to_value(t).ok())
            {
                e.insert(key("tokens"), tokens);
            }
            if let Some(n) = cfg.pad_to_multiple_of {
                e.insert(key("pad_to_multiple_of"), Yaml::Number(n.into()));
            }
            top.insert(key("tokenizer"), Yaml::Mapping(e));
        } else {
            top.insert(key("tokenizer_source"), source);
        }
    }
    if let Some(c) = &cfg.chat_template {
        top.insert(key("chat_template"), Yaml::String(c.clone()));
    }
    // Serializing a tree of plain YAML values cannot fail (no non-string keys, no foreign types).
    serde_yaml::to_string(&Yaml::Mapping(top)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_at_the_last_colon_before_a_key() {
        let (p, m) = parse_model_flag("C:/m/a:b:weight=0.5,density=0.3").expect("parses");
        assert_eq!(p, PathBuf::from("C:/m/a:b"));
        assert_eq!(m.len(), 2);
        let (p, m) = parse_model_flag("/data/run:v2/model").expect("parses");
        assert_eq!(p, PathBuf::from("/data/run:v2/model"));
        assert!(m.is_empty());
    }

    #[test]
    fn commas_inside_gradients_do_not_split() {
        assert_eq!(split_top_level("t=[0,0.5,1],w=2"), ["t=[0,0.5,1]", "w=2"]);
    }
}

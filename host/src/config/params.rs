//! Parameter values as mergekit configs write them, and their per-tensor resolution.
//!
//! A mergekit parameter is a scalar (`t: 0.3`), a gradient (`t: [0, 0.5, 1]`, interpolated along
//! the layers of a slice), or a list of filtered entries (`t: [{filter: self_attn, value: [0, 1]},
//! {value: 0.5}]`) whose first match, by substring of the tensor name, applies.

use std::collections::BTreeMap;

use serde_json::{Map, Value as Json};
use serde_yaml::Value as Yaml;

/// One parameter setting, as written in a config (before it is resolved for a tensor).
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// A number (`weight: 0.5`); integers are stored as `f64` too.
    Number(f64),
    /// A boolean (`normalize: true`).
    Bool(bool),
    /// A string (`mode: sum`).
    String(String),
    /// A gradient (`t: [0, 0.5, 1]`): interpolated linearly along the layers of a slice.
    List(Vec<f64>),
    /// Filtered entries: the first whose filter is a substring of the tensor name (or that has
    /// no filter) applies; none matching means the parameter is not set at this level.
    Conditional(Vec<ConditionalValue>),
}

/// One entry of a [`ParamValue::Conditional`].
#[derive(Debug, Clone, PartialEq)]
pub struct ConditionalValue {
    /// Substring of the tensor name this entry applies to; `None` (or `"*"`) is the default
    /// entry, which matches every tensor.
    pub filter: Option<String>,
    /// The value: a scalar or a gradient list (never another conditional).
    pub value: ParamValue,
}

/// Parameters by name, in name order.
pub type ParamMap = BTreeMap<String, ParamValue>;

/// Where a tensor sits, for parameter resolution.
///
/// Filters are matched against `name`. mergekit 0.1.5 matches per-model parameters against the
/// *input* model's tensor name and global (method) parameters against the *output* tensor name;
/// they differ only where slices renumber layers (passthrough), so pass the name that fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorSite<'a> {
    /// The tensor's name (`model.layers.3.self_attn.q_proj.weight`).
    pub name: &'a str,
    /// Index of the layer within its slice (or model, for a `models:` config); `None` for the
    /// tensors outside any layer (embeddings, final norm, lm_head).
    pub layer: Option<usize>,
    /// Number of layers in the slice (or model).
    pub num_layers: usize,
}

impl<'a> TensorSite<'a> {
    /// A tensor of layer `layer` of a slice (or model) of `num_layers` layers.
    pub fn in_layer(name: &'a str, layer: usize, num_layers: usize) -> Self {
        TensorSite {
            name,
            layer: Some(layer),
            num_layers,
        }
    }

    /// A tensor outside the decoder layers (embed_tokens, the final norm, lm_head).
    pub fn non_layer(name: &'a str) -> Self {
        TensorSite {
            name,
            layer: None,
            num_layers: 0,
        }
    }

    /// The position `t` in `[0, 1]` at which gradient lists are evaluated, as mergekit 0.1.5
    /// computes it: layer `i` of an `n`-layer slice is at `i / (n - 1)`; a one-layer slice is at
    /// `1`; tensors outside the layers (before *and* after them) are at `0`.
    pub fn gradient_position(&self) -> f64 {
        match self.layer {
            None => 0.0,
            Some(i) if self.num_layers > 1 => i as f64 / (self.num_layers - 1) as f64,
            Some(_) => 1.0,
        }
    }
}

impl ParamValue {
    /// Resolves the setting for one tensor into a JSON value.
    ///
    /// Number/Bool/String are returned as they are (a whole number becomes a JSON integer, so
    /// that integer-typed plugin parameters accept it; `f64` fields accept it too). A gradient is
    /// interpolated at [`TensorSite::gradient_position`]: with `t` that position and `n` list
    /// entries, `s = t·(n−1)`, `i0 = ⌊s⌋`, `i1 = min(n−1, i0+1)`, `f = s − i0`, value
    /// `(1−f)·v[i0] + f·v[i1]` (the same f64 operations as mergekit, so the values agree bit for
    /// bit). A conditional takes its first entry whose filter is a substring of the tensor name
    /// or that has no filter; when none matches, or the list is empty, the result is `None` (the
    /// parameter is absent at this level).
    pub fn resolve(&self, site: &TensorSite) -> Option<Json> {
        self.resolve_at(site.name, site.gradient_position())
    }

    fn resolve_at(&self, name: &str, t: f64) -> Option<Json> {
        match self {
            ParamValue::Number(x) => Some(number_json(*x)),
            ParamValue::Bool(b) => Some(Json::Bool(*b)),
            ParamValue::String(s) => Some(Json::String(s.clone())),
            ParamValue::List(values) => interpolate(values, t).map(number_json),
            ParamValue::Conditional(entries) => entries
                .iter()
                .find(|e| e.matches(name))
                .and_then(|e| e.value.resolve_at(name, t)),
        }
    }

    /// Parses a YAML parameter value in mergekit's schema; `key` is only used in messages.
    pub(crate) fn from_yaml(key: &str, value: &Yaml) -> Result<ParamValue, String> {
        match value {
            Yaml::Mapping(_) => Ok(ParamValue::Conditional(vec![conditional_entry(key, value)?])),
            Yaml::Sequence(items) if items.iter().any(|v| matches!(v, Yaml::Mapping(_))) => {
                if !items.iter().all(|v| matches!(v, Yaml::Mapping(_))) {
                    return Err(format!(
                        "parameter `{key}` mixes filtered entries ({{filter, value}}) with plain \
                         values; write every entry as `{{filter: NAME, value: V}}` and the default \
                         as `{{value: V}}`"
                    ));
                }
                let entries = items
                    .iter()
                    .map(|v| conditional_entry(key, v))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(ParamValue::Conditional(entries))
            }
            other => scalar_or_gradient(key, other),
        }
    }

    /// The YAML form of this value (for rendering a config).
    pub(crate) fn to_yaml(&self) -> Yaml {
        match self {
            ParamValue::Number(x) => yaml_number(*x),
            ParamValue::Bool(b) => Yaml::Bool(*b),
            ParamValue::String(s) => Yaml::String(s.clone()),
            ParamValue::List(v) => Yaml::Sequence(v.iter().map(|x| yaml_number(*x)).collect()),
            ParamValue::Conditional(entries) => Yaml::Sequence(
                entries
                    .iter()
                    .map(|e| {
                        let mut m = serde_yaml::Mapping::new();
                        if let Some(f) = &e.filter {
                            m.insert(Yaml::String("filter".into()), Yaml::String(f.clone()));
                        }
                        m.insert(Yaml::String("value".into()), e.value.to_yaml());
                        Yaml::Mapping(m)
                    })
                    .collect(),
            ),
        }
    }
}

impl ConditionalValue {
    /// Whether this entry applies to the tensor called `name`.
    pub fn matches(&self, name: &str) -> bool {
        match self.filter.as_deref() {
            None | Some("*") => true,
            Some(f) => !name.is_empty() && name.contains(f),
        }
    }
}

/// Resolves a [`ParamMap`] for a tensor into a JSON object of the parameters that apply
/// (parameters that resolve to nothing, see [`ParamValue::resolve`], are left out).
pub fn resolve_params(params: &ParamMap, site: &TensorSite) -> Map<String, Json> {
    params
        .iter()
        .filter_map(|(k, v)| v.resolve(site).map(|j| (k.clone(), j)))
        .collect()
}

/// Resolves several parameter scopes, highest precedence first (model, then slice, then global),
/// the way mergekit 0.1.5 does: for each name, the first scope whose setting *resolves* to a
/// value wins, so a filtered setting that matches nothing falls through to the next scope.
pub fn resolve_layered(scopes: &[&ParamMap], site: &TensorSite) -> Map<String, Json> {
    let mut out = Map::new();
    for scope in scopes {
        for (k, v) in scope.iter() {
            if out.contains_key(k) {
                continue;
            }
            if let Some(j) = v.resolve(site) {
                out.insert(k.clone(), j);
            }
        }
    }
    out
}

fn interpolate(values: &[f64], t: f64) -> Option<f64> {
    let last = values.len().checked_sub(1)?;
    let scaled = t * last as f64;
    // t lies in [0, 1] for every site; the clamp only keeps a caller's out-of-range layer from
    // indexing past the end.
    let i0 = (scaled.max(0.0) as usize).min(last);
    let i1 = (i0 + 1).min(last);
    let frac = scaled - i0 as f64;
    Some((1.0 - frac) * values[i0] + frac * values[i1])
}

fn number_json(x: f64) -> Json {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53: every integer below is exact in f64
    if x.fract() == 0.0 && x.abs() < EXACT {
        Json::from(x as i64)
    } else {
        serde_json::Number::from_f64(x).map_or(Json::Null, Json::Number)
    }
}

fn yaml_number(x: f64) -> Yaml {
    Yaml::Number(serde_yaml::Number::from(x))
}

fn conditional_entry(key: &str, value: &Yaml) -> Result<ConditionalValue, String> {
    let Yaml::Mapping(m) = value else {
        return Err(format!("parameter `{key}`: a filtered entry must be a mapping"));
    };
    let mut filter = None;
    let mut val = None;
    for (k, v) in m {
        match k.as_str() {
            Some("filter") => match v {
                Yaml::String(s) => filter = Some(s.clone()),
                Yaml::Null => {}
                _ => {
                    return Err(format!(
                        "parameter `{key}`: `filter` must be a string (a substring of tensor \
                         names, e.g. `self_attn`)"
                    ))
                }
            },
            Some("value") => {
                if matches!(v, Yaml::Mapping(_))
                    || matches!(v, Yaml::Sequence(s) if s.iter().any(|e| matches!(e, Yaml::Mapping(_))))
                {
                    return Err(format!(
                        "parameter `{key}`: a filtered entry's `value` must be a scalar or a \
                         gradient list, not another filtered entry"
                    ));
                }
                val = Some(scalar_or_gradient(key, v)?);
            }
            _ => {
                let name = k.as_str().map_or_else(|| format!("{k:?}"), str::to_string);
                let hint = super::error::did_you_mean(&name, ["filter", "value"])
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                return Err(format!(
                    "parameter `{key}`: unknown key `{name}` in a filtered entry{hint}; an entry \
                     has only `filter` and `value`"
                ));
            }
        }
    }
    let value = val.ok_or_else(|| {
        format!("parameter `{key}`: a filtered entry needs a `value` (e.g. `{{filter: mlp, value: 0.5}}`)")
    })?;
    Ok(ConditionalValue { filter, value })
}

fn scalar_or_gradient(key: &str, value: &Yaml) -> Result<ParamValue, String> {
    match value {
        Yaml::Bool(b) => Ok(ParamValue::Bool(*b)),
        Yaml::Number(n) => finite_number(key, n).map(ParamValue::Number),
        Yaml::String(s) => Ok(ParamValue::String(s.clone())),
        Yaml::Sequence(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Yaml::Number(n) => out.push(finite_number(key, n)?),
                    _ => {
                        return Err(format!(
                            "parameter `{key}`: a gradient list takes numbers only (found \
                             {}); lists of booleans or strings are not supported",
                            describe(item)
                        ))
                    }
                }
            }
            Ok(ParamValue::List(out))
        }
        Yaml::Null => Err(format!(
            "parameter `{key}` has no value; give a number, boolean, string or list"
        )),
        Yaml::Tagged(_) | Yaml::Mapping(_) => Err(format!(
            "parameter `{key}`: expected a number, boolean, string or gradient list, found {}",
            describe(value)
        )),
    }
}

fn finite_number(key: &str, n: &serde_yaml::Number) -> Result<f64, String> {
    match n.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        _ => Err(format!("parameter `{key}`: {n} is not a finite number")),
    }
}

fn describe(v: &Yaml) -> String {
    match v {
        Yaml::Null => "null".into(),
        Yaml::Bool(b) => format!("the boolean {b}"),
        Yaml::Number(n) => format!("the number {n}"),
        Yaml::String(s) => format!("the string {s:?}"),
        Yaml::Sequence(_) => "a list".into(),
        Yaml::Mapping(_) => "a mapping".into(),
        Yaml::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// Deserializes a `parameters:` mapping into a [`ParamMap`], so that errors carry the YAML
/// position of the offending value.
pub(crate) struct YamlParams(pub ParamMap);

impl<'de> serde::Deserialize<'de> for YamlParams {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = YamlParams;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping of parameter names to values")
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<YamlParams, E> {
                Ok(YamlParams(ParamMap::new()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<YamlParams, A::Error> {
                let mut out = ParamMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value: Yaml = map.next_value()?;
                    let parsed = ParamValue::from_yaml(&key, &value).map_err(serde::de::Error::custom)?;
                    if out.insert(key.clone(), parsed).is_some() {
                        return Err(serde::de::Error::custom(format!(
                            "parameter `{key}` is given twice"
                        )));
                    }
                }
                Ok(YamlParams(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ParamValue {
        let v: Yaml = serde_yaml::from_str(text).expect("yaml");
        ParamValue::from_yaml("t", &v).expect("valid parameter")
    }

    #[test]
    fn gradient_interpolation_matches_mergekit_float_ops() {
        // python3: s=[0.1,0.7,0.2]; t=i/3; scaled=t*(len(s)-1); i0=int(scaled);
        //          i1=min(len(s)-1,i0+1); frac=scaled-i0; (1-frac)*s[i0]+frac*s[i1]
        //   -> 0.1, 0.49999999999999994, 0.5333333333333333, 0.2
        let g = ParamValue::List(vec![0.1, 0.7, 0.2]);
        let got: Vec<f64> = (0..4)
            .map(|i| {
                g.resolve(&TensorSite::in_layer("x", i, 4))
                    .and_then(|j| j.as_f64())
                    .expect("number")
            })
            .collect();
        assert_eq!(got, [0.1, 0.49999999999999994, 0.5333333333333333, 0.2]);
    }

    #[test]
    fn single_layer_slice_takes_the_last_gradient_entry_and_non_layer_tensors_the_first() {
        let g = ParamValue::List(vec![0.25, 0.75]);
        assert_eq!(
            g.resolve(&TensorSite::in_layer("x", 0, 1)),
            Some(serde_json::json!(0.75))
        );
        assert_eq!(
            g.resolve(&TensorSite::non_layer("lm_head.weight")),
            Some(serde_json::json!(0.25))
        );
    }

    #[test]
    fn conditional_without_match_is_absent_and_star_is_default() {
        let c = parse("[{filter: mlp, value: 1}]");
        assert_eq!(c.resolve(&TensorSite::non_layer("model.norm.weight")), None);
        let c = parse("[{filter: mlp, value: 1}, {filter: '*', value: 2}]");
        assert_eq!(
            c.resolve(&TensorSite::non_layer("model.norm.weight")),
            Some(serde_json::json!(2))
        );
        let single = parse("{filter: mlp, value: 0.5}");
        assert_eq!(
            single,
            ParamValue::Conditional(vec![ConditionalValue {
                filter: Some("mlp".into()),
                value: ParamValue::Number(0.5)
            }])
        );
    }

    #[test]
    fn whole_numbers_resolve_to_json_integers() {
        assert_eq!(
            ParamValue::Number(2.0).resolve(&TensorSite::non_layer("x")),
            Some(serde_json::json!(2))
        );
        assert_eq!(
            ParamValue::Number(0.5).resolve(&TensorSite::non_layer("x")),
            Some(serde_json::json!(0.5))
        );
    }

    #[test]
    fn invalid_settings_are_rejected_with_the_parameter_name() {
        for bad in [
            "[true, false]",
            "~",
            "[{value: 1}, 2]",
            "[{filter: a}]",
            "[{filtr: a, value: 1}]",
            "{value: {value: 1}}",
        ] {
            let v: Yaml = serde_yaml::from_str(bad).expect("yaml");
            let err = ParamValue::from_yaml("density", &v).expect_err(bad);
            assert!(err.contains("`density`"), "{bad}: {err}");
        }
    }
}

//! The output layout: which output tensors a config produces and which input tensors feed each.
//!
//! * `models:` form: every tensor of the reference model (base_model, else the first model),
//!   from every model under the same name.
//! * `slices:` form (mergekit's planner): the tensors before the layers (`embed_tokens`) come from
//!   the first slice's sources, then each slice's layers in order, renumbered consecutively
//!   (output layer `offset + k` of slice `s` is the method over each source's layer
//!   `layer_range.0 + k`), then the tensors after the layers (final norm, `lm_head`) from the
//!   last slice's sources. A slice whose sources all cover the same layers of their models is
//!   the `models:` form restricted to those layers; one source per slice with `passthrough`
//!   is a frankenmerge (layer stacking).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::{layer_of, MergeError};
use crate::checkpoint::Checkpoint;
use crate::config::MergeConfig;

/// One input tensor: a tensor of an opened checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Input {
    /// Index into the plan's checkpoints.
    pub ckpt: usize,
    /// The tensor name in that checkpoint.
    pub tensor: String,
}

/// Where a tensor's parameters come from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scope {
    /// `models:` form: model `i`'s parameters, gradients over the model's layers.
    Models {
        /// The layer (`None` outside the layers).
        layer: Option<usize>,
        /// Layers of the model.
        num_layers: usize,
    },
    /// `slices:` form: slice `slice`, its sources in order.
    Slice {
        /// The slice index.
        slice: usize,
        /// The layer within the slice (`None` outside the layers).
        layer: Option<usize>,
        /// Layers of the slice.
        num_layers: usize,
    },
}

/// One output tensor and its inputs.
#[derive(Debug, Clone)]
pub(crate) struct Planned {
    /// The output tensor name.
    pub name: String,
    /// The output decoder layer.
    pub layer: Option<usize>,
    /// One input per model (`models:`) or per source of the slice (`slices:`).
    pub inputs: Vec<Input>,
    /// The base tensor, if the config has a base model that feeds this tensor.
    pub base: Option<Input>,
    /// Position of the base among `inputs`.
    pub base_index: Option<usize>,
    /// Parameter scope.
    pub scope: Scope,
    /// The base model, when it is set but is not a source of this tensor's slice.
    pub base_outside: Option<PathBuf>,
}

/// The planned output.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// Output tensors in write order.
    pub tensors: Vec<Planned>,
    /// `slices:` form: for each output layer, the checkpoint and layer of the slice's first
    /// source (for `num_hidden_layers` and per-layer config entries such as `layer_types`).
    pub layers: Option<Vec<(usize, usize)>>,
}

/// `name` with its decoder-layer index (the `layers.N.` segment, as [`layer_of`] finds it)
/// replaced by `layer`.
pub(crate) fn rename_layer(name: &str, layer: usize) -> String {
    let Some(at) = name.find("layers.") else {
        return name.to_string();
    };
    let start = at + "layers.".len();
    let digits = name[start..].bytes().take_while(u8::is_ascii_digit).count();
    format!("{}{}{}", &name[..start], layer, &name[start + digits..])
}

/// Whether a tensor outside the layers sits before them (embeddings) rather than after them
/// (final norm, lm_head).
fn is_pre_layer(name: &str) -> bool {
    name.contains("embed") || name.contains("wte") || name.contains("wpe")
}

/// The `models:` layout. `reference` lists the tensors; every model must have each of them.
pub(crate) fn models(
    checkpoints: &[Checkpoint],
    model_ckpt: &[usize],
    base_ckpt: Option<usize>,
    reference: usize,
) -> Result<Layout, MergeError> {
    let refck = &checkpoints[reference];
    let num_layers = refck.num_hidden_layers().unwrap_or(0);
    let base_index = base_ckpt.and_then(|b| model_ckpt.iter().position(|&c| c == b));
    let mut tensors = Vec::new();
    for name in refck.tensor_names() {
        let mut check = |c: usize| -> Result<Input, MergeError> {
            let ck = &checkpoints[c];
            if !ck.contains(&name) {
                return Err(MergeError::Mismatch {
                    model: ck.dir().to_path_buf(),
                    tensor: name.clone(),
                    problem: format!(
                        "is missing (present in {}); models merged with `models:` must have the same tensors",
                        refck.dir().display()
                    ),
                });
            }
            Ok(Input {
                ckpt: c,
                tensor: name.clone(),
            })
        };
        let inputs = model_ckpt
            .iter()
            .map(|&c| check(c))
            .collect::<Result<Vec<_>, _>>()?;
        let base = base_ckpt.map(&mut check).transpose()?;
        let layer = layer_of(&name);
        tensors.push(Planned {
            name: name.clone(),
            layer,
            inputs,
            base,
            base_index,
            scope: Scope::Models {
                layer,
                num_layers: layer.map_or(num_layers.max(1), |l| num_layers.max(l + 1)),
            },
            base_outside: None,
        });
    }
    Ok(Layout {
        tensors,
        layers: None,
    })
}

/// Tensor names of a checkpoint, by decoder layer (file order inside each), and the names
/// outside the layers.
struct Names {
    layers: BTreeMap<usize, Vec<String>>,
    other: Vec<String>,
}

impl Names {
    fn of(ck: &Checkpoint) -> Names {
        let mut layers: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        let mut other = Vec::new();
        for n in ck.tensor_names() {
            match layer_of(&n) {
                Some(l) => layers.entry(l).or_default().push(n),
                None => other.push(n),
            }
        }
        Names { layers, other }
    }
}

/// The `slices:` layout. `ckpt_of` maps a model path to its opened checkpoint.
pub(crate) fn slices(
    config: &MergeConfig,
    checkpoints: &[Checkpoint],
    ckpt_of: &HashMap<PathBuf, usize>,
) -> Result<Layout, MergeError> {
    let ck_index = |p: &Path| -> usize { ckpt_of[p] };
    let mut names: HashMap<usize, Names> = HashMap::new();
    for s in &config.slices {
        for src in &s.sources {
            let c = ck_index(&src.model);
            names.entry(c).or_insert_with(|| Names::of(&checkpoints[c]));
        }
    }

    // Layer ranges must lie inside their models.
    for (i, s) in config.slices.iter().enumerate() {
        for (j, src) in s.sources.iter().enumerate() {
            let c = ck_index(&src.model);
            let ck = &checkpoints[c];
            let have = ck
                .num_hidden_layers()
                .unwrap_or_else(|| names[&c].layers.keys().next_back().map_or(0, |l| l + 1));
            let (a, b) = src.layer_range;
            if b > have {
                return Err(MergeError::Plan(format!(
                    "slices[{i}].sources[{j}]: layer_range [{a}, {b}] goes past the {have} layers of {} \
                     (num_hidden_layers in its config.json); use an end of at most {have}",
                    ck.dir().display()
                )));
            }
            if let Some(l) = (a..b).find(|l| !names[&c].layers.contains_key(l)) {
                return Err(MergeError::Plan(format!(
                    "slices[{i}].sources[{j}]: {} has no tensors for layer {l} (no `layers.{l}.` names in its \
                     safetensors); check the layer_range and the checkpoint",
                    ck.dir().display()
                )));
            }
        }
    }

    let base_path = |s: usize| {
        config.slices[s]
            .base_model
            .as_ref()
            .or(config.base_model.as_ref())
    };
    let base_index =
        |s: usize| base_path(s).and_then(|b| config.slices[s].sources.iter().position(|src| &src.model == b));
    let base_outside = |s: usize| base_path(s).filter(|_| base_index(s).is_none()).cloned();
    let sources = |s: usize| -> Vec<usize> {
        config.slices[s]
            .sources
            .iter()
            .map(|src| ck_index(&src.model))
            .collect()
    };

    let missing = |i: usize, j: usize, c: usize, tensor: &str, has: &str| {
        MergeError::Mismatch {
        model: checkpoints[c].dir().to_path_buf(),
        tensor: tensor.to_string(),
        problem: format!(
            "is missing; slices[{i}].sources[{j}] needs it because {} has `{has}` (the sources of a slice must \
             share one architecture)",
            checkpoints[sources(i)[0]].dir().display()
        ),
    }
    };

    let mut tensors = Vec::new();
    // Tensors outside the layers, before (first slice) or after (last slice).
    let outside = |s: usize, pre: bool, tensors: &mut Vec<Planned>| -> Result<(), MergeError> {
        let cks = sources(s);
        for name in names[&cks[0]].other.iter().filter(|n| is_pre_layer(n) == pre) {
            let inputs = cks
                .iter()
                .enumerate()
                .map(|(j, &c)| {
                    if checkpoints[c].contains(name) {
                        Ok(Input {
                            ckpt: c,
                            tensor: name.clone(),
                        })
                    } else {
                        Err(missing(s, j, c, name, name))
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            let bi = base_index(s);
            tensors.push(Planned {
                name: name.clone(),
                layer: None,
                base: bi.map(|b| inputs[b].clone()),
                inputs,
                base_index: bi,
                scope: Scope::Slice {
                    slice: s,
                    layer: None,
                    num_layers: config.slices[s].num_layers(),
                },
                base_outside: base_outside(s),
            });
        }
        Ok(())
    };

    outside(0, true, &mut tensors)?;
    let mut out_layers: Vec<(usize, usize)> = Vec::new();
    for (s, slice) in config.slices.iter().enumerate() {
        let cks = sources(s);
        let n = slice.num_layers();
        let bi = base_index(s);
        for k in 0..n {
            let out_layer = out_layers.len();
            let l0 = slice.sources[0].layer_range.0 + k;
            out_layers.push((cks[0], l0));
            for name0 in &names[&cks[0]].layers[&l0] {
                let inputs = slice
                    .sources
                    .iter()
                    .zip(&cks)
                    .enumerate()
                    .map(|(j, (src, &c))| {
                        let tensor = rename_layer(name0, src.layer_range.0 + k);
                        if checkpoints[c].contains(&tensor) {
                            Ok(Input { ckpt: c, tensor })
                        } else {
                            Err(missing(s, j, c, &tensor, name0))
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                tensors.push(Planned {
                    name: rename_layer(name0, out_layer),
                    layer: Some(out_layer),
                    base: bi.map(|b| inputs[b].clone()),
                    inputs,
                    base_index: bi,
                    scope: Scope::Slice {
                        slice: s,
                        layer: Some(k),
                        num_layers: n,
                    },
                    base_outside: base_outside(s),
                });
            }
        }
    }
    outside(config.slices.len() - 1, false, &mut tensors)?;
    Ok(Layout {
        tensors,
        layers: Some(out_layers),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renaming_replaces_only_the_layer_index() {
        assert_eq!(
            rename_layer("model.layers.1.mlp.up_proj.weight", 12),
            "model.layers.12.mlp.up_proj.weight"
        );
        assert_eq!(
            rename_layer("model.layers.10.input_layernorm.weight", 2),
            "model.layers.2.input_layernorm.weight"
        );
        assert_eq!(rename_layer("model.norm.weight", 3), "model.norm.weight");
    }

    #[test]
    fn embeddings_go_before_the_layers_and_heads_after() {
        assert!(is_pre_layer("model.embed_tokens.weight"));
        assert!(!is_pre_layer("model.norm.weight"));
        assert!(!is_pre_layer("lm_head.weight"));
    }
}

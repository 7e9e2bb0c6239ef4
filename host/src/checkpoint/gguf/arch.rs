//! Per-architecture knowledge: hyper-parameters from GGUF metadata, the GGUF → Hugging Face
//! tensor-name map, layout fix-ups, and `config.json`.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use serde_json::{json, Value as Json};

use super::tokenizer::SpecialTokens;
use super::{GgufError, Metadata};

/// Upper bound for every size hyper-parameter (hidden size, layers, heads, …).
const MAX_DIM: usize = 1 << 24;

/// The model families the converter knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arch {
    Llama,
    Qwen2,
    Gemma3,
}

impl Arch {
    /// From GGUF `general.architecture`.
    pub(super) fn from_gguf(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "gemma3" => Some(Self::Gemma3),
            _ => None,
        }
    }

    /// The metadata key prefix, also the GGUF architecture name.
    pub(super) fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3",
        }
    }
}

/// The hyper-parameters `config.json` needs, read from the GGUF metadata and cross-checked
/// against the tensor shapes.
#[derive(Debug, Clone)]
pub(super) struct ModelSpec {
    pub arch: Arch,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub context_length: usize,
    pub vocab_size: usize,
    pub sliding_window: Option<usize>,
    pub tied: bool,
    pub attention_bias: bool,
}

impl ModelSpec {
    pub(super) fn from_gguf(
        arch: Arch,
        md: &Metadata<'_>,
        shapes: &HashMap<&str, Vec<usize>>,
    ) -> Result<Self, GgufError> {
        let a = arch.gguf_name();
        let key = |k: &str| format!("{a}.{k}");
        // Sizes are multiplied together below; bounding them keeps that arithmetic far from
        // overflow whatever a damaged file claims (real models are below 2^20 everywhere).
        let dim = |k: &str, v: usize| -> Result<usize, GgufError> {
            if v == 0 || v > MAX_DIM {
                return Err(md.bad(&key(k), format!("is {v}; it must be between 1 and {MAX_DIM}")));
            }
            Ok(v)
        };
        let required = |k: &str| md.usize(&key(k)).and_then(|v| dim(k, v));
        let hidden_size = required("embedding_length")?;
        let num_layers = required("block_count")?;
        // Every block has at least nine tensors (four attention, three MLP, two norms). Refusing a
        // count the file cannot hold keeps a damaged one from making the plan list millions of
        // tensor names before it finds the first one missing (found by fuzzing).
        if num_layers.saturating_mul(9) > shapes.len() {
            return Err(md.bad(
                &key("block_count"),
                format!(
                    "is {num_layers}, but the file holds only {} tensors and every block needs at \
                     least 9",
                    shapes.len()
                ),
            ));
        }
        let num_heads = required("attention.head_count")?;
        let intermediate_size = required("feed_forward_length")?;
        let context_length = md.usize(&key("context_length"))?;
        if context_length == 0 {
            return Err(md.bad(&key("context_length"), "is 0; it must be positive".into()));
        }
        let num_kv_heads = match md.opt_usize(&key("attention.head_count_kv"))? {
            Some(n) => dim("attention.head_count_kv", n)?,
            None => num_heads,
        };
        if num_heads % num_kv_heads != 0 {
            return Err(md.bad(
                &key("attention.head_count_kv"),
                format!("is {num_kv_heads}, which does not divide the {num_heads} query heads"),
            ));
        }
        let head_dim = match md.opt_usize(&key("attention.key_length"))? {
            Some(d) => dim("attention.key_length", d)?,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(md.bad(
                    &key("attention.head_count"),
                    format!(
                        "is {num_heads}, which does not divide embedding_length {hidden_size}, \
                         and `{}` is absent",
                        key("attention.key_length")
                    ),
                ))
            }
        };
        if let Some(v) = md.opt_usize(&key("attention.value_length"))? {
            if v != head_dim {
                return Err(md.bad(
                    &key("attention.value_length"),
                    format!("is {v} but the key length is {head_dim}; Hugging Face needs them equal"),
                ));
            }
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(md.bad(
                &key("attention.key_length"),
                format!("gives a head dimension of {head_dim}; RoPE needs a positive even one"),
            ));
        }
        if let Some(rope_dim) = md.opt_usize(&key("rope.dimension_count"))? {
            if rope_dim != head_dim {
                return Err(md.bad(
                    &key("rope.dimension_count"),
                    format!(
                        "is {rope_dim}, but the head dimension is {head_dim}; partial rotary \
                         embeddings are not supported"
                    ),
                ));
            }
        }
        if let Some(scaling) = md.opt_string(&key("rope.scaling.type"))? {
            if scaling != "none" {
                return Err(md.bad(
                    &key("rope.scaling.type"),
                    format!("is {scaling:?}; RoPE scaling is not supported by this converter"),
                ));
            }
        }
        let rms_norm_eps = md
            .opt_f32(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| GgufError::MissingKey {
                path: md.path().to_path_buf(),
                key: key("attention.layer_norm_rms_epsilon"),
            })?;
        let rope_theta = md.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let sliding_window = match arch {
            Arch::Gemma3 => Some(md.opt_usize(&key("attention.sliding_window"))?.unwrap_or(4096)),
            _ => None,
        };

        let embed = shapes
            .get("token_embd.weight")
            .ok_or_else(|| GgufError::MissingTensor {
                path: md.path().to_path_buf(),
                tensor: "token_embd.weight".to_string(),
                architecture: a.to_string(),
            })?;
        let vocab_size = match embed.as_slice() {
            [rows, cols] if *cols == hidden_size => *rows,
            _ => {
                return Err(GgufError::TensorShape {
                    path: md.path().to_path_buf(),
                    tensor: "token_embd.weight".to_string(),
                    found: embed.clone(),
                    expected: vec![md.opt_usize(&key("vocab_size"))?.unwrap_or(0), hidden_size],
                })
            }
        };
        if let Some(v) = md.opt_usize(&key("vocab_size"))? {
            if v != vocab_size {
                return Err(md.bad(
                    &key("vocab_size"),
                    format!("is {v}, but token_embd.weight has {vocab_size} rows"),
                ));
            }
        }
        let tied = !shapes.contains_key("output.weight");
        let attention_bias = match arch {
            Arch::Qwen2 => true,
            Arch::Llama => shapes.contains_key("blk.0.attn_q.bias"),
            Arch::Gemma3 => false,
        };
        Ok(Self {
            arch,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size,
            rms_norm_eps,
            rope_theta,
            context_length,
            vocab_size,
            sliding_window,
            tied,
            attention_bias,
        })
    }
}

/// A layout fix-up applied to a dequantised tensor before it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transform {
    None,
    /// Undo llama.cpp's RoPE row permutation of a q/k projection with `n_head` heads.
    UnpermuteRope {
        n_head: usize,
    },
    /// Gemma RMSNorm weights: GGUF holds `1 + w`, Hugging Face holds `w`.
    SubtractOne,
}

impl Transform {
    /// Applies the fix-up to row-major `values` of `shape` (`[rows]` or `[rows, cols]`).
    pub(super) fn apply(self, values: Vec<f32>, shape: &[usize]) -> Vec<f32> {
        match self {
            Self::None => values,
            Self::UnpermuteRope { n_head } => {
                let rows = shape.first().copied().unwrap_or(1);
                let cols = shape.iter().skip(1).product::<usize>();
                unpermute_rope_rows(&values, rows, cols, n_head)
            }
            Self::SubtractOne => values.into_iter().map(|v| v - 1.0).collect(),
        }
    }
}

/// Maps llama.cpp's RoPE row order back to Hugging Face's, for a `[n_head * head_dim, cols]`
/// row-major matrix (a bias is `cols = 1`).
///
/// `convert_hf_to_gguf.py` applies `w.reshape(n_head, 2, head_dim / 2, cols).swapaxes(1, 2)`:
/// within each head, Hugging Face row `t * head_dim/2 + j` (half `t` of RoPE pair `j`) becomes
/// GGUF row `2j + t`. This is the inverse: reshape to `[n_head, head_dim/2, 2, cols]`, swap axes
/// 1 and 2, i.e. Hugging Face row `t * head_dim/2 + j` = GGUF row `2j + t`.
pub(super) fn unpermute_rope_rows(src: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut dst = vec![0f32; src.len()];
    for h in 0..n_head {
        for t in 0..2 {
            for j in 0..half {
                let hf = h * head_dim + t * half + j;
                let gg = h * head_dim + 2 * j + t;
                dst[hf * cols..(hf + 1) * cols].copy_from_slice(&src[gg * cols..(gg + 1) * cols]);
            }
        }
    }
    dst
}

/// llama.cpp's permutation (Hugging Face → GGUF), the inverse of [`unpermute_rope_rows`]; kept
/// for the tests that pin the direction.
#[cfg(test)]
pub(super) fn permute_rope_rows(src: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut dst = vec![0f32; src.len()];
    for h in 0..n_head {
        for t in 0..2 {
            for j in 0..half {
                let hf = h * head_dim + t * half + j;
                let gg = h * head_dim + 2 * j + t;
                dst[gg * cols..(gg + 1) * cols].copy_from_slice(&src[hf * cols..(hf + 1) * cols]);
            }
        }
    }
    dst
}

/// One tensor to write: where it comes from, its Hugging Face name and shape, its fix-up.
#[derive(Debug, Clone)]
pub(super) struct PlannedTensor {
    pub gguf_name: String,
    pub hf_name: String,
    pub shape: Vec<usize>,
    pub transform: Transform,
}

/// Builds the list of tensors to write, checking that the file holds exactly the tensors the
/// architecture needs, with the shapes the metadata implies.
pub(super) fn plan_tensors(
    spec: &ModelSpec,
    shapes: &HashMap<&str, Vec<usize>>,
    path: &Path,
) -> Result<Vec<PlannedTensor>, GgufError> {
    let s = spec;
    let q_rows = s.num_heads * s.head_dim;
    let kv_rows = s.num_kv_heads * s.head_dim;
    let llama = s.arch == Arch::Llama;
    let gemma = s.arch == Arch::Gemma3;
    let norm = if gemma {
        Transform::SubtractOne
    } else {
        Transform::None
    };
    let rope = |n_head| {
        if llama {
            Transform::UnpermuteRope { n_head }
        } else {
            Transform::None
        }
    };

    // (gguf name, hf name, expected shape, transform)
    let mut wanted: Vec<(String, String, Vec<usize>, Transform)> = vec![
        (
            "token_embd.weight".into(),
            "model.embed_tokens.weight".into(),
            vec![s.vocab_size, s.hidden_size],
            Transform::None,
        ),
        (
            "output_norm.weight".into(),
            "model.norm.weight".into(),
            vec![s.hidden_size],
            norm,
        ),
    ];
    if !s.tied {
        wanted.push((
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![s.vocab_size, s.hidden_size],
            Transform::None,
        ));
    }
    for i in 0..s.num_layers {
        let g = |n: &str| format!("blk.{i}.{n}");
        let h = |n: &str| format!("model.layers.{i}.{n}");
        let mut layer = vec![
            (
                g("attn_q.weight"),
                h("self_attn.q_proj.weight"),
                vec![q_rows, s.hidden_size],
                rope(s.num_heads),
            ),
            (
                g("attn_k.weight"),
                h("self_attn.k_proj.weight"),
                vec![kv_rows, s.hidden_size],
                rope(s.num_kv_heads),
            ),
            (
                g("attn_v.weight"),
                h("self_attn.v_proj.weight"),
                vec![kv_rows, s.hidden_size],
                Transform::None,
            ),
            (
                g("attn_output.weight"),
                h("self_attn.o_proj.weight"),
                vec![s.hidden_size, q_rows],
                Transform::None,
            ),
            (
                g("ffn_gate.weight"),
                h("mlp.gate_proj.weight"),
                vec![s.intermediate_size, s.hidden_size],
                Transform::None,
            ),
            (
                g("ffn_up.weight"),
                h("mlp.up_proj.weight"),
                vec![s.intermediate_size, s.hidden_size],
                Transform::None,
            ),
            (
                g("ffn_down.weight"),
                h("mlp.down_proj.weight"),
                vec![s.hidden_size, s.intermediate_size],
                Transform::None,
            ),
            (
                g("attn_norm.weight"),
                h("input_layernorm.weight"),
                vec![s.hidden_size],
                norm,
            ),
        ];
        if gemma {
            layer.extend([
                (
                    g("post_attention_norm.weight"),
                    h("post_attention_layernorm.weight"),
                    vec![s.hidden_size],
                    norm,
                ),
                (
                    g("ffn_norm.weight"),
                    h("pre_feedforward_layernorm.weight"),
                    vec![s.hidden_size],
                    norm,
                ),
                (
                    g("post_ffw_norm.weight"),
                    h("post_feedforward_layernorm.weight"),
                    vec![s.hidden_size],
                    norm,
                ),
                (
                    g("attn_q_norm.weight"),
                    h("self_attn.q_norm.weight"),
                    vec![s.head_dim],
                    norm,
                ),
                (
                    g("attn_k_norm.weight"),
                    h("self_attn.k_norm.weight"),
                    vec![s.head_dim],
                    norm,
                ),
            ]);
        } else {
            layer.push((
                g("ffn_norm.weight"),
                h("post_attention_layernorm.weight"),
                vec![s.hidden_size],
                norm,
            ));
        }
        if s.attention_bias {
            layer.extend([
                (
                    g("attn_q.bias"),
                    h("self_attn.q_proj.bias"),
                    vec![q_rows],
                    rope(s.num_heads),
                ),
                (
                    g("attn_k.bias"),
                    h("self_attn.k_proj.bias"),
                    vec![kv_rows],
                    rope(s.num_kv_heads),
                ),
                (
                    g("attn_v.bias"),
                    h("self_attn.v_proj.bias"),
                    vec![kv_rows],
                    Transform::None,
                ),
            ]);
        }
        wanted.extend(layer);
    }

    let arch_name = s.arch.gguf_name().to_string();
    let known: BTreeSet<&str> = wanted.iter().map(|w| w.0.as_str()).collect();
    // Report an unexpected tensor before a missing one: a file with extra tensors is usually a
    // model variant (a different family under the same architecture name), and that is the
    // more useful message. Sorted, so the error is deterministic.
    let mut present: Vec<&str> = shapes.keys().copied().collect();
    present.sort_unstable();
    if let Some(extra) = present.iter().find(|n| !known.contains(*n)) {
        return Err(GgufError::UnexpectedTensor {
            path: path.to_path_buf(),
            tensor: (*extra).to_string(),
            architecture: arch_name,
        });
    }

    let mut plan = Vec::with_capacity(wanted.len());
    for (gguf_name, hf_name, expected, transform) in wanted {
        let Some(found) = shapes.get(gguf_name.as_str()) else {
            return Err(GgufError::MissingTensor {
                path: path.to_path_buf(),
                tensor: gguf_name,
                architecture: arch_name,
            });
        };
        if *found != expected {
            return Err(GgufError::TensorShape {
                path: path.to_path_buf(),
                tensor: gguf_name,
                found: found.clone(),
                expected,
            });
        }
        plan.push(PlannedTensor {
            gguf_name,
            hf_name,
            shape: expected,
            transform,
        });
    }
    Ok(plan)
}

/// `config.json` in the field names transformers uses for the architecture.
pub(super) fn config_json(spec: &ModelSpec, special: &SpecialTokens, dtype: &str) -> Json {
    let s = spec;
    let mut c = json!({
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "rms_norm_eps": f32_json(s.rms_norm_eps),
        "rope_theta": f32_json(s.rope_theta),
        "rope_scaling": null,
        "max_position_embeddings": s.context_length,
        "vocab_size": s.vocab_size,
        "tie_word_embeddings": s.tied,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true,
        // transformers ≥ 4.56 reads "dtype"; older versions read "torch_dtype".
        "dtype": dtype,
        "torch_dtype": dtype,
    });
    let extra = match s.arch {
        Arch::Llama => json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": s.attention_bias,
            "mlp_bias": false,
            "pretraining_tp": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": f32_json(s.rope_theta)},
        }),
        Arch::Qwen2 => json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "use_sliding_window": false,
            "sliding_window": s.context_length,
            "max_window_layers": s.num_layers,
            "rope_parameters": {"rope_type": "default", "rope_theta": f32_json(s.rope_theta)},
        }),
        Arch::Gemma3 => {
            // llama.cpp hard-codes these for gemma3 (llama-model.cpp): every sixth layer is
            // global attention, the sliding layers use RoPE base 10 000, and queries are scaled
            // by 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim; only the 27B differs).
            let layer_types: Vec<&str> = (0..s.num_layers)
                .map(|i| {
                    if (i + 1) % 6 == 0 {
                        "full_attention"
                    } else {
                        "sliding_attention"
                    }
                })
                .collect();
            json!({
                "architectures": ["Gemma3ForCausalLM"],
                "model_type": "gemma3_text",
                "hidden_activation": "gelu_pytorch_tanh",
                "attention_bias": false,
                "query_pre_attn_scalar": s.head_dim,
                "sliding_window": s.sliding_window,
                "sliding_window_pattern": 6,
                "layer_types": layer_types,
                "rope_local_base_freq": 10_000.0,
                "attn_logit_softcapping": null,
                "final_logit_softcapping": null,
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": f32_json(s.rope_theta)},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                },
            })
        }
    };
    if let (Some(c), Json::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    c
}

/// An f32 as the JSON number with its shortest round-trip decimal digits: GGUF stores
/// `rms_norm_eps = 1e-5` as an f32, which widened to f64 would print as 9.999999747378752e-6.
fn f32_json(v: f32) -> Json {
    format!("{v}").parse::<f64>().map_or(Json::Null, Json::from)
}

/// `generation_config.json`: the special ids generation needs.
pub(super) fn generation_config_json(special: &SpecialTokens) -> Json {
    json!({
        "_from_model_config": true,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_and_unpermute_are_inverses() {
        let (rows, cols, n_head) = (3 * 8, 5, 3);
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        assert_eq!(
            unpermute_rope_rows(&permute_rope_rows(&w, rows, cols, n_head), rows, cols, n_head),
            w
        );
        assert_eq!(
            permute_rope_rows(&unpermute_rope_rows(&w, rows, cols, n_head), rows, cols, n_head),
            w
        );
        assert_ne!(unpermute_rope_rows(&w, rows, cols, n_head), w);
    }

    /// Pins the direction against llama.cpp's `permute` written out with numpy, for one head of
    /// dimension 8 and a bias (cols = 1):
    ///
    /// ```python
    /// w = np.arange(8); w.reshape(1, 2, 4).swapaxes(1, 2).reshape(8)  # HF -> GGUF
    /// # array([0, 4, 1, 5, 2, 6, 3, 7])
    /// ```
    #[test]
    fn permutation_matches_llama_cpp_convert_direction() {
        let hf: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let gguf = permute_rope_rows(&hf, 8, 1, 1);
        assert_eq!(gguf, [0., 4., 1., 5., 2., 6., 3., 7.]);
        assert_eq!(unpermute_rope_rows(&gguf, 8, 1, 1), hf);
    }

    #[test]
    fn unpermute_moves_whole_rows_per_head() {
        // Two heads of dim 4, two columns: GGUF rows [a0 b0 a1 b1 | c0 d0 c1 d1] where (a_j, b_j)
        // is RoPE pair j; Hugging Face wants [a0 a1 b0 b1 | c0 c1 d0 d1].
        let row = |r: f32| [r, r + 0.5];
        let gguf: Vec<f32> = [0., 2., 1., 3., 4., 6., 5., 7.]
            .iter()
            .flat_map(|&r| row(r))
            .collect();
        let hf = unpermute_rope_rows(&gguf, 8, 2, 2);
        let expected: Vec<f32> = (0..8).flat_map(|r| row(r as f32)).collect();
        assert_eq!(hf, expected);
    }
}

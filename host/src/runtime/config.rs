//! What a forward pass needs from `config.json`, per architecture.

use serde_json::Value;

use super::RuntimeError;

/// The architecture families the runtime runs. They share one decoder; the differences are the
/// flags of [`ModelConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `llama` (SmolLM2, Llama 2/3 without rope scaling).
    Llama,
    /// `mistral`: llama plus an optional sliding window.
    Mistral,
    /// `qwen2`: llama plus biases on the Q, K and V projections.
    Qwen2,
    /// `mixtral`: mistral with a token-routed mixture of experts in every layer.
    Mixtral,
    /// `gemma3_text`: norm weights offset by one, embeddings scaled by √hidden, QK-norm, sandwich
    /// norms, GELU (tanh), sliding-window layers with their own RoPE base.
    Gemma3,
}

/// The MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (SwiGLU MLPs).
    Silu,
    /// `gelu_pytorch_tanh` (GeGLU MLPs, Gemma).
    GeluTanh,
}

/// A Mixtral-style mixture of experts in each MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeConfig {
    /// `num_local_experts`.
    pub num_experts: usize,
    /// `num_experts_per_tok`.
    pub top_k: usize,
}

/// Everything the runtime reads from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Architecture family (from `model_type`).
    pub arch: Arch,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size`.
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// `num_attention_heads`.
    pub num_heads: usize,
    /// `num_key_value_heads` (default: `num_attention_heads`).
    pub num_kv_heads: usize,
    /// `head_dim` (default: `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// RoPE base of full-attention layers (`rope_theta`, or `rope_parameters.rope_theta`).
    pub rope_theta: f64,
    /// Positions are divided by this before RoPE (`rope_type: linear`); 1 otherwise. Gemma 3
    /// scales only its full-attention layers.
    pub rope_linear_factor: f64,
    /// RoPE base of sliding-window layers where it differs (Gemma 3's `rope_local_base_freq`).
    pub rope_local_theta: Option<f64>,
    /// Attention window of the sliding layers: a query attends to keys less than this many
    /// positions back.
    pub sliding_window: Option<usize>,
    /// Which layers use [`ModelConfig::sliding_window`].
    pub sliding_layers: Vec<bool>,
    /// Scale of `q·kᵀ` (1/√head_dim; Gemma: `query_pre_attn_scalar^-½`).
    pub attn_scale: f64,
    /// `tie_word_embeddings`: the lm_head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// MLP activation.
    pub activation: Activation,
    /// Added to every RMSNorm weight at load (Gemma's `(1 + w)`); 0 otherwise.
    pub norm_weight_offset: f64,
    /// Embeddings are multiplied by this (Gemma: √hidden).
    pub embed_scale: Option<f64>,
    /// RMSNorm over each head of Q and K before RoPE (Gemma 3).
    pub qk_norm: bool,
    /// Extra norms on the attention and MLP outputs before the residual add (Gemma 3).
    pub sandwich_norm: bool,
    /// `final_logit_softcapping`: logits become `cap·tanh(logits/cap)`.
    pub final_logit_softcap: Option<f64>,
    /// The mixture of experts, for Mixtral.
    pub moe: Option<MoeConfig>,
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` object. Multimodal Gemma 3 configs are read through
    /// their `text_config`.
    pub fn from_json(config: &Value) -> Result<ModelConfig, RuntimeError> {
        let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or("");
        let (c, arch) = match model_type {
            "llama" => (config, Arch::Llama),
            "mistral" => (config, Arch::Mistral),
            "qwen2" => (config, Arch::Qwen2),
            "mixtral" => (config, Arch::Mixtral),
            "gemma3_text" => (config, Arch::Gemma3),
            "gemma3" => match config.get("text_config") {
                Some(t) => (t, Arch::Gemma3),
                None => return Err(invalid("text_config", "missing for model_type gemma3")),
            },
            other => {
                return Err(RuntimeError::UnsupportedArchitecture {
                    model_type: other.to_string(),
                })
            }
        };
        let gemma = arch == Arch::Gemma3;
        let hidden_size = usize_key(c, "hidden_size")?;
        let num_heads = usize_key(c, "num_attention_heads")?;
        let num_layers = usize_key(c, "num_hidden_layers")?;
        let num_kv_heads = opt_usize(c, "num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = opt_usize(c, "head_dim")?.unwrap_or(hidden_size / num_heads.max(1));
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(invalid(
                "num_key_value_heads",
                format!("{num_kv_heads} must be non-zero and divide num_attention_heads {num_heads}"),
            ));
        }

        let rope = c.get("rope_parameters").or_else(|| c.get("rope_scaling"));
        // Gemma 3 in transformers 5 nests one entry per layer type.
        let full_rope = rope
            .and_then(|r| r.get("full_attention"))
            .or(rope)
            .filter(|r| !r.is_null());
        let rope_theta = opt_f64(c, "rope_theta")?
            .or_else(|| full_rope.and_then(|r| r.get("rope_theta")?.as_f64()))
            .unwrap_or(if gemma { 1_000_000.0 } else { 10_000.0 });
        let rope_type = full_rope
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type"))?.as_str())
            .unwrap_or("default");
        let rope_linear_factor = match rope_type {
            "default" => 1.0,
            "linear" => full_rope
                .and_then(|r| r.get("factor")?.as_f64())
                .ok_or_else(|| invalid("rope_parameters.factor", "missing for linear rope"))?,
            other => {
                return Err(invalid(
                    "rope_parameters.rope_type",
                    format!("`{other}` is not supported (default and linear are)"),
                ))
            }
        };
        let rope_local_theta = if gemma {
            let nested = rope.and_then(|r| r.get("sliding_attention")?.get("rope_theta")?.as_f64());
            Some(opt_f64(c, "rope_local_base_freq")?.or(nested).unwrap_or(10_000.0))
        } else {
            None
        };

        let sliding_window = match arch {
            Arch::Qwen2
                if !c
                    .get("use_sliding_window")
                    .and_then(Value::as_bool)
                    .unwrap_or(false) =>
            {
                None
            }
            Arch::Llama => None,
            _ => opt_usize(c, "sliding_window")?,
        };
        let sliding_layers = sliding_layers(c, arch, num_layers, sliding_window.is_some())?;

        let attn_scale = match opt_f64(c, "query_pre_attn_scalar")? {
            Some(s) if gemma => s.powf(-0.5),
            _ => (head_dim as f64).powf(-0.5),
        };
        let act_name = c
            .get("hidden_activation")
            .or_else(|| c.get("hidden_act"))
            .and_then(Value::as_str)
            .unwrap_or(if gemma { "gelu_pytorch_tanh" } else { "silu" });
        let activation = match act_name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            other => return Err(invalid("hidden_act", format!("`{other}` is not supported"))),
        };
        if c.get("attn_logit_softcapping").is_some_and(|v| !v.is_null()) {
            return Err(invalid("attn_logit_softcapping", "is not supported"));
        }
        let moe = match arch {
            Arch::Mixtral => Some(MoeConfig {
                num_experts: usize_key(c, "num_local_experts")?,
                top_k: usize_key(c, "num_experts_per_tok")?,
            }),
            _ => None,
        };
        if let Some(m) = moe {
            if m.top_k == 0 || m.top_k > m.num_experts {
                return Err(invalid(
                    "num_experts_per_tok",
                    format!("{} must be in 1..={}", m.top_k, m.num_experts),
                ));
            }
        }

        Ok(ModelConfig {
            arch,
            vocab_size: usize_key(c, "vocab_size")?,
            hidden_size,
            intermediate_size: usize_key(c, "intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f64(c, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_linear_factor,
            rope_local_theta,
            sliding_window,
            sliding_layers,
            attn_scale,
            tie_word_embeddings: c
                .get("tie_word_embeddings")
                .or_else(|| config.get("tie_word_embeddings"))
                .and_then(Value::as_bool)
                .unwrap_or(gemma),
            activation,
            norm_weight_offset: if gemma { 1.0 } else { 0.0 },
            embed_scale: gemma.then(|| (hidden_size as f64).sqrt()),
            qk_norm: gemma,
            sandwich_norm: gemma,
            final_logit_softcap: opt_f64(c, "final_logit_softcapping")?,
            moe,
        })
    }
}

/// `layer_types` when given; else Gemma 3's pattern (every 6th layer full), Qwen2's
/// `max_window_layers`, or every layer when a window is set.
fn sliding_layers(
    c: &Value,
    arch: Arch,
    num_layers: usize,
    windowed: bool,
) -> Result<Vec<bool>, RuntimeError> {
    if let Some(types) = c.get("layer_types").and_then(Value::as_array) {
        if types.len() != num_layers {
            return Err(invalid(
                "layer_types",
                format!("has {} entries for {num_layers} layers", types.len()),
            ));
        }
        return Ok(types
            .iter()
            .map(|t| windowed && t.as_str() == Some("sliding_attention"))
            .collect());
    }
    let pattern = opt_usize(c, "sliding_window_pattern")?
        .or(opt_usize(c, "_sliding_window_pattern")?)
        .unwrap_or(6);
    let first_windowed = match arch {
        Arch::Qwen2 => opt_usize(c, "max_window_layers")?.unwrap_or(0),
        _ => 0,
    };
    Ok((0..num_layers)
        .map(|i| match arch {
            _ if !windowed => false,
            Arch::Gemma3 => (i + 1) % pattern != 0,
            _ => i >= first_windowed,
        })
        .collect())
}

fn invalid(key: &str, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Config {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn opt_usize(c: &Value, key: &str) -> Result<Option<usize>, RuntimeError> {
    match c.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| invalid(key, format!("expected a non-negative integer, found {v}"))),
    }
}

fn usize_key(c: &Value, key: &str) -> Result<usize, RuntimeError> {
    opt_usize(c, key)?.ok_or_else(|| invalid(key, "missing"))
}

fn opt_f64(c: &Value, key: &str) -> Result<Option<f64>, RuntimeError> {
    match c.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| invalid(key, format!("expected a number, found {v}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama() -> Value {
        json!({
            "model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
            "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}
        })
    }

    fn with(mut base: Value, extra: Value) -> Value {
        for (k, v) in extra.as_object().expect("object") {
            base[k] = v.clone();
        }
        base
    }

    #[test]
    fn llama_defaults_and_nested_rope_theta() {
        let c = ModelConfig::from_json(&llama()).unwrap();
        assert_eq!((c.arch, c.head_dim, c.num_kv_heads), (Arch::Llama, 16, 2));
        assert_eq!(c.rope_theta, 500.0);
        assert_eq!(c.attn_scale, 0.25);
        assert!(!c.tie_word_embeddings && c.sliding_window.is_none() && c.moe.is_none());
        let top = with(llama(), json!({"rope_parameters": null, "rope_theta": 1e5}));
        assert_eq!(ModelConfig::from_json(&top).unwrap().rope_theta, 1e5);
    }

    #[test]
    fn mistral_window_applies_to_every_layer_and_qwen2_only_when_enabled() {
        let m = ModelConfig::from_json(&with(
            llama(),
            json!({"model_type": "mistral", "sliding_window": 8}),
        ))
        .unwrap();
        assert_eq!((m.sliding_window, m.sliding_layers), (Some(8), vec![true, true]));
        let q = with(llama(), json!({"model_type": "qwen2", "sliding_window": 8}));
        assert_eq!(ModelConfig::from_json(&q).unwrap().sliding_window, None);
        let q = with(q, json!({"use_sliding_window": true, "max_window_layers": 1}));
        assert_eq!(
            ModelConfig::from_json(&q).unwrap().sliding_layers,
            vec![false, true]
        );
    }

    #[test]
    fn gemma3_sets_its_flags_and_reads_per_layer_rope() {
        let g = with(
            llama(),
            json!({
                "model_type": "gemma3_text", "num_hidden_layers": 6, "head_dim": 32,
                "query_pre_attn_scalar": 64, "sliding_window": 4,
                "hidden_activation": "gelu_pytorch_tanh",
                "rope_parameters": {
                    "full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
                    "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}
                }
            }),
        );
        let c = ModelConfig::from_json(&g).unwrap();
        assert_eq!(c.arch, Arch::Gemma3);
        assert_eq!((c.rope_theta, c.rope_linear_factor), (1e6, 8.0));
        assert_eq!(c.rope_local_theta, Some(1e4));
        assert_eq!(c.attn_scale, 0.125);
        assert_eq!(c.sliding_layers, vec![true, true, true, true, true, false]);
        assert_eq!(c.embed_scale, Some(8.0));
        assert_eq!(c.norm_weight_offset, 1.0);
        assert!(c.qk_norm && c.sandwich_norm && c.tie_word_embeddings);
        assert_eq!(c.activation, Activation::GeluTanh);
    }

    #[test]
    fn mixtral_reads_its_experts() {
        let m = with(
            llama(),
            json!({"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}),
        );
        let c = ModelConfig::from_json(&m).unwrap();
        assert_eq!(
            c.moe,
            Some(MoeConfig {
                num_experts: 4,
                top_k: 2
            })
        );
        let bad = with(m, json!({"num_experts_per_tok": 5}));
        assert!(matches!(
            ModelConfig::from_json(&bad),
            Err(RuntimeError::Config { key, .. }) if key == "num_experts_per_tok"
        ));
    }

    #[test]
    fn unknown_architectures_and_rope_types_are_refused_by_name() {
        let e = ModelConfig::from_json(&with(llama(), json!({"model_type": "gpt2"}))).unwrap_err();
        assert!(e.to_string().contains("`gpt2`"), "{e}");
        let yarn = with(llama(), json!({"rope_parameters": {"rope_type": "llama3"}}));
        let e = ModelConfig::from_json(&yarn).unwrap_err();
        assert!(e.to_string().contains("llama3"), "{e}");
        let missing = with(llama(), json!({"hidden_size": null}));
        let e = ModelConfig::from_json(&missing).unwrap_err();
        assert_eq!(e.to_string(), "config.json: `hidden_size` missing");
    }
}

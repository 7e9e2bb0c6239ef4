//! Building the parts of a model from a Hugging Face checkpoint, shape-checked against its config.

use std::sync::Arc;

use candle_core::Tensor;
use candle_nn::Linear;

use super::config::ModelConfig;
use super::layers::{transposed_linear, Attention, DecoderBlock, DenseMlp, Mlp, MoeMlp, RmsNorm};
use super::model::LoadOptions;
use super::RuntimeError;
use crate::checkpoint::Checkpoint;

/// A checkpoint's model as typed parts, before [`super::Model::from_parts`] assembles them: the
/// starting point for swapping blocks or MLPs.
#[derive(Debug, Clone)]
pub struct ModelParts {
    /// Read from `config.json`.
    pub config: ModelConfig,
    /// `model.embed_tokens.weight`, `[vocab, hidden]`.
    pub embed: Tensor,
    /// `model.layers.*`.
    pub blocks: Vec<DecoderBlock>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head` (the embedding matrix when tied).
    pub lm_head: Linear,
}

struct Loader<'a> {
    ckpt: &'a Checkpoint,
    opts: &'a LoadOptions,
    config: &'a ModelConfig,
}

impl Loader<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor, RuntimeError> {
        let t = self.ckpt.load_as(name, self.opts.dtype)?;
        if t.dims() != shape {
            return Err(RuntimeError::TensorShape {
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.to_device(&self.opts.device)?)
    }

    /// `{prefix}.weight` `[out, in]`, and `{prefix}.bias` `[out]` when the checkpoint has one
    /// (Qwen2's QKV, Llama's `attention_bias` / `mlp_bias`).
    fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<Linear, RuntimeError> {
        let weight = self.tensor(&format!("{prefix}.weight"), &[out, inp])?;
        let bias_name = format!("{prefix}.bias");
        let bias = match self.ckpt.contains(&bias_name) {
            true => Some(self.tensor(&bias_name, &[out])?),
            false => None,
        };
        Ok(transposed_linear(&Linear::new(weight, bias))?)
    }

    fn norm(&self, name: &str, dim: usize) -> Result<RmsNorm, RuntimeError> {
        let w = self.tensor(name, &[dim])?;
        let offset = self.config.norm_weight_offset;
        Ok(RmsNorm {
            weight: if offset == 0.0 { w } else { (w + offset)? },
            eps: self.config.rms_norm_eps,
        })
    }

    fn dense(&self, gate: Linear, up: Linear, down: Linear) -> Mlp {
        Mlp::Dense(DenseMlp {
            gate_proj: gate,
            up_proj: up,
            down_proj: down,
            activation: self.config.activation,
        })
    }

    fn mlp(&self, layer: &str) -> Result<Mlp, RuntimeError> {
        let (h, i) = (self.config.hidden_size, self.config.intermediate_size);
        let Some(moe) = self.config.moe else {
            let p = format!("{layer}.mlp");
            return Ok(self.dense(
                self.linear(&format!("{p}.gate_proj"), i, h)?,
                self.linear(&format!("{p}.up_proj"), i, h)?,
                self.linear(&format!("{p}.down_proj"), h, i)?,
            ));
        };
        let e = moe.num_experts;
        let fused = format!("{layer}.mlp.experts.gate_up_proj");
        let (router, experts) = if self.ckpt.contains(&fused) {
            // transformers 5: gate rows then up rows of every expert in one tensor.
            let gate_up = self.tensor(&fused, &[e, 2 * i, h])?;
            let down = self.tensor(&format!("{layer}.mlp.experts.down_proj"), &[e, h, i])?;
            let experts = (0..e)
                .map(|x| {
                    let gu = gate_up.get(x)?;
                    let part = |at| gu.narrow(0, at, i);
                    Ok(self.dense(
                        transposed_linear(&Linear::new(part(0)?, None))?,
                        transposed_linear(&Linear::new(part(i)?, None))?,
                        transposed_linear(&Linear::new(down.get(x)?, None))?,
                    ))
                })
                .collect::<Result<Vec<_>, candle_core::Error>>()?;
            (self.linear(&format!("{layer}.mlp.gate"), e, h)?, experts)
        } else {
            // The original Mixtral layout: w1 gate, w3 up, w2 down.
            let p = format!("{layer}.block_sparse_moe");
            let experts = (0..e)
                .map(|x| {
                    let w = |n: &str, o, inp| self.linear(&format!("{p}.experts.{x}.{n}"), o, inp);
                    Ok(self.dense(w("w1", i, h)?, w("w3", i, h)?, w("w2", h, i)?))
                })
                .collect::<Result<Vec<_>, RuntimeError>>()?;
            (self.linear(&format!("{p}.gate"), e, h)?, experts)
        };
        Ok(Mlp::Moe(MoeMlp {
            router: Arc::new(router),
            experts,
            top_k: moe.top_k,
        }))
    }

    fn block(&self, idx: usize) -> Result<DecoderBlock, RuntimeError> {
        let c = self.config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let l = format!("model.layers.{idx}");
        let a = format!("{l}.self_attn");
        let qk_norm = match c.qk_norm {
            true => Some((
                self.norm(&format!("{a}.q_norm.weight"), d)?,
                self.norm(&format!("{a}.k_norm.weight"), d)?,
            )),
            false => None,
        };
        let attn = Attention {
            q_proj: self.linear(&format!("{a}.q_proj"), c.num_heads * d, h)?,
            k_proj: self.linear(&format!("{a}.k_proj"), c.num_kv_heads * d, h)?,
            v_proj: self.linear(&format!("{a}.v_proj"), c.num_kv_heads * d, h)?,
            o_proj: self.linear(&format!("{a}.o_proj"), h, c.num_heads * d)?,
            qk_norm,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: d,
            scale: c.attn_scale,
            sliding: c.sliding_window.is_some() && c.sliding_layers[idx],
        };
        let norm = |n: &str| self.norm(&format!("{l}.{n}.weight"), h);
        Ok(if c.sandwich_norm {
            DecoderBlock {
                attn_norm: norm("input_layernorm")?,
                attn,
                attn_out_norm: Some(norm("post_attention_layernorm")?),
                mlp_norm: norm("pre_feedforward_layernorm")?,
                mlp: self.mlp(&l)?,
                mlp_out_norm: Some(norm("post_feedforward_layernorm")?),
            }
        } else {
            DecoderBlock {
                attn_norm: norm("input_layernorm")?,
                attn,
                attn_out_norm: None,
                mlp_norm: norm("post_attention_layernorm")?,
                mlp: self.mlp(&l)?,
                mlp_out_norm: None,
            }
        })
    }
}

impl ModelParts {
    /// Reads the config and every weight of `ckpt`, shape-checked against the config.
    pub fn load(ckpt: &Checkpoint, opts: &LoadOptions) -> Result<ModelParts, RuntimeError> {
        let config = ModelConfig::from_json(ckpt.config())?;
        let ld = Loader {
            ckpt,
            opts,
            config: &config,
        };
        ld.parts()
    }
}

impl Loader<'_> {
    fn parts(&self) -> Result<ModelParts, RuntimeError> {
        let (ld, config) = (self, self.config);
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed = ld.tensor("model.embed_tokens.weight", &[v, h])?;
        let lm_head = match config.tie_word_embeddings {
            // Not transposed: for this wide, short matrix gemm is as fast or faster on the
            // checkpoint layout (2.4x at 8 rows, equal from 100; bench notes in BENCHMARKS.md),
            // and a tied head keeps sharing the embedding's memory.
            true => Linear::new(embed.clone(), None),
            false => Linear::new(ld.tensor("lm_head.weight", &[v, h])?, None),
        };
        Ok(ModelParts {
            blocks: (0..config.num_layers)
                .map(|i| ld.block(i))
                .collect::<Result<_, _>>()?,
            norm: ld.norm("model.norm.weight", h)?,
            config: config.clone(),
            embed,
            lm_head,
        })
    }
}

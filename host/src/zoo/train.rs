//! Training a tiny Llama on CPU with candle's autograd: a differentiable forward with the same
//! numerics as [`crate::runtime`] (RMSNorm, rotate-half RoPE, causal softmax attention, SiLU-gated
//! MLP), AdamW with warm-up and cosine decay, and saving in the Hugging Face layout the runtime,
//! the merge engine and the evaluator read.
//!
//! The runtime uses fused kernels without gradients; this forward is built from differentiable
//! primitives only. The two are pinned to each other by a test (`zoo_synth`: logits of a saved
//! model through the runtime equal this forward's).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use super::autograd::{hidden_states, schedule, scored_loss, Batch, Dims, Weights};
use super::skills::{encode, tokenizer_json, vocab_size, Example, Rng, Sampler, Skill};
use super::ZooError;
use crate::checkpoint::{Checkpoint, CheckpointWriter, OutTensor};

/// The shape of a tiny Llama.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    /// Residual width.
    pub hidden: usize,
    /// Decoder blocks.
    pub layers: usize,
    /// Attention heads (key/value heads are the same number).
    pub heads: usize,
    /// MLP width.
    pub ffn: usize,
}

impl Shape {
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Tensor names and shapes, in the Hugging Face Llama layout.
    pub fn layout(&self) -> Vec<(String, Vec<usize>)> {
        let (h, f, v) = (self.hidden, self.ffn, vocab_size());
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            for n in ["q", "k", "v", "o"] {
                out.push((format!("{p}.self_attn.{n}_proj.weight"), vec![h, h]));
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![f, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, f]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        out.push(("lm_head.weight".to_string(), vec![v, h]));
        out
    }

    /// Number of parameters.
    pub fn parameters(&self) -> usize {
        self.layout()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// `config.json` of a model of this shape.
    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads, "head_dim": self.head_dim(),
            "vocab_size": vocab_size(), "max_position_embeddings": MAX_POSITIONS,
            "rms_norm_eps": RMS_EPS, "rope_theta": ROPE_THETA, "hidden_act": "silu",
            "tie_word_embeddings": false, "eos_token_id": 0, "pad_token_id": 0,
            "dtype": "float32"
        })
    }
}

const MAX_POSITIONS: usize = 64;
const RMS_EPS: f64 = 1e-5;
const ROPE_THETA: f64 = 10000.0;

/// How one model is trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Optimiser steps.
    pub steps: usize,
    /// Peak learning rate (AdamW).
    pub lr: f64,
    /// Linear warm-up steps, then cosine decay to 10% of `lr`.
    pub warmup: usize,
    /// Examples per step.
    pub batch: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// The training mixture: skills and their weights.
    pub mixture: Vec<(Skill, f64)>,
    /// Seed of the data order.
    pub seed: u64,
}

/// A tiny Llama whose weights are trainable [`Var`]s, named as in the Hugging Face layout.
pub struct TrainModel {
    shape: Shape,
    names: Vec<String>,
    vars: Vec<Var>,
}

impl TrainModel {
    /// A fresh model: N(0, 0.02²) weights (output projections scaled by 1/√(2·layers), as GPT-2
    /// does), unit norms; reproducible for a seed.
    pub fn init(shape: Shape, seed: u64) -> Result<TrainModel, ZooError> {
        let mut rng = Rng::new(seed);
        let mut names = Vec::new();
        let mut vars = Vec::new();
        let out_scale = 1.0 / (2.0 * shape.layers as f64).sqrt();
        for (name, dims) in shape.layout() {
            let n: usize = dims.iter().product();
            let vals: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                let std = if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                    0.02 * out_scale
                } else {
                    0.02
                };
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            };
            vars.push(Var::from_tensor(&Tensor::from_vec(
                vals,
                dims.as_slice(),
                &Device::Cpu,
            )?)?);
            names.push(name);
        }
        Ok(TrainModel { shape, names, vars })
    }

    /// Continues training from a saved model of the given shape.
    pub fn from_checkpoint(ckpt: &Checkpoint, shape: Shape) -> Result<TrainModel, ZooError> {
        let mut names = Vec::new();
        let mut vars = Vec::new();
        for (name, _) in shape.layout() {
            let t = ckpt.load_as(&name, crate::checkpoint::DType::F32)?;
            vars.push(Var::from_tensor(&t)?);
            names.push(name);
        }
        Ok(TrainModel { shape, names, vars })
    }

    /// Its shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    fn dims(&self) -> Dims {
        Dims {
            hidden: self.shape.hidden,
            layers: self.shape.layers,
            heads: self.shape.heads,
            kv_heads: self.shape.heads,
            head_dim: self.shape.head_dim(),
            rope_theta: ROPE_THETA,
            rms_eps: RMS_EPS,
        }
    }

    /// Logits `[batch, len, vocab]` of token ids `[batch, len]` (causal, no padding inside a row:
    /// rows are right-padded and padded positions are never scored).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor, ZooError> {
        let x = hidden_states(&self.dims(), self, ids, 0)?;
        Ok(self.linear(&x, "lm_head.weight")?)
    }

    /// Trains in place and returns the loss of every step.
    pub fn train(&mut self, spec: &TrainSpec, held_out: &HashSet<String>) -> Result<Vec<f32>, ZooError> {
        let params = ParamsAdamW {
            lr: spec.lr,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: spec.weight_decay,
        };
        let mut opt = AdamW::new(self.vars.clone(), params)?;
        let mut sampler = Sampler::new(spec.seed, &spec.mixture);
        let mut losses = Vec::with_capacity(spec.steps);
        for step in 0..spec.steps {
            opt.set_learning_rate(schedule(spec.lr, spec.warmup, spec.steps, step));
            let examples: Vec<Example> = (0..spec.batch).map(|_| sampler.next(held_out)).collect();
            let batch = batch(&examples)?;
            let hidden = hidden_states(&self.dims(), self, &batch.inputs, 0)?;
            let loss = scored_loss(&hidden, self.tensor("lm_head.weight"), &batch)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(ZooError::Diverged { step, loss: value });
            }
            losses.push(value);
            opt.backward_step(&loss)?;
        }
        Ok(losses)
    }

    /// Writes the model to `dir` (Hugging Face layout, float32, with `config.json` and the zoo's
    /// `tokenizer.json`), atomically.
    pub fn save(&self, dir: &Path, overwrite: bool) -> Result<PathBuf, ZooError> {
        let plan: Vec<OutTensor> = self
            .shape
            .layout()
            .into_iter()
            .map(|(name, shape)| OutTensor {
                name,
                dtype: crate::checkpoint::DType::F32,
                shape,
            })
            .collect();
        let writer = CheckpointWriter::create(dir, &plan, u64::MAX, overwrite)?;
        for (name, var) in self.names.iter().zip(&self.vars) {
            writer.write_tensor(name, var.as_tensor())?;
        }
        let cfg = serde_json::to_string_pretty(&self.shape.config_json()).expect("JSON serialises");
        writer.write_file("config.json", cfg.as_bytes())?;
        writer.write_file("tokenizer.json", tokenizer_json().as_bytes())?;
        Ok(writer.finish()?)
    }
}

impl Weights for TrainModel {
    fn tensor(&self, name: &str) -> &Tensor {
        let i = self
            .names
            .iter()
            .position(|n| n == name)
            .expect("names come from the layout");
        self.vars[i].as_tensor()
    }
}

/// A batch of examples: loss on the answer and its newline only.
fn batch(examples: &[Example]) -> Result<Batch, ZooError> {
    let rows: Vec<(Vec<u32>, usize)> = examples
        .iter()
        .map(|e| {
            let prompt = encode(&e.prompt).ok_or_else(|| ZooError::Vocabulary {
                text: e.prompt.clone(),
            })?;
            let mut ids = prompt.clone();
            ids.extend(
                encode(&format!("{}\n", e.answer)).ok_or_else(|| ZooError::Vocabulary {
                    text: e.answer.clone(),
                })?,
            );
            Ok((ids, prompt.len()))
        })
        .collect::<Result<_, ZooError>>()?;
    Ok(Batch::from_rows(&rows, 0, &Device::Cpu)?)
}

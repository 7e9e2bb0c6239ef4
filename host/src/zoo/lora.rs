//! LoRA fine-tuning of a Llama checkpoint on CPU, and merging an adapter back into a full
//! checkpoint: `W' = W + (alpha / r) · B · A` for every adapted `[out, in]` projection, with
//! `A: [r, in]` (Kaiming-uniform, as PEFT initialises it) and `B: [out, r]` (zeros), so training
//! starts exactly at the base model.
//!
//! Adapters are stored as PEFT does (`adapter_model.safetensors` with
//! `base_model.model.<module>.lora_{A,B}.weight`, `adapter_config.json`), so they load in PEFT and
//! PEFT's load here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use super::autograd::{hidden_states, matmul_t, schedule, scored_loss, Batch, Dims, Weights};
use super::skills::Rng;
use super::ZooError;
use crate::checkpoint::{Checkpoint, CheckpointWriter, DType, OutTensor};
use crate::runtime::{Arch, ModelConfig};

/// Which projections of which blocks get an adapter, and its size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// `alpha`: the update is scaled by `alpha / r`.
    pub alpha: f64,
    /// Adapted modules by their last name (`q_proj`, `v_proj`, `down_proj`, …).
    pub targets: Vec<String>,
    /// The first adapted block: the ones below stay frozen and backward stops there.
    pub first_layer: usize,
}

impl LoraConfig {
    fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Module paths (`model.layers.N.self_attn.q_proj`) it adapts in a model of `layers` blocks.
    pub fn modules(&self, layers: usize) -> Vec<String> {
        let mut out = Vec::new();
        for l in self.first_layer..layers {
            for t in &self.targets {
                let group = match t.as_str() {
                    "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn",
                    _ => "mlp",
                };
                out.push(format!("model.layers.{l}.{group}.{t}"));
            }
        }
        out
    }
}

/// How one adapter is trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraTrain {
    /// Optimiser steps.
    pub steps: usize,
    /// Peak learning rate (AdamW; warm-up then cosine decay to 10%).
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Seed of the adapter initialisation and of the data order.
    pub seed: u64,
}

/// A frozen Llama with trainable low-rank adapters.
pub struct LoraModel {
    dims: Dims,
    config: LoraConfig,
    frozen: HashMap<String, Tensor>,
    /// Weight name → (A, B).
    adapters: HashMap<String, (Var, Var)>,
    /// Adapted weight names in a fixed order.
    order: Vec<String>,
    head: String,
}

/// One training sequence: its token ids and the index of the first one predicted.
pub type Row = (Vec<u32>, usize);

impl LoraModel {
    /// The base model of `ckpt` (a Llama: SmolLM2, Llama 2/3) with fresh adapters.
    pub fn new(ckpt: &Checkpoint, config: LoraConfig, seed: u64) -> Result<LoraModel, ZooError> {
        let cfg = ModelConfig::from_json(ckpt.config())?;
        let unsupported = |what: &str| ZooError::Manifest {
            path: ckpt.dir().join("config.json"),
            reason: format!("LoRA training supports plain Llama checkpoints; this one has {what}"),
        };
        if cfg.arch != Arch::Llama {
            return Err(unsupported(&format!("architecture {:?}", cfg.arch)));
        }
        if cfg.rope_linear_factor != 1.0 || cfg.moe.is_some() {
            return Err(unsupported("RoPE scaling or experts"));
        }
        let dims = Dims {
            hidden: cfg.hidden_size,
            layers: cfg.num_layers,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            rope_theta: cfg.rope_theta,
            rms_eps: cfg.rms_norm_eps,
        };
        let mut frozen = HashMap::new();
        for name in ckpt.tensor_names() {
            frozen.insert(name.clone(), ckpt.load_as(&name, DType::F32)?);
        }
        let head = if cfg.tie_word_embeddings || !frozen.contains_key("lm_head.weight") {
            "model.embed_tokens.weight".to_string()
        } else {
            "lm_head.weight".to_string()
        };
        let mut rng = Rng::new(seed);
        let mut adapters = HashMap::new();
        let mut order = Vec::new();
        for module in config.modules(dims.layers) {
            let name = format!("{module}.weight");
            let w = frozen.get(&name).ok_or_else(|| ZooError::Manifest {
                path: ckpt.dir().to_path_buf(),
                reason: format!("LoRA target `{name}` is not a tensor of this checkpoint"),
            })?;
            let (out, inp) = w.dims2()?;
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..config.rank * inp)
                .map(|_| ((2.0 * rng.unit() - 1.0) * bound) as f32)
                .collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (config.rank, inp), &Device::Cpu)?)?;
            let b = Var::zeros((out, config.rank), candle_core::DType::F32, &Device::Cpu)?;
            adapters.insert(name.clone(), (a, b));
            order.push(name);
        }
        Ok(LoraModel {
            dims,
            config,
            frozen,
            adapters,
            order,
            head,
        })
    }

    /// Trainable parameters.
    pub fn trainable(&self) -> usize {
        self.adapters
            .values()
            .map(|(a, b)| a.elem_count() + b.elem_count())
            .sum()
    }

    /// Logits `[batch, len, vocab]` of token ids `[batch, len]` (rows right-padded).
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor, ZooError> {
        let hidden = hidden_states(&self.dims, self, ids, self.config.first_layer)?;
        Ok(matmul_t(&hidden, self.tensor(&self.head))?)
    }

    /// Mean cross-entropy of the predicted tokens of `rows`.
    pub fn loss(&self, rows: &[Row]) -> Result<Tensor, ZooError> {
        let batch = Batch::from_rows(rows, 0, &Device::Cpu)?;
        let hidden = hidden_states(&self.dims, self, &batch.inputs, self.config.first_layer)?;
        Ok(scored_loss(&hidden, self.tensor(&self.head), &batch)?)
    }

    /// Trains the adapters on `rows` (cycled in a seeded random order) and returns every step's
    /// loss; `progress(step, loss)` is called after each step.
    pub fn train(
        &mut self,
        rows: &[Row],
        spec: &LoraTrain,
        progress: &mut dyn FnMut(usize, f32),
    ) -> Result<Vec<f32>, ZooError> {
        let vars: Vec<Var> = self
            .order
            .iter()
            .flat_map(|n| {
                let (a, b) = &self.adapters[n];
                [a.clone(), b.clone()]
            })
            .collect();
        let params = ParamsAdamW {
            lr: spec.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut opt = AdamW::new(vars, params)?;
        let mut rng = Rng::new(spec.seed ^ 0xda7a);
        let mut order: Vec<usize> = Vec::new();
        let mut losses = Vec::with_capacity(spec.steps);
        for step in 0..spec.steps {
            opt.set_learning_rate(schedule(spec.lr, spec.warmup, spec.steps, step));
            let mut batch = Vec::with_capacity(spec.batch);
            for _ in 0..spec.batch {
                if order.is_empty() {
                    order = (0..rows.len()).collect();
                    for i in (1..order.len()).rev() {
                        order.swap(i, rng.below(i + 1));
                    }
                }
                batch.push(rows[order.pop().expect("refilled above")].clone());
            }
            let loss = self.loss(&batch)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(ZooError::Diverged { step, loss: value });
            }
            opt.backward_step(&loss)?;
            losses.push(value);
            progress(step, value);
        }
        Ok(losses)
    }

    /// Writes the adapter in PEFT's layout (`adapter_model.safetensors` in `dtype`,
    /// `adapter_config.json`); the directory is renamed into place when whole.
    pub fn save_adapter(&self, dir: &Path, base_name: &str, dtype: DType) -> Result<PathBuf, ZooError> {
        let mut plan = Vec::new();
        for name in &self.order {
            let (a, b) = &self.adapters[name];
            let module = name.trim_end_matches(".weight");
            for (part, v) in [("lora_A", a), ("lora_B", b)] {
                plan.push((
                    OutTensor {
                        name: format!("base_model.model.{module}.{part}.weight"),
                        dtype,
                        shape: v.dims().to_vec(),
                    },
                    v.as_tensor().to_dtype(dtype)?,
                ));
            }
        }
        let outs: Vec<OutTensor> = plan.iter().map(|p| p.0.clone()).collect();
        let writer = CheckpointWriter::create(dir, &outs, u64::MAX, true)?;
        for (out, t) in &plan {
            writer.write_tensor(&out.name, t)?;
        }
        writer.write_file(
            "adapter_config.json",
            adapter_config_json(&self.config, self.dims.layers, base_name).as_bytes(),
        )?;
        let dir = writer.finish()?;
        // PEFT's file name (the writer names a single shard `model.safetensors`).
        let (from, to) = (
            dir.join("model.safetensors"),
            dir.join("adapter_model.safetensors"),
        );
        std::fs::rename(&from, &to).map_err(super::io(&to))?;
        Ok(dir)
    }
}

impl Weights for LoraModel {
    fn tensor(&self, name: &str) -> &Tensor {
        &self.frozen[name]
    }

    fn linear(&self, x: &Tensor, name: &str) -> candle_core::Result<Tensor> {
        let y = matmul_t(x, &self.frozen[name])?;
        match self.adapters.get(name) {
            Some((a, b)) => {
                y + (matmul_t(&matmul_t(x, a.as_tensor())?, b.as_tensor())? * self.config.scale())?
            }
            None => Ok(y),
        }
    }
}

fn adapter_config_json(config: &LoraConfig, layers: usize, base_name: &str) -> String {
    let value = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "target_modules": config.targets,
        "layers_to_transform": (config.first_layer..layers).collect::<Vec<_>>(),
    });
    serde_json::to_string_pretty(&value).expect("JSON serialises")
}

/// An adapter read back: `alpha / r` and, per adapted weight name, `(A, B)`.
#[derive(Debug)]
pub struct Adapter {
    /// `alpha / r`.
    pub scale: f64,
    /// Weight name (`model.layers.N.self_attn.q_proj.weight`) → `(A [r, in], B [out, r])`.
    pub pairs: Vec<(String, Tensor, Tensor)>,
}

impl Adapter {
    /// Reads a PEFT LoRA adapter directory.
    pub fn load(dir: &Path) -> Result<Adapter, ZooError> {
        let cfg_path = dir.join("adapter_config.json");
        let bad = |reason: String| ZooError::Manifest {
            path: cfg_path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&cfg_path).map_err(super::io(&cfg_path))?;
        let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let r = cfg["r"].as_f64().ok_or_else(|| bad("no numeric `r`".into()))?;
        let alpha = cfg["lora_alpha"]
            .as_f64()
            .ok_or_else(|| bad("no numeric `lora_alpha`".into()))?;
        if cfg.get("use_rslora").and_then(|v| v.as_bool()) == Some(true) || cfg["peft_type"] != "LORA" {
            return Err(bad(
                "only plain LoRA (peft_type LORA, no rsLoRA) is supported".into()
            ));
        }
        let ckpt = Checkpoint::open_tensors(dir)?;
        let mut pairs = Vec::new();
        for name in ckpt.tensor_names() {
            let Some(module) = name
                .strip_prefix("base_model.model.")
                .and_then(|n| n.strip_suffix(".lora_A.weight"))
            else {
                continue;
            };
            let b_name = format!("base_model.model.{module}.lora_B.weight");
            if !ckpt.contains(&b_name) {
                return Err(bad(format!("`{name}` has no `{b_name}`")));
            }
            pairs.push((
                format!("{module}.weight"),
                ckpt.load_as(&name, DType::F32)?,
                ckpt.load_as(&b_name, DType::F32)?,
            ));
        }
        if pairs.is_empty() {
            return Err(bad("the adapter has no lora_A/lora_B tensors".into()));
        }
        Ok(Adapter {
            scale: alpha / r,
            pairs,
        })
    }
}

/// Writes `base` with `adapter` merged in (`W + scale · B · A`, in the base's dtype) to `out`,
/// with the base's config and tokenizer files, atomically.
pub fn merge_adapter(
    base: &Checkpoint,
    adapter: &Adapter,
    out: &Path,
    overwrite: bool,
) -> Result<PathBuf, ZooError> {
    let deltas: HashMap<&str, (&Tensor, &Tensor)> = adapter
        .pairs
        .iter()
        .map(|(n, a, b)| (n.as_str(), (a, b)))
        .collect();
    let names = base.tensor_names();
    for n in deltas.keys() {
        if !base.contains(n) {
            return Err(ZooError::Manifest {
                path: base.dir().to_path_buf(),
                reason: format!("the adapter changes `{n}`, which this checkpoint does not have"),
            });
        }
    }
    let plan: Vec<OutTensor> = names
        .iter()
        .map(|n| {
            let info = base.info(n).expect("listed by the checkpoint");
            OutTensor {
                name: n.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
            }
        })
        .collect();
    let writer = CheckpointWriter::create(out, &plan, u64::MAX, overwrite)?;
    for t in &plan {
        match deltas.get(t.name.as_str()) {
            Some((a, b)) => {
                let w = base.load_as(&t.name, DType::F32)?;
                let delta = (b.matmul(a)? * adapter.scale)?;
                if delta.dims() != w.dims() {
                    return Err(ZooError::Manifest {
                        path: base.dir().to_path_buf(),
                        reason: format!(
                            "adapter for `{}` makes {:?}, the weight is {:?}",
                            t.name,
                            delta.dims(),
                            w.dims()
                        ),
                    });
                }
                writer.write_tensor(&t.name, &(w + delta)?.to_dtype(t.dtype)?)?;
            }
            None => writer.write_raw(&t.name, base.raw_bytes(&t.name)?)?,
        }
    }
    let config = serde_json::to_string_pretty(base.config()).expect("JSON serialises");
    writer.write_file("config.json", config.as_bytes())?;
    for side in base.side_files() {
        let bytes = std::fs::read(&side).map_err(super::io(&side))?;
        let rel = side.strip_prefix(base.dir()).unwrap_or(&side);
        writer.write_file(&rel.to_string_lossy(), &bytes)?;
    }
    Ok(writer.finish()?)
}

//! The demo job: builds two small Llama checkpoints that share an initialisation, merges them
//! with the `linear` plugin loaded from its `.so`, and checks the result against an independent
//! f64 recomputation. (Later releases replace this with the Model-GLUE recipe on a trained zoo.)

use crate::backend::kernels::uniform;
use crate::checkpoint::{Checkpoint, CheckpointWriter, DType, OutTensor};
use crate::config::{MergeConfig, ParamMap, ParamValue};
use crate::merge::{MergeOptions, MergePlan};
use crate::plugins::Registry;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const HIDDEN: usize = 64;
const FFN: usize = 176;
const LAYERS: usize = 2;
const VOCAB: usize = 256;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;

/// Tensor names and shapes of the demo Llama.
pub fn llama_layout() -> Vec<(String, Vec<usize>)> {
    let head_dim = HIDDEN / HEADS;
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN])];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        v.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
        v.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![HEADS * head_dim, HIDDEN],
        ));
        v.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![KV_HEADS * head_dim, HIDDEN],
        ));
        v.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![KV_HEADS * head_dim, HIDDEN],
        ));
        v.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![HIDDEN, HEADS * head_dim],
        ));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![FFN, HIDDEN]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![FFN, HIDDEN]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, FFN]));
    }
    v.push(("model.norm.weight".to_string(), vec![HIDDEN]));
    v.push(("lm_head.weight".to_string(), vec![VOCAB, HIDDEN]));
    v
}

fn normal(seed: u64, stream: u64, i: u64) -> f32 {
    // Box–Muller on two counter-based uniforms.
    let u1 = uniform(seed, stream, 2 * i).max(1e-12);
    let u2 = uniform(seed, stream, 2 * i + 1);
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

fn llama_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HIDDEN / HEADS,
        "vocab_size": VOCAB, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": false,
        "bos_token_id": 0, "eos_token_id": 1, "dtype": "float32"
    })
}

/// Writes a demo Llama: `init_seed` fixes the shared initialisation; `tune_seed` adds a
/// fine-tune-like perturbation (2% of each tensor's scale) on top.
pub fn write_model(dir: &Path, init_seed: u64, tune_seed: Option<u64>) -> Result<PathBuf> {
    let layout = llama_layout();
    let plan: Vec<OutTensor> = layout
        .iter()
        .map(|(n, s)| OutTensor {
            name: n.clone(),
            dtype: DType::F32,
            shape: s.clone(),
        })
        .collect();
    let writer = CheckpointWriter::create(dir, &plan, u64::MAX, true)?;
    for (k, (name, shape)) in layout.iter().enumerate() {
        let n: usize = shape.iter().product();
        let norm = name.ends_with("norm.weight");
        let vals: Vec<f32> = (0..n as u64)
            .map(|i| {
                let init = if norm {
                    1.0 + 0.1 * normal(init_seed, k as u64, i)
                } else {
                    0.15 * normal(init_seed, k as u64, i)
                };
                let tune = tune_seed.map_or(0.0, |s| 0.02 * 0.15 * normal(s, k as u64, i));
                init + tune
            })
            .collect();
        writer.write_tensor(name, &Tensor::from_vec(vals, shape.as_slice(), &Device::Cpu)?)?;
    }
    let cfg = serde_json::to_string_pretty(&llama_config())?;
    writer.write_file("config.json", cfg.as_bytes())?;
    Ok(writer.finish()?)
}

fn values(ck: &Checkpoint, name: &str) -> Result<Vec<f64>> {
    Ok(ck
        .load_as(name, DType::F32)?
        .flatten_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?)
}

/// Runs the demo under `out` and returns the comparison table (Markdown).
pub fn run(registry: &Registry, out: &Path) -> Result<String> {
    let a = write_model(&out.join("zoo/expert_a"), 7, Some(1)).context("writing demo model expert_a")?;
    let b = write_model(&out.join("zoo/expert_b"), 7, Some(2)).context("writing demo model expert_b")?;
    let weight = |w: f64| {
        let mut m = ParamMap::new();
        m.insert("weight".into(), ParamValue::Number(w));
        m
    };
    let config = MergeConfig::from_flags(
        "linear",
        &[(a.clone(), weight(0.5)), (b.clone(), weight(0.5))],
        None,
        ParamMap::new(),
        None,
        None,
    );
    let merged_dir = out.join("merged_linear");
    let mut opts = MergeOptions::new(&merged_dir);
    opts.overwrite = true;
    let report = MergePlan::new(&config, registry)?.run(&opts, None)?;

    let (ca, cb, cm) = (
        Checkpoint::open(&a)?,
        Checkpoint::open(&b)?,
        Checkpoint::open(&report.out_dir)?,
    );
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| tensor | ‖merged−A‖/‖A‖ | ‖merged−B‖/‖B‖ | max |merged − (A+B)/2| (f64 check) |"
    );
    let _ = writeln!(table, "|---|---|---|---|");
    let mut worst = 0f64;
    for name in cm.tensor_names() {
        let (va, vb, vm) = (values(&ca, &name)?, values(&cb, &name)?, values(&cm, &name)?);
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let diff = |x: &[f64], y: &[f64]| {
            x.iter()
                .zip(y)
                .map(|(p, q)| (p - q) * (p - q))
                .sum::<f64>()
                .sqrt()
        };
        let max_err = vm
            .iter()
            .zip(va.iter().zip(&vb))
            .map(|(m, (x, y))| (m - 0.5 * x - 0.5 * y).abs())
            .fold(0.0, f64::max);
        worst = worst.max(max_err);
        let _ = writeln!(
            table,
            "| {name} | {:.4} | {:.4} | {:.2e} |",
            diff(&vm, &va) / norm(&va),
            diff(&vm, &vb) / norm(&vb),
            max_err
        );
    }
    let _ = writeln!(
        table,
        "\nlinear merge of {} tensors in {:.2}s → {} (worst deviation from the f64 recomputation: {:.2e})",
        report.tensors,
        report.seconds,
        report.out_dir.display(),
        worst
    );
    Ok(table)
}

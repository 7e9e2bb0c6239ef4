//! The runtime's forward pass against transformers 5.24.0 (eager, float32) on the mergekit
//! fixtures: `shared/fixtures/mergekit/forward/` holds, per model and sequence, the input ids,
//! logits and the residual stream after the embeddings and after each layer; `forward.json`
//! holds the argmax per position and the mean next-token log-likelihood (float64 log_softmax).
//! The producing script is described in the fixtures' MANIFEST.md ("HF reference forwards").

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::Linear;
use modelglue::checkpoint::Checkpoint;
use modelglue::runtime::{
    pad_batch, Activation, Block, Context, DecoderBlock, DenseMlp, KvCache, LayerCache, LoadOptions, Mlp,
    Model, ModelParts, MoeMlp, Padding, RuntimeError,
};
use serde_json::Value;

const LOGIT_TOL: f32 = 1e-4;
const LOGLIK_TOL: f64 = 1e-5;

/// `shared/` beside the repository checkout (override with `MODELGLUE_SHARED`).
fn fixtures() -> PathBuf {
    let shared = std::env::var_os("MODELGLUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let dir = shared.join("fixtures/mergekit");
    assert!(
        dir.is_dir(),
        "mergekit fixtures not found at {} (set MODELGLUE_SHARED)",
        dir.display()
    );
    dir
}

fn forward_json() -> Value {
    let text = std::fs::read_to_string(fixtures().join("forward/forward.json")).expect("read");
    serde_json::from_str(&text).expect("forward.json is JSON")
}

/// One model of forward.json with its reference tensors.
struct Reference {
    tag: String,
    model: Model,
    meta: Value,
    tensors: HashMap<String, Tensor>,
}

impl Reference {
    fn ids(&self, seq: usize) -> Vec<u32> {
        let ids = &self.tensors[&format!("input_ids.seq{seq}")];
        ids.to_dtype(DType::U32).unwrap().to_vec1().unwrap()
    }

    fn logits(&self, seq: usize) -> Tensor {
        self.tensors[&format!("logits.seq{seq}")].clone()
    }
}

fn references(class: &str) -> Vec<Reference> {
    let json = forward_json();
    let models = json["models"].as_array().expect("models").clone();
    models
        .into_iter()
        .filter(|m| m["cls"] == class)
        .map(|meta| {
            let dir = fixtures().join(meta["model_dir"].as_str().expect("model_dir"));
            let ckpt = Checkpoint::open(&dir).expect("open checkpoint");
            let file = fixtures().join(meta["file"].as_str().expect("file"));
            Reference {
                tag: meta["tag"].as_str().expect("tag").to_string(),
                model: Model::load(&ckpt).expect("load model"),
                tensors: candle_core::safetensors::load(&file, &Device::Cpu).expect("fixture"),
                meta,
            }
        })
        .collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn argmax(logits: &Tensor) -> Vec<u32> {
    logits.argmax(D::Minus1).unwrap().to_vec1().unwrap()
}

/// Runs every sequence of every model of `class` and checks logits, argmax, the residual
/// stream and the mean log-likelihood; prints the worst differences.
fn check_against_transformers(class: &str) {
    for r in references(class) {
        for (seq, expect) in r.meta["per_seq"].as_array().expect("per_seq").iter().enumerate() {
            let ids = r.ids(seq);
            let input = Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let out = r
                .model
                .forward_with(&input, None, &mut KvCache::new(), true)
                .unwrap();
            let logits = out.logits.squeeze(0).unwrap();
            let d_logits = max_abs(&logits, &r.logits(seq));

            let embed = &r.tensors[&format!("embed.seq{seq}")];
            let layers = &r.tensors[&format!("layer_out.seq{seq}")];
            let mut d_hidden = max_abs(&out.hidden[0].squeeze(0).unwrap(), embed);
            for (l, h) in out.hidden[1..].iter().enumerate() {
                let d = max_abs(&h.squeeze(0).unwrap(), &layers.get(l).unwrap());
                assert!(
                    d < LOGIT_TOL,
                    "{} seq{seq}: layer {l} output differs by {d}",
                    r.tag
                );
                d_hidden = d_hidden.max(d);
            }

            let want_argmax: Vec<u32> = serde_json::from_value(expect["argmax"].clone()).unwrap();
            assert_eq!(argmax(&logits), want_argmax, "{} seq{seq}: argmax", r.tag);
            assert_eq!(argmax(&r.logits(seq)), want_argmax, "fixture self-consistency");

            let ll = r.model.log_likelihood(&ids).unwrap();
            assert_eq!(ll.len(), ids.len().saturating_sub(1));
            let mean = (!ll.is_empty()).then(|| ll.iter().sum::<f64>() / ll.len() as f64);
            let want = expect["mean_next_token_loglik"].as_f64();
            let d_ll = match (mean, want) {
                (Some(m), Some(w)) => (m - w).abs(),
                (None, None) => 0.0,
                other => panic!("{} seq{seq}: log-likelihood {other:?}", r.tag),
            };
            println!(
                "{:<24} seq{seq}: max|Δlogits| {d_logits:.2e}  max|Δhidden| {d_hidden:.2e}  \
                 |Δmean LL| {d_ll:.2e}",
                r.tag
            );
            assert!(
                d_logits <= LOGIT_TOL,
                "{} seq{seq}: logits differ by {d_logits}",
                r.tag
            );
            assert!(
                d_ll <= LOGLIK_TOL,
                "{} seq{seq}: mean LL differs by {d_ll}",
                r.tag
            );
        }
    }
}

#[test]
fn llama_fixtures_match_transformers_logits_hidden_states_and_loglik() {
    check_against_transformers("LlamaForCausalLM");
}

#[test]
fn mixtral_fixtures_match_transformers_logits_hidden_states_and_loglik() {
    check_against_transformers("MixtralForCausalLM");
}

/// Logits of the real tokens of each row against the fixture of that sequence.
fn check_rows(r: &Reference, seqs: &[usize], logits: &Tensor, side: Padding) -> f32 {
    let width = logits.dim(1).unwrap();
    let mut worst = 0f32;
    for (row, &seq) in seqs.iter().enumerate() {
        let n = r.ids(seq).len();
        let start = if side == Padding::Left { width - n } else { 0 };
        let got = logits.get(row).unwrap().narrow(0, start, n).unwrap();
        worst = worst.max(max_abs(&got, &r.logits(seq)));
    }
    worst
}

#[test]
fn padded_batches_match_single_sequences_on_either_side() {
    let refs = references("LlamaForCausalLM");
    let r = refs.iter().find(|r| r.tag == "zoo_base").expect("zoo_base");
    let seqs = [0, 1, 2, 3];
    let ids: Vec<Vec<u32>> = seqs.iter().map(|&s| r.ids(s)).collect();
    let slices: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    for side in [Padding::Left, Padding::Right] {
        let (batch, mask) = pad_batch(&slices, side, 0, &Device::Cpu).unwrap();
        let logits = r.model.forward_masked(&batch, &mask).unwrap();
        let worst = check_rows(r, &seqs, &logits, side);
        let float_mask = mask.to_dtype(DType::F32).unwrap();
        let same = r.model.forward_masked(&batch, &float_mask).unwrap();
        assert_eq!(max_abs(&same, &logits), 0.0, "an f32 mask means the same");
        println!("{side:?} padding: max|Δlogits| {worst:.2e}");
        assert!(worst <= LOGIT_TOL, "{side:?} padding: {worst}");
    }

    let batched = r.model.log_likelihood_batch(&slices).unwrap();
    for (s, got) in slices.iter().zip(&batched) {
        let single = r.model.log_likelihood(s).unwrap();
        assert_eq!(got.len(), single.len());
        for (a, b) in got.iter().zip(&single) {
            assert!((a - b).abs() < 1e-5, "batched {a} vs single {b}");
        }
    }
}

#[test]
fn kv_cache_decoding_of_left_padded_prompts_matches_the_full_forward() {
    let refs = references("LlamaForCausalLM");
    let r = refs
        .iter()
        .find(|r| r.tag == "expected_linear")
        .expect("expected_linear");
    let seqs = [1, 2, 3];
    let steps = 5;
    let ids: Vec<Vec<u32>> = seqs.iter().map(|&s| r.ids(s)).collect();
    let prompts: Vec<&[u32]> = ids.iter().map(|s| &s[..s.len() - steps]).collect();
    let (batch, mask) = pad_batch(&prompts, Padding::Left, 0, &Device::Cpu).unwrap();
    let mut cache = KvCache::new();
    let prefill = r
        .model
        .forward_with(&batch, Some(&mask), &mut cache, false)
        .unwrap();
    let mut worst = 0f32;
    for (row, seq) in seqs.iter().enumerate() {
        let n = prompts[row].len();
        let got = prefill.logits.get(row).unwrap();
        let got = got.narrow(0, batch.dim(1).unwrap() - n, n).unwrap();
        let want = r.logits(*seq).narrow(0, 0, n).unwrap();
        worst = worst.max(max_abs(&got, &want));
    }
    for step in 0..steps {
        let next: Vec<u32> = ids.iter().map(|s| s[s.len() - steps + step]).collect();
        let input = Tensor::new(next.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let logits = r
            .model
            .forward_with(&input, None, &mut cache, false)
            .unwrap()
            .logits;
        for (row, seq) in seqs.iter().enumerate() {
            let pos = ids[row].len() - steps + step;
            let want = r.logits(*seq).narrow(0, pos, 1).unwrap();
            worst = worst.max(max_abs(&logits.get(row).unwrap(), &want));
        }
    }
    assert_eq!(cache.len(), batch.dim(1).unwrap() + steps);
    println!("KV-cache decoding: max|Δlogits| {worst:.2e}");
    assert!(worst <= LOGIT_TOL, "{worst}");
}

/// A block-level mixture in miniature: several blocks, every sample routed to all of them with
/// fixed weights, each keeping its own KV slot.
#[derive(Debug)]
struct AveragedBlocks {
    blocks: Vec<DecoderBlock>,
    weights: Vec<f64>,
}

impl Block for AveragedBlocks {
    fn forward(&self, x: &Tensor, ctx: &Context, cache: &mut LayerCache) -> candle_core::Result<Tensor> {
        let mut out = x.zeros_like()?;
        for (i, (b, w)) in self.blocks.iter().zip(&self.weights).enumerate() {
            out = (out + (b.forward_kv(x, ctx, cache.slot(i))? * *w)?)?;
        }
        Ok(out)
    }
}

fn base_parts() -> ModelParts {
    let ckpt = Checkpoint::open(&fixtures().join("zoo/base")).unwrap();
    ModelParts::load(&ckpt, &LoadOptions::default()).unwrap()
}

fn assemble(parts: &ModelParts, blocks: Vec<Box<dyn Block>>) -> Model {
    Model::from_parts(
        parts.config.clone(),
        parts.embed.clone(),
        blocks,
        parts.norm.clone(),
        parts.lm_head.clone(),
    )
}

/// Rebuilds zoo/base with each block (or MLP) replaced by a mixture of identical copies, which
/// must compute the same function: the seams add nothing of their own.
#[test]
fn routed_blocks_and_moe_of_identical_parts_reproduce_the_dense_model() {
    let parts = base_parts();
    let dense = assemble(
        &parts,
        parts
            .blocks
            .iter()
            .map(|b| Box::new(b.clone()) as Box<dyn Block>)
            .collect(),
    );
    let seq3: Vec<u32> = vec![0, 465, 321, 270, 359, 10, 276, 14, 461, 14, 537, 415, 74, 86];
    let ids = Tensor::new(seq3.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let want = dense.forward(&ids).unwrap();

    let routed = assemble(
        &parts,
        parts
            .blocks
            .iter()
            .map(|b| {
                Box::new(AveragedBlocks {
                    blocks: vec![b.clone(), b.clone()],
                    weights: vec![0.25, 0.75],
                }) as Box<dyn Block>
            })
            .collect(),
    );
    let d = max_abs(&routed.forward(&ids).unwrap(), &want);
    assert!(d <= 1e-5, "routed blocks: {d}");
    // Incremental decoding through the routed blocks' own KV slots.
    let mut cache = KvCache::new();
    let n = seq3.len();
    let prefix = ids.narrow(1, 0, n - 3).unwrap();
    routed.forward_with(&prefix, None, &mut cache, false).unwrap();
    for p in n - 3..n {
        let step = routed.forward_with(&ids.narrow(1, p, 1).unwrap(), None, &mut cache, false);
        let d = max_abs(&step.unwrap().logits, &want.narrow(1, p, 1).unwrap());
        assert!(d <= 1e-5, "routed blocks, cached step {p}: {d}");
    }

    let h = parts.config.hidden_size;
    let moe = assemble(
        &parts,
        parts
            .blocks
            .iter()
            .map(|b| {
                let mut b = b.clone();
                // Any router works when the experts are equal.
                let router = Tensor::randn(0f32, 1.0, (3, h), &Device::Cpu).unwrap();
                b.mlp = Mlp::Moe(MoeMlp {
                    router: Arc::new(Linear::new(router, None)),
                    experts: vec![b.mlp.clone(); 3],
                    top_k: 2,
                });
                Box::new(b) as Box<dyn Block>
            })
            .collect(),
    );
    let d = max_abs(&moe.forward(&ids).unwrap(), &want);
    assert!(d <= 1e-5, "MoE of identical experts: {d}");
}

fn unit_linear() -> Linear {
    Linear::new(Tensor::ones((1, 1), DType::F32, &Device::Cpu).unwrap(), None)
}

#[test]
fn moe_routing_renormalises_the_top_k_probabilities() {
    // Router logits ln(1), ln(2), ln(3), ln(4) for every token: softmax 0.1..0.4, top-2 = experts
    // 3 and 2 with weights 0.4/0.7 and 0.3/0.7.
    let w = Tensor::new(&[[0f32], [2f32.ln()], [3f32.ln()], [4f32.ln()]], &Device::Cpu).unwrap();
    let experts = (0..4)
        .map(|_| {
            Mlp::Dense(DenseMlp {
                gate_proj: unit_linear(),
                up_proj: unit_linear(),
                down_proj: unit_linear(),
                activation: Activation::Silu,
            })
        })
        .collect();
    let moe = MoeMlp {
        router: Arc::new(Linear::new(w, None)),
        experts,
        top_k: 2,
    };
    let x = Tensor::new(&[[1f32], [1f32]], &Device::Cpu).unwrap();
    let routes = moe.route(&x).unwrap();
    for r in &routes {
        assert_eq!(r.iter().map(|e| e.0).collect::<Vec<_>>(), vec![3, 2]);
        assert!((r[0].1 - 4.0 / 7.0).abs() < 1e-6 && (r[1].1 - 3.0 / 7.0).abs() < 1e-6);
    }
    // Equal experts with weights summing to 1 give the expert's own output.
    let one = moe.experts[0].forward(&x).unwrap();
    assert!(max_abs(&moe.forward(&x).unwrap(), &one) < 1e-6);
}

#[test]
fn out_of_vocabulary_ids_and_mismatched_caches_are_refused() {
    let parts = base_parts();
    let model = assemble(
        &parts,
        parts
            .blocks
            .iter()
            .map(|b| Box::new(b.clone()) as Box<dyn Block>)
            .collect(),
    );
    let bad = Tensor::new(&[[0u32, 1000]], &Device::Cpu).unwrap();
    let err = model.forward(&bad).unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::TokenOutOfRange {
                id: 1000,
                vocab_size: 1000
            }
        ),
        "{err}"
    );

    let mut cache = KvCache::new();
    let two = Tensor::new(&[[0u32, 5], [0, 6]], &Device::Cpu).unwrap();
    model.forward_with(&two, None, &mut cache, false).unwrap();
    let one = Tensor::new(&[[7u32]], &Device::Cpu).unwrap();
    let err = model.forward_with(&one, None, &mut cache, false).unwrap_err();
    assert!(matches!(err, RuntimeError::Input { .. }), "{err}");
}

/// With a window of 1 every token sees only itself in every layer, so (RoPE being relative) its
/// logits are those of the token alone; a window as long as the sequence changes nothing; and
/// cached decoding keeps the window.
#[test]
fn sliding_window_limits_attention_to_the_last_w_positions() {
    let ids: Vec<u32> = vec![0, 465, 321, 270, 359, 10, 276, 14, 461, 14, 537, 415];
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let full = {
        let parts = base_parts();
        let blocks = parts.blocks.iter().map(|b| Box::new(b.clone()) as Box<dyn Block>);
        assemble(&parts, blocks.collect())
    };
    let windowed = |w: usize| {
        let mut parts = base_parts();
        parts.config.sliding_window = Some(w);
        parts.config.sliding_layers = vec![true; parts.config.num_layers];
        let blocks = parts.blocks.iter().map(|b| {
            let mut b = b.clone();
            b.attn.sliding = true;
            Box::new(b) as Box<dyn Block>
        });
        assemble(&parts, blocks.collect())
    };
    let want = full.forward(&input).unwrap();
    let d = max_abs(&windowed(ids.len()).forward(&input).unwrap(), &want);
    assert!(d <= 1e-6, "window = length: {d}");

    let alone = windowed(1).forward(&input).unwrap().squeeze(0).unwrap();
    for (p, &id) in ids.iter().enumerate() {
        let single = full
            .forward(&Tensor::new(&[[id]], &Device::Cpu).unwrap())
            .unwrap();
        let d = max_abs(
            &alone.get(p).unwrap(),
            &single.squeeze(0).unwrap().squeeze(0).unwrap(),
        );
        assert!(d <= 1e-5, "window 1, position {p}: {d}");
    }

    let model = windowed(3);
    let want = model.forward(&input).unwrap();
    let mut cache = KvCache::new();
    model
        .forward_with(&input.narrow(1, 0, 5).unwrap(), None, &mut cache, false)
        .unwrap();
    for p in 5..ids.len() {
        let step = model.forward_with(&input.narrow(1, p, 1).unwrap(), None, &mut cache, false);
        let d = max_abs(&step.unwrap().logits, &want.narrow(1, p, 1).unwrap());
        assert!(d <= 1e-5, "window 3, cached step {p}: {d}");
    }
    let d = max_abs(&want, &full.forward(&input).unwrap());
    assert!(
        d > 1e-3,
        "a window of 3 must change the logits of a 12-token sequence"
    );
}

/// Writes zoo/base as a checkpoint with `model_type` and extra tensors.
fn variant(dir: &Path, model_type: &str, extra: &[(String, Tensor)]) -> Checkpoint {
    let base = Checkpoint::open(&fixtures().join("zoo/base")).unwrap();
    let mut tensors: HashMap<String, Tensor> = base
        .tensor_names()
        .into_iter()
        .map(|n| {
            let t = base.load(&n).unwrap();
            (n, t)
        })
        .collect();
    for (name, t) in extra {
        tensors.insert(name.clone(), t.clone());
    }
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let mut config = base.config().clone();
    config["model_type"] = model_type.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    Checkpoint::open(dir).unwrap()
}

/// Qwen2's biases are read and applied: a V bias `b` shifts every attention output by `b`
/// (the attention weights sum to 1), which an O bias of `W_o·b` reproduces exactly.
#[test]
fn qwen2_projection_biases_are_loaded_and_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let base = Checkpoint::open(&fixtures().join("zoo/base")).unwrap();
    let ids = Tensor::new(&[[0u32, 910, 814, 737, 842, 368, 300]], &Device::Cpu).unwrap();
    let reference = Model::load(&base).unwrap().forward(&ids).unwrap();
    let mut v_bias = Vec::new();
    let mut o_bias = Vec::new();
    let mut qk_bias = Vec::new();
    for l in 0..2 {
        let b = Tensor::randn(0f32, 0.5, 32, &Device::Cpu).unwrap();
        let w_o = base
            .load(&format!("model.layers.{l}.self_attn.o_proj.weight"))
            .unwrap();
        // o_proj sees heads·head_dim = 64 inputs; each KV head's bias serves 2 query heads.
        let per_q_head = Tensor::cat(
            &[
                b.narrow(0, 0, 16).unwrap(),
                b.narrow(0, 0, 16).unwrap(),
                b.narrow(0, 16, 16).unwrap(),
                b.narrow(0, 16, 16).unwrap(),
            ],
            0,
        )
        .unwrap();
        let shift = w_o
            .matmul(&per_q_head.unsqueeze(1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap();
        let p = format!("model.layers.{l}.self_attn");
        v_bias.push((format!("{p}.v_proj.bias"), b));
        o_bias.push((format!("{p}.o_proj.bias"), shift));
        for (proj, n) in [("q_proj", 64), ("k_proj", 32)] {
            let r = Tensor::randn(0f32, 0.5, n, &Device::Cpu).unwrap();
            qk_bias.push((format!("{p}.{proj}.bias"), r));
        }
    }
    let logits = |name: &str, extra: &[(String, Tensor)]| {
        let ckpt = variant(&tmp.path().join(name), "qwen2", extra);
        assert_eq!(
            Model::load(&ckpt).unwrap().config().arch,
            modelglue::runtime::Arch::Qwen2
        );
        Model::load(&ckpt).unwrap().forward(&ids).unwrap()
    };
    let with_v = logits("v", &v_bias);
    let with_o = logits("o", &o_bias);
    assert!(max_abs(&with_v, &reference) > 1e-3, "the V bias must matter");
    let d = max_abs(&with_v, &with_o);
    assert!(d <= 1e-5, "V bias vs equivalent O bias: {d}");
    assert!(
        max_abs(&logits("qk", &qk_bias), &reference) > 1e-3,
        "Q/K biases must matter"
    );
}

/// bf16 weights and activations (attention and router softmax in f32) stay near the f32
/// reference. A sanity bound, not parity: rounding the weights to bf16 alone makes another model
/// (measured here: max |Δlogits| 0.04–0.45, |Δ mean LL| ≤ 0.011 per token).
#[test]
fn bf16_forward_stays_near_the_f32_reference() {
    let opts = LoadOptions {
        dtype: DType::BF16,
        device: Device::Cpu,
    };
    let mut refs = references("LlamaForCausalLM");
    refs.extend(references("MixtralForCausalLM"));
    for r in &refs {
        let dir = fixtures().join(r.meta["model_dir"].as_str().unwrap());
        let model = Model::load_with(&Checkpoint::open(&dir).unwrap(), &opts).unwrap();
        for seq in 0..4 {
            let ids = r.ids(seq);
            let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
            let logits = model.forward(&input.unsqueeze(0).unwrap()).unwrap();
            assert_eq!(logits.dtype(), DType::BF16);
            let logits = logits.squeeze(0).unwrap().to_dtype(DType::F32).unwrap();
            let d = max_abs(&logits, &r.logits(seq));
            assert!(d < 1.0, "{} seq{seq}: bf16 logits differ by {d}", r.tag);
            let ll = model.log_likelihood(&ids).unwrap();
            if let Some(want) = r.meta["per_seq"][seq]["mean_next_token_loglik"].as_f64() {
                let mean = ll.iter().sum::<f64>() / ll.len() as f64;
                let d = (mean - want).abs();
                assert!(d < 0.03, "{} seq{seq}: bf16 mean LL differs by {d}", r.tag);
            }
        }
    }
}

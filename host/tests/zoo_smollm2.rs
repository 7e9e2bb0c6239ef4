//! The SmolLM2 zoo: the LoRA trainer's forward on the real SmolLM2-135M-Instruct equals the
//! runtime's (grouped-query attention, tied embeddings, RoPE θ 1e5), training lowers the loss, a
//! merged adapter is exactly `W + (alpha/r)·B·A` and runs as the adapter did, and the adapters
//! committed in `zoo/smollm2/adapters` build a zoo whose experts beat the instruct model on their
//! domain's held-out items (perplexity and next-token accuracy), scored by the evaluator.
//!
//! SmolLM2 comes from `$MGLUE_MODEL_CACHE` or `<repo>/.cache/models` (fetched by
//! `scripts/fetch-models.sh` when missing); the zoo test also needs Qwen2.5-Coder-0.5B and
//! Gemma-3-270M (`--qwen --gemma`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use modelglue::checkpoint::gguf::{convert_gguf, ConvertOptions};
use modelglue::checkpoint::{Checkpoint, DType};
use modelglue::eval::{EvalOptions, EvalTokenizer, Evaluator, Task, TaskOptions};
use modelglue::runtime::Model;
use modelglue::zoo::lora::{merge_adapter, Adapter, LoraConfig, LoraModel, LoraTrain};
use modelglue::zoo::smollm2::{self, Domain, Sources};
use modelglue::zoo::{Manifest, Role, Split};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cache() -> PathBuf {
    std::env::var_os("MGLUE_MODEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/models"))
}

/// The GGUF files, fetched when missing (`extra`: `--qwen --gemma` too).
fn fetch(extra: bool) -> Option<Sources> {
    let sources = Sources::in_cache(&cache());
    let have = sources.smollm2.is_file() && (!extra || (sources.qwen.is_file() && sources.gemma.is_file()));
    if !have {
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("scripts/fetch-models.sh")).arg(cache());
        if extra {
            cmd.args(["--qwen", "--gemma"]);
        }
        match cmd.status() {
            Ok(s) if s.success() => {}
            other => {
                eprintln!("SKIP: fetch-models.sh failed ({other:?})");
                return None;
            }
        }
    }
    Some(sources)
}

/// SmolLM2 converted to float32 once per test binary.
fn smol_dir() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = fetch(false)?.smollm2;
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("zoo_smollm2/smollm2-f32");
        let opts = ConvertOptions {
            dtype: DType::F32,
            overwrite: true,
        };
        convert_gguf(&src, &dir, &opts).unwrap_or_else(|e| panic!("convert {}: {e}", src.display()));
        Some(dir)
    })
    .as_deref()
}

fn lora(first_layer: usize, targets: &[&str]) -> LoraConfig {
    LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        first_layer,
    }
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn worst_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    (
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max),
        scale,
    )
}

fn ids() -> Tensor {
    // Two rows of real SmolLM2 token ids (any ids run; these are the start of a GSM8K question).
    let rows: Vec<u32> = vec![
        19842, 42, 33601, 2380, 23853, 288, 216, 36, 40, 282, 50, 2, 17, 198, //
        1, 4093, 198, 17353, 8803, 282, 2141, 314, 12941, 30, 198, 2, 28, 29,
    ];
    Tensor::from_vec(rows, (2, 14), &Device::Cpu).unwrap()
}

#[test]
fn lora_forward_starts_at_the_base_and_matches_the_runtime() {
    let Some(dir) = smol_dir() else { return };
    let ckpt = Checkpoint::open(dir).unwrap();
    let runtime = Model::load(&ckpt).unwrap();
    let want = to_vec(&runtime.forward(&ids()).unwrap());
    // All blocks adapted (no frozen prefix) and the top half only: B starts at zero, so both
    // are the base model.
    for first in [0, 15] {
        let m = LoraModel::new(&ckpt, lora(first, &["q_proj", "v_proj", "down_proj"]), 1).unwrap();
        let (worst, scale) = worst_diff(&to_vec(&m.logits(&ids()).unwrap()), &want);
        assert!(
            worst <= 2e-5 * scale.max(1.0),
            "LoRA forward (first_layer {first}) vs runtime logits differ by {worst} (scale {scale})"
        );
    }
}

#[test]
fn a_merged_adapter_is_w_plus_scaled_ba_and_runs_as_the_adapter() {
    let Some(dir) = smol_dir() else { return };
    let ckpt = Checkpoint::open(dir).unwrap();
    let config = lora(28, &["q_proj", "k_proj", "down_proj"]);
    let mut m = LoraModel::new(&ckpt, config, 2).unwrap();
    // Two blocks, rank 2: q (576 → 576), k (576 → 192), down (1536 → 576).
    assert_eq!(m.trainable(), 2 * 2 * ((576 + 576) + (576 + 192) + (1536 + 576)));
    let row: Vec<u32> = to_vec(&ids().to_dtype(candle_core::DType::F32).unwrap())
        .iter()
        .map(|&x| x as u32)
        .collect();
    let rows = vec![(row[..14].to_vec(), 1), (row[14..].to_vec(), 5)];
    let spec = LoraTrain {
        steps: 4,
        lr: 1e-2,
        warmup: 1,
        batch: 2,
        seed: 0,
    };
    let losses = m.train(&rows, &spec, &mut |_, _| {}).unwrap();
    assert!(
        losses[3] < losses[0] - 0.05,
        "four steps on one batch did not lower the loss: {losses:?}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let adir = m
        .save_adapter(&tmp.path().join("adapter"), "SmolLM2", DType::F32)
        .unwrap();
    let adapter = Adapter::load(&adir).unwrap();
    assert_eq!(adapter.scale, 2.0);
    assert_eq!(adapter.pairs.len(), 2 * 3);
    let merged_dir = merge_adapter(&ckpt, &adapter, &tmp.path().join("merged"), false).unwrap();
    let merged = Checkpoint::open(&merged_dir).unwrap();

    // W + scale·B·A, recomputed here in f64 from the stored adapter tensors.
    let raw = Checkpoint::open_tensors(&adir).unwrap();
    let name = "model.layers.29.mlp.down_proj.weight";
    let a = to_vec(
        &raw.load("base_model.model.model.layers.29.mlp.down_proj.lora_A.weight")
            .unwrap(),
    );
    let b = to_vec(
        &raw.load("base_model.model.model.layers.29.mlp.down_proj.lora_B.weight")
            .unwrap(),
    );
    let w = to_vec(&ckpt.load(name).unwrap());
    let got = to_vec(&merged.load(name).unwrap());
    let (out, inp, r) = (576, 1536, 2);
    assert!(b.iter().any(|&x| x != 0.0), "training left B at zero");
    let mut worst = 0f64;
    for o in 0..out {
        for i in 0..inp {
            let ba: f64 = (0..r).map(|k| b[o * r + k] as f64 * a[k * inp + i] as f64).sum();
            let want = w[o * inp + i] as f64 + 2.0 * ba;
            worst = worst.max((got[o * inp + i] as f64 - want).abs());
        }
    }
    assert!(worst < 1e-6, "merged {name} is off W + 2·B·A by {worst}");
    // Untouched tensors are byte-identical; the config and tokenizer come along.
    for n in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.embed_tokens.weight",
    ] {
        assert!(
            merged.raw_bytes(n).unwrap() == ckpt.raw_bytes(n).unwrap(),
            "{n} changed"
        );
    }
    assert!(merged_dir.join("tokenizer.json").is_file());
    assert_eq!(merged.config(), ckpt.config());

    // The merged checkpoint through the runtime is the adapter model.
    let runtime = Model::load(&merged).unwrap();
    let (worst, scale) = worst_diff(
        &to_vec(&m.logits(&ids()).unwrap()),
        &to_vec(&runtime.forward(&ids()).unwrap()),
    );
    assert!(
        worst <= 2e-5 * scale.max(1.0),
        "adapter vs merged logits differ by {worst}"
    );
}

#[test]
fn adapter_errors_name_the_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("adapter_config.json"),
        r#"{"peft_type": "LORA", "lora_alpha": 16}"#,
    )
    .unwrap();
    let e = Adapter::load(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json") && e.contains("`r`"), "{e}");
    std::fs::write(
        tmp.path().join("adapter_config.json"),
        r#"{"peft_type": "IA3", "r": 8, "lora_alpha": 16}"#,
    )
    .unwrap();
    let e = Adapter::load(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("plain LoRA"), "{e}");
}

#[test]
fn held_out_items_are_never_trained_on() {
    let data = repo_root().join("../shared/data/train");
    for d in Domain::ALL {
        let (train, held) = smollm2::domain_pairs(d, &data).unwrap();
        assert_eq!(held.len(), d.held_out());
        let ids: std::collections::HashSet<&str> = train.iter().map(|p| p.id.as_str()).collect();
        assert!(
            held.iter().all(|p| !ids.contains(p.id.as_str())),
            "{d:?}: a held-out id is trained on"
        );
        let texts: std::collections::HashSet<&str> = train.iter().map(|p| p.context.as_str()).collect();
        let dup = held.iter().filter(|p| texts.contains(p.context.as_str())).count();
        assert!(dup <= 1, "{d:?}: {dup} held-out prompts also appear in training");
    }
}

/// The committed adapters build the zoo, and each expert beats the instruct model on its
/// domain's held-out test items.
#[test]
fn committed_adapters_make_experts_that_beat_the_instruct_model() {
    let Some(sources) = fetch(true) else { return };
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("zoo_smollm2/zoo");
    let data = repo_root().join("../shared/data/train");
    let adapters = repo_root().join("zoo/smollm2/adapters");
    let manifest =
        smollm2::build_smollm2(&sources, &adapters, &data, &out, true, &mut |l| eprintln!("{l}")).unwrap();
    let manifest = Manifest::load(&manifest.dir).unwrap();
    let roles: Vec<(String, Role, String)> = manifest
        .models
        .iter()
        .map(|m| (m.name.clone(), m.role, m.family.clone()))
        .collect();
    eprintln!("{roles:?}");
    for d in Domain::ALL {
        assert!(
            manifest.model(&format!("smollm2_{}", d.name())).is_some(),
            "no {} expert (is zoo/smollm2/adapters/{} committed?)",
            d.name(),
            d.name()
        );
    }
    assert_eq!(
        manifest
            .models
            .iter()
            .filter(|m| m.role == Role::OtherShape)
            .count(),
        2
    );
    // The unmergeable members load and run.
    for name in ["qwen2.5_coder", "gemma3"] {
        let ckpt = Checkpoint::open(&manifest.model_dir(manifest.model(name).unwrap())).unwrap();
        let family = &manifest.model(name).unwrap().family;
        assert_ne!(family, "smollm2");
        Model::load(&ckpt).unwrap();
    }

    let limit = 12;
    let score = |model: &str, task: &Path| {
        let ckpt = Checkpoint::open(&manifest.model_dir(manifest.model(model).unwrap())).unwrap();
        let m = Model::load(&ckpt).unwrap();
        let tok = EvalTokenizer::from_checkpoint(&ckpt).unwrap();
        let opts = EvalOptions {
            limit: Some(limit),
            progress: false,
            ..EvalOptions::default()
        };
        let task = Task::load(task, &TaskOptions::default()).unwrap();
        let r = Evaluator::new(&m, &tok, opts).run(&task).unwrap();
        (
            r.metric("token_perplexity").unwrap(),
            r.metric("token_acc").unwrap(),
        )
    };
    let tasks = manifest.tasks(Split::Test, false);
    for (i, d) in Domain::ALL.iter().enumerate() {
        let (bp, ba) = score("smollm2", &tasks[i]);
        let (ep, ea) = score(&format!("smollm2_{}", d.name()), &tasks[i]);
        eprintln!(
            "{}: instruct ppl {bp:.3} acc {ba:.3}; expert ppl {ep:.3} acc {ea:.3}",
            d.name()
        );
        assert!(
            ep < bp,
            "{} expert perplexity {ep} is not below the instruct model's {bp}",
            d.name()
        );
        assert!(
            ea > ba,
            "{} expert token accuracy {ea} is not above the instruct model's {ba}",
            d.name()
        );
    }
}

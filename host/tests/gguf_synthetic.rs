//! `convert_gguf` on tiny GGUF files written here with candle's GGUF writer: layout fix-ups per
//! architecture (exact, with f32 tensors), and every kind of malformed input giving a
//! structured error that names the file and the key or tensor — never a panic.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use modelglue::checkpoint::gguf::{convert_gguf, ConvertOptions, GgufError};
use serde_json::Value as Json;

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 96;
const LAYERS: usize = 2;

/// GPT-2's byte → printable character table (`bytes_to_unicode` of the GPT-2 encoder).
fn byte_alphabet() -> Vec<String> {
    let printable =
        |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).expect("valid char").to_string()
        })
        .collect()
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// A tiny model as GGUF metadata + tensors (Hugging Face-layout values kept for comparison).
struct Tiny {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    vocab: usize,
}

/// Byte-level BPE tokenizer metadata (GPT-2 alphabet, three merges) and its vocabulary size.
fn gpt2_tokenizer() -> (Vec<(String, Value)>, usize) {
    let mut tokens = vec!["<|endoftext|>".to_string(), "<|im_start|>".to_string()];
    tokens.extend(byte_alphabet());
    tokens.extend(["Ġt".to_string(), "he".to_string(), "Ġthe".to_string()]);
    let n = tokens.len();
    let mut types = vec![Value::I32(3), Value::I32(3)];
    types.extend((2..n).map(|_| Value::I32(1)));
    let md = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt-2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(
                ["Ġ t", "h e", "Ġt he"]
                    .iter()
                    .map(|m| Value::String(m.to_string()))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
    ];
    (md, n)
}

/// The pieces of [`spm_tokenizer`] after the 4 control tokens and 256 byte pieces.
const SPM_PIECES: [(&str, f32, i32); 6] = [
    ("\u{2581}", -1.0, 1),
    ("a", -2.0, 1),
    ("b", -3.0, 1),
    ("ab", -4.0, 1),
    ("\u{2581}ab", -5.0, 1),
    ("\n", 0.0, 4),
];

/// SentencePiece (Gemma-style) tokenizer metadata: control tokens, byte pieces, a few scored
/// pieces, a user-defined newline; BOS added, no space prefix.
fn spm_tokenizer() -> (Vec<(String, Value)>, usize) {
    let mut tokens: Vec<(String, f32, i32)> = ["<pad>", "<eos>", "<bos>", "<unk>"]
        .iter()
        .map(|t| (t.to_string(), -1000.0, 3))
        .collect();
    tokens.extend((0..256).map(|b| (format!("<0x{b:02X}>"), 0.0, 6)));
    tokens.extend(SPM_PIECES.iter().map(|(p, s, t)| (p.to_string(), *s, *t)));
    let n = tokens.len();
    let md = vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String(t.0.clone())).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(tokens.iter().map(|t| Value::F32(t.1)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(tokens.iter().map(|t| Value::I32(t.2)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(3)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)),
    ];
    (md, n)
}

fn tiny(arch: &str) -> Tiny {
    tiny_with(arch, gpt2_tokenizer())
}

fn tiny_with(arch: &str, (tokenizer, vocab): (Vec<(String, Value)>, usize)) -> Tiny {
    let a = |k: &str| format!("{arch}.{k}");
    let mut metadata = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (a("embedding_length"), Value::U32(HIDDEN as u32)),
        (a("block_count"), Value::U32(LAYERS as u32)),
        (a("attention.head_count"), Value::U32(HEADS as u32)),
        (a("attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
        (a("feed_forward_length"), Value::U32(FFN as u32)),
        (a("context_length"), Value::U32(256)),
        (a("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (a("rope.freq_base"), Value::F32(10_000.0)),
    ];
    metadata.extend(tokenizer);
    let mut tensors = Vec::new();
    let mut seed = 1;
    let mut add = |name: String, shape: Vec<usize>| {
        seed += 1;
        let n = shape.iter().product();
        tensors.push((name, shape, values(n, seed)));
    };
    add("token_embd.weight".into(), vec![vocab, HIDDEN]);
    add("output_norm.weight".into(), vec![HIDDEN]);
    for i in 0..LAYERS {
        let b = |n: &str| format!("blk.{i}.{n}");
        add(b("attn_q.weight"), vec![HEADS * HEAD_DIM, HIDDEN]);
        add(b("attn_k.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN]);
        add(b("attn_v.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN]);
        add(b("attn_output.weight"), vec![HIDDEN, HEADS * HEAD_DIM]);
        add(b("ffn_gate.weight"), vec![FFN, HIDDEN]);
        add(b("ffn_up.weight"), vec![FFN, HIDDEN]);
        add(b("ffn_down.weight"), vec![HIDDEN, FFN]);
        add(b("attn_norm.weight"), vec![HIDDEN]);
        add(b("ffn_norm.weight"), vec![HIDDEN]);
        match arch {
            "qwen2" => {
                add(b("attn_q.bias"), vec![HEADS * HEAD_DIM]);
                add(b("attn_k.bias"), vec![KV_HEADS * HEAD_DIM]);
                add(b("attn_v.bias"), vec![KV_HEADS * HEAD_DIM]);
            }
            "gemma3" => {
                add(b("post_attention_norm.weight"), vec![HIDDEN]);
                add(b("post_ffw_norm.weight"), vec![HIDDEN]);
                add(b("attn_q_norm.weight"), vec![HEAD_DIM]);
                add(b("attn_k_norm.weight"), vec![HEAD_DIM]);
            }
            _ => {}
        }
    }
    if arch == "qwen2" {
        add("output.weight".into(), vec![vocab, HIDDEN]);
    }
    Tiny {
        metadata,
        tensors,
        vocab,
    }
}

impl Tiny {
    fn set(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), value));
        self
    }

    fn remove_key(&mut self, key: &str) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self
    }

    fn remove_tensor(&mut self, name: &str) -> &mut Self {
        self.tensors.retain(|(n, _, _)| n != name);
        self
    }

    fn values(&self, name: &str) -> &[f32] {
        &self.tensors.iter().find(|t| t.0 == name).expect("tensor").2
    }

    /// Writes the GGUF; tensors are f32 except the embedding, stored Q8_0 to exercise
    /// dequantisation. `permute` applies llama.cpp's q/k permutation to what is stored.
    fn write(&self, path: &Path, permute: bool) {
        let dev = Device::Cpu;
        let qtensors: Vec<(String, QTensor)> = self
            .tensors
            .iter()
            .map(|(name, shape, data)| {
                let mut t = Tensor::from_vec(data.clone(), shape.as_slice(), &dev).expect("tensor");
                let heads = if name.contains("attn_q.") { HEADS } else { KV_HEADS };
                if permute && (name.contains("attn_q.") || name.contains("attn_k.")) {
                    t = llama_cpp_permute(&t, heads);
                }
                let ty = if name == "token_embd.weight" {
                    GgmlDType::Q8_0
                } else {
                    GgmlDType::F32
                };
                (name.clone(), QTensor::quantize(&t, ty).expect("quantize"))
            })
            .collect();
        let md: Vec<(&str, &Value)> = self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = qtensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut f = std::fs::File::create(path).expect("create");
        gguf_file::write(&mut f, &md, &ts).expect("write gguf");
    }
}

/// `convert_hf_to_gguf.py`'s `LlamaModel.permute`:
/// `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`.
fn llama_cpp_permute(w: &Tensor, n_head: usize) -> Tensor {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    w.reshape((n_head, 2, rows / n_head / 2, rest))
        .and_then(|t| t.transpose(1, 2))
        .and_then(|t| t.contiguous())
        .and_then(|t| t.reshape(dims.as_slice()))
        .expect("permute")
}

struct Run {
    _dir: tempfile::TempDir,
    src: PathBuf,
    out: PathBuf,
}

fn run(model: &Tiny, permute: bool) -> (Run, Result<modelglue::checkpoint::gguf::ConvertReport, GgufError>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("tiny.gguf");
    let out = dir.path().join("hf");
    model.write(&src, permute);
    let result = convert_gguf(&src, &out, &ConvertOptions::default());
    (Run { _dir: dir, src, out }, result)
}

fn load(out: &Path) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)
        .expect("safetensors")
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("f32")))
        .collect()
}

fn config(out: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).expect("config")).expect("json")
}

#[test]
fn llama_q_and_k_come_back_in_hf_layout_exactly() {
    let model = tiny("llama");
    let (r, result) = run(&model, true);
    let report = result.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.tensors, 2 + LAYERS * 9);
    assert_eq!(report.vocab_size, model.vocab);
    let w = load(&r.out);
    for i in 0..LAYERS {
        for (g, h) in [
            ("attn_q", "self_attn.q_proj"),
            ("attn_k", "self_attn.k_proj"),
            ("attn_v", "self_attn.v_proj"),
            ("ffn_up", "mlp.up_proj"),
        ] {
            let hf = &w[&format!("model.layers.{i}.{h}.weight")];
            assert_eq!(
                hf.as_slice(),
                model.values(&format!("blk.{i}.{g}.weight")),
                "layer {i} {h}"
            );
        }
    }
    let cfg = config(&r.out);
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["rms_norm_eps"], 1e-6);
    assert_eq!(cfg["head_dim"], HEAD_DIM);
    assert!(!w.contains_key("lm_head.weight"));
    // Q8_0 round trip of the embedding: within half a quantisation step of the original.
    let embed = &w["model.embed_tokens.weight"];
    let max_err = embed
        .iter()
        .zip(model.values("token_embd.weight"))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_err < 1.0 / 127.0, "Q8_0 error {max_err}");
}

#[test]
fn qwen2_is_not_permuted_and_keeps_biases_and_untied_head() {
    let model = tiny("qwen2");
    let (r, result) = run(&model, false);
    result.unwrap_or_else(|e| panic!("{e}"));
    let w = load(&r.out);
    assert_eq!(w.len(), 3 + LAYERS * 12);
    assert_eq!(
        w["model.layers.1.self_attn.q_proj.weight"],
        model.values("blk.1.attn_q.weight")
    );
    assert_eq!(
        w["model.layers.1.self_attn.k_proj.bias"],
        model.values("blk.1.attn_k.bias")
    );
    assert_eq!(w["lm_head.weight"], model.values("output.weight"));
    let cfg = config(&r.out);
    assert_eq!(cfg["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(cfg["model_type"], "qwen2");
    assert_eq!(cfg["tie_word_embeddings"], false);
}

#[test]
fn sentencepiece_vocabulary_becomes_a_byte_fallback_bpe_tokenizer() {
    let model = tiny_with("gemma3", spm_tokenizer());
    let (r, result) = run(&model, false);
    result.unwrap_or_else(|e| panic!("{e}"));
    let tok =
        tokenizers::Tokenizer::from_file(r.out.join("tokenizer.json")).unwrap_or_else(|e| panic!("{e}"));
    let piece = |p: &str| tok.token_to_id(p).unwrap_or_else(|| panic!("{p:?} not in vocab"));
    let text = "ab ab\n\u{e9}";
    let ids = tok.encode(text, true).expect("encode").get_ids().to_vec();
    // BOS; "ab" by merges a+b; " ab" as ▁ab (▁ + ab); the user-defined newline whole; é is not
    // a piece, so its UTF-8 bytes fall back to <0xC3> <0xA9>.
    assert_eq!(
        ids,
        [
            2,
            piece("ab"),
            piece("\u{2581}ab"),
            piece("\n"),
            4 + 0xC3,
            4 + 0xA9
        ]
    );
    assert_eq!(tok.decode(&ids, true).expect("decode"), text);
    let cfg: Json =
        serde_json::from_str(&std::fs::read_to_string(r.out.join("tokenizer_config.json")).expect("read"))
            .expect("json");
    assert_eq!(cfg["add_bos_token"], true);
    assert_eq!(cfg["bos_token"], "<bos>");
    assert_eq!(cfg["unk_token"], "<unk>");
    let newline = piece("\n").to_string();
    assert_eq!(
        cfg["added_tokens_decoder"][&newline]["special"], false,
        "user-defined"
    );
    assert_eq!(cfg["added_tokens_decoder"]["2"]["special"], true, "control");
}

#[test]
fn gemma3_norms_lose_the_stored_plus_one() {
    let model = tiny("gemma3");
    let (r, result) = run(&model, false);
    result.unwrap_or_else(|e| panic!("{e}"));
    let w = load(&r.out);
    let minus_one = |g: &str| model.values(g).iter().map(|v| v - 1.0).collect::<Vec<f32>>();
    for (h, g) in [
        ("model.norm.weight", "output_norm.weight"),
        ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
        (
            "model.layers.0.post_attention_layernorm.weight",
            "blk.0.post_attention_norm.weight",
        ),
        (
            "model.layers.0.pre_feedforward_layernorm.weight",
            "blk.0.ffn_norm.weight",
        ),
        (
            "model.layers.0.post_feedforward_layernorm.weight",
            "blk.0.post_ffw_norm.weight",
        ),
        (
            "model.layers.1.self_attn.q_norm.weight",
            "blk.1.attn_q_norm.weight",
        ),
        (
            "model.layers.1.self_attn.k_norm.weight",
            "blk.1.attn_k_norm.weight",
        ),
    ] {
        assert_eq!(w[h], minus_one(g), "{h}");
    }
    assert_eq!(
        w["model.layers.0.self_attn.q_proj.weight"],
        model.values("blk.0.attn_q.weight")
    );
    let cfg = config(&r.out);
    assert_eq!(cfg["architectures"][0], "Gemma3ForCausalLM");
    assert_eq!(cfg["model_type"], "gemma3_text");
    assert_eq!(cfg["layer_types"].as_array().map(Vec::len), Some(LAYERS));
}

/// Runs a conversion expected to fail and returns the error, checking that its message names the
/// input file and that no output or partial directory is left behind.
fn expect_error(model: &Tiny) -> GgufError {
    let (r, result) = run(model, false);
    let err = result.expect_err("conversion must fail");
    assert!(err.to_string().contains(&r.src.display().to_string()), "{err}");
    assert!(!r.out.exists());
    let leftovers = std::fs::read_dir(r.src.parent().expect("parent"))
        .expect("readable")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("mglue"))
        .count();
    assert_eq!(leftovers, 0);
    err
}

#[test]
fn missing_hyperparameter_names_the_key() {
    match expect_error(tiny("llama").remove_key("llama.block_count")) {
        GgufError::MissingKey { key, .. } => assert_eq!(key, "llama.block_count"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn mistyped_hyperparameter_names_the_key_and_the_type() {
    let err = expect_error(tiny("llama").set("llama.block_count", Value::String("two".into())));
    assert!(err.to_string().contains("non-negative integer"), "{err}");
    match err {
        GgufError::BadValue { key, .. } => assert_eq!(key, "llama.block_count"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn inconsistent_head_counts_are_refused() {
    match expect_error(tiny("llama").set("llama.attention.head_count_kv", Value::U32(3))) {
        GgufError::BadValue { key, .. } => assert_eq!(key, "llama.attention.head_count_kv"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn absurd_sizes_are_refused_before_any_arithmetic_on_them() {
    match expect_error(tiny("llama").set("llama.attention.key_length", Value::U64(1 << 62))) {
        GgufError::BadValue { key, .. } => assert_eq!(key, "llama.attention.key_length"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_architecture_is_named() {
    let err = expect_error(tiny("llama").set("general.architecture", Value::String("mamba".into())));
    assert!(
        err.to_string().contains("supported: llama, qwen2, gemma3"),
        "{err}"
    );
    match err {
        GgufError::UnsupportedArchitecture { architecture, .. } => {
            assert_eq!(architecture, "mamba")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_pre_tokenizer_is_named() {
    match expect_error(tiny("llama").set("tokenizer.ggml.pre", Value::String("chatglm-bpe".into()))) {
        GgufError::UnsupportedTokenizer { key, value, .. } => {
            assert_eq!(
                (key.as_str(), value.as_str()),
                ("tokenizer.ggml.pre", "chatglm-bpe")
            )
        }
        other => panic!("{other:?}"),
    }
}

/// Every llama.cpp pre-tokenizer name the converter knows yields a `tokenizer.json` that the
/// Rust `tokenizers` crate (fancy-regex backend) loads and that round-trips text.
#[test]
fn every_supported_pre_tokenizer_loads_and_round_trips() {
    for pre in [
        "smollm",
        "starcoder",
        "refact",
        "gpt-2",
        "gpt2",
        "qwen2",
        "deepseek-r1-qwen",
        "llama-bpe",
        "llama3",
        "smaug-bpe",
    ] {
        let mut model = tiny("llama");
        model.set("tokenizer.ggml.pre", Value::String(pre.into()));
        let (r, result) = run(&model, true);
        result.unwrap_or_else(|e| panic!("{pre}: {e}"));
        let tok = tokenizers::Tokenizer::from_file(r.out.join("tokenizer.json"))
            .unwrap_or_else(|e| panic!("{pre}: {e}"));
        let text = "the cat's 123 ÿ\n\n  x";
        let ids = tok.encode(text, false).expect("encode").get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).expect("decode"), text, "{pre}");
    }
}

#[test]
fn token_type_count_mismatch_is_refused() {
    let err =
        expect_error(tiny("llama").set("tokenizer.ggml.token_type", Value::Array(vec![Value::I32(1); 3])));
    match err {
        GgufError::BadValue { key, .. } => assert_eq!(key, "tokenizer.ggml.token_type"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn special_token_id_outside_the_vocabulary_is_refused() {
    match expect_error(tiny("llama").set("tokenizer.ggml.eos_token_id", Value::U32(100_000))) {
        GgufError::BadValue { key, .. } => assert_eq!(key, "tokenizer.ggml.eos_token_id"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_tensor_is_named() {
    match expect_error(tiny("llama").remove_tensor("blk.1.ffn_up.weight")) {
        GgufError::MissingTensor { tensor, .. } => assert_eq!(tensor, "blk.1.ffn_up.weight"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unexpected_tensor_is_named() {
    let mut model = tiny("llama");
    model
        .tensors
        .push(("blk.0.attn_sinks.weight".into(), vec![HEADS], vec![0.0; HEADS]));
    match expect_error(&model) {
        GgufError::UnexpectedTensor { tensor, .. } => assert_eq!(tensor, "blk.0.attn_sinks.weight"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let mut model = tiny("llama");
    let t = model
        .tensors
        .iter_mut()
        .find(|t| t.0 == "blk.0.attn_k.weight")
        .expect("k");
    t.1 = vec![HEADS * HEAD_DIM, HIDDEN];
    t.2 = values(HEADS * HEAD_DIM * HIDDEN, 7);
    match expect_error(&model) {
        GgufError::TensorShape {
            tensor,
            found,
            expected,
            ..
        } => {
            assert_eq!(tensor, "blk.0.attn_k.weight");
            assert_eq!(found, [HEADS * HEAD_DIM, HIDDEN]);
            assert_eq!(expected, [KV_HEADS * HEAD_DIM, HIDDEN]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_and_non_gguf_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("hf");
    let missing = dir.path().join("nope.gguf");
    match convert_gguf(&missing, &out, &ConvertOptions::default()) {
        Err(GgufError::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("{other:?}"),
    }
    let text = dir.path().join("notes.gguf");
    std::fs::write(&text, "this is not a model\n".repeat(10)).expect("write");
    let err = convert_gguf(&text, &out, &ConvertOptions::default()).expect_err("not gguf");
    assert!(matches!(err, GgufError::Header { .. }), "{err:?}");
    assert!(
        err.to_string().contains("notes.gguf") && err.to_string().contains("magic"),
        "{err}"
    );
}

#[test]
fn unsupported_output_dtype_and_path_are_refused_before_reading() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("tiny.gguf");
    tiny("llama").write(&src, true);
    let opts = ConvertOptions {
        dtype: DType::U8,
        overwrite: false,
    };
    assert!(matches!(
        convert_gguf(&src, &dir.path().join("hf"), &opts),
        Err(GgufError::UnsupportedDType { dtype: DType::U8 })
    ));
    let root = convert_gguf(
        &src,
        Path::new("/"),
        &ConvertOptions {
            overwrite: true,
            ..Default::default()
        },
    );
    assert!(matches!(root, Err(GgufError::BadOutputPath { .. })), "{root:?}");
}

#[test]
fn overwrite_replaces_an_existing_directory_completely() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("tiny.gguf");
    tiny("llama").write(&src, true);
    let out = dir.path().join("hf");
    std::fs::create_dir(&out).expect("mkdir");
    std::fs::write(out.join("stale.bin"), b"old").expect("write");
    let opts = ConvertOptions {
        overwrite: true,
        ..Default::default()
    };
    convert_gguf(&src, &out, &opts).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.join("model.safetensors").is_file());
    assert!(
        !out.join("stale.bin").exists(),
        "the old directory is replaced, not merged"
    );
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("readable")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "only the input and the output: {names:?}");
}

/// Prefixes of a valid file (every 5th length through the header, 50 through the tensor data)
/// and the file with one header byte set to 0x00 or 0xff (every 13th byte) convert or fail with
/// an error; nothing panics.
#[test]
fn damaged_files_never_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("tiny.gguf");
    tiny("llama").write(&src, true);
    let good = std::fs::read(&src).expect("read");
    // Corrupt only the header: tensor data bytes are just values.
    let header_len = gguf_file::Content::read(&mut std::io::Cursor::new(&good))
        .expect("valid")
        .tensor_data_offset as usize;
    let bad = dir.path().join("bad.gguf");
    let out = dir.path().join("hf");
    let opts = ConvertOptions {
        overwrite: true,
        ..Default::default()
    };
    let mut outcomes = [0usize; 2];
    let mut attempt = |bytes: &[u8], what: &str| {
        std::fs::write(&bad, bytes).expect("write");
        let r = catch_unwind(AssertUnwindSafe(|| convert_gguf(&bad, &out, &opts)));
        match r {
            Ok(Ok(_)) => outcomes[0] += 1,
            Ok(Err(_)) => outcomes[1] += 1,
            Err(_) => panic!("convert_gguf panicked on {what}"),
        }
    };
    // Every 5th cut inside the header, 50 cuts through the tensor data.
    let cuts = (0..header_len)
        .step_by(5)
        .chain((header_len..good.len()).step_by((good.len() - header_len) / 50 + 1));
    for n in cuts {
        attempt(&good[..n], &format!("a {n}-byte prefix"));
    }
    for pos in (0..header_len).step_by(13) {
        for value in [0x00, 0xff] {
            let mut b = good.clone();
            if b[pos] == value {
                continue;
            }
            b[pos] = value;
            attempt(&b, &format!("byte {pos} set to {value:#x}"));
        }
    }
    eprintln!(
        "damaged files: {} converted, {} refused",
        outcomes[0], outcomes[1]
    );
    assert!(outcomes[1] > 0);
}

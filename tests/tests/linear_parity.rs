//! `linear` through the real `mglue` binary and the real plugin `.so`, from mergekit's own YAML
//! configs, compared bit for bit with mergekit 0.1.5's outputs (shared/fixtures/mergekit).

use modelglue_e2e::{assert_same_tensors, fixtures, read_tensors, run_mglue, text};
use std::path::Path;

fn merge_case(case: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let cfg = fixtures().join("configs").join(format!("{case}.yml"));
    let mut args = vec![
        "merge",
        cfg.to_str().expect("utf-8 path"),
        "--out",
        out.to_str().expect("utf-8 path"),
    ];
    args.extend(extra);
    run_mglue(&args)
}

fn config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("config.json")).expect("json")
}

fn check_case(case: &str, check_dtype: bool) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join(case);
    let o = merge_case(case, &out, &[]);
    assert!(o.status.success(), "{case}: {}", text(&o));
    let expected = fixtures().join("expected").join(case);
    assert_same_tensors(&out, &expected);
    let (a, e) = (config_json(&out), config_json(&expected));
    for key in ["architectures", "num_hidden_layers", "vocab_size", "hidden_size"] {
        assert_eq!(a[key], e[key], "{case}: config.json `{key}`");
    }
    if check_dtype {
        assert_eq!(a["dtype"], e["dtype"], "{case}: config.json dtype");
    }
    for side in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(side)).expect(side),
            std::fs::read(expected.join(side)).expect(side),
            "{case}: {side} copied from the donor"
        );
    }
    let card = std::fs::read_to_string(out.join("README.md")).expect("model card");
    assert!(
        card.contains("merge_method: linear"),
        "model card records the exact config"
    );
}

#[test]
fn linear_f32_matches_mergekit_bit_exact_with_sharded_input() {
    // ft2 is a two-shard input with model.safetensors.index.json.
    check_case("linear", true);
}

#[test]
fn linear_unnormalized_matches_mergekit_bit_exact() {
    check_case("linear_unnorm", true);
}

#[test]
fn linear_bf16_compute_matches_mergekit_bit_exact() {
    check_case("linear_dtype_bf16", true);
}

#[test]
fn linear_bf16_output_matches_mergekit_bit_exact() {
    check_case("linear_out_bf16", true);
}

#[test]
fn linear_mixed_input_dtypes_match_mergekit_bit_exact() {
    // mergekit copies config.json from an arbitrary model here, so its dtype field is not pinned.
    check_case("linear_mixed_dtype", false);
}

#[test]
fn vocabulary_mismatch_is_refused_naming_the_tensor_and_the_fix() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("x");
    let o = merge_case("linear_vocab_mismatch", &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let msg = text(&o);
    assert!(
        (msg.contains("embed_tokens") || msg.contains("lm_head")) && msg.contains("tokenizer_source"),
        "{msg}"
    );
    assert!(!out.exists(), "nothing written for an invalid plan");
}

#[test]
fn sharded_output_holds_the_same_tensors_as_one_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("sharded");
    let o = merge_case("linear", &out, &["--out-shard-size", "300KB"]);
    assert!(o.status.success(), "{}", text(&o));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).expect("index"))
            .expect("json");
    let shards: std::collections::BTreeSet<_> = index["weight_map"]
        .as_object()
        .expect("weight_map")
        .values()
        .map(|v| v.as_str().expect("str").to_string())
        .collect();
    assert!(
        shards.len() >= 3,
        "expected ≥3 shards of 300 KB for 880 KB, got {shards:?}"
    );
    assert_eq!(
        index["metadata"]["total_size"].as_u64(),
        Some(read_tensors(&out).values().map(|t| t.2.len() as u64).sum())
    );
    assert_same_tensors(&out, &fixtures().join("expected/linear"));
}

#[test]
fn flag_form_equals_the_yaml_form() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("flags");
    let zoo = fixtures().join("zoo");
    let m = |name: &str, w: f64| format!("{}:weight={w}", zoo.join(name).display());
    let (a, b, c) = (m("ft1", 0.5), m("ft2", 0.3), m("ft3", 0.2));
    let o = run_mglue(&[
        "merge",
        "--method",
        "linear",
        "--model",
        &a,
        "--model",
        &b,
        "--model",
        &c,
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_same_tensors(&out, &fixtures().join("expected/linear"));
}

#[test]
fn unknown_parameter_is_refused_before_any_weight_is_read() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = tmp.path().join("bad.yml");
    let zoo = fixtures().join("zoo");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0, densty: 0.5}}\n",
            zoo.join("ft1").display()
        ),
    )
    .expect("write config");
    let out = tmp.path().join("out");
    let o = run_mglue(&[
        "merge",
        cfg.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let msg = text(&o);
    assert!(msg.contains("`densty`") && msg.contains("weight"), "{msg}");
    assert!(!out.exists());
}

//! Every mergekit fixture config parses to the structure mergekit gave it, and per-tensor
//! parameters resolve to the values mergekit 0.1.5 used (`stats/analysis.json`).

use std::path::{Path, PathBuf};

use candle_core::DType;
use modelglue::config::{
    AnyConfig, ConfigError, GateMode, MergeConfig, MoeConfig, ParamValue, TensorSite, TokenizerSource,
};
use serde_json::json;

/// `shared/` beside the repository checkout (override with `MODELGLUE_SHARED`).
fn shared() -> PathBuf {
    std::env::var_os("MODELGLUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
}

fn fixtures() -> PathBuf {
    let dir = shared().join("fixtures/mergekit");
    assert!(
        dir.is_dir(),
        "mergekit fixtures not found at {} (set MODELGLUE_SHARED)",
        dir.display()
    );
    dir
}

fn config(case: &str) -> MergeConfig {
    let path = fixtures().join("configs").join(format!("{case}.yml"));
    MergeConfig::from_yaml_file(&path).unwrap_or_else(|e| panic!("{case}: {e}"))
}

fn zoo(name: &str) -> PathBuf {
    fixtures().join("configs").join("../zoo").join(name)
}

fn number(params: &ParamValue) -> f64 {
    match params {
        ParamValue::Number(x) => *x,
        other => panic!("not a number: {other:?}"),
    }
}

/// The layer index of a Llama tensor name, if it is inside a decoder layer.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

#[test]
fn every_fixture_config_parses_as_its_kind() {
    let mut merge = 0;
    let mut moe = 0;
    let dir = fixtures().join("configs");
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .expect("configs dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
    {
        let name = path.file_stem().and_then(|s| s.to_str()).expect("utf-8 name");
        let any = AnyConfig::from_yaml_file(path).unwrap_or_else(|e| panic!("{name}: {e}"));
        match any {
            AnyConfig::Moe(m) => {
                assert!(name.starts_with("moe_"), "{name} parsed as mergekit-moe");
                moe += 1;
                let err =
                    MergeConfig::from_yaml_file(path).expect_err("moe config refused as a merge config");
                assert!(matches!(err, ConfigError::MoeConfig { .. }), "{name}: {err}");
                assert!(err.to_string().contains("this is a mergekit-moe config"), "{err}");
                assert_eq!(m.referenced_models(), [zoo("base"), zoo("ft1"), zoo("alien")]);
            }
            AnyConfig::Merge(m) => {
                assert!(!name.starts_with("moe_"), "{name} parsed as a merge config");
                merge += 1;
                assert_eq!(m.source_text, std::fs::read_to_string(path).expect("read"));
                for p in m.referenced_models() {
                    // Paths are resolved against the YAML's directory, so they exist from any CWD.
                    assert!(
                        p.join("config.json").is_file(),
                        "{name}: {} does not resolve",
                        p.display()
                    );
                }
            }
        }
    }
    assert_eq!((merge, moe), (23, 4));
}

#[test]
fn linear_has_its_weights_and_normalize() {
    let c = config("linear");
    assert_eq!(c.merge_method, "linear");
    assert_eq!(c.base_model, None);
    assert!(c.slices.is_empty());
    let weights: Vec<f64> = c.models.iter().map(|m| number(&m.parameters["weight"])).collect();
    assert_eq!(weights, [0.5, 0.3, 0.2]);
    assert_eq!(c.models[1].model, zoo("ft2"));
    assert_eq!(c.parameters["normalize"], ParamValue::Bool(true));
    assert_eq!(c.dtype, None);
    assert_eq!(c.out_dtype, None);
    assert_eq!(c.referenced_models(), [zoo("ft1"), zoo("ft2"), zoo("ft3")]);

    let site = TensorSite::in_layer("model.layers.0.mlp.up_proj.weight", 0, 2);
    assert_eq!(
        serde_json::Value::Object(c.model_params(0, &site)),
        json!({"weight": 0.5, "normalize": true})
    );
    assert_eq!(
        serde_json::Value::Object(c.model_params_for(2, &site, &["weight"])),
        json!({"weight": 0.2})
    );
    assert_eq!(
        serde_json::Value::Object(c.global_params(&site)),
        json!({"normalize": true})
    );
}

#[test]
fn dtypes_are_read() {
    assert_eq!(config("linear_dtype_bf16").dtype, Some(DType::BF16));
    assert_eq!(config("ties_bf16").dtype, Some(DType::BF16));
    let out = config("linear_out_bf16");
    assert_eq!((out.dtype, out.out_dtype), (None, Some(DType::BF16)));
    assert_eq!(
        config("linear_unnorm").parameters["normalize"],
        ParamValue::Bool(false)
    );
}

#[test]
fn slerp_gradient_resolves_t_per_tensor_as_mergekit_did() {
    let c = config("slerp_gradient");
    assert_eq!(c.merge_method, "slerp");
    assert_eq!(c.base_model, Some(zoo("base")));
    assert_eq!(c.slices.len(), 1);
    let slice = &c.slices[0];
    assert_eq!(slice.num_layers(), 2);
    assert_eq!(
        slice.sources.iter().map(|s| s.layer_range).collect::<Vec<_>>(),
        [(0, 2), (0, 2)]
    );
    assert_eq!(c.referenced_models(), [zoo("base"), zoo("alien")]);

    let t = |name: &str| {
        let site = match layer_of(name) {
            Some(l) => TensorSite::in_layer(name, l, slice.num_layers()),
            None => TensorSite::non_layer(name),
        };
        c.slice_params(0, &site)["t"].as_f64().expect("t is a number")
    };
    assert_eq!(t("model.layers.0.self_attn.q_proj.weight"), 0.0);
    assert_eq!(t("model.layers.1.self_attn.q_proj.weight"), 1.0);
    assert_eq!(t("model.layers.1.mlp.up_proj.weight"), 0.0);
    assert_eq!(t("model.layers.0.mlp.up_proj.weight"), 1.0);
    assert_eq!(t("model.embed_tokens.weight"), 0.3);
    assert_eq!(t("lm_head.weight"), 0.3);

    // All 21 tensors against the t that mergekit 0.1.5 used (recovered by the fixture generator
    // from the outputs; see stats/analysis.json, cases.slerp_gradient.t_per_tensor).
    let analysis: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("stats/analysis.json")).expect("analysis.json"),
    )
    .expect("json");
    let expected = analysis["cases"]["slerp_gradient"]["t_per_tensor"]
        .as_object()
        .expect("t_per_tensor");
    assert_eq!(expected.len(), 21);
    for (name, want) in expected {
        assert_eq!(t(name), want.as_f64().expect("number"), "{name}");
    }
}

#[test]
fn slerp_scalar_t_applies_everywhere() {
    let c = config("slerp_ft1");
    assert_eq!(c.models.len(), 2);
    assert_eq!(c.models[0].model, zoo("base"));
    let site = TensorSite::non_layer("model.norm.weight");
    assert_eq!(c.global_params(&site)["t"], json!(0.3));
}

#[test]
fn passthrough_slices_keep_their_layer_ranges() {
    let c = config("passthrough");
    assert_eq!(c.merge_method, "passthrough");
    assert!(c.models.is_empty());
    assert_eq!(c.slices.len(), 2);
    assert_eq!(c.slices[0].sources.len(), 1);
    assert_eq!(c.slices[0].sources[0].model, zoo("base"));
    assert_eq!(c.slices[0].sources[0].layer_range, (0, 2));
    assert_eq!(c.slices[1].sources[0].model, zoo("alien"));
    assert_eq!(c.slices[1].sources[0].layer_range, (1, 2));
    assert_eq!(c.slices.iter().map(|s| s.num_layers()).sum::<usize>(), 3);
    assert_eq!(c.referenced_models(), [zoo("base"), zoo("alien")]);
}

#[test]
fn tokenizer_sources_are_read() {
    assert_eq!(
        config("linear_vocab_union").tokenizer_source,
        Some(TokenizerSource::Union)
    );
    let base = config("linear_vocab_base");
    assert_eq!(base.tokenizer_source, Some(TokenizerSource::Base));
    // base_model is also listed in models: it appears once.
    assert_eq!(base.referenced_models(), [zoo("base"), zoo("ft_vocab")]);
    assert_eq!(config("linear_vocab_mismatch").tokenizer_source, None);
}

#[test]
fn task_vector_methods_keep_per_model_and_global_parameters_apart() {
    let ta = config("task_arithmetic");
    assert_eq!(ta.parameters["lambda"], ParamValue::Number(1.0));
    let site = TensorSite::in_layer("model.layers.1.self_attn.o_proj.weight", 1, 2);
    // Whole numbers resolve to JSON integers; compare numerically.
    assert_eq!(ta.global_params(&site)["lambda"].as_f64(), Some(1.0));
    assert_eq!(ta.model_params_for(1, &site, &["weight"])["weight"], json!(0.3));

    let della = config("della");
    assert_eq!(della.models.len(), 3);
    for m in &della.models {
        assert_eq!(number(&m.parameters["density"]), 0.5);
        assert_eq!(number(&m.parameters["epsilon"]), 0.1);
    }
    let bc = config("breadcrumbs");
    assert_eq!(number(&bc.models[0].parameters["gamma"]), 0.01);
    let ms = config("model_stock");
    assert!(ms.models.iter().all(|m| m.parameters.is_empty()));
    assert_eq!(ms.base_model, Some(zoo("base")));
    // The base model (not listed in models) has only the global scope.
    assert!(ms.model_params(ms.models.len(), &site).is_empty());
}

#[test]
fn moe_configs_parse_with_their_gate_modes() {
    let path = fixtures().join("configs/moe_hidden_k2.yml");
    let m = MoeConfig::from_yaml_file(&path).expect("parses");
    assert_eq!(m.gate_mode, GateMode::Hidden);
    assert_eq!(m.experts_per_token, 2);
    assert_eq!(m.dtype, Some(DType::F32));
    assert_eq!(m.base_model, zoo("base"));
    assert_eq!(m.experts.len(), 2);
    assert_eq!(m.experts[0].positive_prompts[1], "class Foo(object):");
    assert_eq!(m.experts[1].negative_prompts, ["import os"]);

    let r = MoeConfig::from_yaml_file(&fixtures().join("configs/moe_random_k1.yml")).expect("parses");
    assert_eq!((r.gate_mode, r.experts_per_token), (GateMode::Random, 1));
    assert!(r.experts.iter().all(|e| e.positive_prompts.is_empty()));

    let err = MoeConfig::from_yaml_file(&fixtures().join("configs/linear.yml")).expect_err("not moe");
    assert!(matches!(err, ConfigError::NotMoeConfig { .. }), "{err}");
}

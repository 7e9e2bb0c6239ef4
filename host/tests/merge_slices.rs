//! `slices:` configs against mergekit 0.1.5: passthrough layer stacking (built into the engine),
//! slices that merge the same layers of several models (the `models:` form with per-source
//! parameters), and merges of different layer ranges per output layer.

mod merge_common;

use merge_common::*;
use modelglue::merge::{MergeError, MergePlan};

#[test]
fn passthrough_stacking_matches_mergekit_bit_exact() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("stack");
    // No plugin is involved: passthrough is part of the engine.
    let report = merge(&case_config("passthrough"), &registry(&[]), &out);
    let expected = fixtures().join("expected/passthrough");
    assert_eq!(report.tensors, 30);
    assert_same_tensors(&out, &expected);
    let (got, want) = (config_json(&out), config_json(&expected));
    assert_eq!(got["num_hidden_layers"], 3);
    for key in [
        "architectures",
        "num_hidden_layers",
        "vocab_size",
        "hidden_size",
        "dtype",
    ] {
        assert_eq!(got[key], want[key], "config.json `{key}`");
    }
}

#[test]
fn passthrough_takes_embeddings_from_the_first_slice_and_the_head_from_the_last() {
    // alien first: its embeddings, then base's final norm and lm_head.
    let config = yaml_config(
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: alien\n        layer_range: [1, 2]\n  - \
         sources:\n      - model: base\n        layer_range: [0, 1]\n",
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("stack");
    merge(&config, &registry(&[]), &out);
    let (got, alien, base) = (tensors(&out), tensors(&zoo("alien")), tensors(&zoo("base")));
    assert_eq!(got.len(), 3 + 2 * 9);
    assert_eq!(
        got["model.embed_tokens.weight"],
        alien["model.embed_tokens.weight"]
    );
    assert_eq!(got["model.norm.weight"], base["model.norm.weight"]);
    assert_eq!(got["lm_head.weight"], base["lm_head.weight"]);
    assert_eq!(
        got["model.layers.0.mlp.up_proj.weight"],
        alien["model.layers.1.mlp.up_proj.weight"]
    );
    assert_eq!(
        got["model.layers.1.mlp.up_proj.weight"],
        base["model.layers.0.mlp.up_proj.weight"]
    );
    assert_eq!(config_json(&out)["num_hidden_layers"], 2);
}

#[test]
fn passthrough_scale_multiplies_the_copied_tensors() {
    let config = yaml_config(
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: base\n        layer_range: [0, 2]\n  - \
         sources:\n      - model: alien\n        layer_range: [1, 2]\n        parameters:\n          scale:\n            \
         - filter: o_proj\n              value: 0.5\n            - value: 1.0\n",
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("scaled");
    merge(&config, &registry(&[]), &out);
    let (got, alien) = (tensors(&out), tensors(&zoo("alien")));
    let scaled = f32_values(&got["model.layers.2.self_attn.o_proj.weight"].2);
    let source = f32_values(&alien["model.layers.1.self_attn.o_proj.weight"].2);
    assert!(scaled
        .iter()
        .zip(&source)
        .all(|(s, x)| s.to_bits() == (x * 0.5).to_bits()));
    assert_eq!(
        got["model.layers.2.self_attn.q_proj.weight"],
        alien["model.layers.1.self_attn.q_proj.weight"]
    );
}

#[test]
fn passthrough_refuses_a_slice_with_two_sources() {
    let config = yaml_config(
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: base\n        layer_range: [0, 2]\n      - \
         model: alien\n        layer_range: [0, 2]\n",
    );
    let msg = MergePlan::new(&config, &registry(&[]))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        msg.contains("passthrough") && msg.contains("exactly one"),
        "{msg}"
    );
}

#[test]
fn passthrough_refuses_parameters_it_does_not_take() {
    let config = yaml_config(
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: base\n        layer_range: [0, 2]\n        \
         parameters: {weight: 0.5}\n",
    );
    let err = MergePlan::new(&config, &registry(&[])).err().expect("refused");
    assert!(
        matches!(&err, MergeError::UnknownParameter { name, .. } if name == "weight"),
        "{err}"
    );
    assert!(err.to_string().contains("scale"), "{err}");
}

#[test]
fn a_layer_range_past_the_model_is_refused_naming_the_slice() {
    let config = yaml_config(
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: base\n        layer_range: [0, 2]\n  - \
         sources:\n      - model: alien\n        layer_range: [1, 3]\n",
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("never");
    let msg = MergePlan::new(&config, &registry(&[]))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        msg.contains("slices[1].sources[0]") && msg.contains("[1, 3]") && msg.contains("2 layers"),
        "{msg}"
    );
    assert!(!out.exists());
}

#[test]
fn a_slice_over_the_same_layers_of_every_model_equals_the_models_form() {
    // expected/linear, written as one slice with per-source weights.
    let config = yaml_config(
        "merge_method: linear\nslices:\n  - sources:\n      - model: ft1\n        layer_range: [0, 2]\n        \
         parameters: {weight: 0.5}\n      - model: ft2\n        layer_range: [0, 2]\n        parameters: {weight: \
         0.3}\n      - model: ft3\n        layer_range: [0, 2]\n        parameters: {weight: 0.2}\nparameters:\n  \
         normalize: true\n",
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("linear");
    merge(&config, &linear(), &out);
    assert_same_tensors(&out, &fixtures().join("expected/linear"));
    assert_eq!(config_json(&out)["num_hidden_layers"], 2);
}

#[test]
fn different_layer_ranges_merge_layer_by_layer() {
    // Output layer 0 = linear(base layer 0, alien layer 1); the embeddings and the head are
    // merged over the same two sources.
    let config = yaml_config(
        "merge_method: linear\nslices:\n  - sources:\n      - model: base\n        layer_range: [0, 1]\n        \
         parameters: {weight: 0.5}\n      - model: alien\n        layer_range: [1, 2]\n        parameters: {weight: \
         0.5}\n",
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("mixed");
    merge(&config, &linear(), &out);
    let (got, base, alien) = (tensors(&out), tensors(&zoo("base")), tensors(&zoo("alien")));
    assert_eq!(config_json(&out)["num_hidden_layers"], 1);
    assert_eq!(got.len(), 3 + 9);
    // mergekit's linear in f32: acc = w0·x0; acc = fma(w1, x1, acc); acc / (w0 + w1).
    let lin = |a: &[u8], b: &[u8]| -> Vec<u32> {
        f32_values(a)
            .iter()
            .zip(f32_values(b))
            .map(|(x, y)| (y.mul_add(0.5, 0.5 * x) / 1.0).to_bits())
            .collect()
    };
    let bits = |b: &[u8]| -> Vec<u32> { f32_values(b).iter().map(|x| x.to_bits()).collect() };
    for (out_name, base_name, alien_name) in [
        (
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
        ),
        (
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.1.input_layernorm.weight",
        ),
        (
            "model.embed_tokens.weight",
            "model.embed_tokens.weight",
            "model.embed_tokens.weight",
        ),
        ("lm_head.weight", "lm_head.weight", "lm_head.weight"),
    ] {
        assert_eq!(
            bits(&got[out_name].2),
            lin(&base[base_name].2, &alien[alien_name].2),
            "{out_name}"
        );
    }
}

#[test]
fn gradients_are_positioned_within_their_slice() {
    // Two 2-layer slices: slice 1's gradient starts again at its own first layer (output layer 2).
    let config = yaml_config(
        "merge_method: linear\nslices:\n  - sources:\n      - model: base\n        layer_range: [0, 2]\n      - model: \
         ft1\n        layer_range: [0, 2]\n  - sources:\n      - model: base\n        layer_range: [0, 2]\n      - \
         model: ft1\n        layer_range: [0, 2]\n        parameters:\n          weight: [0.0, 1.0]\nparameters:\n  \
         weight: 0.25\n",
    );
    let plan = MergePlan::new(&config, &linear()).expect("valid plan");
    let weight =
        |name: &str, source: usize| plan.params_of(name).expect("planned").1[source]["weight"].as_f64();
    assert_eq!(weight("model.layers.0.mlp.up_proj.weight", 1), Some(0.25));
    assert_eq!(weight("model.layers.2.mlp.up_proj.weight", 1), Some(0.0));
    assert_eq!(weight("model.layers.3.mlp.up_proj.weight", 1), Some(1.0));
    assert_eq!(weight("model.layers.3.mlp.up_proj.weight", 0), Some(0.25));
    // The head comes after the layers: the last slice's scope, gradients at position 0.
    assert_eq!(weight("lm_head.weight", 1), Some(0.0));
    let sources = plan
        .sources_of("model.layers.3.mlp.up_proj.weight")
        .expect("planned");
    assert_eq!(
        sources[1],
        (zoo("ft1"), "model.layers.1.mlp.up_proj.weight".to_string())
    );
    assert_eq!(plan.len(), 3 + 4 * 9);
}

#[test]
fn slerp_gradient_matches_mergekit_within_a_few_ulp() {
    let reg = registry(&["slerp"]);
    if reg.get("slerp").is_none() {
        eprintln!(
            "SKIPPED slerp_gradient_matches_mergekit_within_a_few_ulp: no `slerp` plugin could be built or loaded \
             ({:?})",
            reg.problem_messages()
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("slerp");
    merge(&case_config("slerp_gradient"), &reg, &out);
    let (got, want) = (
        tensors(&out),
        tensors(&fixtures().join("expected/slerp_gradient")),
    );
    let (base, alien) = (tensors(&zoo("base")), tensors(&zoo("alien")));
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    let (mut to_base, mut to_alien) = (0, 0);
    for (name, (dt, shape, bytes)) in &want {
        assert_eq!((&got[name].0, &got[name].1), (dt, shape), "{name}");
        let (g, w) = (f32_values(&got[name].2), f32_values(bytes));
        let worst = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // kind "tol": fp32 reductions (norms, dot) in another order; a few ulp on |w| <= 1.
        assert!(worst <= 1e-6, "{name}: max |Δ| {worst:e}");
        to_base += usize::from(got[name].2 == base[name].2);
        to_alien += usize::from(got[name].2 == alien[name].2);
    }
    // t = 0 and t = 1 endpoints are exact copies (MANIFEST: 7 and 7 tensors).
    assert_eq!((to_base, to_alien), (7, 7));
}

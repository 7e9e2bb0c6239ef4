//! MergeConfig parsing errors, parameter precedence and gradients, and the command-line forms.

use std::path::{Path, PathBuf};

use candle_core::DType;
use modelglue::config::{
    parse_model_flag, parse_param_flag, ConditionalValue, ConfigError, MergeConfig, ParamMap, ParamValue,
    TensorSite, TokenizerSource,
};
use serde_json::json;

fn parse(text: &str) -> Result<MergeConfig, ConfigError> {
    MergeConfig::from_yaml_str(text, Path::new("/cfg"))
}

fn ok(text: &str) -> MergeConfig {
    parse(text).unwrap_or_else(|e| panic!("{e}"))
}

const LINEAR: &str = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 0.5}\n  - model: b\n    parameters: {weight: 0.5}\n";

#[test]
fn unknown_top_level_key_is_named_with_a_suggestion_and_line() {
    let err = parse(&format!("{LINEAR}paramters:\n  normalize: true\n")).expect_err("unknown key");
    match &err {
        ConfigError::UnknownKey {
            key,
            suggestion,
            line,
            section,
            ..
        } => {
            assert_eq!(key, "paramters");
            assert_eq!(suggestion.as_deref(), Some("parameters"));
            assert_eq!(*line, Some(7));
            assert_eq!(section, "");
        }
        other => panic!("wrong error: {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("unknown key `paramters`") && msg.contains("did you mean `parameters`"),
        "{msg}"
    );
    assert!(msg.contains(":7:"), "{msg}");
}

#[test]
fn unknown_nested_key_names_its_section() {
    let err =
        parse("merge_method: linear\nmodels:\n  - model: a\n    weight: 0.5\n").expect_err("unknown key");
    let ConfigError::UnknownKey {
        key, section, line, ..
    } = &err
    else {
        panic!("wrong error: {err}")
    };
    assert_eq!(
        (key.as_str(), section.as_str(), *line),
        ("weight", "models[0]", Some(4))
    );
}

#[test]
fn bad_yaml_reports_its_line() {
    let err = parse("merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: 1}\n")
        .expect_err("bad yaml");
    assert!(matches!(err, ConfigError::Yaml { .. }), "{err}");
    assert_eq!(err.line(), Some(4), "{err}");
    let err = parse("merge_method: linear\nmodels: [a, {\n").expect_err("unclosed");
    assert!(err.line().is_some(), "{err}");
}

#[test]
fn bad_parameter_values_report_the_parameter_and_line() {
    let err =
        parse("merge_method: slerp\nmodels:\n  - model: a\n  - model: b\nparameters:\n  t: [0, true]\n")
            .expect_err("non-numeric gradient");
    let msg = err.to_string();
    assert!(msg.contains("`t`") && msg.contains("numbers only"), "{msg}");
    assert_eq!(err.line(), Some(6), "{msg}");
}

#[test]
fn structural_mistakes_are_refused_with_what_to_do() {
    let cases: &[(&str, &str)] = &[
        ("models:\n  - model: a\n", "merge_method"),
        ("merge_method: linear\n", "no models"),
        ("merge_method: linear\nmodels: []\n", "no models"),
        (
            "merge_method: linear\nmodels:\n  - model: a\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 1]\n",
            "both `models:` and `slices:`",
        ),
        (
            "merge_method: slerp\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n      - model: b\n        layer_range: [0, 3]\n",
            "same number of layers",
        ),
        ("merge_method: linear\nmodels:\n  - model: a\ndtype: float8\n", "unsupported dtype"),
        ("merge_method: linear\nmodels:\n  - model: a+lora\n", "LoRA"),
        ("merge_method: linear\nmodules:\n  text: {models: [{model: a}]}\n", "not supported"),
        (
            "merge_method: linear\nmodels:\n  - model: a\ntokenizer_source: base\ntokenizer: {source: union}\n",
            "keep one",
        ),
        ("- a\n- b\n", "mapping"),
        ("", "mapping"),
    ];
    for (text, needle) in cases {
        let err = parse(text).expect_err(text);
        assert!(err.to_string().contains(needle), "{text:?}: {err}");
    }
}

#[test]
fn moe_text_is_refused_with_a_clear_message() {
    let err = parse("base_model: b\nexperts:\n  - source_model: x\n").expect_err("moe");
    assert!(matches!(err, ConfigError::MoeConfig { .. }));
    assert!(err.to_string().contains("this is a mergekit-moe config"));
}

#[test]
fn paths_resolve_against_the_yaml_directory_and_absolute_paths_are_kept() {
    let c = ok(
        "merge_method: linear\nbase_model: /abs/base\nmodels:\n  - model: ../zoo/a\n  - model: /abs/base\n",
    );
    assert_eq!(c.models[0].model, PathBuf::from("/cfg/../zoo/a"));
    assert_eq!(c.base_model, Some(PathBuf::from("/abs/base")));
    assert_eq!(
        c.referenced_models(),
        [PathBuf::from("/cfg/../zoo/a"), PathBuf::from("/abs/base")]
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("x.yml");
    std::fs::write(&file, "merge_method: linear\nmodels:\n  - model: m\n").expect("write");
    let c = MergeConfig::from_yaml_file(&file).expect("parses");
    assert_eq!(c.models[0].model, dir.path().join("m"));
    let err = MergeConfig::from_yaml_file(&dir.path().join("missing.yml")).expect_err("missing");
    assert!(matches!(err, ConfigError::Read { .. }));
    std::fs::write(
        &file,
        "merge_method: linear\nmodels:\n  - model: m\nbase_modle: m\n",
    )
    .expect("write");
    let err = MergeConfig::from_yaml_file(&file).expect_err("typo");
    assert!(
        err.to_string().starts_with(&format!("{}:4:", file.display())),
        "{err}"
    );
}

#[test]
fn both_tokenizer_forms_are_read() {
    let c = ok(&format!("{LINEAR}tokenizer:\n  source: base\n"));
    assert_eq!(c.tokenizer_source, Some(TokenizerSource::Base));
    let c = ok(&format!(
        "{LINEAR}tokenizer:\n  pad_to_multiple_of: 64\n  tokens:\n    '<x>': {{source: a}}\n"
    ));
    assert_eq!(
        c.tokenizer_source,
        Some(TokenizerSource::Union),
        "mergekit's default source"
    );
    assert_eq!(c.pad_to_multiple_of, Some(64));
    assert_eq!(c.tokenizer_tokens, Some(json!({"<x>": {"source": "a"}})));
    let c = ok(&format!(
        "{LINEAR}tokenizer_source: ../tok\nchat_template: chatml\n"
    ));
    assert_eq!(
        c.tokenizer_source,
        Some(TokenizerSource::Model(PathBuf::from("/cfg/../tok")))
    );
    assert_eq!(c.chat_template.as_deref(), Some("chatml"));
}

#[test]
fn dtype_aliases_are_accepted() {
    for (name, want) in [
        ("fp32", DType::F32),
        ("bf16", DType::BF16),
        ("fp16", DType::F16),
        ("torch.float16", DType::F16),
    ] {
        assert_eq!(
            ok(&format!("{LINEAR}dtype: {name}\n")).dtype,
            Some(want),
            "{name}"
        );
    }
}

#[test]
fn model_params_fall_back_to_global_per_name_and_per_tensor() {
    let c = ok("merge_method: ties\nmodels:\n  - model: a\n    parameters:\n      weight: 2\n      density: [{filter: mlp, value: 0.3}]\n  - model: b\nparameters:\n  density: 0.9\n  normalize: true\n");
    let mlp = TensorSite::in_layer("model.layers.0.mlp.up_proj.weight", 0, 2);
    let attn = TensorSite::in_layer("model.layers.0.self_attn.q_proj.weight", 0, 2);
    assert_eq!(
        serde_json::Value::Object(c.model_params(0, &mlp)),
        json!({"weight": 2, "density": 0.3, "normalize": true})
    );
    // The model's filtered density matches nothing here, so the global density applies.
    assert_eq!(c.model_params(0, &attn)["density"], json!(0.9));
    assert_eq!(
        serde_json::Value::Object(c.model_params_for(1, &attn, &["weight", "density"])),
        json!({"density": 0.9})
    );
    assert_eq!(
        serde_json::Value::Object(c.global_params(&attn)),
        json!({"density": 0.9, "normalize": true})
    );
}

#[test]
fn slice_scopes_sit_between_source_and_global() {
    let c = ok("merge_method: slerp\nbase_model: a\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 4]\n        parameters: {weight: 1}\n      - model: b\n        layer_range: [4, 8]\n    parameters:\n      t: [0, 0.5, 1]\n      weight: 0.5\nparameters:\n  t: 0.9\n  weight: 0.1\n");
    let site = TensorSite::in_layer("model.layers.1.mlp.up_proj.weight", 1, 4);
    // python3: t=1/3; scaled=t*2; i0=0; frac=scaled; (1-frac)*0+frac*0.5 -> 0.3333333333333333
    assert_eq!(c.slice_params(0, &site)["t"], json!(0.3333333333333333));
    assert_eq!(c.source_params(0, 0, &site)["weight"], json!(1));
    assert_eq!(c.source_params(0, 1, &site)["weight"], json!(0.5));
    assert_eq!(c.slices[0].sources[1].layer_range, (4, 8));
}

#[test]
fn gradients_on_tensors_outside_the_layers_take_the_first_entry() {
    // mergekit 0.1.5 plans embed_tokens, the final norm and lm_head with t = 0.
    let t = ParamValue::List(vec![0.2, 0.6, 1.0]);
    for name in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] {
        assert_eq!(
            t.resolve(&TensorSite::non_layer(name)),
            Some(json!(0.2)),
            "{name}"
        );
    }
    // ... and a one-layer slice with t = 1.
    assert_eq!(
        t.resolve(&TensorSite::in_layer("model.layers.0.mlp.up_proj.weight", 0, 1)),
        Some(json!(1))
    );
    // python3 (mergekit's formula) for [0, 0.5, 1] over 5 layers: 0.0, 0.25, 0.5, 0.75, 1.0
    let g = ParamValue::List(vec![0.0, 0.5, 1.0]);
    let got: Vec<f64> = (0..5)
        .map(|i| {
            g.resolve(&TensorSite::in_layer("x", i, 5))
                .and_then(|v| v.as_f64())
                .expect("number")
        })
        .collect();
    assert_eq!(got, [0.0, 0.25, 0.5, 0.75, 1.0]);
}

#[test]
fn conditional_values_take_the_first_matching_filter() {
    let c = ok("merge_method: slerp\nmodels:\n  - model: a\n  - model: b\nparameters:\n  t:\n    - filter: self_attn\n      value: 0.1\n    - filter: attn\n      value: 0.2\n    - value: [0.3, 0.7]\n");
    let at = |name: &str, layer: Option<usize>| {
        let site = TensorSite {
            name,
            layer,
            num_layers: 2,
        };
        c.global_params(&site)["t"].clone()
    };
    assert_eq!(at("model.layers.0.self_attn.q_proj.weight", Some(0)), json!(0.1));
    assert_eq!(at("model.layers.1.cross_attn.q_proj.weight", Some(1)), json!(0.2));
    assert_eq!(at("model.layers.1.mlp.up_proj.weight", Some(1)), json!(0.7));
    assert_eq!(at("model.embed_tokens.weight", None), json!(0.3));
    assert_eq!(
        c.parameters["t"],
        ParamValue::Conditional(vec![
            ConditionalValue {
                filter: Some("self_attn".into()),
                value: ParamValue::Number(0.1)
            },
            ConditionalValue {
                filter: Some("attn".into()),
                value: ParamValue::Number(0.2)
            },
            ConditionalValue {
                filter: None,
                value: ParamValue::List(vec![0.3, 0.7])
            },
        ])
    );
}

#[test]
fn model_flags_split_at_the_last_colon_before_a_key() {
    let (p, m) = parse_model_flag("../zoo/ft1:weight=0.5,density=0.3").expect("parses");
    assert_eq!(p, PathBuf::from("../zoo/ft1"));
    assert_eq!(m["weight"], ParamValue::Number(0.5));
    assert_eq!(m["density"], ParamValue::Number(0.3));
    let (p, m) = parse_model_flag("/mnt/run:3/ckpt:t=[0,0.5,1],name=abc,on=true").expect("parses");
    assert_eq!(p, PathBuf::from("/mnt/run:3/ckpt"));
    assert_eq!(m["t"], ParamValue::List(vec![0.0, 0.5, 1.0]));
    assert_eq!(m["name"], ParamValue::String("abc".into()));
    assert_eq!(m["on"], ParamValue::Bool(true));
    let (p, m) = parse_model_flag("hub:org/model").expect("no params");
    assert_eq!((p, m.len()), (PathBuf::from("hub:org/model"), 0));
    for bad in [
        ":weight=1",
        "a:weight=1,weight=2",
        "a:weight=",
        "a:weight=1,x",
        "a:t=[0,z]",
        "a:t=[]",
        "a:w=nan",
    ] {
        let err = parse_model_flag(bad).expect_err(bad);
        assert!(matches!(err, ConfigError::Flag { .. }), "{bad}: {err}");
    }
}

#[test]
fn param_flags_read_numbers_booleans_strings_and_gradients() {
    assert_eq!(
        parse_param_flag("t=0.3").expect("ok"),
        ("t".into(), ParamValue::Number(0.3))
    );
    assert_eq!(
        parse_param_flag("normalize=false").expect("ok").1,
        ParamValue::Bool(false)
    );
    assert_eq!(
        parse_param_flag("lambda=1e-1").expect("ok").1,
        ParamValue::Number(0.1)
    );
    assert_eq!(
        parse_param_flag("t=[0, 0.5, 1]").expect("ok").1,
        ParamValue::List(vec![0.0, 0.5, 1.0])
    );
    assert_eq!(
        parse_param_flag("mode='1.5'").expect("ok").1,
        ParamValue::String("1.5".into())
    );
    assert_eq!(
        parse_param_flag("mode=sum").expect("ok").1,
        ParamValue::String("sum".into())
    );
    for bad in ["t", "=1", "1t=2", "t=[0,1"] {
        assert!(parse_param_flag(bad).is_err(), "{bad}");
    }
}

#[test]
fn flag_configs_render_to_equivalent_yaml() {
    let (a, pa) = parse_model_flag("m/a:weight=0.7,density=[0.2,0.8]").expect("parses");
    let (b, pb) = parse_model_flag("m/b:weight=0.3").expect("parses");
    let mut global = ParamMap::new();
    global.insert("normalize".into(), ParamValue::Bool(true));
    // Strings that look like other YAML types must come back as strings.
    global.insert("mode".into(), ParamValue::String("1.5".into()));
    global.insert("flag".into(), ParamValue::String("true".into()));
    global.insert(
        "t".into(),
        ParamValue::Conditional(vec![
            ConditionalValue {
                filter: Some("mlp".into()),
                value: ParamValue::Number(0.25),
            },
            ConditionalValue {
                filter: None,
                value: ParamValue::Number(0.5),
            },
        ]),
    );
    let c = MergeConfig::from_flags(
        "ties",
        &[(a, pa), (b, pb)],
        Some("m/base".into()),
        global,
        Some(DType::BF16),
        None,
    );
    assert_eq!(c.models.len(), 2);
    assert_eq!(c.base_model, Some(PathBuf::from("m/base")));
    let back = MergeConfig::from_yaml_str(&c.source_text, Path::new(""))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.source_text));
    assert_eq!(
        MergeConfig {
            source_text: c.source_text.clone(),
            ..back
        },
        c
    );

    // A parsed config renders back to itself, too.
    let parsed = ok("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n  - sources:\n      - model: b\n        layer_range: [1, 2]\ntokenizer_source: union\nout_dtype: float16\n");
    let again = MergeConfig::from_yaml_str(&parsed.to_yaml(), Path::new("")).expect("re-parses");
    assert_eq!(
        MergeConfig {
            source_text: parsed.source_text.clone(),
            ..again
        },
        parsed
    );
}

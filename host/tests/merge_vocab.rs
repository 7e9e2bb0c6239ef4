//! Vocabulary policies (`tokenizer_source:`) against mergekit 0.1.5's outputs: `base` cuts the
//! embedding rows to the base vocabulary, `union` gathers every model's rows into the union
//! vocabulary, and different vocabularies without a policy are refused before anything is read.

mod merge_common;

use std::collections::HashMap;
use std::path::Path;

use merge_common::*;
use modelglue::merge::{MergeError, MergePlan};

/// token → id of a tokenizer.json, read with the `tokenizers` crate (what transformers'
/// `get_vocab()` returns: model vocabulary plus added tokens).
fn vocab(dir: &Path) -> HashMap<String, u32> {
    tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .get_vocab(true)
}

fn added_tokens(dir: &Path) -> serde_json::Value {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).expect("tokenizer.json"))
            .expect("json");
    json["added_tokens"].clone()
}

#[test]
fn union_vocabulary_matches_mergekit_bit_exact() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("union");
    merge(&case_config("linear_vocab_union"), &linear(), &out);
    let expected = fixtures().join("expected/linear_vocab_union");
    assert_same_tensors(&out, &expected);
    assert_eq!(config_json(&out)["vocab_size"], 1008);
    // Same token ids as mergekit's tokenizer, and the added tokens keep their settings.
    assert_eq!(vocab(&out), vocab(&expected));
    assert_eq!(added_tokens(&out), added_tokens(&expected));
    // Without `added_tokens_decoder` to extend, tokenizer_config.json is the base's, unchanged.
    assert_eq!(
        std::fs::read(out.join("tokenizer_config.json")).expect("written"),
        std::fs::read(zoo("base").join("tokenizer_config.json")).expect("base")
    );
    // And it tokenizes like mergekit's, added tokens included.
    let text = "def merge(self, other):<extra_3>\n    return <extra_7>self";
    let encode = |dir: &Path| {
        let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).expect("loads");
        tok.encode(text, false).expect("encodes").get_ids().to_vec()
    };
    let ids = encode(&out);
    assert!(ids.contains(&1003) && ids.contains(&1007), "{ids:?}");
    assert_eq!(ids, encode(&expected));
}

#[test]
fn union_rows_of_tokens_only_one_model_has_are_that_models_rows() {
    // base lacks <extra_0..7>: its filled rows are ft_vocab's, so the 0.5/0.5 average of the two
    // equal rows is ft_vocab's row, bit for bit (MANIFEST: "extra rows == ft_vocab rows").
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("union");
    merge(&case_config("linear_vocab_union"), &linear(), &out);
    let (got, src) = (tensors(&out), tensors(&zoo("ft_vocab")));
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let row = 64 * 4;
        assert_eq!(got[name].1, [1008, 64]);
        assert_eq!(
            got[name].2[1000 * row..],
            src[name].2[1000 * row..],
            "{name}: rows 1000..1008"
        );
    }
}

#[test]
fn base_vocabulary_matches_mergekit_bit_exact() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("base");
    merge(&case_config("linear_vocab_base"), &linear(), &out);
    let expected = fixtures().join("expected/linear_vocab_base");
    assert_same_tensors(&out, &expected);
    assert_eq!(config_json(&out)["vocab_size"], 1000);
    assert_eq!(vocab(&out), vocab(&expected));
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).expect("written"),
        std::fs::read(zoo("base").join("tokenizer.json")).expect("base"),
        "the base tokenizer is copied as it is"
    );
}

#[test]
fn a_model_as_tokenizer_source_takes_its_vocabulary() {
    // ft_vocab's vocabulary is base's plus 8 tokens: the same rows as the union.
    let config = yaml_config(
        "merge_method: linear\nmodels:\n  - model: base\n    parameters: {weight: 0.5}\n  - model: ft_vocab\n    \
         parameters: {weight: 0.5}\ntokenizer_source: ft_vocab\n",
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("model");
    merge(&config, &linear(), &out);
    assert_same_tensors(&out, &fixtures().join("expected/linear_vocab_union"));
    assert_eq!(vocab(&out), vocab(&zoo("ft_vocab")));
}

#[test]
fn different_vocabularies_without_a_policy_are_refused_before_reading_weights() {
    let err = MergePlan::new(&case_config("linear_vocab_mismatch"), &linear())
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, MergeError::Mismatch { .. }), "{msg}");
    assert!(msg.contains("embed_tokens") || msg.contains("lm_head"), "{msg}");
    assert!(msg.contains("tokenizer_source"), "{msg}");
    assert!(msg.contains("ft_vocab") && msg.contains("[1008, 64]"), "{msg}");
}

#[test]
fn a_policy_without_tokenizer_files_is_refused_naming_the_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bare = tmp.path().join("bare");
    std::fs::create_dir(&bare).expect("mkdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(zoo("base").join(f), bare.join(f)).expect("copy");
    }
    let config = yaml_config(&format!(
        "merge_method: linear\nbase_model: {}\nmodels:\n  - model: {0}\n    parameters: {{weight: 0.5}}\n  - model: \
         ft_vocab\n    parameters: {{weight: 0.5}}\ntokenizer_source: base\n",
        bare.display()
    ));
    let msg = MergePlan::new(&config, &linear())
        .err()
        .expect("refused")
        .to_string();
    assert!(msg.contains("tokenizer.json") && msg.contains("bare"), "{msg}");
}

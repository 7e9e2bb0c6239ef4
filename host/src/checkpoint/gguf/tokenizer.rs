//! `tokenizer.json` and `tokenizer_config.json` rebuilt from the GGUF vocabulary.
//!
//! GGUF keeps the vocabulary (`tokenizer.ggml.tokens`, in the byte-level alphabet for BPE
//! models), the merges, a type per token (1 normal, 2 unknown, 3 control, 4 user-defined,
//! 5 unused, 6 byte) and the name of llama.cpp's pre-tokenizer (`tokenizer.ggml.pre`), which
//! stands for the regex split the original Hugging Face tokenizer used. This module writes the
//! Hugging Face `tokenizers` pipeline that matches each known pre-tokenizer name.

use std::collections::HashSet;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::{json, Value as Json};

use super::{describe, int_value, GgufError, Metadata};

/// llama.cpp token types (`llama_token_type`).
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// The special-token ids the configs refer to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
}

/// The two tokenizer files, ready to serialise.
pub(super) struct TokenizerFiles<'a> {
    pub tokenizer_json: TokenizerJson<'a>,
    pub tokenizer_config_json: Json,
    pub special: SpecialTokens,
}

/// `tokenizer.json`, fields in the order the `tokenizers` library writes them. A struct rather
/// than a `serde_json::Value` so that the vocabulary keeps id order.
#[derive(Serialize)]
pub(super) struct TokenizerJson<'a> {
    version: &'static str,
    truncation: Option<()>,
    padding: Option<()>,
    added_tokens: Vec<AddedToken<'a>>,
    normalizer: Json,
    pre_tokenizer: Json,
    post_processor: Json,
    decoder: Json,
    model: BpeModel<'a>,
}

/// The `model` section: byte-level BPE without an unknown token (every byte is in the vocabulary).
#[derive(Serialize)]
struct BpeModel<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f32>,
    unk_token: Option<&'a str>,
    continuing_subword_prefix: Option<&'a str>,
    end_of_word_suffix: Option<&'a str>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: OrderedVocab<'a>,
    /// Pairs (`[["Ġ", "t"], …]`), the unambiguous format of tokenizers ≥ 0.20.
    merges: Vec<(&'a str, &'a str)>,
}

/// The pre-tokenizer names (`tokenizer.ggml.pre`) this module can rebuild, for messages.
const SUPPORTED_PRE: &str = "smollm, starcoder, refact (digits split, then GPT-2 byte level); \
                             gpt-2, gpt2; qwen2, deepseek-r1-qwen; llama-bpe, llama3, smaug-bpe";

/// Word-splitting regexes of the Hugging Face tokenizers that llama.cpp's pre-tokenizer names
/// stand for. The contractions are spelled with explicit case classes rather than `(?i:…)`:
/// the same pattern then means the same thing to Oniguruma (Python `tokenizers`) and to
/// fancy-regex (Rust `tokenizers` without C code), whose case folding differ beyond ASCII.
const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The parts of `tokenizer.json` that depend on the pre-tokenizer.
struct Pipeline {
    normalizer: Json,
    pre_tokenizer: Json,
    byte_level_post: Json,
    decoder: Json,
    ignore_merges: bool,
}

fn byte_level(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> Json {
    json!({
        "type": "ByteLevel",
        "add_prefix_space": add_prefix_space,
        "trim_offsets": trim_offsets,
        "use_regex": use_regex,
    })
}

fn split_then_byte_level(regex: &str) -> Json {
    json!({
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level(false, false, false),
        ],
    })
}

fn pipeline_for(pre: &str) -> Option<Pipeline> {
    Some(match pre {
        // llama.cpp's STARCODER/REFACT/SMOLLM types: `\p{N}` split first, then the GPT-2 regex.
        "smollm" | "starcoder" | "refact" => Pipeline {
            normalizer: Json::Null,
            pre_tokenizer: json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    byte_level(false, true, true),
                ],
            }),
            byte_level_post: byte_level(false, true, true),
            decoder: byte_level(false, true, true),
            ignore_merges: false,
        },
        "gpt-2" | "gpt2" => Pipeline {
            normalizer: Json::Null,
            pre_tokenizer: byte_level(false, true, true),
            byte_level_post: byte_level(false, true, true),
            decoder: byte_level(false, true, true),
            ignore_merges: false,
        },
        "qwen2" | "deepseek-r1-qwen" => Pipeline {
            normalizer: json!({"type": "NFC"}),
            pre_tokenizer: split_then_byte_level(REGEX_QWEN2),
            byte_level_post: byte_level(false, false, false),
            decoder: byte_level(false, false, false),
            ignore_merges: false,
        },
        "llama-bpe" | "llama3" | "smaug-bpe" => Pipeline {
            normalizer: Json::Null,
            pre_tokenizer: split_then_byte_level(REGEX_LLAMA3),
            byte_level_post: byte_level(true, false, true),
            decoder: byte_level(true, true, true),
            ignore_merges: true,
        },
        _ => return None,
    })
}

/// Builds both tokenizer files from the `tokenizer.*` metadata. `vocab_size` is the number of
/// embedding rows (the vocabulary may be shorter, never longer); `context_length` becomes
/// `model_max_length`.
pub(super) fn build<'a>(
    md: &Metadata<'a>,
    vocab_size: usize,
    context_length: usize,
) -> Result<TokenizerFiles<'a>, GgufError> {
    let model = md.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(GgufError::UnsupportedTokenizer {
            path: md.path().to_path_buf(),
            key: "tokenizer.ggml.model".to_string(),
            value: model.to_string(),
            supported: "gpt2 (byte-level BPE)",
        });
    }
    let pre = md.opt_string("tokenizer.ggml.pre")?.unwrap_or("default");
    let pipeline = pipeline_for(pre).ok_or_else(|| GgufError::UnsupportedTokenizer {
        path: md.path().to_path_buf(),
        key: "tokenizer.ggml.pre".to_string(),
        value: pre.to_string(),
        supported: SUPPORTED_PRE,
    })?;

    let tokens = md.string_array("tokenizer.ggml.tokens")?;
    if tokens.is_empty() || tokens.len() > vocab_size {
        return Err(md.bad(
            "tokenizer.ggml.tokens",
            format!(
                "has {} tokens, but the embedding has {vocab_size} rows; expected between 1 and \
                 {vocab_size}",
                tokens.len()
            ),
        ));
    }
    let types = token_types(md, tokens.len())?;
    let merges = md.string_array("tokenizer.ggml.merges")?;
    let merges: Vec<(&'a str, &'a str)> = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ').ok_or_else(|| {
                md.bad(
                    "tokenizer.ggml.merges",
                    format!("entry {i} ({m:?}) is not two tokens separated by a space"),
                )
            })
        })
        .collect::<Result<_, _>>()?;

    let id = |key: &str| -> Result<Option<u32>, GgufError> {
        match md.opt_u32(key)? {
            Some(i) if i as usize >= tokens.len() => Err(md.bad(
                key,
                format!("is {i}, outside the vocabulary of {} tokens", tokens.len()),
            )),
            other => Ok(other),
        }
    };
    let special = SpecialTokens {
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        pad: id("tokenizer.ggml.padding_token_id")?,
        unk: id("tokenizer.ggml.unknown_token_id")?,
    };
    let add_bos = md
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let add_eos = md
        .opt_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    let chat_template = md.opt_string("tokenizer.chat_template")?;
    let name = |i: Option<u32>| i.map(|i| tokens[i as usize]);

    // Control and unknown tokens are special (never split, skipped by skip_special_tokens);
    // user-defined ones are matched whole but decode as text. None is normalised.
    let added: Vec<AddedToken<'_>> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter_map(|(i, (content, ty))| {
            let special = match *ty {
                TYPE_CONTROL | TYPE_UNKNOWN => true,
                TYPE_USER_DEFINED => false,
                _ => return None,
            };
            Some(AddedToken {
                id: i as u32,
                content,
                single_word: false,
                lstrip: false,
                rstrip: false,
                normalized: false,
                special,
            })
        })
        .collect();

    let mut seen = HashSet::with_capacity(tokens.len());
    let mut vocab = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        // A JSON object cannot hold a token twice; the first id wins, as in llama.cpp's
        // text-to-id map.
        if seen.insert(*t) {
            vocab.push((*t, i as u32));
        } else {
            tracing::debug!(token = %t, id = i, "duplicate token in the GGUF vocabulary; the first id is kept");
        }
    }

    let post_processor = if add_bos || add_eos {
        template_processor(
            name(special.bos),
            special.bos,
            name(special.eos),
            special.eos,
            add_bos,
            add_eos,
        )
        .ok_or_else(|| {
            md.bad(
                if add_bos {
                    "tokenizer.ggml.add_bos_token"
                } else {
                    "tokenizer.ggml.add_eos_token"
                },
                "is true, but the matching bos/eos token id is absent".to_string(),
            )
        })?
    } else {
        pipeline.byte_level_post
    };

    let added_decoder: serde_json::Map<String, Json> = added
        .iter()
        .map(|t| {
            (
                t.id.to_string(),
                json!({
                    "content": t.content,
                    "lstrip": false,
                    "normalized": false,
                    "rstrip": false,
                    "single_word": false,
                    "special": t.special,
                }),
            )
        })
        .collect();
    let tokenizer_json = TokenizerJson {
        version: "1.0",
        truncation: None,
        padding: None,
        added_tokens: added,
        normalizer: pipeline.normalizer,
        pre_tokenizer: pipeline.pre_tokenizer,
        post_processor,
        decoder: pipeline.decoder,
        model: BpeModel {
            kind: "BPE",
            dropout: None,
            unk_token: None,
            continuing_subword_prefix: None,
            end_of_word_suffix: None,
            fuse_unk: false,
            byte_fallback: false,
            ignore_merges: pipeline.ignore_merges,
            vocab: OrderedVocab(vocab),
            merges,
        },
    };

    let mut tokenizer_config = json!({
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "added_tokens_decoder": added_decoder,
        "bos_token": name(special.bos),
        "eos_token": name(special.eos),
        "pad_token": name(special.pad),
        "unk_token": name(special.unk),
        "clean_up_tokenization_spaces": false,
        "model_max_length": context_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let (Some(template), Some(obj)) = (chat_template, tokenizer_config.as_object_mut()) {
        obj.insert(
            "chat_template".to_string(),
            Json::String(template.to_string()),
        );
    }

    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config_json: tokenizer_config,
        special,
    })
}

/// `tokenizer.ggml.token_type`, one integer per token; all normal when absent.
fn token_types(md: &Metadata<'_>, n: usize) -> Result<Vec<i64>, GgufError> {
    let key = "tokenizer.ggml.token_type";
    let Some(items) = md.opt_array(key)? else {
        return Ok(vec![1; n]);
    };
    if items.len() != n {
        return Err(md.bad(
            key,
            format!("has {} entries but there are {n} tokens", items.len()),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            int_value(v)
                .and_then(|x| i64::try_from(x).ok())
                .ok_or_else(|| {
                    md.bad(
                        key,
                        format!("entry {i} should be an integer, found {}", describe(v)),
                    )
                })
        })
        .collect()
}

/// A `TemplateProcessing` post-processor adding BOS and/or EOS, as Hugging Face writes it for
/// tokenizers that add them (llama 3 adds `<|begin_of_text|>`).
fn template_processor(
    bos: Option<&str>,
    bos_id: Option<u32>,
    eos: Option<&str>,
    eos_id: Option<u32>,
    add_bos: bool,
    add_eos: bool,
) -> Option<Json> {
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special = serde_json::Map::new();
    if add_bos {
        let (b, id) = (bos?, bos_id?);
        single.push(json!({"SpecialToken": {"id": b, "type_id": 0}}));
        pair.push(json!({"SpecialToken": {"id": b, "type_id": 0}}));
        special.insert(b.to_string(), json!({"id": b, "ids": [id], "tokens": [b]}));
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if add_eos {
        let (e, id) = (eos?, eos_id?);
        single.push(json!({"SpecialToken": {"id": e, "type_id": 0}}));
        pair.push(json!({"SpecialToken": {"id": e, "type_id": 0}}));
        special.insert(e.to_string(), json!({"id": e, "ids": [id], "tokens": [e]}));
    }
    if add_bos {
        pair.push(json!({"SpecialToken": {"id": bos?, "type_id": 1}}));
    }
    pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
    if add_eos {
        pair.push(json!({"SpecialToken": {"id": eos?, "type_id": 1}}));
    }
    Some(json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special,
    }))
}

/// One entry of `added_tokens` in `tokenizer.json`: matched whole, never normalised.
#[derive(Serialize)]
struct AddedToken<'a> {
    id: u32,
    content: &'a str,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

/// The vocabulary as a JSON object in id order (a `serde_json::Map` would sort it by token).
struct OrderedVocab<'a>(Vec<(&'a str, u32)>);

impl Serialize for OrderedVocab<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (token, id) in &self.0 {
            m.serialize_entry(token, id)?;
        }
        m.end()
    }
}

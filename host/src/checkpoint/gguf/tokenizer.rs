//! `tokenizer.json` and `tokenizer_config.json` rebuilt from the GGUF vocabulary.
//!
//! GGUF keeps the vocabulary (`tokenizer.ggml.tokens`) and a type per token (1 normal,
//! 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte — SentencePiece's numbering), and
//! then, by `tokenizer.ggml.model`:
//!
//! - `gpt2`: byte-level BPE. The tokens are in GPT-2's byte alphabet, `tokenizer.ggml.merges`
//!   holds the merges, and `tokenizer.ggml.pre` names llama.cpp's pre-tokenizer, which stands
//!   for the regex split of the original Hugging Face tokenizer; each known name maps to the
//!   `tokenizers` pipeline it came from.
//! - `llama`: SentencePiece BPE (Llama 2, Gemma). There are no merges, only a score per piece;
//!   the merges are derived from the scores exactly as transformers' `SpmConverter` does when it
//!   writes a `tokenizer.json` for these models, and the pipeline is its (byte fallback, `▁` for
//!   spaces, optional `▁` prefix per `tokenizer.ggml.add_space_prefix`).
//!
//! Control and user-defined tokens become added tokens (special and not special respectively),
//! as transformers' converters make them.

use std::collections::{HashMap, HashSet};

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::{json, Value as Json};

use candle_core::quantized::gguf_file::Value;

use super::{describe, int_value, GgufError, Metadata};

/// llama.cpp token types (`llama_token_type`, SentencePiece's `Type`).
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

/// The `model` section: BPE, byte-level (no unknown token: every byte is in the vocabulary) or
/// SentencePiece-style (byte fallback for characters outside the vocabulary).
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
    /// Pairs (`[["Ġ", "t"], …]`), the unambiguous format of tokenizers ≥ 0.20 (SentencePiece
    /// pieces may contain spaces).
    merges: Vec<(&'a str, &'a str)>,
}

/// The model-specific parts of `tokenizer.json`.
struct Pipeline<'a> {
    normalizer: Json,
    pre_tokenizer: Json,
    /// The post-processor when no BOS/EOS is added.
    plain_post: Json,
    decoder: Json,
    unk_token: Option<&'a str>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
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

/// The byte-level pipeline for a llama.cpp pre-tokenizer name.
struct ByteLevelPipeline {
    normalizer: Json,
    pre_tokenizer: Json,
    post: Json,
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

fn byte_level_pipeline(pre: &str) -> Option<ByteLevelPipeline> {
    Some(match pre {
        // llama.cpp's STARCODER/REFACT/SMOLLM types: `\p{N}` split first, then the GPT-2 regex.
        "smollm" | "starcoder" | "refact" => ByteLevelPipeline {
            normalizer: Json::Null,
            pre_tokenizer: json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    byte_level(false, true, true),
                ],
            }),
            post: byte_level(false, true, true),
            decoder: byte_level(false, true, true),
            ignore_merges: false,
        },
        "gpt-2" | "gpt2" => ByteLevelPipeline {
            normalizer: Json::Null,
            pre_tokenizer: byte_level(false, true, true),
            post: byte_level(false, true, true),
            decoder: byte_level(false, true, true),
            ignore_merges: false,
        },
        "qwen2" | "deepseek-r1-qwen" => ByteLevelPipeline {
            normalizer: json!({"type": "NFC"}),
            pre_tokenizer: split_then_byte_level(REGEX_QWEN2),
            post: byte_level(false, false, false),
            decoder: byte_level(false, false, false),
            ignore_merges: false,
        },
        "llama-bpe" | "llama3" | "smaug-bpe" => ByteLevelPipeline {
            normalizer: Json::Null,
            pre_tokenizer: split_then_byte_level(REGEX_LLAMA3),
            post: byte_level(true, false, true),
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
    if model != "gpt2" && model != "llama" {
        return Err(GgufError::UnsupportedTokenizer {
            path: md.path().to_path_buf(),
            key: "tokenizer.ggml.model".to_string(),
            value: model.to_string(),
            supported: "gpt2 (byte-level BPE), llama (SentencePiece BPE)",
        });
    }
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
    let sentencepiece = model == "llama";
    // llama.cpp's defaults: SentencePiece models add BOS, byte-level ones do not.
    let add_bos = md
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(sentencepiece);
    let add_eos = md.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let chat_template = md.opt_string("tokenizer.chat_template")?;
    let name = |i: Option<u32>| i.map(|i| tokens[i as usize]);

    // Control tokens are special (never split, skipped by skip_special_tokens); user-defined
    // ones are matched whole but decode as text. None is normalised.
    let added: Vec<AddedToken<'_>> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter_map(|(i, (content, ty))| {
            let special = match *ty {
                TYPE_CONTROL => true,
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

    let pipeline = if sentencepiece {
        sentencepiece_pipeline(md, &tokens, &vocab, name(special.unk))?
    } else {
        let pre = md.opt_string("tokenizer.ggml.pre")?.unwrap_or("default");
        let p = byte_level_pipeline(pre).ok_or_else(|| GgufError::UnsupportedTokenizer {
            path: md.path().to_path_buf(),
            key: "tokenizer.ggml.pre".to_string(),
            value: pre.to_string(),
            supported: SUPPORTED_PRE,
        })?;
        Pipeline {
            normalizer: p.normalizer,
            pre_tokenizer: p.pre_tokenizer,
            plain_post: p.post,
            decoder: p.decoder,
            unk_token: None,
            fuse_unk: false,
            byte_fallback: false,
            ignore_merges: p.ignore_merges,
            merges: gpt2_merges(md)?,
        }
    };

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
        pipeline.plain_post
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
            unk_token: pipeline.unk_token,
            continuing_subword_prefix: None,
            end_of_word_suffix: None,
            fuse_unk: pipeline.fuse_unk,
            byte_fallback: pipeline.byte_fallback,
            ignore_merges: pipeline.ignore_merges,
            vocab: OrderedVocab(vocab),
            merges: pipeline.merges,
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
        obj.insert("chat_template".to_string(), Json::String(template.to_string()));
    }

    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config_json: tokenizer_config,
        special,
    })
}

/// `tokenizer.ggml.merges` of a byte-level BPE model, as pairs.
fn gpt2_merges<'a>(md: &Metadata<'a>) -> Result<Vec<(&'a str, &'a str)>, GgufError> {
    let key = "tokenizer.ggml.merges";
    md.string_array(key)?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ').ok_or_else(|| {
                md.bad(
                    key,
                    format!("entry {i} ({m:?}) is not two tokens separated by a space"),
                )
            })
        })
        .collect()
}

/// The pipeline transformers' `SpmConverter` writes for a SentencePiece BPE model (its
/// `LlamaConverter` with `legacy = True`, and `GemmaConverter`, whose `add_dummy_prefix` is off):
/// spaces become `▁` (after prepending one when `tokenizer.ggml.add_space_prefix`, default on as
/// in llama.cpp), characters outside the vocabulary fall back to `<0xXX>` byte pieces, and the
/// decoder undoes both.
fn sentencepiece_pipeline<'a>(
    md: &Metadata<'a>,
    tokens: &[&'a str],
    vocab: &[(&'a str, u32)],
    unk: Option<&'a str>,
) -> Result<Pipeline<'a>, GgufError> {
    let key = "tokenizer.ggml.scores";
    let scores = md.array(key)?;
    if scores.len() != tokens.len() {
        return Err(md.bad(
            key,
            format!(
                "has {} entries but there are {} tokens",
                scores.len(),
                tokens.len()
            ),
        ));
    }
    let scores: Vec<f32> = scores
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::F32(x) if !x.is_nan() => Ok(*x),
            v => Err(md.bad(key, format!("entry {i} should be an f32, found {}", describe(v)))),
        })
        .collect::<Result<_, _>>()?;
    let add_prefix = md.opt_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let (normalizer, decoder) = if add_prefix {
        (
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                replace,
            ]}),
            json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ]}),
        )
    } else {
        (
            replace,
            json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ]}),
        )
    };
    Ok(Pipeline {
        normalizer,
        pre_tokenizer: Json::Null,
        plain_post: Json::Null,
        decoder,
        unk_token: unk,
        fuse_unk: true,
        byte_fallback: true,
        ignore_merges: false,
        merges: sentencepiece_merges(vocab, &scores),
    })
}

/// BPE merges for a SentencePiece vocabulary, derived as transformers'
/// `SentencePieceExtractor.extract(vocab_scores)` does: every split of every piece into two
/// pieces of the vocabulary is a merge ranked by the whole piece's score (higher first), then by
/// the lengths in characters of the left and right parts (longer first); ties keep vocabulary
/// order, and the splits of one piece are ordered by the ids of their parts.
fn sentencepiece_merges<'a>(vocab: &[(&'a str, u32)], scores: &[f32]) -> Vec<(&'a str, &'a str)> {
    let index: HashMap<&str, u32> = vocab.iter().copied().collect();
    let mut merges: Vec<(f32, usize, usize, &'a str, &'a str)> = Vec::new();
    let mut local: Vec<(u32, u32, &'a str, &'a str)> = Vec::new();
    for &(piece, id) in vocab {
        local.clear();
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&il), Some(&ir)) = (index.get(l), index.get(r)) {
                local.push((il, ir, l, r));
            }
        }
        local.sort_by_key(|&(il, ir, _, _)| (il, ir));
        let score = scores[id as usize];
        merges.extend(
            local
                .iter()
                .map(|&(_, _, l, r)| (score, l.chars().count(), r.chars().count(), l, r)),
        );
    }
    // Stable, so equal keys keep their order, as Python's sorted(..., reverse=True) does.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)));
    merges.into_iter().map(|(_, _, _, l, r)| (l, r)).collect()
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
            int_value(v).and_then(|x| i64::try_from(x).ok()).ok_or_else(|| {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected output from transformers' `SentencePieceExtractor.extract` logic on the same
    /// toy vocabulary:
    ///
    /// ```python
    /// vocab_scores = [("▁", -1.0), ("a", -2.0), ("b", -3.0), ("ab", -4.0), ("▁a", -4.0),
    ///                 ("▁ab", -5.0), ("ba", -4.0), ("aba", -6.0), ("é", -7.0)]
    /// vocab = {p: i for i, (p, _) in enumerate(vocab_scores)}
    /// merges = []
    /// for merge, piece_score in dict(vocab_scores).items():
    ///     local = [(merge[:i], merge[i:], piece_score) for i in range(1, len(merge))
    ///              if merge[:i] in vocab and merge[i:] in vocab]
    ///     merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    /// merges = sorted(merges, key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    /// # [('a', 'b'), ('▁', 'a'), ('b', 'a'), ('▁a', 'b'), ('▁', 'ab'), ('ab', 'a'), ('a', 'ba')]
    /// ```
    #[test]
    fn sentencepiece_merges_follow_transformers_extractor_order() {
        let pieces = ["▁", "a", "b", "ab", "▁a", "▁ab", "ba", "aba", "é"];
        let scores = [-1.0, -2.0, -3.0, -4.0, -4.0, -5.0, -4.0, -6.0, -7.0];
        let vocab: Vec<(&str, u32)> = pieces.iter().zip(0..).map(|(p, i)| (*p, i)).collect();
        assert_eq!(
            sentencepiece_merges(&vocab, &scores),
            [
                ("a", "b"),
                ("▁", "a"),
                ("b", "a"),
                ("▁a", "b"),
                ("▁", "ab"),
                ("ab", "a"),
                ("a", "ba")
            ]
        );
    }
}

//! Vocabulary policies (`tokenizer_source:`): the output vocabulary, each model's row
//! permutation into it, the rows a model lacks, and the tokenizer files written with the merge.
//!
//! mergekit 0.1.5 semantics (`mergekit/tokenizer/`), re-implemented from its behaviour:
//!
//! * The vocabulary "base" is `base_model`, else the first referenced model. Its tokenizer is
//!   *stripped* of the ids at or above its usable rows (`vocab_size` in config.json, and the
//!   rows of its embedding tensors).
//! * `base`: the output vocabulary is the stripped base vocabulary. `MODEL`: that model's
//!   vocabulary, as its tokenizer.json has it. `union`: the base vocabulary with its ids, then
//!   the other models' ordinary tokens it lacks (model by model in config order, each by id),
//!   then the added tokens it lacks (first appearance wins, by id), appended with new ids.
//! * Every embedding-like tensor (`embed_tokens`, `lm_head`, ...) of every model is gathered
//!   into the output vocabulary by token string. A row a model lacks is filled, for that model
//!   only, with: the row of the single model that has the token; else the base model's row when
//!   the base has it; else the mean of the rows of the models that have it (summed in model
//!   order in the tensor dtype, then divided by the count); zeros when none has it.
//! * `vocab_size` in config.json becomes the output vocabulary size (rounded up to
//!   `pad_to_multiple_of`; padding rows are each model's mean row).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};

use super::MergeError;
use crate::checkpoint::Checkpoint;
use crate::config::TokenizerSource;

/// Whether `name` is an embedding-like tensor whose rows are indexed by token id.
pub(crate) fn is_vocab_tensor(name: &str) -> bool {
    const SUFFIXES: &[&str] = &[
        "embed_tokens.weight",
        "lm_head.weight",
        "embed_out.weight",
        "wte.weight",
        "word_embeddings.weight",
    ];
    SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// The vocabulary of one tokenizer.json: what transformers' `get_vocab()` returns (the model
/// vocabulary plus the added tokens).
#[derive(Debug, Clone)]
struct Vocab {
    /// token → id.
    ids: HashMap<String, usize>,
    /// The parsed tokenizer.json.
    json: Value,
    /// The file.
    path: PathBuf,
}

fn tokenizer_error(path: &Path, message: impl Into<String>) -> MergeError {
    MergeError::Tokenizer {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl Vocab {
    /// Reads `dir/tokenizer.json`; `None` when the directory has none.
    fn read(dir: &Path) -> Result<Option<Vocab>, MergeError> {
        let path = dir.join("tokenizer.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(tokenizer_error(&path, format!("cannot be read: {e}"))),
        };
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| tokenizer_error(&path, format!("is not valid JSON: {e}")))?;
        let mut ids = HashMap::new();
        match json.pointer("/model/vocab") {
            Some(Value::Object(map)) => {
                for (tok, id) in map {
                    let id = id.as_u64().ok_or_else(|| {
                        tokenizer_error(&path, format!("model.vocab[{tok:?}] is not a token id"))
                    })?;
                    ids.insert(tok.clone(), id as usize);
                }
            }
            // Unigram: a list of [piece, score]; the id is the position.
            Some(Value::Array(pieces)) => {
                for (id, piece) in pieces.iter().enumerate() {
                    let tok = piece.get(0).and_then(Value::as_str).ok_or_else(|| {
                        tokenizer_error(&path, format!("model.vocab[{id}] is not a [piece, score] pair"))
                    })?;
                    ids.insert(tok.to_string(), id);
                }
            }
            _ => return Err(tokenizer_error(
                &path,
                "has no `model.vocab`; only BPE, WordPiece, WordLevel and Unigram tokenizers can be aligned",
            )),
        }
        for entry in json
            .get("added_tokens")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(id), Some(content)) = (
                entry.get("id").and_then(Value::as_u64),
                entry.get("content").and_then(Value::as_str),
            ) else {
                return Err(tokenizer_error(
                    &path,
                    "an `added_tokens` entry lacks `id` or `content`",
                ));
            };
            ids.insert(content.to_string(), id as usize);
        }
        Ok(Some(Vocab { ids, json, path }))
    }

    /// Rows the vocabulary needs: the largest id plus one.
    fn size(&self) -> usize {
        self.ids.values().max().map_or(0, |m| m + 1)
    }

    /// Ordinary (non-added) tokens, by id.
    fn ordinary_by_id(&self) -> Vec<(usize, &str)> {
        let added: HashSet<&str> = self.added().filter_map(|e| e.get("content")?.as_str()).collect();
        let mut v: Vec<(usize, &str)> = self
            .ids
            .iter()
            .filter(|(t, _)| !added.contains(t.as_str()))
            .map(|(t, &i)| (i, t.as_str()))
            .collect();
        v.sort_unstable();
        v
    }

    /// The `added_tokens` entries, by id.
    fn added(&self) -> impl Iterator<Item = &Value> {
        let mut v: Vec<&Value> = self
            .json
            .get("added_tokens")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .collect();
        v.sort_by_key(|e| e.get("id").and_then(Value::as_u64).unwrap_or(u64::MAX));
        v.into_iter()
    }

    /// Drops every token with an id at or above `limit`, as mergekit does for the base
    /// tokenizer (only BPE tokenizers can be stripped: their merges must go too).
    fn strip(&mut self, limit: usize) -> Result<bool, MergeError> {
        let unused: HashSet<String> = self
            .ids
            .iter()
            .filter(|(_, &i)| i >= limit)
            .map(|(t, _)| t.clone())
            .collect();
        if unused.is_empty() {
            return Ok(false);
        }
        let kind = self
            .json
            .pointer("/model/type")
            .and_then(Value::as_str)
            .unwrap_or("?");
        if kind != "BPE" {
            return Err(tokenizer_error(
                &self.path,
                format!(
                    "has {} tokens with ids at or above the model's {limit} embedding rows, and only a BPE tokenizer \
                     can be cut down (this one is {kind}); give `tokenizer_source:` a model whose tokenizer fits its embeddings",
                    unused.len()
                ),
            ));
        }
        self.ids.retain(|_, i| *i < limit);
        if let Some(Value::Object(vocab)) = self.json.pointer_mut("/model/vocab") {
            vocab.retain(|t, _| !unused.contains(t));
        }
        if let Some(Value::Array(added)) = self.json.get_mut("added_tokens") {
            added.retain(|e| {
                e.get("id")
                    .and_then(Value::as_u64)
                    .is_some_and(|i| (i as usize) < limit)
            });
        }
        if let Some(Value::Array(merges)) = self.json.pointer_mut("/model/merges") {
            merges.retain(|m| {
                let parts: Vec<&str> = match m {
                    Value::String(s) => s.split(' ').collect(),
                    Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                    _ => Vec::new(),
                };
                !parts.iter().any(|p| unused.contains(*p))
            });
        }
        Ok(true)
    }
}

/// How the merged model's tokenizer files are produced.
#[derive(Debug, Clone)]
pub(crate) enum TokenizerFiles {
    /// Copy the tokenizer files of this directory unchanged.
    Copy(PathBuf),
    /// Write these tokenizer.json / tokenizer_config.json texts; copy the other
    /// vocabulary-independent tokenizer files of `dir`.
    Write {
        /// Where the unchanged files come from.
        dir: PathBuf,
        /// The new tokenizer.json.
        tokenizer_json: String,
        /// The new tokenizer_config.json, when `dir` has one.
        tokenizer_config: Option<String>,
    },
}

/// Where an output row comes from, for a model that lacks the token.
#[derive(Debug, Clone)]
enum Fill {
    /// The row of participant `p` (an index into the job's participants), row `row`.
    Row { p: usize, row: usize },
    /// The mean of these rows.
    Mean(Vec<(usize, usize)>),
    /// Zeros.
    Zero,
}

/// The output vocabulary and every model's permutation into it.
#[derive(Debug, Clone)]
pub(crate) struct VocabPlan {
    /// Rows of the output embedding tensors.
    pub rows: usize,
    /// Rows that carry tokens (`rows` minus the `pad_to_multiple_of` padding).
    vocab_len: usize,
    /// Per checkpoint (index into the plan's checkpoints): output row → that model's row, or
    /// `None` where the model lacks the token.
    perms: Vec<Vec<Option<usize>>>,
    /// The tokenizer files to write.
    pub files: TokenizerFiles,
    /// Human-readable summary for logs.
    pub summary: String,
}

/// The usable vocabulary rows of a checkpoint: `vocab_size` from config.json, capped by the rows
/// of its embedding-like tensors.
fn usable_rows(ck: &Checkpoint) -> usize {
    let config = ck.config();
    let from_config = config
        .get("vocab_size")
        .or_else(|| config.get("text_config").and_then(|t| t.get("vocab_size")))
        .and_then(Value::as_u64)
        .map_or(usize::MAX, |v| v as usize);
    ck.tensor_names()
        .iter()
        .filter(|n| is_vocab_tensor(n))
        .filter_map(|n| ck.info(n))
        .filter(|i| i.shape.len() == 2)
        .map(|i| i.shape[0])
        .fold(from_config, usize::min)
}

fn new_added_entry(id: usize, content: &str) -> Value {
    // What `tokenizer.add_tokens("tok")` records in transformers.
    serde_json::json!({
        "id": id, "content": content, "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": true, "special": false,
    })
}

fn added_decoder_entry(entry: &Value) -> Value {
    let mut m = Map::new();
    for key in [
        "content",
        "lstrip",
        "normalized",
        "rstrip",
        "single_word",
        "special",
    ] {
        if let Some(v) = entry.get(key) {
            m.insert(key.to_string(), v.clone());
        }
    }
    Value::Object(m)
}

impl VocabPlan {
    /// Builds the output vocabulary for `policy`. `base` is the index of the vocabulary base
    /// (base_model, else the first referenced model) in `checkpoints`; `order` lists the
    /// checkpoints in config order (the union is built in that order).
    pub fn build(
        policy: &TokenizerSource,
        checkpoints: &[Checkpoint],
        base: usize,
        order: &[usize],
        pad_to_multiple_of: Option<usize>,
    ) -> Result<VocabPlan, MergeError> {
        let base_ck = &checkpoints[base];
        let policy_name = match policy {
            TokenizerSource::Base => "base".to_string(),
            TokenizerSource::Union => "union".to_string(),
            TokenizerSource::Model(p) => p.display().to_string(),
        };
        let mut base_vocab = Vocab::read(base_ck.dir())?.ok_or_else(|| {
            tokenizer_error(
                &base_ck.dir().join("tokenizer.json"),
                format!(
                    "is missing; `tokenizer_source: {policy_name}` aligns embedding rows by token, which needs the \
                     tokenizer.json of the base model (add it, or remove `tokenizer_source:` if the vocabularies are the same)"
                ),
            )
        })?;
        let stripped = base_vocab.strip(usable_rows(base_ck))?;

        // Every model's vocabulary; a model without tokenizer.json is taken to share the base's
        // (mergekit does the same, with a warning).
        let mut vocabs: Vec<Vocab> = Vec::with_capacity(checkpoints.len());
        for (i, ck) in checkpoints.iter().enumerate() {
            if i == base {
                vocabs.push(base_vocab.clone());
                continue;
            }
            match Vocab::read(ck.dir())? {
                Some(v) => vocabs.push(v),
                None => {
                    tracing::warn!(
                        model = %ck.dir().display(),
                        "no tokenizer.json; assuming the vocabulary of {}",
                        base_ck.dir().display()
                    );
                    vocabs.push(base_vocab.clone());
                }
            }
        }
        let limits: Vec<usize> = checkpoints.iter().map(usable_rows).collect();

        let (out, files) = match policy {
            TokenizerSource::Base => {
                let files = if stripped {
                    write_files(base_ck.dir(), &base_vocab.json, &[])?
                } else {
                    TokenizerFiles::Copy(base_ck.dir().to_path_buf())
                };
                (base_vocab, files)
            }
            TokenizerSource::Model(dir) => {
                let v = Vocab::read(dir)?.ok_or_else(|| {
                    tokenizer_error(
                        &dir.join("tokenizer.json"),
                        "is missing; `tokenizer_source: MODEL` takes the vocabulary from that model's tokenizer.json",
                    )
                })?;
                (v, TokenizerFiles::Copy(dir.clone()))
            }
            TokenizerSource::Union => {
                let mut union = base_vocab.clone();
                let mut next = union.size();
                let mut appended: Vec<Value> = Vec::new();
                let mut push = |union: &mut Vocab, entry: Value, content: &str| {
                    let mut entry = entry;
                    entry["id"] = Value::from(next);
                    union.ids.insert(content.to_string(), next);
                    appended.push(entry);
                    next += 1;
                };
                let mut seq: Vec<usize> = vec![base];
                seq.extend(order.iter().copied().filter(|&c| c != base));
                let mut seen = HashSet::new();
                seq.retain(|c| seen.insert(*c));
                // Added tokens of every model, first appearance wins: these are appended after
                // the ordinary tokens, with their settings (special, normalized, ...).
                let mut added: Vec<(String, Value)> = Vec::new();
                let mut added_names = HashSet::new();
                for &c in &seq {
                    for e in vocabs[c].added() {
                        let id = e
                            .get("id")
                            .and_then(Value::as_u64)
                            .map_or(usize::MAX, |i| i as usize);
                        let Some(content) = e.get("content").and_then(Value::as_str) else {
                            continue;
                        };
                        if id < limits[c] && added_names.insert(content.to_string()) {
                            added.push((content.to_string(), e.clone()));
                        }
                    }
                }
                for &c in &seq {
                    let tokens: Vec<String> = vocabs[c]
                        .ordinary_by_id()
                        .into_iter()
                        .filter(|&(id, _)| id < limits[c])
                        .map(|(_, t)| t.to_string())
                        .collect();
                    for t in tokens {
                        if !added_names.contains(&t) && !union.ids.contains_key(&t) {
                            push(&mut union, new_added_entry(0, &t), &t);
                        }
                    }
                }
                for (content, entry) in added {
                    if !union.ids.contains_key(&content) {
                        push(&mut union, entry, &content);
                    }
                }
                let files = if appended.is_empty() && !stripped {
                    TokenizerFiles::Copy(base_ck.dir().to_path_buf())
                } else {
                    let mut json = union.json.clone();
                    if let Some(Value::Array(list)) = json.get_mut("added_tokens") {
                        list.extend(appended.iter().cloned());
                    } else {
                        json["added_tokens"] = Value::Array(appended.clone());
                    }
                    union.json = json;
                    write_files(base_ck.dir(), &union.json, &appended)?
                };
                (union, files)
            }
        };

        let vocab_len = out.size();
        let mut by_row: Vec<Option<&str>> = vec![None; vocab_len];
        for (t, &i) in &out.ids {
            by_row[i] = Some(t.as_str());
        }
        let rows = match pad_to_multiple_of {
            Some(m) if m > 1 && vocab_len % m != 0 => (vocab_len / m + 1) * m,
            _ => vocab_len,
        };
        let perms = vocabs
            .iter()
            .zip(&limits)
            .map(|(v, &limit)| {
                by_row
                    .iter()
                    .map(|t| t.and_then(|t| v.ids.get(t).copied()).filter(|&i| i < limit))
                    .collect()
            })
            .collect();
        let summary = format!(
            "tokenizer_source {policy_name}: {vocab_len} tokens{} (vocabulary base {})",
            if rows != vocab_len {
                format!(", padded to {rows} rows")
            } else {
                String::new()
            },
            base_ck.dir().display()
        );
        Ok(VocabPlan {
            rows,
            vocab_len,
            perms,
            files,
            summary,
        })
    }

    /// Whether checkpoint `ckpt`'s rows map onto the output rows as the identity.
    fn is_identity(&self, ckpt: usize) -> bool {
        self.rows == self.vocab_len && self.perms[ckpt].iter().enumerate().all(|(r, p)| *p == Some(r))
    }

    /// Gathers the embedding-like tensors of the job's participants (distinct checkpoints,
    /// config order, base last if not among the models) into the output vocabulary.
    /// `base` is the position of the base model among `participants`, if it is one.
    pub fn align(
        &self,
        name: &str,
        participants: &[(usize, Tensor)],
        base: Option<usize>,
    ) -> Result<Vec<Tensor>, MergeError> {
        let err = |e: candle_core::Error| MergeError::Backend {
            tensor: name.to_string(),
            message: e.to_string(),
        };
        if participants.iter().all(|(c, _)| self.is_identity(*c)) {
            return participants
                .iter()
                .map(|(_, t)| {
                    t.narrow(0, 0, self.rows)
                        .and_then(|t| t.contiguous())
                        .map_err(err)
                })
                .collect();
        }
        let (dtype, cols) = {
            let t = &participants[0].1;
            (t.dtype(), t.dims().get(1).copied().unwrap_or(0))
        };

        // One fill per row that some participant lacks.
        let mut fills: Vec<(usize, Fill)> = Vec::new();
        for r in 0..self.vocab_len {
            let present: Vec<(usize, usize)> = participants
                .iter()
                .enumerate()
                .filter_map(|(p, (c, _))| self.perms[*c][r].map(|row| (p, row)))
                .collect();
            if present.len() == participants.len() {
                continue;
            }
            let fill = match present.as_slice() {
                [] => Fill::Zero,
                [(p, row)] => Fill::Row { p: *p, row: *row },
                _ => match base.and_then(|b| present.iter().find(|(p, _)| *p == b)) {
                    Some(&(p, row)) => Fill::Row { p, row },
                    None => Fill::Mean(present),
                },
            };
            fills.push((r, fill));
        }
        let fill_rows = self.fill_rows(&fills, participants, dtype, cols).map_err(err)?;
        let fill_pos: HashMap<usize, usize> = fills.iter().enumerate().map(|(i, (r, _))| (*r, i)).collect();

        let mut out = Vec::with_capacity(participants.len());
        for (c, t) in participants {
            let own = t.dims()[0];
            let indices: Vec<u32> = (0..self.vocab_len)
                .map(|r| match self.perms[*c][r] {
                    Some(row) => row as u32,
                    None => (own + fill_pos[&r]) as u32,
                })
                .collect();
            let idx = Tensor::from_vec(indices, self.vocab_len, &Device::Cpu).map_err(err)?;
            let source = match &fill_rows {
                Some(f) => Tensor::cat(&[t, f], 0).map_err(err)?,
                None => t.clone(),
            };
            let mut aligned = source.index_select(&idx, 0).map_err(err)?;
            if self.rows > self.vocab_len {
                // Padding rows: the model's mean row (mergekit's vocab-expansion rule).
                let mean = aligned
                    .to_dtype(DType::F64)
                    .and_then(|a| a.mean_keepdim(0))
                    .map_err(err)?;
                let pad = mean
                    .broadcast_as((self.rows - self.vocab_len, cols))
                    .and_then(|m| m.to_dtype(dtype))
                    .and_then(|m| m.contiguous())
                    .map_err(err)?;
                aligned = Tensor::cat(&[&aligned, &pad], 0).map_err(err)?;
            }
            out.push(aligned);
        }
        Ok(out)
    }

    /// The fill rows, in `fills` order, as one `[n, cols]` tensor of `dtype`.
    fn fill_rows(
        &self,
        fills: &[(usize, Fill)],
        participants: &[(usize, Tensor)],
        dtype: DType,
        cols: usize,
    ) -> candle_core::Result<Option<Tensor>> {
        if fills.is_empty() {
            return Ok(None);
        }
        let row = |p: usize, r: usize| -> candle_core::Result<Vec<f64>> {
            participants[p]
                .1
                .narrow(0, r, 1)?
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()
        };
        let mut values: Vec<f64> = Vec::with_capacity(fills.len() * cols);
        for (_, fill) in fills {
            match fill {
                Fill::Zero => values.extend(std::iter::repeat_n(0.0, cols)),
                Fill::Row { p, row: r } => values.extend(row(*p, *r)?),
                Fill::Mean(rows) => {
                    // As torch: zeros in the tensor dtype, `+=` each row, `/=` the count, each
                    // op rounded to the dtype (f64 then rounding is the correctly rounded op).
                    let mut acc = vec![0.0f64; cols];
                    for &(p, r) in rows {
                        for (a, v) in acc.iter_mut().zip(row(p, r)?) {
                            *a = round_to(dtype, *a + v);
                        }
                    }
                    let n = rows.len() as f64;
                    values.extend(acc.into_iter().map(|a| round_to(dtype, a / n)));
                }
            }
        }
        let t = Tensor::from_vec(values, (fills.len(), cols), &Device::Cpu)?;
        Ok(Some(if dtype == DType::F64 {
            t
        } else {
            t.to_dtype(DType::F32)?.to_dtype(dtype)?
        }))
    }
}

fn round_to(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F32 => x as f32 as f64,
        DType::BF16 => half::bf16::from_f64(x).to_f64(),
        DType::F16 => half::f16::from_f64(x).to_f64(),
        _ => x,
    }
}

/// The tokenizer files for a changed vocabulary: the new tokenizer.json, and tokenizer_config.json
/// with its `added_tokens_decoder` extended (when it has one).
fn write_files(dir: &Path, tokenizer_json: &Value, appended: &[Value]) -> Result<TokenizerFiles, MergeError> {
    let text = serde_json::to_string_pretty(tokenizer_json)
        .map_err(|e| tokenizer_error(&dir.join("tokenizer.json"), e.to_string()))?;
    let config_path = dir.join("tokenizer_config.json");
    // Rewritten only when it lists added tokens (transformers 4's `added_tokens_decoder`);
    // otherwise it is copied byte for byte (a JSON round trip would turn integers such as
    // `model_max_length` 1e30 into floats).
    let tokenizer_config = match std::fs::read_to_string(&config_path) {
        Ok(t) => {
            let mut cfg: Value = serde_json::from_str(&t)
                .map_err(|e| tokenizer_error(&config_path, format!("is not valid JSON: {e}")))?;
            match cfg.get_mut("added_tokens_decoder") {
                Some(Value::Object(dec)) if !appended.is_empty() => {
                    for e in appended {
                        if let Some(id) = e.get("id").and_then(Value::as_u64) {
                            dec.insert(id.to_string(), added_decoder_entry(e));
                        }
                    }
                    let out = serde_json::to_string_pretty(&cfg)
                        .map_err(|e| tokenizer_error(&config_path, e.to_string()))?;
                    Some(format!("{out}\n"))
                }
                _ => Some(t),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(tokenizer_error(&config_path, format!("cannot be read: {e}"))),
    };
    Ok(TokenizerFiles::Write {
        dir: dir.to_path_buf(),
        tokenizer_json: format!("{text}\n"),
        tokenizer_config,
    })
}

/// Tokenizer files that describe the vocabulary: replaced or dropped when it changes.
pub(crate) const VOCAB_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// Tokenizer files copied along with the vocabulary's source.
pub(crate) const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(json: Value) -> Vocab {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).expect("write");
        Vocab::read(dir.path()).expect("reads").expect("present")
    }

    #[test]
    fn get_vocab_includes_added_tokens_and_unigram_positions() {
        let v = vocab(serde_json::json!({
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []},
            "added_tokens": [{"id": 2, "content": "<x>", "special": true}]
        }));
        assert_eq!(v.size(), 3);
        assert_eq!(v.ids["<x>"], 2);
        assert_eq!(v.ordinary_by_id(), [(0, "a"), (1, "b")]);
        let u = vocab(serde_json::json!({"model": {"type": "Unigram", "vocab": [["x", 0.0], ["y", -1.0]]}}));
        assert_eq!(u.ids["y"], 1);
    }

    #[test]
    fn stripping_drops_tokens_beyond_the_rows_and_their_merges() {
        let mut v = vocab(serde_json::json!({
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
            "added_tokens": [{"id": 3, "content": "<x>"}]
        }));
        assert!(v.strip(2).expect("BPE strips"));
        assert_eq!(v.size(), 2);
        assert_eq!(v.json["model"]["merges"], serde_json::json!(["a b"]));
        assert!(v.json["added_tokens"].as_array().expect("list").is_empty());
        let mut v = vocab(serde_json::json!({
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b", ["ab", "b"]]}
        }));
        v.strip(2).expect("strips");
        assert_eq!(v.json["model"]["merges"], serde_json::json!(["a b"]));
    }

    #[test]
    fn bf16_mean_rounds_after_every_op() {
        // 1 + 2^-8 is not a bf16 (8 bits of mantissa): the sum rounds to even before dividing.
        let x = 1.0 + 2f64.powi(-8);
        assert_eq!(round_to(DType::BF16, x), 1.0);
        assert_eq!(round_to(DType::F32, x), x);
    }

    fn tensor(rows: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (rows.len(), 2), &Device::Cpu).expect("tensor")
    }

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().expect("2-D f32")
    }

    #[test]
    fn missing_rows_take_the_single_donor_else_the_base_else_the_mean_else_zeros() {
        // Output rows: 0 everyone; 1 only model 2; 2 models 1 and 2 (not the base, 0);
        // 3 nobody; 4 the base and model 1.
        let plan = VocabPlan {
            rows: 5,
            vocab_len: 5,
            perms: vec![
                vec![Some(0), None, None, None, Some(1)],
                vec![Some(0), None, Some(1), None, Some(2)],
                vec![Some(0), Some(1), Some(2), None, None],
            ],
            files: TokenizerFiles::Copy(PathBuf::new()),
            summary: String::new(),
        };
        let base = tensor(&[[1.0, 1.0], [4.0, 4.0]]);
        let m1 = tensor(&[[2.0, 2.0], [0.5, 1.0], [5.0, 5.0]]);
        let m2 = tensor(&[[3.0, 3.0], [7.0, 8.0], [1.5, 2.0]]);
        let parts = [(0, base), (1, m1), (2, m2)];
        let out = plan
            .align("model.embed_tokens.weight", &parts, Some(0))
            .expect("aligned");
        assert_eq!(
            rows(&out[0]),
            [
                vec![1.0, 1.0],
                vec![7.0, 8.0],
                vec![1.0, 1.5],
                vec![0.0, 0.0],
                vec![4.0, 4.0]
            ]
        );
        assert_eq!(
            rows(&out[1]),
            [
                vec![2.0, 2.0],
                vec![7.0, 8.0],
                vec![0.5, 1.0],
                vec![0.0, 0.0],
                vec![5.0, 5.0]
            ]
        );
        assert_eq!(
            rows(&out[2]),
            [
                vec![3.0, 3.0],
                vec![7.0, 8.0],
                vec![1.5, 2.0],
                vec![0.0, 0.0],
                vec![4.0, 4.0]
            ]
        );
    }

    fn model_dir(root: &Path, name: &str, tokenizer: Value, rows: usize) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let config = serde_json::json!({"architectures": ["LlamaForCausalLM"], "vocab_size": rows});
        std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).expect("tokenizer");
        let data = vec![0u8; rows * 2 * 4];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, 2], &data)
            .expect("view");
        let bytes = safetensors::serialize([("model.embed_tokens.weight", view)], None).expect("serialize");
        std::fs::write(dir.join("model.safetensors"), bytes).expect("weights");
        dir
    }

    #[test]
    fn union_keeps_base_ids_then_appends_new_ordinary_tokens_then_new_added_tokens() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = model_dir(
            tmp.path(),
            "base",
            serde_json::json!({
                "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []},
                "added_tokens": [{"id": 2, "content": "<s>", "special": true, "normalized": false}]
            }),
            3,
        );
        let other = model_dir(
            tmp.path(),
            "other",
            serde_json::json!({
                "model": {"type": "BPE", "vocab": {"a": 0, "c": 1, "b": 2, "d": 5}, "merges": []},
                "added_tokens": [
                    {"id": 4, "content": "<s>", "special": true, "normalized": false},
                    {"id": 3, "content": "<t>", "special": true, "normalized": false}
                ]
            }),
            5, // "d" (id 5) is past the embedding rows: left out, as mergekit does
        );
        let cks = [
            Checkpoint::open(&base).expect("base"),
            Checkpoint::open(&other).expect("other"),
        ];
        let plan = VocabPlan::build(&TokenizerSource::Union, &cks, 0, &[0, 1], None).expect("union");
        assert_eq!(plan.rows, 5);
        // out rows: a b <s> c <t>
        assert_eq!(plan.perms[0], [Some(0), Some(1), Some(2), None, None]);
        assert_eq!(plan.perms[1], [Some(0), Some(2), Some(4), Some(1), Some(3)]);
        let TokenizerFiles::Write { tokenizer_json, .. } = &plan.files else {
            panic!("the vocabulary changed")
        };
        let json: Value = serde_json::from_str(tokenizer_json).expect("json");
        let added = json["added_tokens"].as_array().expect("list");
        assert_eq!(added[1]["content"], "c");
        assert_eq!(
            (&added[1]["id"], &added[1]["special"], &added[1]["normalized"]),
            (&3.into(), &false.into(), &true.into())
        );
        assert_eq!(
            (&added[2]["content"], &added[2]["id"], &added[2]["special"]),
            (&"<t>".into(), &4.into(), &true.into())
        );

        // `base`: the base's vocabulary, the other model's rows permuted into it.
        let plan = VocabPlan::build(&TokenizerSource::Base, &cks, 0, &[0, 1], Some(4)).expect("base");
        assert_eq!(plan.perms[1][..3], [Some(0), Some(2), Some(4)]);
        assert_eq!((plan.rows, plan.vocab_len), (4, 3), "padded to a multiple of 4");
    }
}

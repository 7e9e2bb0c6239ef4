//! The tokenizer as lm-eval's HF backend uses it: `tokenizer.json`, no special tokens added,
//! and `_encode_pair`'s split of context and continuation.

use std::path::Path;

use tokenizers::Tokenizer;

use super::EvalError;
use crate::checkpoint::Checkpoint;

/// A Hugging Face `tokenizer.json` plus the ids lm-eval needs besides it.
#[derive(Debug, Clone)]
pub struct EvalTokenizer {
    inner: Tokenizer,
    /// Put before the continuation when the context is empty (lm-eval's `prefix_token_id`: the
    /// BOS token if the model has one, else end-of-text).
    prefix_token_id: Option<u32>,
    /// End of text; also stops a generation.
    eot_token_id: Option<u32>,
}

impl EvalTokenizer {
    /// Wraps a loaded tokenizer.
    pub fn new(inner: Tokenizer, bos_token_id: Option<u32>, eos_token_id: Option<u32>) -> EvalTokenizer {
        EvalTokenizer {
            inner,
            prefix_token_id: bos_token_id.or(eos_token_id),
            eot_token_id: eos_token_id,
        }
    }

    /// Reads `tokenizer.json`, with the BOS and EOS ids given.
    pub fn from_file(
        path: &Path,
        bos_token_id: Option<u32>,
        eos_token_id: Option<u32>,
    ) -> Result<EvalTokenizer, EvalError> {
        let inner = Tokenizer::from_file(path).map_err(|e| EvalError::Tokenizer {
            reason: format!("cannot load {}: {e}", path.display()),
        })?;
        Ok(EvalTokenizer::new(inner, bos_token_id, eos_token_id))
    }

    /// The checkpoint's `tokenizer.json`, with `bos_token_id` and `eos_token_id` from its
    /// `config.json` (the first, where a list).
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<EvalTokenizer, EvalError> {
        let id = |key: &str| {
            let v = ckpt.config().get(key)?;
            let v = v.as_array().and_then(|a| a.first()).unwrap_or(v);
            v.as_u64().and_then(|n| u32::try_from(n).ok())
        };
        let path = ckpt.dir().join("tokenizer.json");
        if !path.is_file() {
            return Err(EvalError::Tokenizer {
                reason: format!(
                    "{} has no tokenizer.json; the evaluator needs the Hugging Face tokenizer file",
                    ckpt.dir().display()
                ),
            });
        }
        EvalTokenizer::from_file(&path, id("bos_token_id"), id("eos_token_id"))
    }

    /// The wrapped tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// End-of-text id, if known.
    pub fn eot_token_id(&self) -> Option<u32> {
        self.eot_token_id
    }

    /// Token ids of `text`, no special tokens added (lm-eval's `tok_encode` for causal models).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EvalError> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| EvalError::Tokenizer {
                reason: format!("cannot encode {text:?}: {e}"),
            })?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`, special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String, EvalError> {
        self.inner.decode(ids, false).map_err(|e| EvalError::Tokenizer {
            reason: format!("cannot decode {} ids: {e}", ids.len()),
        })
    }

    /// lm-eval 0.4.13's split of a request into context and continuation ids: trailing
    /// whitespace of the context moves to the front of the continuation; the continuation's
    /// ids are those of `encode(context + continuation)` after the first
    /// `len(encode(context))`. An empty context becomes the prefix token.
    pub fn encode_pair(&self, context: &str, continuation: &str) -> Result<(Vec<u32>, Vec<u32>), EvalError> {
        if context.is_empty() {
            let prefix = self.prefix_token_id.ok_or_else(|| EvalError::Tokenizer {
                reason: "an empty context needs a BOS or EOS token id, and the model has neither".into(),
            })?;
            return Ok((vec![prefix], self.encode(continuation)?));
        }
        let kept = context.trim_end().len();
        let (context, moved) = context.split_at(kept);
        let whole = self.encode(&format!("{context}{moved}{continuation}"))?;
        let context_ids = self.encode(context)?;
        let continuation_ids = whole.get(context_ids.len()..).unwrap_or_default().to_vec();
        Ok((context_ids, continuation_ids))
    }
}

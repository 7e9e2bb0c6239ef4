//! Greedy generation until stop strings (lm-eval's `generate_until`), answer extraction and
//! exact match (lm-eval's `regex` filter + `take_first`, and `exact_match`).

use candle_core::{DType, Tensor};
use regex::Regex;

use super::task::GenerationSpec;
use super::tokenize::EvalTokenizer;
use super::EvalError;
use crate::runtime::{pad_batch, KvCache, LogitPositions, Model, Padding};

/// What an unmatched answer regex yields, as in lm-eval.
pub const INVALID_ANSWER: &str = "[invalid]";

/// Greedy decoding of batches of prompts with the KV cache.
#[derive(Debug)]
pub struct Generator<'m> {
    model: &'m Model,
    tokenizer: &'m EvalTokenizer,
    max_length: usize,
    batch_size: usize,
}

/// One finished generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Decoded text (special tokens skipped), cut before the first stop string.
    pub text: String,
    /// Prompt tokens after truncation.
    pub n_ctx_tokens: usize,
    /// Tokens generated (until a stop, end of text or the limit).
    pub n_gen_tokens: usize,
}

impl<'m> Generator<'m> {
    /// Prompts are cut to their last `max_length - max_gen_toks` tokens (lm-eval's rule);
    /// `batch_size` prompts decode together.
    pub fn new(
        model: &'m Model,
        tokenizer: &'m EvalTokenizer,
        max_length: usize,
        batch_size: usize,
    ) -> Generator<'m> {
        Generator {
            model,
            tokenizer,
            max_length,
            batch_size: batch_size.max(1),
        }
    }

    /// Generates greedily after each context until a string of `until` appears, the end-of-text
    /// token is produced, or `max_gen_toks` tokens; `done(n)` after each batch of `n`.
    pub fn generate_until(
        &self,
        contexts: &[String],
        until: &[String],
        max_gen_toks: usize,
        done: &mut dyn FnMut(usize),
    ) -> Result<Vec<Generation>, EvalError> {
        self.generate_until_or(contexts, until, max_gen_toks, &|_| false, done)
    }

    /// [`Generator::generate_until`] that also stops a row as soon as `stop(text so far)` holds
    /// (e.g. the braces of a function balance); the text is not cut there, only at `until`.
    pub fn generate_until_or(
        &self,
        contexts: &[String],
        until: &[String],
        max_gen_toks: usize,
        stop: &dyn Fn(&str) -> bool,
        done: &mut dyn FnMut(usize),
    ) -> Result<Vec<Generation>, EvalError> {
        let max_ctx = self.max_length.saturating_sub(max_gen_toks).max(1);
        let mut prompts = Vec::with_capacity(contexts.len());
        for c in contexts {
            let mut ids = self.tokenizer.encode(c)?;
            if ids.is_empty() {
                ids.extend(self.tokenizer.eot_token_id());
            }
            let cut = ids.len().saturating_sub(max_ctx);
            ids.drain(..cut);
            prompts.push(ids);
        }
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
        let mut out = vec![None; prompts.len()];
        for chunk in order.chunks(self.batch_size) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| &prompts[i][..]).collect();
            let generated = self.generate_batch(&batch, until, max_gen_toks, stop)?;
            for (&i, g) in chunk.iter().zip(generated) {
                out[i] = Some(g);
            }
            done(chunk.len());
        }
        Ok(out.into_iter().flatten().collect())
    }

    fn generate_batch(
        &self,
        prompts: &[&[u32]],
        until: &[String],
        max_gen_toks: usize,
        stop: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<Generation>, EvalError> {
        let device = self.model.embeddings().device();
        let eot = self.tokenizer.eot_token_id();
        let (ids, mask) = pad_batch(prompts, Padding::Left, 0, device)?;
        let mut cache = KvCache::new();
        let mut logits = self
            .model
            .forward_at(&ids, Some(&mask), &mut cache, false, &LogitPositions::Last)?
            .logits;
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        let mut finished = vec![max_gen_toks == 0; prompts.len()];
        for _ in 0..max_gen_toks {
            let next = last_argmax(&logits)?;
            for (r, &t) in next.iter().enumerate() {
                if finished[r] {
                    continue;
                }
                if Some(t) == eot {
                    finished[r] = true;
                    continue;
                }
                tokens[r].push(t);
                let text = self.tokenizer.decode(&tokens[r])?;
                finished[r] = tokens[r].len() >= max_gen_toks
                    || until.iter().any(|s| text.contains(s.as_str()))
                    || stop(&text);
            }
            if finished.iter().all(|&f| f) {
                break;
            }
            // Finished rows keep decoding (their output is ignored) so the batch stays square.
            let step = Tensor::from_vec(next.clone(), (next.len(), 1), device)?;
            logits = self
                .model
                .forward_at(&step, None, &mut cache, false, &LogitPositions::Last)?
                .logits;
        }
        prompts
            .iter()
            .zip(tokens)
            .map(|(p, t)| {
                let text = self
                    .tokenizer
                    .inner()
                    .decode(&t, true)
                    .map_err(|e| EvalError::Tokenizer {
                        reason: format!("cannot decode a generation: {e}"),
                    })?;
                Ok(Generation {
                    text: cut_at_stops(&text, until),
                    n_ctx_tokens: p.len(),
                    n_gen_tokens: t.len(),
                })
            })
            .collect()
    }
}

/// Argmax (first on ties) of the last position of each row of `[batch, len, vocab]` logits.
fn last_argmax(logits: &Tensor) -> Result<Vec<u32>, EvalError> {
    let last = logits
        .narrow(1, logits.dim(1)? - 1, 1)?
        .squeeze(1)?
        .to_dtype(DType::F32)?;
    // candle's argmax is not specified on ties; do it on the host to take the first.
    let rows = last.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect())
}

/// `text` before the first occurrence of each stop string, applied in order (lm-eval's
/// `for term in until: s = s.split(term)[0]`).
pub fn cut_at_stops(text: &str, until: &[String]) -> String {
    let mut s = text;
    for term in until.iter().filter(|t| !t.is_empty()) {
        if let Some(at) = s.find(term.as_str()) {
            s = &s[..at];
        }
    }
    s.to_string()
}

/// The answer regex and normalisation of a generation task, compiled.
#[derive(Debug)]
pub(crate) struct AnswerRules {
    answer: Regex,
    ignore: Vec<Regex>,
    ignore_case: bool,
}

impl AnswerRules {
    pub(crate) fn new(spec: &GenerationSpec) -> Result<AnswerRules, String> {
        let compile = |p: &str| Regex::new(p).map_err(|e| format!("invalid regex {p:?}: {e}"));
        Ok(AnswerRules {
            answer: compile(&spec.answer_regex)?,
            ignore: spec.ignore.iter().map(|p| compile(p)).collect::<Result<_, _>>()?,
            ignore_case: spec.ignore_case,
        })
    }

    /// lm-eval's regex filter with `group_select = 0`: the first match; with capture groups,
    /// its first non-empty group; stripped; [`INVALID_ANSWER`] when nothing matches.
    pub(crate) fn extract(&self, text: &str) -> String {
        let Some(caps) = self.answer.captures(text) else {
            return INVALID_ANSWER.to_string();
        };
        let m = if caps.len() > 1 {
            caps.iter().skip(1).flatten().find(|m| !m.as_str().is_empty())
        } else {
            caps.get(0)
        };
        m.map_or(INVALID_ANSWER.to_string(), |m| m.as_str().trim().to_string())
    }

    /// Whether `answer` equals `target` after normalisation.
    pub(crate) fn matches(&self, answer: &str, target: &str) -> bool {
        normalize_answer(answer, &self.ignore, self.ignore_case)
            == normalize_answer(target, &self.ignore, self.ignore_case)
    }
}

/// lm-eval's `exact_match` normalisation: each regex of `ignore` deleted in turn, then
/// lower-cased if `ignore_case`.
pub fn normalize_answer(text: &str, ignore: &[Regex], ignore_case: bool) -> String {
    let mut s = text.to_string();
    for re in ignore {
        s = re.replace_all(&s, "").into_owned();
    }
    if ignore_case {
        s = s.to_lowercase();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gsm8k() -> AnswerRules {
        AnswerRules::new(&GenerationSpec {
            until: vec!["Question:".into()],
            max_gen_toks: 256,
            answer_regex: r"#### (\-?[0-9\.\,]+)".into(),
            ignore: vec![",".into(), r"\$".into(), "(?s).*#### ".into(), r"\.$".into()],
            ignore_case: true,
        })
        .expect("valid")
    }

    #[test]
    fn gsm8k_strict_match_takes_the_first_hash_answer_and_normalises_both_sides() {
        let r = gsm8k();
        let gen = " She has 3 + 4 = 7.\n#### 1,234.\nmore #### 9";
        assert_eq!(r.extract(gen), "1,234.");
        assert!(r.matches(&r.extract(gen), "Worked text\n#### 1234"));
        assert!(!r.matches("12", "#### 1234"));
        assert_eq!(r.extract("no answer here"), INVALID_ANSWER);
    }

    #[test]
    fn stop_strings_cut_in_order() {
        let until = ["Question:".to_string(), "\n\n".to_string()];
        assert_eq!(cut_at_stops(" 5\n\nQuestion: next", &until), " 5");
        assert_eq!(cut_at_stops("no stop", &until), "no stop");
    }
}

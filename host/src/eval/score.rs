//! Log-likelihood scoring of token requests on a [`Model`], batched.
//!
//! lm-eval runs one forward per request over `(context + continuation)[-(max_length+1):][:-1]`
//! and sums the log-softmax of the continuation tokens. The choices of one item share most of
//! that input (ARC and MMLU: the whole context; WinoGrande: the sentence up to the blank), so
//! [`Batching::SharedPrefix`] runs the longest common prefix of an item's inputs once, keeps its
//! KV cache, and runs only the differing suffixes after it; several items go through each
//! forward as rows of one padded batch. [`Batching::Full`] is lm-eval's way (every request a
//! full sequence), batched by padding; both give the same numbers up to float rounding.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::EvalError;
use crate::runtime::{pad_batch, KvCache, LogitPositions, Model, Padding};

/// A request in token ids, as [`super::EvalTokenizer::encode_pair`] splits it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// Context ids.
    pub context: Vec<u32>,
    /// Continuation ids, the ones scored.
    pub continuation: Vec<u32>,
}

/// The score of one request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Loglik {
    /// Sum of `log p(token | everything before it)` over the continuation tokens (the
    /// log-softmax is computed in f64 from the model's logits).
    pub loglik: f64,
    /// Whether every continuation token is the argmax of its logits (first index on ties, as
    /// torch's `argmax`).
    pub is_greedy: bool,
}

/// The score of one continuation token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TokenScore {
    /// `log p(token | everything before it)`, the log-softmax computed in f64 from the logits.
    pub logprob: f64,
    /// Whether the token is the argmax of its logits (first index on ties, as torch's `argmax`).
    pub is_argmax: bool,
}

impl Loglik {
    /// The sum and the all-greedy flag of a request's token scores (lm-eval's `(logprob,
    /// is_greedy)`).
    pub fn of_tokens(tokens: &[TokenScore]) -> Loglik {
        Loglik {
            loglik: tokens.iter().map(|t| t.logprob).sum(),
            is_greedy: tokens.iter().all(|t| t.is_argmax),
        }
    }
}

/// How requests are packed into forward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Batching {
    /// The common prefix of an item's requests is run once and its KV cache reused for each
    /// request's suffix (default: 2-4x fewer tokens on ARC, WinoGrande and MMLU).
    #[default]
    SharedPrefix,
    /// Every request is a full sequence of its own (what lm-eval does), rows of padded batches.
    Full,
}

/// Scores groups of requests (the choices of one item form a group) on a model.
#[derive(Debug)]
pub struct Scorer<'m> {
    model: &'m Model,
    max_length: usize,
    batching: Batching,
    token_budget: usize,
}

/// One request ready for the model.
struct Prepared {
    /// What the model sees.
    input: Vec<u32>,
    /// The scored tokens: the last `continuation.len()` tokens after `input`'s positions
    /// `input.len() - continuation.len() ..`.
    continuation: Vec<u32>,
}

impl Prepared {
    /// First input position whose logits predict a continuation token.
    fn first_scored(&self) -> usize {
        self.input.len() - self.continuation.len()
    }
}

/// Per request, per scored position: `(log p, is argmax)`.
type Scored = Vec<Vec<(f64, bool)>>;

impl<'m> Scorer<'m> {
    /// A scorer that truncates inputs to the last `max_length` tokens (lm-eval's rule), packs
    /// requests as `batching` says and puts at most about `token_budget` tokens (padding
    /// included) in one forward; a single request longer than that runs alone.
    pub fn new(model: &'m Model, max_length: usize, batching: Batching, token_budget: usize) -> Scorer<'m> {
        Scorer {
            model,
            max_length: max_length.max(1),
            batching,
            token_budget,
        }
    }

    /// Scores every group; `done(n)` is called after each forward batch with the number of
    /// groups it completed. The result has the shape of `groups`.
    pub fn score(
        &self,
        groups: &[Vec<TokenRequest>],
        done: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<Loglik>>, EvalError> {
        Ok(self
            .score_tokens(groups, done)?
            .iter()
            .map(|g| g.iter().map(|tokens| Loglik::of_tokens(tokens)).collect())
            .collect())
    }

    /// As [`Scorer::score`], but per continuation token: the result has the shape of `groups`,
    /// with one [`TokenScore`] per continuation token of each request, in order.
    pub fn score_tokens(
        &self,
        groups: &[Vec<TokenRequest>],
        done: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<Vec<TokenScore>>>, EvalError> {
        let mut prepared = Vec::with_capacity(groups.len());
        let mut offset = 0;
        for g in groups {
            let mut reqs = Vec::with_capacity(g.len());
            for r in g {
                reqs.push(self.prepare(r, offset)?);
                offset += 1;
            }
            prepared.push(reqs);
        }
        let scored = match self.batching {
            Batching::SharedPrefix => self.score_shared(&prepared, done)?,
            Batching::Full => self.score_full(&prepared, done)?,
        };
        Ok(scored
            .into_iter()
            .map(|g| {
                g.into_iter()
                    .map(|per_token| {
                        per_token
                            .into_iter()
                            .map(|(logprob, is_argmax)| TokenScore { logprob, is_argmax })
                            .collect()
                    })
                    .collect()
            })
            .collect())
    }

    fn prepare(&self, r: &TokenRequest, index: usize) -> Result<Prepared, EvalError> {
        if r.continuation.len() > self.max_length {
            return Err(EvalError::Request {
                request: index,
                reason: format!(
                    "the continuation has {} tokens, more than the model's context of {}",
                    r.continuation.len(),
                    self.max_length
                ),
            });
        }
        let mut all: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
        let keep = all.len().min(self.max_length + 1);
        all.drain(..all.len() - keep);
        all.pop();
        if r.continuation.len() > all.len() {
            return Err(EvalError::Request {
                request: index,
                reason: "the context has no tokens (a whitespace-only context?)".into(),
            });
        }
        Ok(Prepared {
            input: all,
            continuation: r.continuation.clone(),
        })
    }

    /// Each group: its longest common input prefix once (rows of one batch across groups), then
    /// for each request slot, the suffixes after a clone of that cache.
    fn score_shared(
        &self,
        groups: &[Vec<Prepared>],
        done: &mut dyn FnMut(usize),
    ) -> Result<Vec<Scored>, EvalError> {
        let prefix: Vec<usize> = groups.iter().map(|g| common_prefix(g)).collect();
        let suffix_max = |g: usize| {
            groups[g]
                .iter()
                .map(|r| r.input.len() - prefix[g])
                .max()
                .unwrap_or(0)
        };
        // Longest first, so that similar lengths share a batch (less padding).
        let mut order: Vec<usize> = (0..groups.len()).collect();
        order.sort_by_key(|&g| std::cmp::Reverse((prefix[g], suffix_max(g))));

        let mut out: Vec<Scored> = groups
            .iter()
            .map(|g| {
                g.iter()
                    .map(|r| Vec::with_capacity(r.continuation.len()))
                    .collect()
            })
            .collect();
        let mut start = 0;
        while start < order.len() {
            let (mut p_max, mut s_max, mut end) = (0, 0, start);
            while end < order.len() {
                let g = order[end];
                let (p, s) = (p_max.max(prefix[g]), s_max.max(suffix_max(g)));
                let rows = end - start + 1;
                if end > start && rows * p.max(s) > self.token_budget {
                    break;
                }
                (p_max, s_max, end) = (p, s, end + 1);
            }
            let chunk = &order[start..end];
            self.run_shared_chunk(groups, &prefix, chunk, &mut out)?;
            done(chunk.len());
            start = end;
        }
        Ok(out)
    }

    fn run_shared_chunk(
        &self,
        groups: &[Vec<Prepared>],
        prefix: &[usize],
        chunk: &[usize],
        out: &mut [Scored],
    ) -> Result<(), EvalError> {
        let device = self.model.embeddings().device();
        let mut cache = KvCache::new();
        let heads: Vec<&[u32]> = chunk
            .iter()
            .map(|&g| groups[g].first().map_or(&[][..], |r| &r.input[..prefix[g]]))
            .collect();
        if heads.iter().any(|h| !h.is_empty()) {
            let (ids, mask) = pad_batch(&heads, Padding::Right, 0, device)?;
            // (group, request, row, first position, targets) of every scored span.
            let mut wanted = Vec::new();
            for (row, &g) in chunk.iter().enumerate() {
                for (r, req) in groups[g].iter().enumerate() {
                    let from = req.first_scored();
                    let to = req.input.len().min(prefix[g]);
                    if from < to {
                        wanted.push((g, r, row, from, &req.continuation[..to - from]));
                    }
                }
            }
            let rows = self.logits_at(&ids, &mask, &mut cache, &wanted)?;
            let mut rows = rows.iter();
            for &(g, r, _, _, targets) in &wanted {
                out[g][r].extend(score_rows(rows.by_ref().take(targets.len()), targets));
            }
        }
        let slots = chunk.iter().map(|&g| groups[g].len()).max().unwrap_or(0);
        // `slot` picks the request of every group in the chunk, not an element of one slice.
        #[allow(clippy::needless_range_loop)]
        for slot in 0..slots {
            let tails: Vec<&[u32]> = chunk
                .iter()
                .map(|&g| groups[g].get(slot).map_or(&[][..], |r| &r.input[prefix[g]..]))
                .collect();
            if tails.iter().all(|t| t.is_empty()) {
                continue;
            }
            let (ids, mask) = pad_batch(&tails, Padding::Right, 0, device)?;
            let mut step = cache.clone();
            let mut wanted = Vec::new();
            for (row, &g) in chunk.iter().enumerate() {
                let Some(req) = groups[g].get(slot) else { continue };
                let from = req.first_scored().max(prefix[g]);
                if from < req.input.len() {
                    let skip = from - req.first_scored();
                    wanted.push((g, slot, row, from - prefix[g], &req.continuation[skip..]));
                }
            }
            let rows = self.logits_at(&ids, &mask, &mut step, &wanted)?;
            let mut rows = rows.iter();
            for &(g, r, _, _, targets) in &wanted {
                out[g][r].extend(score_rows(rows.by_ref().take(targets.len()), targets));
            }
        }
        Ok(())
    }

    /// Every request a full row; rows sorted longest first and packed into padded batches.
    fn score_full(
        &self,
        groups: &[Vec<Prepared>],
        done: &mut dyn FnMut(usize),
    ) -> Result<Vec<Scored>, EvalError> {
        let device = self.model.embeddings().device();
        let mut reqs: Vec<(usize, usize)> = groups
            .iter()
            .enumerate()
            .flat_map(|(g, rs)| (0..rs.len()).map(move |r| (g, r)))
            .collect();
        reqs.sort_by_key(|&(g, r)| std::cmp::Reverse(groups[g][r].input.len()));
        let mut out: Vec<Scored> = groups.iter().map(|g| vec![Vec::new(); g.len()]).collect();
        let mut left: Vec<usize> = groups.iter().map(Vec::len).collect();
        let mut start = 0;
        while start < reqs.len() {
            let longest = groups[reqs[start].0][reqs[start].1].input.len().max(1);
            let rows = (self.token_budget / longest).max(1);
            let end = (start + rows).min(reqs.len());
            let batch = &reqs[start..end];
            let seqs: Vec<&[u32]> = batch.iter().map(|&(g, r)| &groups[g][r].input[..]).collect();
            let mut finished = 0;
            if seqs.iter().any(|s| !s.is_empty()) {
                let (ids, mask) = pad_batch(&seqs, Padding::Right, 0, device)?;
                let wanted: Vec<_> = batch
                    .iter()
                    .enumerate()
                    .map(|(row, &(g, r))| {
                        let req = &groups[g][r];
                        (g, r, row, req.first_scored(), &req.continuation[..])
                    })
                    .collect();
                let rows = self.logits_at(&ids, &mask, &mut KvCache::new(), &wanted)?;
                let mut rows = rows.iter();
                for &(g, r, _, _, targets) in &wanted {
                    out[g][r] = score_rows(rows.by_ref().take(targets.len()), targets);
                }
            }
            for &(g, _) in batch {
                left[g] -= 1;
                finished += usize::from(left[g] == 0);
            }
            done(finished);
            start = end;
        }
        Ok(out)
    }
}

impl Scorer<'_> {
    /// Runs `ids` after `cache` and returns the f32 logits of the positions of `wanted`
    /// (`(group, request, row, first position, targets)`), one row per target, in order.
    fn logits_at(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
        wanted: &[Wanted<'_>],
    ) -> Result<Vec<Vec<f32>>, EvalError> {
        let spans = wanted
            .iter()
            .filter(|w| !w.4.is_empty())
            .map(|&(_, _, row, from, targets)| (row, from, targets.len()))
            .collect::<Vec<_>>();
        if spans.is_empty() {
            // Still extend the cache: later suffixes attend to these tokens.
            self.model
                .forward_at(ids, Some(mask), cache, false, &LogitPositions::Last)?;
            return Ok(Vec::new());
        }
        let logits = self
            .model
            .forward_at(ids, Some(mask), cache, false, &LogitPositions::Spans(spans))?
            .logits;
        Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }
}

/// A span of scored positions: `(group, request, row, first position, targets)`.
type Wanted<'a> = (usize, usize, usize, usize, &'a [u32]);

/// Length of the longest common prefix of the inputs of a group.
fn common_prefix(group: &[Prepared]) -> usize {
    let Some(first) = group.first() else { return 0 };
    group[1..].iter().fold(first.input.len(), |n, r| {
        first.input[..n]
            .iter()
            .zip(&r.input)
            .take_while(|(a, b)| a == b)
            .count()
    })
}

/// `(log_softmax(row i)[targets[i]], targets[i] is the argmax)` for each target, from the logit
/// rows of its positions.
fn score_rows<'a>(rows: impl Iterator<Item = &'a Vec<f32>>, targets: &[u32]) -> Vec<(f64, bool)> {
    rows.zip(targets)
        .map(|(logits, &t)| log_prob_and_greedy(logits, t as usize))
        .collect()
}

/// `log_softmax(logits)[target]` in f64, and whether `target` is the first maximum.
fn log_prob_and_greedy(logits: &[f32], target: usize) -> (f64, bool) {
    let mut argmax = 0;
    for (i, &v) in logits.iter().enumerate() {
        // `>` keeps the first of equal maxima, as torch.argmax.
        if v > logits[argmax] {
            argmax = i;
        }
    }
    let max = f64::from(logits[argmax]);
    let sum: f64 = logits.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    let lp = logits
        .get(target)
        .map_or(f64::NEG_INFINITY, |&v| f64::from(v) - max - sum.ln());
    (lp, argmax == target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_prob_is_normalised_and_argmax_takes_the_first_tie() {
        let logits = [1.0f32, 3.0, 3.0, -2.0];
        let total: f64 = (0..4).map(|i| log_prob_and_greedy(&logits, i).0.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!(log_prob_and_greedy(&logits, 1).1);
        assert!(!log_prob_and_greedy(&logits, 2).1);
    }

    #[test]
    fn common_prefix_of_inputs() {
        let p = |v: &[u32]| Prepared {
            input: v.to_vec(),
            continuation: vec![0],
        };
        assert_eq!(common_prefix(&[p(&[1, 2, 3]), p(&[1, 2, 4, 5]), p(&[1, 2])]), 2);
        assert_eq!(common_prefix(&[p(&[1, 2, 3])]), 3);
        assert_eq!(common_prefix(&[p(&[7]), p(&[1])]), 0);
    }
}

//! Text generation on a [`Model`]: greedy or sampled (temperature, top-p), with a KV cache, EOS
//! ids and stop strings.

use super::{KvCache, LogitPositions, Model, RuntimeError};
use crate::backend::kernels::uniform;
use candle_core::{DType, Tensor};

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Upper bound on new tokens.
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax); otherwise softmax temperature.
    pub temperature: f64,
    /// Nucleus sampling mass (1 = off).
    pub top_p: f64,
    /// Seed of the sampler (counter-based: the same seed gives the same text).
    pub seed: u64,
    /// Generation stops when the decoded continuation contains one of these; the text is cut
    /// before it.
    pub stop: Vec<String>,
    /// Token ids that end generation (not included in the text).
    pub eos: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            eos: Vec::new(),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An EOS id was produced.
    Eos,
    /// A stop string appeared.
    StopString,
    /// `max_new_tokens` reached.
    Length,
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The new token ids (EOS excluded; tokens after a stop string may be included).
    pub tokens: Vec<u32>,
    /// The decoded continuation, cut before a stop string.
    pub text: String,
    /// Why it ended.
    pub reason: StopReason,
}

fn pick(logits: &[f32], opts: &GenerateOptions, step: u64) -> u32 {
    if opts.temperature <= 0.0 {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, ((v as f64 - max) / opts.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    if opts.top_p < 1.0 {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (k, p) in probs.iter().enumerate() {
            acc += p.1;
            if acc >= opts.top_p {
                keep = k + 1;
                break;
            }
        }
        probs.truncate(keep);
        let z: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= z);
    }
    let u = uniform(opts.seed, 0x6e6e, step);
    let mut acc = 0.0;
    for &(i, p) in &probs {
        acc += p;
        if u < acc {
            return i as u32;
        }
    }
    probs.last().map_or(0, |p| p.0 as u32)
}

/// Generates a continuation of `prompt` (token ids). `decode` turns new ids into text (for stop
/// strings and the result).
pub fn generate(
    model: &Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    decode: impl Fn(&[u32]) -> String,
) -> Result<Generation, RuntimeError> {
    if prompt.is_empty() {
        return Err(RuntimeError::Input {
            reason: "the prompt has no tokens".into(),
        });
    }
    let device = model.embeddings().device().clone();
    let mut cache = KvCache::new();
    let mut input = prompt.to_vec();
    let mut tokens = Vec::new();
    for step in 0..opts.max_new_tokens {
        let ids = Tensor::new(input.as_slice(), &device)?.unsqueeze(0)?;
        let out = model.forward_at(&ids, None, &mut cache, false, &LogitPositions::Last)?;
        let last = out
            .logits
            .get(0)?
            .get(0)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let next = pick(&last, opts, step as u64);
        if opts.eos.contains(&next) {
            return Ok(Generation {
                text: decode(&tokens),
                tokens,
                reason: StopReason::Eos,
            });
        }
        tokens.push(next);
        if !opts.stop.is_empty() {
            let text = decode(&tokens);
            if let Some(cut) = opts.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                return Ok(Generation {
                    text: text[..cut].to_string(),
                    tokens,
                    reason: StopReason::StopString,
                });
            }
        }
        input = vec![next];
    }
    Ok(Generation {
        text: decode(&tokens),
        tokens,
        reason: StopReason::Length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_argmax_and_sampling_is_reproducible() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        assert_eq!(pick(&logits, &GenerateOptions::default(), 0), 1);
        let opts = GenerateOptions {
            temperature: 1.0,
            seed: 9,
            ..GenerateOptions::default()
        };
        let a: Vec<u32> = (0..50).map(|s| pick(&logits, &opts, s)).collect();
        let b: Vec<u32> = (0..50).map(|s| pick(&logits, &opts, s)).collect();
        assert_eq!(a, b);
        assert!(
            a.contains(&3) && a.contains(&1),
            "samples both likely tokens: {a:?}"
        );
        let nucleus = GenerateOptions {
            temperature: 1.0,
            top_p: 0.3,
            seed: 9,
            ..GenerateOptions::default()
        };
        assert!(
            (0..50).all(|s| pick(&logits, &nucleus, s) == 1),
            "top_p 0.3 keeps only the best token"
        );
    }
}

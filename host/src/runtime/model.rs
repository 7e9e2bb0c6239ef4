//! The whole model: embeddings, blocks, final norm, lm_head; the KV cache; scoring.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;

use super::config::ModelConfig;
use super::layers::{AttnInputs, Block, Context, LayerCache, RmsNorm};
use super::load::ModelParts;
use super::RuntimeError;
use crate::checkpoint::Checkpoint;

/// Added to the scores a query must not see. Finite, so that a padding query that sees nothing
/// gets a uniform (ignored) distribution rather than NaN.
const MASKED: f32 = f32::MIN;

/// How a model is loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Weights and activations (f32 is the reference; bf16 halves memory).
    pub dtype: DType,
    /// Where the weights live.
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }
}

/// Which side of a batch of unequal sequences the padding goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Pads first, so that every sequence ends at the last column (for generation).
    Left,
    /// Pads last, so that every sequence starts at position 0 (for scoring).
    Right,
}

/// Token ids `[batch, len]` (u32) and their mask `[batch, len]` (u8, 1 = real token), from
/// sequences of unequal length padded with `pad_id`.
pub fn pad_batch(
    seqs: &[&[u32]],
    side: Padding,
    pad_id: u32,
    device: &Device,
) -> Result<(Tensor, Tensor), RuntimeError> {
    let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for s in seqs {
        let pad = len - s.len();
        let (before, after) = match side {
            Padding::Left => (pad, 0),
            Padding::Right => (0, pad),
        };
        ids.extend(std::iter::repeat_n(pad_id, before).chain(s.iter().copied()));
        ids.extend(std::iter::repeat_n(pad_id, after));
        mask.extend(std::iter::repeat_n(0u8, before).chain(std::iter::repeat_n(1, s.len())));
        mask.extend(std::iter::repeat_n(0u8, after));
    }
    let shape = (seqs.len(), len);
    Ok((
        Tensor::from_vec(ids, shape, device)?,
        Tensor::from_vec(mask, shape, device)?,
    ))
}

/// Keys and values of every layer, plus, per batch row, the position of each cached token
/// (`None` for padding). One cache serves one batch of sequences from prefill to the last step;
/// cloning it is cheap (tensors are shared), e.g. to score several continuations of one prompt.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    positions: Vec<Vec<Option<u32>>>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Tokens cached per row, padding included.
    pub fn len(&self) -> usize {
        self.positions.first().map_or(0, Vec::len)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which positions of a forward call get logits. The lm_head is the widest matmul of a small
/// model (SmolLM2: vocabulary 49152 against hidden 576, a fifth of the compute per token), so a
/// caller that needs a few positions asks for those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitPositions {
    /// Every position: `[batch, new_tokens, vocab]`.
    All,
    /// The last new position of each row (generation): `[batch, 1, vocab]`.
    Last,
    /// `(row, first position, count)` spans, in this order: `[sum of counts, vocab]`.
    Spans(Vec<(usize, usize, usize)>),
}

/// Logits and, when asked for, the residual stream after the embeddings and after each block.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// `[batch, new_tokens, vocab]`, or what [`LogitPositions`] says for [`Model::forward_at`].
    pub logits: Tensor,
    /// `hidden[0]`: embeddings (scaled); `hidden[i + 1]`: output of block `i`; each
    /// `[batch, new_tokens, hidden]`. Empty unless requested.
    pub hidden: Vec<Tensor>,
}

/// A decoder-only language model: embeddings, a stack of [`Block`]s, a final norm and an
/// lm_head.
#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    embed: Tensor,
    blocks: Vec<Box<dyn Block>>,
    norm: RmsNorm,
    lm_head: Linear,
    /// RoPE inverse frequencies of full and sliding layers, `[head_dim/2]`.
    inv_freq: (Vec<f32>, Vec<f32>),
}

impl Model {
    /// Loads a checkpoint in f32 on the CPU.
    pub fn load(ckpt: &Checkpoint) -> Result<Model, RuntimeError> {
        Model::load_with(ckpt, &LoadOptions::default())
    }

    /// Loads a checkpoint with the given dtype and device.
    pub fn load_with(ckpt: &Checkpoint, opts: &LoadOptions) -> Result<Model, RuntimeError> {
        let parts = ModelParts::load(ckpt, opts)?;
        let blocks = parts
            .blocks
            .into_iter()
            .map(|b| Box::new(b) as Box<dyn Block>)
            .collect();
        Ok(Model::from_parts(
            parts.config,
            parts.embed,
            blocks,
            parts.norm,
            parts.lm_head,
        ))
    }

    /// Assembles a model from parts, e.g. blocks of several checkpoints or routed blocks.
    pub fn from_parts(
        config: ModelConfig,
        embed: Tensor,
        blocks: Vec<Box<dyn Block>>,
        norm: RmsNorm,
        lm_head: Linear,
    ) -> Model {
        let inv = |theta: f64| -> Vec<f32> {
            // As transformers computes it, in f32.
            let d = config.head_dim as f32;
            (0..config.head_dim / 2)
                .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / d))
                .collect()
        };
        let inv_freq = (
            inv(config.rope_theta),
            inv(config.rope_local_theta.unwrap_or(config.rope_theta)),
        );
        Model {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            inv_freq,
        }
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The blocks, in order.
    pub fn blocks(&self) -> &[Box<dyn Block>] {
        &self.blocks
    }

    /// The embedding matrix, `[vocab, hidden]`.
    pub fn embeddings(&self) -> &Tensor {
        &self.embed
    }

    /// Logits `[batch, len, vocab]` of unpadded ids `[batch, len]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor, RuntimeError> {
        Ok(self.forward_with(ids, None, &mut KvCache::new(), false)?.logits)
    }

    /// Logits `[batch, len, vocab]` of padded ids; `mask` `[batch, len]` is nonzero on real
    /// tokens. Logits at padding positions are meaningless.
    pub fn forward_masked(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor, RuntimeError> {
        Ok(self
            .forward_with(ids, Some(mask), &mut KvCache::new(), false)?
            .logits)
    }

    /// The general call: runs the new tokens `ids` `[batch, new]` (with their padding `mask`, all
    /// real if `None`) after what `cache` holds, appends them to it, and returns their logits
    /// (and the residual stream if `hidden`). Each row's positions continue from its real
    /// tokens so far, so left-padded prompts decode correctly (padding may sit anywhere: it is
    /// never attended to and takes no position). A cache that saw an error must be dropped.
    pub fn forward_with(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        hidden: bool,
    ) -> Result<ForwardOutput, RuntimeError> {
        self.forward_at(ids, mask, cache, hidden, &LogitPositions::All)
    }

    /// [`Model::forward_with`] computing logits only at `positions` (shapes in
    /// [`LogitPositions`]); the KV cache and the hidden states are those of every position.
    pub fn forward_at(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        hidden: bool,
        positions: &LogitPositions,
    ) -> Result<ForwardOutput, RuntimeError> {
        if ids.rank() != 2 {
            return Err(RuntimeError::Input {
                reason: format!("ids must be [batch, len], got shape {:?}", ids.dims()),
            });
        }
        let host_ids = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        if let Some(&id) = host_ids
            .iter()
            .flatten()
            .find(|&&i| i as usize >= self.config.vocab_size)
        {
            return Err(RuntimeError::TokenOutOfRange {
                id,
                vocab_size: self.config.vocab_size,
            });
        }
        let real: Vec<Vec<bool>> = match mask {
            Some(m) => {
                if m.dims() != ids.dims() {
                    return Err(RuntimeError::Input {
                        reason: format!("mask {:?} and ids {:?} differ in shape", m.dims(), ids.dims()),
                    });
                }
                let m = m.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                m.into_iter()
                    .map(|r| r.into_iter().map(|v| v != 0.0).collect())
                    .collect()
            }
            None => host_ids.iter().map(|r| vec![true; r.len()]).collect(),
        };
        let ctx = self.context(&real, cache)?;
        let device = self.embed.device();
        let (b, t) = (host_ids.len(), real.first().map_or(0, Vec::len));
        let flat = Tensor::new(host_ids.concat(), device)?;
        let mut x = self.embed.index_select(&flat, 0)?.reshape((b, t, ()))?;
        if let Some(s) = self.config.embed_scale {
            // transformers rounds the scale to the activation dtype first.
            x = (x * f64::from(s as f32))?;
        }
        let mut states = Vec::new();
        cache.layers.resize_with(self.blocks.len(), LayerCache::default);
        for (block, layer) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            if hidden {
                states.push(x.clone());
            }
            x = block.forward(&x, &ctx, layer)?;
        }
        if hidden {
            states.push(x.clone());
        }
        let x = match positions {
            LogitPositions::All => x,
            LogitPositions::Last => x.narrow(1, t - 1, 1)?,
            LogitPositions::Spans(spans) => {
                let mut rows = Vec::with_capacity(spans.iter().map(|s| s.2).sum());
                for &(row, from, len) in spans {
                    if row >= b || from + len > t {
                        return Err(RuntimeError::Input {
                            reason: format!(
                                "logit span (row {row}, {from}..{}) outside the [{b}, {t}] input",
                                from + len
                            ),
                        });
                    }
                    rows.extend((from..from + len).map(|p| (row * t + p) as u32));
                }
                let idx = Tensor::from_vec(rows, (spans.iter().map(|s| s.2).sum::<usize>(),), device)?;
                x.reshape((b * t, ()))?.index_select(&idx, 0)?
            }
        };
        let mut logits = self.lm_head.forward(&self.norm.forward(&x)?)?;
        if let Some(cap) = self.config.final_logit_softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        Ok(ForwardOutput {
            logits,
            hidden: states,
        })
    }

    /// Positions of the new tokens, their RoPE angles, and the masks over all keys; records the
    /// new positions in `cache`.
    fn context(&self, real: &[Vec<bool>], cache: &mut KvCache) -> Result<Context, RuntimeError> {
        let (b, t) = (real.len(), real.first().map_or(0, Vec::len));
        if b == 0 || t == 0 || real.iter().any(|r| r.len() != t) {
            return Err(RuntimeError::Input {
                reason: format!("ids must be a non-empty [batch, len] grid (got {b} rows)"),
            });
        }
        if cache.positions.is_empty() {
            cache.positions = vec![Vec::new(); b];
        } else if cache.positions.len() != b {
            return Err(RuntimeError::Input {
                reason: format!(
                    "the cache holds {} sequences, this call has {b}",
                    cache.positions.len()
                ),
            });
        }
        let past = cache.len();
        let mut query_pos = Vec::with_capacity(b * t);
        for (row, keys) in real.iter().zip(cache.positions.iter_mut()) {
            let mut next = keys.iter().flatten().max().map_or(0, |p| p + 1);
            for &is_real in row {
                keys.push(is_real.then_some(next));
                query_pos.push(next);
                next += u32::from(is_real);
            }
        }
        let c = &self.config;
        let inputs = |inv_freq: &[f32], factor: f64, window: Option<usize>| {
            let (cos, sin) = rope_angles(&query_pos, inv_freq, factor, (b, t), &self.embed)?;
            let mask = attention_mask(&cache.positions, past, window, self.embed.device())?;
            Ok::<_, RuntimeError>(AttnInputs { cos, sin, mask })
        };
        let full = inputs(&self.inv_freq.0, c.rope_linear_factor, None)?;
        // Gemma 3's local RoPE has its own base and no scaling; otherwise it is the same RoPE.
        let local_factor = match c.rope_local_theta {
            Some(_) => 1.0,
            None => c.rope_linear_factor,
        };
        let sliding = match c.sliding_window {
            Some(w) if c.sliding_layers.iter().any(|&s| s) => {
                Some(inputs(&self.inv_freq.1, local_factor, Some(w))?)
            }
            _ => None,
        };
        Ok(Context { full, sliding })
    }

    /// Log-probability of each next token: entry `t` is `log p(ids[t+1] | ids[..=t])`, computed
    /// in f64 from the logits (empty for fewer than two ids).
    pub fn log_likelihood(&self, ids: &[u32]) -> Result<Vec<f64>, RuntimeError> {
        Ok(self.log_likelihood_batch(&[ids])?.remove(0))
    }

    /// [`Model::log_likelihood`] of several sequences in one right-padded forward.
    pub fn log_likelihood_batch(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f64>>, RuntimeError> {
        if seqs.iter().all(|s| s.len() < 2) {
            return Ok(vec![Vec::new(); seqs.len()]);
        }
        let (ids, mask) = pad_batch(seqs, Padding::Right, 0, self.embed.device())?;
        let spans: Vec<(usize, usize, usize)> = seqs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.len() >= 2)
            .map(|(r, s)| (r, 0, s.len() - 1))
            .collect();
        let logits = self
            .forward_at(
                &ids,
                Some(&mask),
                &mut KvCache::new(),
                false,
                &LogitPositions::Spans(spans),
            )?
            .logits
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut rows = logits.iter();
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if seq.len() < 2 {
                out.push(Vec::new());
                continue;
            }
            out.push(
                seq[1..]
                    .iter()
                    .zip(rows.by_ref())
                    .map(|(&next, row)| log_softmax_at(row, next as usize))
                    .collect(),
            );
        }
        Ok(out)
    }
}

/// `log_softmax(row)[i]` in f64.
fn log_softmax_at(row: &[f32], i: usize) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let sum: f64 = row.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    f64::from(row[i]) - max - sum.ln()
}

/// `cos` and `sin` `[batch, new, head_dim/2]` of RoPE at `positions` (row-major `[batch, new]`),
/// computed in f32 as transformers does, in the dtype and on the device of `like`.
fn rope_angles(
    positions: &[u32],
    inv_freq: &[f32],
    factor: f64,
    (b, t): (usize, usize),
    like: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let factor = factor as f32;
    let angles: Vec<f32> = positions
        .iter()
        .flat_map(|&p| inv_freq.iter().map(move |f| f * (p as f32 / factor)))
        .collect();
    let table =
        |v: Vec<f32>| Tensor::from_vec(v, (b, t, inv_freq.len()), like.device())?.to_dtype(like.dtype());
    Ok((
        table(angles.iter().map(|a| a.cos()).collect())?,
        table(angles.iter().map(|a| a.sin()).collect())?,
    ))
}

/// The additive f32 mask `[batch, 1, new, all]` of the last `all - past` keys of each row of
/// `positions` (position per cached key, `None` for padding) over all its keys: causal, real
/// keys only, and within `window` positions when given. A padding query sees nothing.
fn attention_mask(
    positions: &[Vec<Option<u32>>],
    past: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let (b, all) = (positions.len(), positions.first().map_or(0, Vec::len));
    let t = all - past;
    let mut mask = vec![MASKED; b * t * all];
    for (r, keys) in positions.iter().enumerate() {
        for q in 0..t {
            let Some(qp) = keys[past + q] else { continue };
            for (k, kp) in keys[..=past + q].iter().enumerate() {
                let visible =
                    kp.is_some_and(|kp| window.is_none_or(|w| (qp.saturating_sub(kp) as usize) < w));
                if visible {
                    mask[(r * t + q) * all + k] = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(mask, (b, 1, t, all), device)
}

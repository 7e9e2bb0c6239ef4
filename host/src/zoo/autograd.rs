//! The differentiable Llama forward shared by the zoo's trainers: the synthetic zoo's full
//! training ([`super::TrainModel`]) and the SmolLM2 zoo's LoRA fine-tuning
//! ([`super::lora::LoraModel`]). Same numerics as [`crate::runtime`] (RMSNorm, rotate-half RoPE,
//! grouped-query causal softmax attention, SiLU-gated MLP), built from differentiable candle
//! primitives only; a test pins the two to each other.

use candle_core::{DType, Device, Tensor, D};

/// What a Llama forward needs to know of the architecture.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dims {
    /// Residual width.
    pub hidden: usize,
    /// Decoder blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
}

/// Where a forward takes its weights from, by Hugging Face name.
pub trait Weights {
    /// The tensor called `name`.
    fn tensor(&self, name: &str) -> &Tensor;

    /// `x · Wᵀ` for the `[out, in]` weight `name` over the last dimension of `x`; an adapter may
    /// add to it.
    fn linear(&self, x: &Tensor, name: &str) -> candle_core::Result<Tensor> {
        matmul_t(x, self.tensor(name))
    }
}

/// `x · wᵀ` over the last dimension of a `[b, l, in]` tensor.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (b, l, i) = x.dims3()?;
    x.reshape((b * l, i))?.matmul(&w.t()?)?.reshape((b, l, w.dim(0)?))
}

/// RMSNorm `x / sqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// RoPE tables `[len, head_dim]`: the two halves of a head share frequencies (rotate_half pairs
/// `i` with `i + d/2`).
fn rope(d: &Dims, len: usize, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let hd = d.head_dim;
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| (1.0 / d.rope_theta.powf(2.0 * i as f64 / hd as f64)) as f32)
        .collect();
    let mut cos = Vec::with_capacity(len * hd);
    let mut sin = Vec::with_capacity(len * hd);
    for p in 0..len {
        for _half in 0..2 {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (len, hd), device)?,
        Tensor::from_vec(sin, (len, hd), device)?,
    ))
}

/// The final-normed hidden states `[batch, len, hidden]` of token ids `[batch, len]` (causal;
/// rows are right-padded and padded positions are never scored). The first `frozen` blocks run
/// without gradient tracking: nothing below them is trained, and backward stops there.
pub fn hidden_states(d: &Dims, w: &dyn Weights, ids: &Tensor, frozen: usize) -> candle_core::Result<Tensor> {
    let (b, l) = ids.dims2()?;
    let (nh, nkv, hd) = (d.heads, d.kv_heads, d.head_dim);
    let device = ids.device();
    let (cos, sin) = rope(d, l, device)?;
    let mask: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (l, l), device)?;
    let embed = w.tensor("model.embed_tokens.weight");
    let mut x = embed
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, l, d.hidden))?;
    let heads = |t: Tensor, n: usize| t.reshape((b, l, n, hd))?.transpose(1, 2);
    let rotate = |t: &Tensor| -> candle_core::Result<Tensor> {
        let x1 = t.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = t.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        t.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?
    };
    // Query head h reads key/value head h / (heads / kv_heads), as transformers' repeat_kv.
    let repeat = |t: Tensor| -> candle_core::Result<Tensor> {
        if nkv == nh {
            return Ok(t);
        }
        Tensor::cat(&vec![&t; nh / nkv], 2)?.reshape((b, nh, l, hd))
    };
    for layer in 0..d.layers {
        if layer == frozen && frozen > 0 {
            x = x.detach();
        }
        let p = format!("model.layers.{layer}");
        let n = rms_norm(&x, w.tensor(&format!("{p}.input_layernorm.weight")), d.rms_eps)?;
        let q = rotate(&heads(w.linear(&n, &format!("{p}.self_attn.q_proj.weight"))?, nh)?.contiguous()?)?;
        let k = rotate(&heads(w.linear(&n, &format!("{p}.self_attn.k_proj.weight"))?, nkv)?.contiguous()?)?;
        let v = heads(w.linear(&n, &format!("{p}.self_attn.v_proj.weight"))?, nkv)?.contiguous()?;
        let (k, v) = (repeat(k)?, repeat(v)?);
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?.broadcast_add(&mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let att = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, nh * hd))?;
        x = (x + w.linear(&att, &format!("{p}.self_attn.o_proj.weight"))?)?;
        let n = rms_norm(
            &x,
            w.tensor(&format!("{p}.post_attention_layernorm.weight")),
            d.rms_eps,
        )?;
        let gate = w.linear(&n, &format!("{p}.mlp.gate_proj.weight"))?.silu()?;
        let up = w.linear(&n, &format!("{p}.mlp.up_proj.weight"))?;
        x = (x + w.linear(&(gate * up)?, &format!("{p}.mlp.down_proj.weight"))?)?;
    }
    if frozen >= d.layers {
        x = x.detach();
    }
    rms_norm(&x, w.tensor("model.norm.weight"), d.rms_eps)
}

/// A training batch of token rows: right-padded inputs and the scored positions only.
pub struct Batch {
    /// Input ids `[rows, len]`.
    pub inputs: Tensor,
    /// Flat indices (`row · len + position`) of the scored positions.
    pub positions: Tensor,
    /// The token each scored position must predict.
    pub targets: Tensor,
    /// Number of scored positions.
    pub scored: usize,
}

impl Batch {
    /// A batch of `(ids, first)` rows: every token from index `first` on is predicted from the
    /// ones before it (so `first ≥ 1`); rows are right-padded with `pad`.
    pub fn from_rows(rows: &[(Vec<u32>, usize)], pad: u32, device: &Device) -> candle_core::Result<Batch> {
        let len = rows.iter().map(|r| r.0.len()).max().unwrap_or(2).max(2) - 1;
        let (mut inputs, mut positions, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        for (r, (ids, first)) in rows.iter().enumerate() {
            for i in 0..len {
                inputs.push(ids.get(i).copied().unwrap_or(pad));
                if i + 1 >= (*first).max(1) && i + 1 < ids.len() {
                    positions.push((r * len + i) as u32);
                    targets.push(ids[i + 1]);
                }
            }
        }
        let scored = targets.len();
        Ok(Batch {
            inputs: Tensor::from_vec(inputs, (rows.len(), len), device)?,
            positions: Tensor::from_vec(positions, scored, device)?,
            targets: Tensor::from_vec(targets, scored, device)?,
            scored,
        })
    }
}

/// Mean cross-entropy of the scored positions: the output head `[vocab, hidden]` runs on those
/// rows of `hidden` only.
pub fn scored_loss(hidden: &Tensor, head: &Tensor, batch: &Batch) -> candle_core::Result<Tensor> {
    let h = hidden.dim(D::Minus1)?;
    let rows = hidden.reshape(((), h))?.index_select(&batch.positions, 0)?;
    let logits = rows.matmul(&head.t()?)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = logp.gather(&batch.targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    (picked.sum_all()?.neg()? / batch.scored.max(1) as f64)?.to_dtype(DType::F32)
}

/// Warm-up then cosine decay to 10% of the peak `lr` over `steps`.
pub fn schedule(lr: f64, warmup: usize, steps: usize, step: usize) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let t = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
    lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

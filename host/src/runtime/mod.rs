//! The model runtime: the project's own Llama-family forward pass in candle (llama, mistral,
//! qwen2, mixtral; gemma3 by config flags), with a KV cache, batched scoring of padded
//! sequences, and per-token log-likelihoods.
//!
//! A [`Model`] is embeddings, a stack of [`Block`]s, a final [`RmsNorm`] and an lm_head. The
//! parts are public and swappable, which is what the mixture runtime builds on:
//!
//! - an [`Mlp`] is [`Mlp::Dense`] or [`Mlp::Moe`]: any experts (themselves [`Mlp`]s) behind any
//!   [`Router`] (a [`candle_nn::Linear`] for Mixtral, a Router plugin wrapped in a
//!   [`candle_core::Module`] for FFN-level mixtures);
//! - a [`Block`] is one layer of the residual stream; [`DecoderBlock`] is attention + MLP, and a
//!   routed set of blocks is another implementation that keeps one KV slot per sub-block in its
//!   [`LayerCache`];
//! - [`ModelParts::load`] reads a checkpoint into typed parts; [`Model::from_parts`] assembles a
//!   model from blocks of any origin.
//!
//! ```no_run
//! use modelglue::checkpoint::Checkpoint;
//! use modelglue::runtime::Model;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = Model::load(&Checkpoint::open("zoo/base".as_ref())?)?;
//! let per_token = model.log_likelihood(&[0, 910, 814, 737])?;
//! assert_eq!(per_token.len(), 3);
//! # Ok(())
//! # }
//! ```
//!
//! Numerics follow transformers' eager float32 path: RMSNorm `x/√(mean(x²)+ε)·w`, RoPE with
//! `rotate_half` (pairs `(i, i + d/2)`), the attention softmax in f32, Mixtral's top-k weights
//! renormalised to 1. Llama and Mixtral are pinned to transformers' logits (within 2e-5, tests
//! `runtime_forward`); Qwen2's biases and Mistral's window are pinned by invariants; Gemma 3
//! follows transformers' conventions but has no reference forward yet.

mod config;
pub mod generate;
mod layers;
mod load;
mod model;

pub use config::{Activation, Arch, ModelConfig, MoeConfig};
pub use generate::{generate, GenerateOptions, Generation, StopReason};
pub use layers::{
    transposed_linear, Attention, AttnInputs, Block, Context, DecoderBlock, DenseMlp, LayerCache, Mlp,
    MoeMlp, RmsNorm, Router,
};
pub use load::ModelParts;
pub use model::{pad_batch, ForwardOutput, KvCache, LoadOptions, LogitPositions, Model, Padding};

use crate::checkpoint::CheckpointError;

/// What can go wrong building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// `config.json` lacks a key the runtime needs, or holds a value it cannot use.
    #[error("config.json: `{key}` {reason}")]
    Config {
        /// The key, e.g. `num_attention_heads`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The `model_type` is none the runtime implements.
    #[error(
        "model_type `{model_type}` is not supported; the runtime runs llama, mistral, qwen2, \
         mixtral and gemma3_text checkpoints"
    )]
    UnsupportedArchitecture {
        /// `config["model_type"]`.
        model_type: String,
    },
    /// A weight's shape disagrees with the config.
    #[error(
        "tensor `{tensor}` has shape {found:?} but config.json implies {expected:?}; the \
         checkpoint and its config do not match"
    )]
    TensorShape {
        /// The tensor name.
        tensor: String,
        /// Shape from the config.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A token id is not below `vocab_size`.
    #[error("token id {id} is out of range for a vocabulary of {vocab_size}")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// `vocab_size`.
        vocab_size: usize,
    },
    /// The ids, mask or cache of a call do not fit together.
    #[error("invalid forward input: {reason}")]
    Input {
        /// What does not fit.
        reason: String,
    },
    /// Reading a weight failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

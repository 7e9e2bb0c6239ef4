//! modelglue host library: everything `mglue` does, usable from tests and benches.
//!
//! One module per concern: [`checkpoint`] (Hugging Face / GGUF I/O), [`config`] (mergekit YAML),
//! [`backend`] (the candle tensor layer plugins compute on), [`plugins`] (discovery and loading),
//! [`merge`] (the streaming merge engine). `cli.rs` is the only file that knows clap.

pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod eval;
pub mod merge;
pub mod plugins;
pub mod runtime;
pub mod testing;
pub mod zoo;

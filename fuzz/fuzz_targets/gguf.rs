//! The GGUF reader on arbitrary bytes: header walk, candle's parser, metadata, tensor plan,
//! tokenizer rebuild and dequantisation. Every input must give `Ok` or a `GgufError`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = modelglue::checkpoint::gguf::check_gguf_bytes(data, Path::new("fuzz.gguf"));
});

//! The safetensors header parser and tensor decoding on arbitrary bytes: every input must give
//! `Ok` or a `CheckpointError`, never a panic, an out-of-bounds read or a huge allocation.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = modelglue::checkpoint::check_safetensors_bytes(data, Path::new("fuzz.safetensors"));
});

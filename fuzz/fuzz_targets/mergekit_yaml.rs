//! The mergekit YAML parser (merge and MoE configs) on arbitrary text. Every input must give
//! `Ok` or a `ConfigError`; an accepted merge config must render back to YAML that parses again.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use modelglue::config::{AnyConfig, MergeConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let base = Path::new("/fuzz");
    if let Ok(AnyConfig::Merge(cfg)) = AnyConfig::from_yaml_str(text, base) {
        let yaml = cfg.to_yaml();
        if let Err(e) = MergeConfig::from_yaml_str(&yaml, base) {
            panic!("to_yaml output does not parse again: {e}\n---\n{yaml}");
        }
    }
});

//! The fuzz targets' entry points (see `fuzz/`) on the committed seed corpus and on every input
//! the fuzzer ever crashed on (`host/tests/data/fuzz/<target>/`): seeds must be accepted, crash
//! inputs must now give an error or `Ok`, never a panic. Runs in milliseconds on a plain
//! `cargo test`; the fuzzers themselves need nightly (README, "Safety").

use std::path::{Path, PathBuf};

use modelglue::checkpoint::check_safetensors_bytes;
use modelglue::checkpoint::gguf::check_gguf_bytes;
use modelglue::config::{AnyConfig, MergeConfig};

fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    out.sort();
    out
}

fn seeds(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let found = files(&dir, "seed-");
    assert!(!found.is_empty(), "no seeds in {}", dir.display());
    found
}

fn crashes(target: &str) -> Vec<PathBuf> {
    files(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/fuzz")
            .join(target),
        "",
    )
    .into_iter()
    .filter(|p| p.extension().is_none_or(|e| e != "md"))
    .collect()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// What the `mergekit_yaml` target checks: parse, and an accepted merge config renders to YAML
/// that parses again.
fn yaml_round_trip(data: &[u8]) -> Result<(), String> {
    let Ok(text) = std::str::from_utf8(data) else {
        return Ok(());
    };
    let base = Path::new("/fuzz");
    match AnyConfig::from_yaml_str(text, base) {
        Ok(AnyConfig::Merge(cfg)) => {
            let yaml = cfg.to_yaml();
            MergeConfig::from_yaml_str(&yaml, base)
                .map(drop)
                .map_err(|e| format!("to_yaml output does not parse again: {e}\n---\n{yaml}"))
        }
        Ok(AnyConfig::Moe(_)) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn safetensors_seeds_are_valid_files() {
    for p in seeds("safetensors") {
        let infos = check_safetensors_bytes(&read(&p), &p).unwrap_or_else(|e| panic!("{e}"));
        assert!(!infos.is_empty(), "{}", p.display());
    }
}

#[test]
fn gguf_seeds_are_convertible_models() {
    for p in seeds("gguf") {
        let report = check_gguf_bytes(&read(&p), &p).unwrap_or_else(|e| panic!("{e}"));
        assert!(report.tensors > 0, "{}", p.display());
    }
}

#[test]
fn inline_yaml_seeds_parse_and_round_trip() {
    for p in seeds("mergekit_yaml") {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let result = yaml_round_trip(&read(&p));
        // The fixture copies include configs that are meant to be refused; the inline ones not.
        if name.starts_with("seed-inline-") {
            result.unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

#[test]
fn safetensors_crash_inputs_are_errors_not_panics() {
    for p in crashes("safetensors") {
        let _ = check_safetensors_bytes(&read(&p), &p);
    }
}

#[test]
fn gguf_crash_inputs_are_errors_not_panics() {
    for p in crashes("gguf") {
        let _ = check_gguf_bytes(&read(&p), &p);
    }
}

#[test]
fn yaml_crash_inputs_are_errors_not_panics() {
    for p in crashes("mergekit_yaml") {
        if let Err(e) = yaml_round_trip(&read(&p)) {
            assert!(!e.contains("does not parse again"), "{}: {e}", p.display());
        }
    }
}

#[test]
fn huge_block_count_is_refused_before_the_plan_lists_its_tensors() {
    // Found by the gguf fuzzer: `qwen2.block_count` = 16187393 in a 3.6 KB file made the
    // converter build ~150 million tensor names before reporting the first missing one.
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz/gguf/timeout-huge-block-count");
    let err = check_gguf_bytes(&read(&p), &p).expect_err("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("qwen2.block_count") && msg.contains("16187393"),
        "{msg}"
    );
}

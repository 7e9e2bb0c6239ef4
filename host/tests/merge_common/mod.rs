//! Shared helpers of the `merge_*` tests: the fixtures, the plugin libraries of this workspace
//! (built on demand), and bit-exact comparison of safetensors outputs.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use modelglue::config::MergeConfig;
use modelglue::merge::{MergeOptions, MergePlan, MergeReport};
use modelglue::plugins::Registry;

/// The mergekit fixtures (`shared/fixtures/mergekit`).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/mergekit")
}

/// A zoo model directory.
pub fn zoo(name: &str) -> PathBuf {
    fixtures().join("zoo").join(name)
}

/// A fixture config, parsed.
pub fn case_config(case: &str) -> MergeConfig {
    let path = fixtures().join("configs").join(format!("{case}.yml"));
    MergeConfig::from_yaml_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A config from YAML text; relative paths resolve against the fixture zoo.
pub fn yaml_config(text: &str) -> MergeConfig {
    MergeConfig::from_yaml_str(text, &fixtures().join("zoo")).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `<target>/<profile>`: the test executable lives in `<target>/<profile>/deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("<target>/<profile>/deps/<test>")
        .to_path_buf()
}

/// The library of workspace plugin crate `mglue-plugin-<name>` (e.g. `"linear"`), built with
/// cargo when it is missing. `None` when it cannot be built.
pub fn plugin_library(name: &str) -> Option<PathBuf> {
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let profile = profile_dir();
    let lib = profile.join(format!("libmglue_plugin_{}.so", name.replace('-', "_")));
    if lib.exists() {
        return Some(lib);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let package = format!("mglue-plugin-{name}");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", &package])
        .current_dir(workspace());
    if profile.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    if let Some(target) = profile.parent() {
        cmd.arg("--target-dir").arg(target);
    }
    let out = cmd.output().ok()?;
    if !out.status.success() {
        eprintln!(
            "cargo build -p {package} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    lib.exists().then_some(lib)
}

/// A registry with the named workspace plugins that could be built and loaded.
pub fn registry(plugins: &[&str]) -> Registry {
    let mut reg = Registry::default();
    for p in plugins {
        if let Some(lib) = plugin_library(p) {
            reg.load_file(&lib);
        }
    }
    reg
}

/// A registry with the `linear` plugin, which every test using it needs.
pub fn linear() -> Registry {
    let reg = registry(&["linear"]);
    assert!(
        reg.get("linear").is_some(),
        "the linear plugin did not load: {:?}",
        reg.problem_messages()
    );
    reg
}

/// Plans and runs `config` into `out` (single shard).
pub fn merge(config: &MergeConfig, registry: &Registry, out: &Path) -> MergeReport {
    let plan = MergePlan::new(config, registry).unwrap_or_else(|e| panic!("plan: {e}"));
    let mut opts = MergeOptions::new(out);
    opts.threads = Some(2);
    plan.run(&opts, None).unwrap_or_else(|e| panic!("run: {e}"))
}

/// name → (dtype, shape, bytes) of every tensor in a directory's safetensors files.
pub fn tensors(dir: &Path) -> BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("list dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read safetensors");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
        for (name, view) in st.tensors() {
            out.insert(name, (view.dtype(), view.shape().to_vec(), view.data().to_vec()));
        }
    }
    out
}

/// f32 values of a tensor from [`tensors`].
pub fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Asserts that `got` holds exactly the tensors of `want` (names, dtypes, shapes, bytes).
pub fn assert_same_tensors(got: &Path, want: &Path) {
    let (g, w) = (tensors(got), tensors(want));
    assert_eq!(
        g.keys().collect::<Vec<_>>(),
        w.keys().collect::<Vec<_>>(),
        "tensor names"
    );
    for (name, (dt, shape, bytes)) in &w {
        let (gdt, gshape, gbytes) = &g[name];
        assert_eq!((gdt, gshape), (dt, shape), "{name}: dtype/shape");
        if gbytes != bytes {
            let (a, b) = (f32_values(gbytes), f32_values(bytes));
            let diff = a
                .iter()
                .zip(&b)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count();
            panic!(
                "{name}: {diff} of {} elements differ from {}",
                b.len(),
                want.display()
            );
        }
    }
}

/// config.json of a directory.
pub fn config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("config.json")).expect("json")
}

//! Helpers for the end-to-end tests: locate (and build) the real `mglue` binary and plugin
//! libraries, build the out-of-workspace plugin crates, and compare safetensors files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `shared/` beside the repository (CI lays it out the same way).
pub fn shared() -> PathBuf {
    root().join("../shared")
}

/// The mergekit fixtures.
pub fn fixtures() -> PathBuf {
    shared().join("fixtures/mergekit")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// The profile directory the tests were built in (`debug` or `release`).
fn profile_dir() -> PathBuf {
    // The test executable lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| target_dir().join("debug"))
}

fn run_cargo(args: &[&str], dir: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo {args:?} in {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `mglue` binary and the workspace plugins, built once per test process (a no-op when
/// `cargo build --workspace` already ran).
pub fn mglue() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let profile = profile_dir();
            let mut args = vec!["build", "--workspace", "--bins", "--lib"];
            if profile.file_name().is_some_and(|n| n == "release") {
                args.push("--release");
            }
            run_cargo(&args, &root());
            let exe = profile.join("mglue");
            assert!(exe.exists(), "{} was not built", exe.display());
            exe
        })
        .clone()
}

/// A workspace plugin's library file, e.g. `plugin_so("linear")`.
pub fn plugin_so(name: &str) -> PathBuf {
    let exe = mglue();
    exe.parent()
        .expect("bin dir")
        .join(format!("libmglue_plugin_{name}.so"))
}

/// Builds an out-of-workspace plugin crate under `tests/` with `features`, and copies its
/// library to `dest`. Builds are serialised: variants share one target directory.
pub fn build_external(crate_dir: &str, lib_name: &str, features: &[&str], dest: &Path) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = root().join("tests").join(crate_dir);
    let target = target_dir().join("e2e");
    let target_s = target.to_string_lossy().to_string();
    let feats = features.join(",");
    let mut args = vec!["build", "--quiet", "--target-dir", target_s.as_str()];
    if !features.is_empty() {
        args.extend(["--features", feats.as_str()]);
    }
    run_cargo(&args, &dir);
    let built = target.join("debug").join(format!("lib{lib_name}.so"));
    std::fs::create_dir_all(dest).expect("create plugin dir");
    let out = dest.join(format!(
        "lib{lib_name}{}.so",
        if feats.is_empty() {
            String::new()
        } else {
            format!("_{}", feats.replace(',', "_"))
        }
    ));
    std::fs::copy(&built, &out).unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
    out
}

/// Runs `mglue` with `args` (no plugins from MGLUE_PLUGIN_PATH), returning its output.
pub fn run_mglue(args: &[&str]) -> Output {
    Command::new(mglue())
        .args(args)
        .env_remove("MGLUE_PLUGIN_PATH")
        .output()
        .expect("mglue runs")
}

/// Text of stdout + stderr.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// All tensors of a checkpoint directory: name → (dtype, shape, bytes), across shards.
pub fn read_tensors(dir: &Path) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("read checkpoint dir") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).expect("read shard");
            let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
            for (name, view) in st.tensors() {
                out.insert(
                    name.to_string(),
                    (
                        format!("{:?}", view.dtype()),
                        view.shape().to_vec(),
                        view.data().to_vec(),
                    ),
                );
            }
        }
    }
    out
}

/// Asserts that two checkpoints hold the same tensors, bit for bit.
pub fn assert_same_tensors(actual: &Path, expected: &Path) {
    let (a, e) = (read_tensors(actual), read_tensors(expected));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        e.keys().collect::<Vec<_>>(),
        "tensor names differ"
    );
    for (name, (edt, eshape, ebytes)) in &e {
        let (adt, ashape, abytes) = &a[name];
        assert_eq!((adt, ashape), (edt, eshape), "{name}: dtype/shape");
        if abytes != ebytes {
            let width = if edt == "F32" { 4 } else { 2 };
            let differing = abytes
                .chunks(width)
                .zip(ebytes.chunks(width))
                .filter(|(x, y)| x != y)
                .count();
            panic!(
                "{name}: {differing} of {} elements differ from {}",
                ebytes.len() / width,
                expected.display()
            );
        }
    }
}

//! Plugins as users meet them: libraries built outside the workspace, dropped into a directory
//! and used by the already-built `mglue`; a plugin built against the frozen plugin-api 1.0 in a
//! host that has since gained ops; and every way a library can fail to load or misbehave.

use modelglue_e2e::{build_external, fixtures, plugin_so, read_tensors, run_mglue, text};
use std::path::{Path, PathBuf};

fn zoo(name: &str) -> String {
    fixtures().join("zoo").join(name).to_string_lossy().into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn dropin_dir(tmp: &Path) -> PathBuf {
    let dir = tmp.join("plugins");
    build_external("dropin-plugin", "mglue_dropin_plugin", &[], &dir);
    dir
}

#[test]
fn dropped_in_plugin_is_listed_and_merges_with_the_prebuilt_host() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = dropin_dir(tmp.path());
    let o = run_mglue(&["--plugin-dir", s(&dir), "plugins", "list"]);
    assert!(o.status.success(), "{}", text(&o));
    let list = text(&o);
    for name in ["lerp_pair", "always_panics", "fail_on", "linear"] {
        assert!(list.contains(name), "{name} missing from:\n{list}");
    }
    let o = run_mglue(&["--plugin-dir", s(&dir), "plugins", "show", "lerp_pair", "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        shown["params_schema"]["properties"]["t"]["type"], "number",
        "{shown}"
    );

    let out = tmp.path().join("merged");
    let o = run_mglue(&[
        "--plugin-dir",
        s(&dir),
        "merge",
        "--method",
        "lerp_pair",
        "--model",
        &zoo("ft1"),
        "--model",
        &zoo("ft3"),
        "--param",
        "t=0.25",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let (a, b, m) = (
        read_tensors(Path::new(&zoo("ft1"))),
        read_tensors(Path::new(&zoo("ft3"))),
        read_tensors(&out),
    );
    for (name, (_, _, bytes)) in &m {
        let (x, y, got) = (f32s(&a[name].2), f32s(&b[name].2), f32s(bytes));
        for i in 0..got.len() {
            // candle: a + (b − a)·t, each op rounded in f32.
            let want = x[i] + (y[i] - x[i]) * 0.25f32;
            assert_eq!(got[i].to_bits(), want.to_bits(), "{name}[{i}]");
        }
    }
}

#[test]
fn plugin_built_against_frozen_api_1_0_loads_and_merges_in_a_newer_host() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("plugins");
    build_external("old-plugin", "mglue_old_plugin", &[], &dir);
    let o = run_mglue(&["--plugin-dir", s(&dir), "plugins", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let old = list
        .as_array()
        .expect("array")
        .iter()
        .find(|p| p["name"] == "old_mean")
        .expect("old_mean listed");
    assert_eq!(old["api_version"], "1.0.0");
    let linear = list
        .as_array()
        .expect("array")
        .iter()
        .find(|p| p["name"] == "linear")
        .expect("linear listed");
    assert_ne!(
        linear["api_version"], "1.0.0",
        "the host's own plugins are newer than 1.0"
    );

    let out = tmp.path().join("merged");
    let o = run_mglue(&[
        "--plugin-dir",
        s(&dir),
        "merge",
        "--method",
        "old_mean",
        "--model",
        &zoo("ft1"),
        "--model",
        &zoo("ft2"),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let (a, b, m) = (
        read_tensors(Path::new(&zoo("ft1"))),
        read_tensors(Path::new(&zoo("ft2"))),
        read_tensors(&out),
    );
    for (name, (_, _, bytes)) in &m {
        let (x, y, got) = (f32s(&a[name].2), f32s(&b[name].2), f32s(bytes));
        for i in 0..got.len() {
            assert_eq!(
                got[i].to_bits(),
                ((x[i] + y[i]) * 0.5f32).to_bits(),
                "{name}[{i}]"
            );
        }
    }
}

#[test]
fn incompatible_plugins_are_refused_with_one_short_line_and_the_host_goes_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("plugins");
    let abi2 = build_external("old-plugin", "mglue_old_plugin", &["abi2"], &dir);
    let layout = build_external("old-plugin", "mglue_old_plugin", &["bad-layout"], &dir);
    std::fs::write(dir.join("libnot_a_library.so"), b"#!/bin/sh\necho hello\n").expect("write");
    let libm = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
    ]
    .iter()
    .map(Path::new)
    .find(|p| p.exists())
    .expect("a system libm to copy");
    std::fs::copy(libm, dir.join("libplain_c_library.so")).expect("copy libm");

    let o = run_mglue(&["--plugin-dir", s(&dir), "plugins", "list"]);
    assert!(o.status.success(), "the host goes on: {}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    let line = |needle: &str| -> String {
        stderr
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line about {needle} in:\n{stderr}"))
            .to_string()
    };
    let l = line(abi2.file_name().and_then(|n| n.to_str()).expect("name"));
    assert!(l.contains("ABI 2.0.0") && l.contains("rebuild"), "{l}");
    let l = line(layout.file_name().and_then(|n| n.to_str()).expect("name"));
    assert!(l.contains("layout") && l.contains("rebuild"), "{l}");
    assert!(line("libnot_a_library.so").contains("not a loadable shared library"));
    assert!(line("libplain_c_library.so").contains("not a modelglue plugin"));
    assert!(
        stderr.len() < 2000,
        "messages stay short, not abi_stable's layout dumps:\n{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("linear"),
        "good plugins still load"
    );
}

#[test]
fn a_panicking_plugin_is_contained_and_reported() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = dropin_dir(tmp.path());
    let out = tmp.path().join("merged");
    let o = run_mglue(&[
        "--plugin-dir",
        s(&dir),
        "merge",
        "--method",
        "always_panics",
        "--model",
        &zoo("ft1"),
        "--out",
        s(&out),
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "an error exit, not an abort: {}",
        text(&o)
    );
    let msg = text(&o);
    assert!(
        msg.contains("panicked") && msg.contains("deliberate panic") && msg.contains("always_panics"),
        "{msg}"
    );
    assert!(!out.exists());
}

#[test]
fn two_plugins_with_one_name_are_reported_naming_both_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let copy = dir.join("libmglue_plugin_linear_copy.so");
    std::fs::copy(plugin_so("linear"), &copy).expect("copy linear");
    let o = run_mglue(&["--plugin-dir", s(&dir), "plugins", "list"]);
    assert!(o.status.success());
    let msg = text(&o);
    let line = msg
        .lines()
        .find(|l| l.contains("two plugins are named `linear`"))
        .unwrap_or_else(|| panic!("{msg}"));
    assert!(
        line.contains("libmglue_plugin_linear_copy.so") && line.contains("libmglue_plugin_linear.so"),
        "{line}"
    );
}

#[test]
fn a_merge_that_fails_midway_leaves_nothing_at_the_target() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = dropin_dir(tmp.path());
    let out = tmp.path().join("merged");
    let o = run_mglue(&[
        "--plugin-dir",
        s(&dir),
        "merge",
        "--method",
        "fail_on",
        "--param",
        "tensor=model.norm.weight",
        "--model",
        &zoo("ft1"),
        "--threads",
        "1",
        "--out",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("model.norm.weight"), "{}", text(&o));
    assert!(!out.exists(), "no directory at the target");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("read tmp")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("mglue-partial"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "partial directory left behind: {leftovers:?}"
    );
}

#[test]
fn plugin_log_events_reach_the_host_subscriber() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = dropin_dir(tmp.path());
    let out = tmp.path().join("merged");
    let o = run_mglue(&[
        "-v",
        "--plugin-dir",
        s(&dir),
        "merge",
        "--method",
        "lerp_pair",
        "--model",
        &zoo("ft1"),
        "--model",
        &zoo("ft2"),
        "--param",
        "t=0.5",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("lerp_pair merging"),
        "{}",
        text(&o)
    );
}

#[test]
fn world_writable_plugin_directories_are_refused_unless_allowed() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = dropin_dir(tmp.path());
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let o = run_mglue(&["--plugin-dir", s(&dir), "plugins", "list"]);
    assert!(
        text(&o).contains("writable by every user") && !text(&o).contains("lerp_pair "),
        "{}",
        text(&o)
    );
    let o = run_mglue(&[
        "--allow-insecure-plugin-dir",
        "--plugin-dir",
        s(&dir),
        "plugins",
        "list",
    ]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("lerp_pair"),
        "{}",
        text(&o)
    );
}

#[test]
fn ctrl_c_during_a_merge_leaves_nothing_at_the_target() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = dropin_dir(tmp.path());
    let out = tmp.path().join("merged");
    let child = std::process::Command::new(modelglue_e2e::mglue())
        .args([
            "--plugin-dir",
            s(&dir),
            "merge",
            "--method",
            "fail_on",
            "--param",
            "tensor=none",
            "--param",
            "sleep_ms=300",
            "--threads",
            "1",
            "--model",
            &zoo("ft1"),
            "--out",
            s(&out),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn mglue");
    // Wait until the partial directory exists, i.e. the run is writing.
    let started = std::time::Instant::now();
    while !std::fs::read_dir(tmp.path())
        .expect("read tmp")
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains("mglue-partial"))
    {
        assert!(started.elapsed().as_secs() < 60, "merge never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let o = child.wait_with_output().expect("wait");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("interrupted"), "{}", text(&o));
    assert!(!out.exists());
    assert!(
        !std::fs::read_dir(tmp.path())
            .expect("read tmp")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("mglue-partial")),
        "partial directory removed"
    );
}

#[test]
fn locked_runs_refuse_libraries_missing_from_the_lock_or_changed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(plugin_so("linear"), dir.join("liblocked_linear.so")).expect("copy");
    let lock = tmp.path().join("plugins.lock");
    // Lock only what this directory provides (the executable's directory has `linear` too, so
    // that copy is a duplicate and not locked).
    let o = run_mglue(&["--plugin-dir", s(&dir), "plugins", "lock", "--out", s(&lock)]);
    assert!(o.status.success(), "{}", text(&o));
    let text_lock = std::fs::read_to_string(&lock).expect("lock written");
    assert!(
        text_lock.contains("liblocked_linear.so") && text_lock.contains("sha256"),
        "{text_lock}"
    );

    let dropin = build_external("dropin-plugin", "mglue_dropin_plugin", &[], &dir);
    let locked = format!("--locked={}", lock.display());
    let o = run_mglue(&[&locked, "--plugin-dir", s(&dir), "plugins", "list"]);
    let msg = text(&o);
    let dropin_name = dropin.file_name().and_then(|n| n.to_str()).expect("name");
    assert!(
        msg.lines()
            .any(|l| l.contains(dropin_name) && l.contains("not in the lock file")),
        "{msg}"
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("lerp_pair"), "{msg}");
    // A changed library (same name, other bytes) is refused too.
    std::fs::copy(&dropin, dir.join("liblocked_linear.so")).expect("swap library");
    let o = run_mglue(&[&locked, "--plugin-dir", s(&dir), "plugins", "list"]);
    assert!(text(&o).contains("differs from the locked"), "{}", text(&o));
}

//! Reliability of the real `mglue` binary on bad weights and bad luck: NaN/Inf in inputs and
//! outputs, config.json that lies about shapes, a full disk (a file-size limit, and a real
//! full tmpfs where mounting is permitted), a SIGKILL mid-merge, and a 12-model merge whose
//! measured peak memory must stay within the bound the pre-flight estimate prints.
//!
//! Linux only (rlimits, `wait4`, `/proc`, `unshare`). The few libc calls are declared here
//! rather than adding a dependency for one test file.

#![cfg(target_os = "linux")]

use modelglue_e2e::{build_external, fixtures, mglue, read_tensors, run_mglue, text};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod sys {
    //! `wait4`, `setrlimit` and `signal` of glibc/musl on 64-bit Linux.
    #[repr(C)]
    #[derive(Default)]
    pub struct Timeval {
        pub sec: i64,
        pub usec: i64,
    }
    /// `struct rusage`: two timevals, then 14 longs starting with `ru_maxrss` (KiB).
    #[repr(C)]
    #[derive(Default)]
    pub struct Rusage {
        pub utime: Timeval,
        pub stime: Timeval,
        pub maxrss: i64,
        pub rest: [i64; 13],
    }
    #[repr(C)]
    pub struct Rlimit {
        pub cur: u64,
        pub max: u64,
    }
    pub const RLIMIT_FSIZE: i32 = 1;
    pub const SIGXFSZ: i32 = 25;
    pub const SIG_IGN: usize = 1;
    extern "C" {
        pub fn wait4(pid: i32, status: *mut i32, options: i32, rusage: *mut Rusage) -> i32;
        pub fn setrlimit(resource: i32, rlim: *const Rlimit) -> i32;
        pub fn signal(signum: i32, handler: usize) -> usize;
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A `--model` flag with weight 1 (linear needs one per model).
fn w(p: &Path) -> String {
    format!("{}:weight=1", s(p))
}

fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("mglue-partial"))
        .collect()
}

/// A Llama-shaped checkpoint of f32 or f16 tensors: `tensors` are (name, shape), values from
/// `value(tensor index, element index)`.
fn write_model(
    dir: &Path,
    hidden: usize,
    layers: usize,
    vocab: usize,
    dtype: safetensors::Dtype,
    value: impl Fn(usize, usize) -> f32,
) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let ffn = hidden * 11 / 4;
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![vocab, hidden])];
    for l in 0..layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        shapes.push((p("input_layernorm.weight"), vec![hidden]));
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            shapes.push((p(&format!("self_attn.{n}.weight")), vec![hidden, hidden]));
        }
        shapes.push((p("mlp.gate_proj.weight"), vec![ffn, hidden]));
        shapes.push((p("mlp.up_proj.weight"), vec![ffn, hidden]));
        shapes.push((p("mlp.down_proj.weight"), vec![hidden, ffn]));
        shapes.push((p("post_attention_layernorm.weight"), vec![hidden]));
    }
    shapes.push(("model.norm.weight".into(), vec![hidden]));
    shapes.push(("lm_head.weight".into(), vec![vocab, hidden]));
    let data: Vec<Vec<u8>> = shapes
        .iter()
        .enumerate()
        .map(|(t, (_, shape))| {
            let n: usize = shape.iter().product();
            match dtype {
                safetensors::Dtype::F32 => (0..n).flat_map(|i| value(t, i).to_le_bytes()).collect(),
                // Small positive f16 values by bit pattern (exponent 0b01100..0b01110).
                _ => (0..n)
                    .flat_map(|i| ((0x3000 + (t * 131 + i * 7) % 0x0c00) as u16).to_le_bytes())
                    .collect(),
            }
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = shapes
        .iter()
        .zip(&data)
        .map(|((name, shape), bytes)| {
            let view = safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes).expect("view");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).expect("write safetensors");
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "torch_dtype": if dtype == safetensors::Dtype::F32 { "float32" } else { "float16" },
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
}

fn small(dir: &Path, value: impl Fn(usize, usize) -> f32) {
    write_model(dir, 32, 2, 64, safetensors::Dtype::F32, value);
}

fn smooth(t: usize, i: usize) -> f32 {
    ((t * 31 + i * 7) % 97) as f32 / 97.0 - 0.5
}

// ---- NaN / Inf ---------------------------------------------------------------------------

const POISONED: &str = "model.layers.1.mlp.up_proj.weight";

fn poisoned_pair(tmp: &Path) -> (PathBuf, PathBuf) {
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    small(&a, smooth);
    // Tensor index of POISONED in write_model's order: embed, then 9 per layer.
    small(&b, |t, i| {
        if t == 1 + 9 + 6 && (i == 5 || i == 9) {
            f32::NAN
        } else {
            smooth(t, i)
        }
    });
    (a, b)
}

#[test]
fn nan_in_an_input_is_refused_naming_the_file_and_the_tensor() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = poisoned_pair(tmp.path());
    let out = tmp.path().join("merged");
    let o = run_mglue(&[
        "merge",
        "--method",
        "linear",
        "--model",
        &w(&a),
        "--model",
        &w(&b),
        "--out",
        s(&out),
    ]);
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(2), "{msg}");
    assert!(
        msg.contains(s(&b.join("model.safetensors")))
            && msg.contains(POISONED)
            && msg.contains("2 NaN values")
            && msg.contains("--allow-nonfinite"),
        "{msg}"
    );
    assert!(!msg.contains("panicked"), "{msg}");
    assert!(
        !out.exists() && partials(tmp.path()).is_empty(),
        "nothing at the target"
    );

    // A plain copy (passthrough, bytes straight from the file) is checked too.
    let cfg = tmp.path().join("copy.yml");
    std::fs::write(
        &cfg,
        format!("merge_method: passthrough\nmodels:\n  - model: {}\n", s(&b)),
    )
    .expect("cfg");
    let o = run_mglue(&["merge", s(&cfg), "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains(POISONED), "{}", text(&o));
}

#[test]
fn allow_nonfinite_merges_with_a_warning_naming_the_tensor() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = poisoned_pair(tmp.path());
    let out = tmp.path().join("merged");
    let o = run_mglue(&[
        "merge",
        "--method",
        "linear",
        "--model",
        &w(&a),
        "--model",
        &w(&b),
        "--allow-nonfinite",
        "--out",
        s(&out),
    ]);
    let msg = text(&o);
    assert!(o.status.success(), "{msg}");
    assert!(
        msg.contains("WARN") && msg.contains(POISONED) && msg.contains("--allow-nonfinite"),
        "{msg}"
    );
    let merged = &read_tensors(&out)[POISONED].2;
    let nan = merged
        .chunks_exact(4)
        .filter(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_nan());
    assert_eq!(nan.count(), 2);
}

#[test]
fn a_merge_that_produces_inf_from_finite_inputs_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    // Finite in f32, but 1e5 does not fit in float16 (max 65504).
    small(&a, |t, i| if t == 3 && i == 0 { 1e5 } else { smooth(t, i) });
    small(&b, |t, i| if t == 3 && i == 0 { 1e5 } else { smooth(t, i) });
    let out = tmp.path().join("merged");
    let (wa, wb) = (w(&a), w(&b));
    let o = run_mglue(&[
        "merge",
        "--method",
        "linear",
        "--model",
        &wa,
        "--model",
        &wb,
        "--out-dtype",
        "float16",
        "--out",
        s(&out),
    ]);
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(2), "{msg}");
    assert!(
        msg.contains("model.layers.0.self_attn.k_proj.weight")
            && msg.contains("1 infinite value")
            && msg.contains("out_dtype float16"),
        "{msg}"
    );
    assert!(!out.exists() && partials(tmp.path()).is_empty());

    // The method itself overflowing f32: weights of 1e38 without normalisation.
    let (c, d) = (tmp.path().join("c"), tmp.path().join("d"));
    small(&c, |_, _| 4.0);
    small(&d, |_, _| 4.0);
    let o = run_mglue(&[
        "merge",
        "--method",
        "linear",
        "--model",
        &format!("{}:weight=1e38", s(&c)),
        "--model",
        &format!("{}:weight=1e38", s(&d)),
        "--param",
        "normalize=false",
        "--out",
        s(&out),
    ]);
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(2), "{msg}");
    assert!(
        msg.contains("method `linear` produced") && msg.contains("infinite"),
        "{msg}"
    );
    assert!(!out.exists() && partials(tmp.path()).is_empty());
}

// ---- config.json that lies -----------------------------------------------------------------

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read").flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

fn lie(dir: &Path, key: &str, value: u64) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
    cfg[key] = value.into();
    std::fs::write(&path, cfg.to_string()).expect("write");
}

#[test]
fn config_json_that_lies_about_shapes_is_one_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ft2 = fixtures().join("zoo/ft2");
    for (key, value, needle) in [
        ("hidden_size", 128, "model.embed_tokens.weight"),
        ("vocab_size", 999, "model.embed_tokens.weight"),
        ("num_hidden_layers", 3, "model.layers.1."),
    ] {
        let liar = tmp.path().join(format!("liar-{key}"));
        copy_dir(&fixtures().join("zoo/ft1"), &liar);
        lie(&liar, key, value);
        let out = tmp.path().join("merged");
        let o = run_mglue(&[
            "merge",
            "--method",
            "linear",
            "--model",
            &w(&liar),
            "--model",
            &w(&ft2),
            "--out",
            s(&out),
        ]);
        let msg = text(&o);
        assert_eq!(o.status.code(), Some(2), "{key}: {msg}");
        assert!(
            msg.contains(s(&liar.join("config.json")))
                && msg.contains(&format!("`{key}` is {value}"))
                && msg.contains(needle),
            "{key}: {msg}"
        );
        assert!(!out.exists());

        // The runtime refuses it too, with one error and no panic.
        let o = run_mglue(&[
            "generate",
            "--model",
            s(&liar),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "1",
            "--raw",
        ]);
        let msg = text(&o);
        assert!(
            !o.status.success(),
            "{key}: the runtime accepted a lying config: {msg}"
        );
        assert!(!msg.contains("panicked"), "{key}: {msg}");
        assert!(msg.contains("error"), "{key}: {msg}");
    }
}

// ---- full disk -------------------------------------------------------------------------------

/// A model whose merged output is about 1.2 MB (f32).
fn megabyte_models(tmp: &Path) -> (PathBuf, PathBuf) {
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    write_model(&a, 128, 2, 256, safetensors::Dtype::F32, smooth);
    write_model(&b, 128, 2, 256, safetensors::Dtype::F32, |t, i| smooth(t, i + 1));
    (a, b)
}

#[test]
fn a_file_size_limit_makes_the_write_fail_and_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = megabyte_models(tmp.path());
    let out = tmp.path().join("merged");
    let mut cmd = Command::new(mglue());
    cmd.args([
        "merge",
        "--method",
        "linear",
        "--model",
        &w(&a),
        "--model",
        &w(&b),
        "--out",
        s(&out),
    ])
    .env_remove("MGLUE_PLUGIN_PATH");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // Writes past 256 KiB fail with EFBIG instead of killing the process (SIGXFSZ).
            sys::signal(sys::SIGXFSZ, sys::SIG_IGN);
            let lim = sys::Rlimit {
                cur: 256 << 10,
                max: 256 << 10,
            };
            if sys::setrlimit(sys::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().expect("mglue runs");
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(2), "{msg}");
    assert!(msg.contains("File too large"), "the OS error is shown: {msg}");
    assert!(
        msg.contains("nothing is left at the target"),
        "and what it means: {msg}"
    );
    assert!(msg.contains("merged"), "the output is named: {msg}");
    assert!(!out.exists(), "no checkpoint at the target");
    assert!(
        partials(tmp.path()).is_empty(),
        "temporary directory removed: {:?}",
        partials(tmp.path())
    );
}

#[test]
fn a_full_tmpfs_mid_merge_leaves_nothing_at_the_target() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = megabyte_models(tmp.path());
    let mnt = tmp.path().join("small-disk");
    std::fs::create_dir(&mnt).expect("mkdir");
    // A private mount namespace (and user namespace where unprivileged): nothing outlives the
    // command. 512 KiB holds the sparse pre-sized shard but not its data, so the failure comes
    // from a write in the middle of the merge.
    let script = format!(
        "mount -t tmpfs -o size=512k tmpfs '{m}' || exit 97\n\
         '{mglue}' merge --method linear --model '{a}:weight=1' --model '{b}:weight=1' --out '{m}/merged'\n\
         echo \"rc=$?\"\n\
         ls -A '{m}'\n",
        m = s(&mnt),
        mglue = s(&mglue()),
        a = s(&a),
        b = s(&b),
    );
    let o = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .env_remove("MGLUE_PLUGIN_PATH")
        .stdin(Stdio::null())
        .output();
    let o = match o {
        Ok(o) if o.status.code() != Some(97) && !text(&o).contains("unshare:") => o,
        Ok(o) => {
            println!("skipped: cannot mount a private tmpfs here: {}", text(&o).trim());
            return;
        }
        Err(e) => {
            println!("skipped: unshare is not available: {e}");
            return;
        }
    };
    let msg = text(&o);
    assert!(msg.contains("rc=2"), "{msg}");
    assert!(
        msg.contains("No space left on device"),
        "the OS error is shown: {msg}"
    );
    assert!(
        msg.contains("Free space on that file system"),
        "and what to do: {msg}"
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let listing: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("rc="))
        .skip(1)
        .collect();
    assert!(
        listing.is_empty(),
        "the full disk holds nothing afterwards: {listing:?}\n{msg}"
    );
}

// ---- SIGKILL -------------------------------------------------------------------------------

#[test]
fn a_killed_merge_leaves_a_hidden_partial_that_the_next_run_removes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    small(&a, smooth);
    small(&b, |t, i| smooth(t, i + 3));
    let out = tmp.path().join("merged");
    // The drop-in test plugin's `fail_on` sleeps in every tensor, so the run is certainly still
    // writing when it is killed.
    let plugins = tmp.path().join("plugins");
    build_external("dropin-plugin", "mglue_dropin_plugin", &[], &plugins);
    let mut child = Command::new(mglue())
        .args([
            "--plugin-dir",
            s(&plugins),
            "merge",
            "--method",
            "fail_on",
            "--param",
            "tensor=none",
        ])
        .args([
            "--param",
            "sleep_ms=200",
            "--threads",
            "1",
            "--model",
            s(&a),
            "--out",
            s(&out),
        ])
        .env_remove("MGLUE_PLUGIN_PATH")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mglue");
    let started = Instant::now();
    while partials(tmp.path()).is_empty() {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("the merge ended ({status}) before it could be killed");
        }
        assert!(started.elapsed() < Duration::from_secs(60), "merge never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("wait");
    assert!(!status.success());
    assert!(!out.exists(), "nothing presented as complete at the target");
    let left = partials(tmp.path());
    assert_eq!(left.len(), 1, "the killed run could not clean up: {left:?}");
    assert!(
        left[0].starts_with(".merged."),
        "hidden, and named after the target: {left:?}"
    );

    let (wa, wb) = (w(&a), w(&b));
    let o = run_mglue(&[
        "merge",
        "--method",
        "linear",
        "--model",
        &wa,
        "--model",
        &wb,
        "--out",
        s(&out),
    ]);
    let msg = text(&o);
    assert!(o.status.success(), "{msg}");
    assert!(
        msg.contains("removing the partial output of an earlier run"),
        "reported: {msg}"
    );
    assert!(partials(tmp.path()).is_empty(), "{:?}", partials(tmp.path()));
    assert_eq!(read_tensors(&out).len(), 1 + 2 * 9 + 2);
}

// ---- load ----------------------------------------------------------------------------------

/// Runs `cmd` to completion and returns its output and peak resident set (bytes, `ru_maxrss` of
/// exactly this child via `wait4`).
// The child is reaped by `wait4` (std's `wait` cannot return its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn run_measured(mut cmd: Command) -> (i32, String, u64) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id() as i32;
    let (mut out, mut err) = (child.stdout.expect("stdout"), child.stderr.expect("stderr"));
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).expect("stdout");
        s
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut err, &mut stderr).expect("stderr");
    let stdout = reader.join().expect("reader");
    let mut status = 0i32;
    let mut usage = sys::Rusage::default();
    // SAFETY: `pid` is our unwaited child; the pointers are valid for the call.
    let r = unsafe { sys::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    let code = if status & 0x7f == 0 {
        (status >> 8) & 0xff
    } else {
        -(status & 0x7f)
    };
    (code, format!("{stdout}{stderr}"), usage.maxrss as u64 * 1024)
}

/// The bound the pre-flight line prints: "peak memory bound ≈ 123.4 MB".
fn printed_bound(text: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.contains("peak memory bound"))
        .unwrap_or_else(|| panic!("no pre-flight estimate in:\n{text}"));
    let mb: f64 = line
        .split('≈')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unparsable estimate: {line}"));
    (mb * 1e6) as u64
}

#[test]
fn twelve_model_merge_stays_within_the_printed_peak_memory_bound() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // One ~80 MB f16 model, hard-linked into 12 directories: 12 distinct checkpoints (each
    // opened and mapped on its own) without writing 1 GB.
    let first = tmp.path().join("m00");
    write_model(&first, 1024, 2, 8192, safetensors::Dtype::F16, smooth);
    let mut models = vec![first.clone()];
    for i in 1..12 {
        let dir = tmp.path().join(format!("m{i:02}"));
        std::fs::create_dir(&dir).expect("mkdir");
        for f in ["model.safetensors", "config.json"] {
            std::fs::hard_link(first.join(f), dir.join(f)).expect("hard link");
        }
        models.push(dir);
    }
    let out = tmp.path().join("merged");
    let mut cmd = Command::new(mglue());
    cmd.args(["merge", "--method", "linear", "--threads", "2", "--out", s(&out)])
        .env_remove("MGLUE_PLUGIN_PATH");
    for m in &models {
        cmd.args(["--model", &w(m)]);
    }
    let (code, msg, peak) = run_measured(cmd);
    assert_eq!(code, 0, "{msg}");
    let bound = printed_bound(&msg);
    println!(
        "12-model merge: peak RSS {:.1} MB, printed bound {:.1} MB",
        peak as f64 / 1e6,
        bound as f64 / 1e6
    );
    assert!(
        peak <= bound,
        "peak RSS {peak} B exceeds the printed bound {bound} B\n{msg}"
    );
}

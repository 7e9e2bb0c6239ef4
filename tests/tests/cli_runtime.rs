//! `mglue convert`, `generate`, `score` and `eval` (a code task, end to end through the sandbox)
//! on the real SmolLM2-135M-Instruct (GGUF from its PyPI wheel, fetched by
//! scripts/fetch-models.sh).

use modelglue_e2e::{mglue, root, run_mglue, text};
use std::path::PathBuf;

fn gguf() -> Option<PathBuf> {
    let cache = std::env::var_os("MGLUE_MODEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/models"));
    let path = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        let status = std::process::Command::new(root().join("scripts/fetch-models.sh"))
            .arg(&cache)
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("SKIPPED: SmolLM2 GGUF not available and the registry fetch failed");
            return None;
        }
    }
    Some(path)
}

#[test]
fn converted_smollm2_continues_the_capital_of_france_with_paris_and_scores_text() {
    let Some(src) = gguf() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("smollm2");
    let o = run_mglue(&[
        "convert",
        src.to_str().expect("utf-8"),
        dir.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let d = dir.to_str().expect("utf-8");
    let o = run_mglue(&[
        "generate",
        "--model",
        d,
        "--prompt",
        "The capital of France is",
        "--raw",
        "--max-new-tokens",
        "3",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with(" Paris"),
        "{}",
        text(&o)
    );

    let o = run_mglue(&[
        "generate",
        "--model",
        d,
        "--prompt",
        "Count: one, two,",
        "--raw",
        "--stop",
        ",",
        "--max-new-tokens",
        "10",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !String::from_utf8_lossy(&o.stdout).trim_end().contains(','),
        "stop string cut: {}",
        text(&o)
    );

    let o = run_mglue(&[
        "score",
        "--model",
        d,
        "--text",
        "The capital of France is Paris.",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let ppl = v["perplexity"].as_f64().expect("perplexity");
    assert!(ppl.is_finite() && ppl > 1.0 && ppl < 100.0, "{v}");
    let paris = v["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .find(|t| t["token"] == "ĠParis")
        .expect("Paris token");
    assert!(
        paris["logprob"].as_f64().expect("lp") > -2.0,
        "Paris is likely after the prompt: {paris}"
    );

    // A code task end to end: generation, bigcode's post-processing, the sandbox, pass@1.
    let o = std::process::Command::new(mglue())
        .args([
            "-q",
            "eval",
            "--model",
            d,
            "--task",
            "humaneval",
            "--limit",
            "2",
            "--json",
            "--no-cache",
        ])
        .env("MGLUE_TASKS", root().join("tasks"))
        .current_dir(tmp.path())
        .output()
        .expect("mglue runs");
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let task = &v["tasks"][0];
    assert_eq!(task["task"], "humaneval", "{v}");
    assert_eq!(task["n_items"], 2, "{v}");
    let pass = task["metrics"]["pass@1"]["value"].as_f64().expect("pass@1");
    assert!((0.0..=1.0).contains(&pass), "{v}");
    for item in task["items"].as_array().expect("items") {
        let completion = item["completion"].as_str().expect("completion");
        assert!(
            !completion.is_empty() && item["n_gen_tokens"].as_u64() > Some(0),
            "{item}"
        );
        assert!(item["outcome"].as_str().is_some_and(|s| !s.is_empty()), "{item}");
    }
    eprintln!(
        "humaneval --limit 2 on SmolLM2: pass@1 {pass}; {}",
        task["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| format!("{}: {}", i["id"], i["outcome"]))
            .collect::<Vec<_>>()
            .join("; ")
    );
}

/// Qwen2.5-Coder-0.5B-Instruct (qwen2: QKV biases, untied head, no Q/K permutation in its GGUF):
/// `mglue convert`, then a greedy completion of `def fibonacci(n):` that python3 parses and that
/// returns something. The GGUF (~490 MB in six wheels) is fetched once into the model cache; the
/// whole test took about 2 minutes on the 2-core machine (fetch 1.5 min the first time, convert
/// 34 s, generate 36 s; BENCHMARKS.md), so it runs by default; `MGLUE_SKIP_QWEN=1` skips it.
#[test]
fn qwen_coder_converts_and_completes_a_python_function() {
    if std::env::var_os("MGLUE_SKIP_QWEN").is_some_and(|v| v != "0") {
        eprintln!("SKIPPED: MGLUE_SKIP_QWEN is set");
        return;
    }
    let start = std::time::Instant::now();
    let cache = std::env::var_os("MGLUE_MODEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/models"));
    let src = cache.join("Qwen2.5-Coder-0.5B-Instruct.gguf");
    if !src.exists() {
        let status = std::process::Command::new(root().join("scripts/fetch-models.sh"))
            .arg(&cache)
            .arg("--qwen")
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("SKIPPED: Qwen2.5-Coder GGUF not available and the registry fetch failed");
            return;
        }
    }
    let fetched = start.elapsed();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("qwen");
    let o = run_mglue(&[
        "convert",
        src.to_str().expect("utf-8"),
        dir.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("qwen2"),
        "{}",
        text(&o)
    );
    let converted = start.elapsed();
    let prompt = "def fibonacci(n):";
    let o = run_mglue(&[
        "generate",
        "--model",
        dir.to_str().expect("utf-8"),
        "--prompt",
        prompt,
        "--raw",
        "--max-new-tokens",
        "80",
        "--stop",
        "\nprint",
        "--stop",
        "\n#",
        "--stop",
        "\nif __name__",
        "--stop",
        "\n```",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let completion = String::from_utf8_lossy(&o.stdout).trim_end().to_string();
    let program = format!("{prompt}{completion}\n");
    eprintln!(
        "Qwen2.5-Coder-0.5B: fetch {:.1} s, convert {:.1} s, generate {:.1} s; greedy completion:\n{program}",
        fetched.as_secs_f64(),
        (converted - fetched).as_secs_f64(),
        (start.elapsed() - converted).as_secs_f64()
    );
    assert!(completion.contains("return"), "{program}");
    let parsed = std::process::Command::new("python3")
        .args(["-c", "import ast, sys; ast.parse(sys.stdin.read())"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(program.as_bytes())?;
            child.wait_with_output()
        })
        .expect("python3 runs");
    assert!(
        parsed.status.success(),
        "not valid Python: {}\n{program}",
        String::from_utf8_lossy(&parsed.stderr)
    );
}

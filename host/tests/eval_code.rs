//! The code tasks (`tasks/humaneval.toml`, `mbpp.toml`, `humaneval_js.toml`) and the sandbox
//! they run programs in, with real programs: the datasets' reference solutions pass their own
//! tests (HumanEval 164/164, MBPP 600/600 over validation + test + few-shot rows, HumanEval-JS
//! 163/164: item 162 `require`s the npm package js-md5, which is not installed), wrong solutions
//! fail, and the limits hold (time, memory, network).
//!
//! Every reference solution runs by default (in parallel: about 30 s on a quiet 2-core
//! machine); `MGLUE_CODE_STRIDE=k` runs every k-th item only (HumanEval-JS item 162 always).
//! Needs `python3` and `node` on PATH (CI installs both).

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use modelglue::eval::sandbox::{network_isolation, run_program, SandboxLimits, Termination};
use modelglue::eval::{CodeRunner, ItemRequests, Task, TaskOptions};
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn shared() -> PathBuf {
    std::env::var_os("MODELGLUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared"))
}

fn task(name: &str) -> Task {
    Task::load(&repo_root().join("tasks").join(name), &TaskOptions::default()).expect("task loads")
}

fn stride() -> usize {
    std::env::var("MGLUE_CODE_STRIDE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// Indices checked: every `stride()`-th, plus `always`.
fn indices(len: usize, always: &[usize]) -> Vec<usize> {
    let mut v: Vec<usize> = (0..len).step_by(stride()).chain(always.iter().copied()).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Runs the reference solutions of `indices` under the task's limits; a reference that runs out
/// of time (several run at once on a shared machine) runs again alone with 10x the time. Returns
/// those that still fail: index, id, summary and stderr.
fn failing_references(task: &Task, indices: &[usize]) -> Vec<(usize, String, String, String)> {
    let runner = CodeRunner::for_task(task).expect("code task");
    let start = Instant::now();
    let mut runs = runner.run_references(task, indices).expect("programs run");
    eprintln!(
        "{}: {} reference programs in {:.1} s",
        task.name(),
        runs.len(),
        start.elapsed().as_secs_f64()
    );
    let patient = runner.clone().with_jobs(1).with_limits(SandboxLimits {
        timeout: runner.limits().timeout * 10,
        ..runner.limits().clone()
    });
    for (&i, run) in indices.iter().zip(runs.iter_mut()) {
        if run.outcome.termination == Termination::TimedOut {
            let again = patient
                .run(&task.program(i, None).expect("renders"))
                .expect("runs");
            eprintln!(
                "{}: item {i} ({}) timed out at {:?}; alone with {:?}: {} in {} ms",
                task.name(),
                task.item_id(i).unwrap_or("?"),
                runner.limits().timeout,
                patient.limits().timeout,
                if again.passed { "passed" } else { "failed" },
                again.outcome.millis
            );
            *run = again;
        }
    }
    indices
        .iter()
        .zip(runs)
        .filter(|(_, r)| !r.passed)
        .map(|(&i, r)| {
            (
                i,
                task.item_id(i).unwrap_or("?").to_string(),
                r.outcome.summary(),
                r.outcome.stderr.clone(),
            )
        })
        .collect()
}

#[test]
fn humaneval_reference_solutions_pass_their_tests() {
    let t = task("humaneval.toml");
    assert_eq!(t.len(), 164);
    let failing = failing_references(&t, &indices(t.len(), &[]));
    assert!(failing.is_empty(), "failing references: {failing:?}");
}

#[test]
fn mbpp_reference_solutions_pass_their_tests_in_every_split() {
    let mut total = 0;
    for file in [
        "mbpp_test.jsonl",
        "mbpp_validation.jsonl",
        "mbpp_prompt_fewshot.jsonl",
    ] {
        let text = std::fs::read_to_string(repo_root().join("tasks/mbpp.toml")).expect("read");
        let mut spec = modelglue::eval::TaskSpec::from_toml(&text, Path::new("mbpp.toml")).expect("parses");
        spec.file = file.into();
        let t = Task::from_spec(spec, &repo_root().join("tasks"), &TaskOptions::default()).expect("loads");
        total += t.len();
        let failing = failing_references(&t, &indices(t.len(), &[]));
        assert!(failing.is_empty(), "{file}: failing references: {failing:?}");
    }
    assert_eq!(total, 600);
}

#[test]
fn humaneval_js_references_pass_except_162_which_needs_js_md5() {
    let t = task("humaneval_js.toml");
    assert_eq!(t.len(), 164);
    let idx = indices(t.len(), &[162]);
    let failing = failing_references(&t, &idx);
    let ids: Vec<&str> = failing.iter().map(|f| f.1.as_str()).collect();
    assert_eq!(ids, ["JavaScript/162"], "{failing:?}");
    assert!(
        failing[0].2.contains("Cannot find module 'js-md5'"),
        "fails for the missing module: {}",
        failing[0].3
    );
    eprintln!("humaneval_js: {}/{} references pass", idx.len() - 1, idx.len());
}

#[test]
fn prompts_are_bigcodes() {
    let js = task("humaneval_js.toml");
    let rows: Vec<Value> =
        std::fs::read_to_string(shared().join("data/benchmarks/humanevalpack_js_test.jsonl"))
            .expect("read")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
    for (i, row) in rows.iter().enumerate() {
        let ItemRequests::Generate { context, .. } = js.item(i).expect("item").requests else {
            panic!("generation item")
        };
        assert_eq!(
            context,
            row["bigcode_instruct_prompt"].as_str().expect("field"),
            "item {i}"
        );
    }
    let he = task("humaneval.toml");
    let ItemRequests::Generate { context, .. } = he.item(0).expect("item").requests else {
        panic!("generation item")
    };
    assert!(context.starts_with("from typing import List") && context.ends_with("\"\"\""));
    let mbpp = task("mbpp.toml");
    let ItemRequests::Generate { context, .. } = mbpp.item(0).expect("item").requests else {
        panic!("generation item")
    };
    assert_eq!(
        context,
        "\"\"\"\nWrite a python function to remove first and last occurrence of a given character from \
         the string.\nassert remove_Occ(\"hello\",\"l\") == \"heo\"\n\"\"\"\n"
    );
}

#[test]
fn wrong_solutions_fail() {
    let he = task("humaneval.toml");
    let r = CodeRunner::for_task(&he).expect("code task");
    // HumanEval/0 has_close_elements: a body that always says no.
    let wrong = he.program(0, Some("\n    return False\n")).expect("renders");
    let run = r.run(&wrong).expect("runs");
    assert!(
        !run.passed && run.outcome.summary().contains("AssertionError"),
        "{run:?}"
    );
    let right = he
        .program(
            0,
            Some(
                "\n    return any(abs(a - b) < threshold for i, a in enumerate(numbers) \
                 for j, b in enumerate(numbers) if i != j)\n",
            ),
        )
        .expect("renders");
    assert!(r.run(&right).expect("runs").passed);
    let syntax = he.program(0, Some("\n    return (\n")).expect("renders");
    assert!(!r.run(&syntax).expect("runs").passed);

    let mbpp = task("mbpp.toml");
    let r = CodeRunner::for_task(&mbpp).expect("code task");
    let run = r
        .run(
            &mbpp
                .program(0, Some("def remove_Occ(s, ch):\n    return s\n"))
                .expect("renders"),
        )
        .expect("runs");
    assert!(!run.passed, "{run:?}");

    let js = task("humaneval_js.toml");
    let r = CodeRunner::for_task(&js).expect("code task");
    let run = r
        .run(&js.program(0, Some("\n  return false\n}")).expect("renders"))
        .expect("runs");
    assert!(
        !run.passed && run.outcome.stderr.contains("Assertion failed"),
        "{run:?}"
    );
    let thrown = r
        .run(
            &js.program(0, Some("\n  return undefinedName\n}"))
                .expect("renders"),
        )
        .expect("runs");
    assert!(!thrown.passed, "{thrown:?}");
}

fn python(source: &str, limits: &SandboxLimits) -> modelglue::eval::sandbox::RunOutcome {
    run_program(&["python3".to_string()], "program.py", source, limits).expect("runs")
}

#[test]
fn an_infinite_loop_is_killed_at_the_time_limit() {
    let limits = SandboxLimits {
        timeout: Duration::from_millis(1500),
        ..SandboxLimits::default()
    };
    let start = Instant::now();
    let o = python("while True:\n    pass\n", &limits);
    let took = start.elapsed();
    assert_eq!(o.termination, Termination::TimedOut);
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "{took:?}"
    );
    // The task's own limit is 3 s, as bigcode's.
    let he = task("humaneval.toml");
    let r = CodeRunner::for_task(&he).expect("code task");
    assert_eq!(r.limits().timeout, Duration::from_secs(3));
    let start = Instant::now();
    let run = r
        .run(
            &he.program(0, Some("\n    while True:\n        pass\n"))
                .expect("renders"),
        )
        .expect("runs");
    assert!(
        !run.passed && run.outcome.termination == Termination::TimedOut,
        "{run:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(8));
}

#[test]
fn a_memory_bomb_is_stopped_by_the_memory_limit() {
    let limits = SandboxLimits {
        memory_bytes: Some(512 << 20),
        ..SandboxLimits::default()
    };
    let big = python("x = bytearray(4 << 30)\nprint('allocated')\n", &limits);
    assert!(
        !big.exited_ok() && big.stderr.contains("MemoryError") && big.stdout.is_empty(),
        "{big:?}"
    );
    let growing = python("l = []\nwhile True:\n    l.append(' ' * 10**7)\n", &limits);
    assert!(
        !growing.exited_ok() && growing.termination != Termination::TimedOut,
        "stopped by the limit, not the clock: {growing:?}"
    );
    // The same program fits without the limit, so it is the limit that stops it.
    let fits = python(
        "x = bytearray(600 << 20)\nprint(len(x) >> 20)\n",
        &SandboxLimits {
            memory_bytes: Some(2 << 30),
            ..SandboxLimits::default()
        },
    );
    assert_eq!(fits.stdout, "600\n", "{fits:?}");
}

#[test]
fn a_program_cannot_reach_the_network_when_isolation_is_available() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let source = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n"
    );
    let o = python(&source, &SandboxLimits::default());
    let accepted = listener.accept().map(|(mut s, _)| {
        let mut b = Vec::new();
        let _ = s.read_to_end(&mut b);
    });
    let isolation = network_isolation();
    if !isolation.is_isolated() {
        eprintln!("SKIP (no network isolation here: {isolation:?}); the program ran with network: {o:?}");
        return;
    }
    assert!(!o.exited_ok() && !o.stdout.contains("connected"), "{o:?}");
    assert!(
        o.stderr.contains("Network is unreachable") || o.stderr.contains("Connection refused"),
        "{o:?}"
    );
    assert!(accepted.is_err(), "the host's listener saw no connection");
}

#[test]
fn programs_run_in_a_fresh_directory_that_is_removed_afterwards() {
    let o = python(
        "import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))\nopen('left_behind', 'w').write('x')\n\
         print(sorted(k for k in os.environ if k not in ('LC_CTYPE',)))\n",
        &SandboxLimits::default(),
    );
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{o:?}");
    assert!(Path::new(lines[0])
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("mglue-sandbox-")));
    assert_eq!(lines[1], "['program.py']");
    assert!(!Path::new(lines[0]).exists(), "the directory is removed");
    assert_eq!(
        lines[2],
        "['HOME', 'LANG', 'PATH', 'PYTHONDONTWRITEBYTECODE', 'PYTHONHASHSEED', 'TMPDIR']"
    );
}

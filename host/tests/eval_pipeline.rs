//! The evaluator end to end on the tiny Llama of `shared/fixtures/mergekit/zoo` (2 layers,
//! vocabulary 1000, its own byte-level BPE tokenizer) and on the shipped task files: request
//! building against the benchmark files' own lm-eval fields, equality of the batching
//! strategies with each other and with the runtime's per-token log-likelihoods, the score
//! cache, the JSON report, and greedy generation against a cache-free decoding loop.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use modelglue::checkpoint::Checkpoint;
use modelglue::eval::{
    Batching, EvalOptions, EvalReport, EvalTokenizer, Evaluator, ItemRequests, ModelKey, ScoreCache, Task,
    TaskOptions, TaskSpec,
};
use modelglue::runtime::Model;
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn shared() -> PathBuf {
    std::env::var_os("MODELGLUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared"))
}

fn benchmarks() -> PathBuf {
    shared().join("data/benchmarks")
}

fn zoo(name: &str) -> PathBuf {
    shared().join("fixtures/mergekit/zoo").join(name)
}

fn shipped(file: &str, num_fewshot: Option<usize>) -> Task {
    let opts = TaskOptions {
        data_dir: Some(benchmarks()),
        num_fewshot,
    };
    Task::load(&repo_root().join("tasks").join(file), &opts).expect("shipped task loads")
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect()
}

struct Tiny {
    ckpt: Checkpoint,
    model: Model,
    tokenizer: EvalTokenizer,
}

fn tiny(name: &str) -> Tiny {
    let ckpt = Checkpoint::open(&zoo(name)).expect("open tiny checkpoint");
    Tiny {
        model: Model::load(&ckpt).expect("load"),
        tokenizer: EvalTokenizer::from_checkpoint(&ckpt).expect("tokenizer"),
        ckpt,
    }
}

fn opts(batching: Batching, token_budget: usize, limit: Option<usize>) -> EvalOptions {
    EvalOptions {
        limit,
        batching,
        token_budget,
        progress: false,
        ..EvalOptions::default()
    }
}

/// A small task written to `dir`: the first rows of a shipped benchmark file under a shipped
/// definition.
fn small_task(dir: &Path, shipped_file: &str, rows: usize) -> Task {
    let text = std::fs::read_to_string(repo_root().join("tasks").join(shipped_file)).expect("read");
    let spec = TaskSpec::from_toml(&text, Path::new(shipped_file)).expect("parses");
    let data: String = std::fs::read_to_string(benchmarks().join(&spec.file))
        .expect("read data")
        .lines()
        .take(rows)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.join(&spec.file), data).expect("write");
    if let Some(f) = &spec.fewshot {
        std::fs::copy(benchmarks().join(&f.file), dir.join(&f.file)).expect("copy few-shot file");
    }
    let opts = TaskOptions {
        data_dir: Some(dir.to_path_buf()),
        num_fewshot: None,
    };
    Task::from_spec(spec, dir, &opts).expect("task")
}

#[test]
fn shipped_tasks_load_with_the_benchmark_item_counts() {
    let tasks = Task::load_dir(
        &repo_root().join("tasks"),
        &TaskOptions {
            data_dir: Some(benchmarks()),
            num_fewshot: None,
        },
    )
    .expect("tasks/ loads");
    let counts: Vec<(&str, usize)> = tasks.iter().map(|t| (t.name(), t.len())).collect();
    assert_eq!(
        counts,
        [
            ("arc_challenge", 300),
            ("gsm8k", 300),
            ("humaneval", 164),
            ("humaneval_js", 164),
            ("mbpp", 500),
            ("mmlu", 285),
            ("winogrande", 300)
        ]
    );
}

#[test]
fn winogrande_requests_equal_the_lm_eval_contexts_of_every_item() {
    let task = shipped("winogrande.toml", None);
    let rows = jsonl(&benchmarks().join("winogrande_validation_first300.jsonl"));
    for (item, row) in task.items(None).expect("items").iter().zip(&rows) {
        let ItemRequests::Choices { requests, gold, .. } = &item.requests else {
            panic!("choices")
        };
        let contexts: Vec<&str> = requests.iter().map(|r| r.context.as_str()).collect();
        let want: Vec<&str> = row["lm_eval_contexts"]
            .as_array()
            .expect("contexts")
            .iter()
            .map(|v| v.as_str().expect("str"))
            .collect();
        assert_eq!(contexts, want, "{}", item.id);
        for r in requests {
            assert_eq!(
                r.continuation,
                row["lm_eval_continuation"].as_str().expect("str"),
                "{}",
                item.id
            );
        }
        assert_eq!(*gold as u64, row["answer_index"].as_u64().expect("gold"));
    }
}

#[test]
fn arc_and_mmlu_zero_shot_requests_follow_the_lm_eval_templates() {
    let arc = shipped("arc_challenge.toml", None).item(0).expect("item");
    let ItemRequests::Choices {
        requests,
        choice_len_chars,
        ..
    } = arc.requests
    else {
        panic!("choices")
    };
    assert_eq!(
        requests[0].context,
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. \
         Which is the most likely effect of this increase in rotation?\nAnswer:"
    );
    assert_eq!(requests[2].continuation, " Planetary days will become shorter.");
    assert_eq!(choice_len_chars, [32, 35, 35, 39]);

    let mmlu = shipped("mmlu.toml", None).item(0).expect("item");
    let ItemRequests::Choices { requests, gold, .. } = mmlu.requests else {
        panic!("choices")
    };
    assert_eq!(
        requests[0].context,
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n\
         Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n\
         A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    );
    let conts: Vec<&str> = requests.iter().map(|r| r.continuation.as_str()).collect();
    assert_eq!((conts, gold), (vec![" A", " B", " C", " D"], 1));
}

#[test]
fn mmlu_five_shot_prefix_is_the_first_five_dev_rows_of_the_subject() {
    let task = shipped("mmlu.toml", Some(5));
    let dev = jsonl(&benchmarks().join("mmlu_dev_5shot.jsonl"));
    let letters = ["A", "B", "C", "D"];
    for index in [0, 5, 284] {
        let item = task.item(index).expect("item");
        let ItemRequests::Choices { requests, .. } = &item.requests else {
            panic!("choices")
        };
        let subject = item.id.split('/').nth(1).expect("mmlu/<subject>/test/<n>");
        let mut want = format!(
            "The following are multiple choice questions (with answers) about {}.\n\n",
            subject.replace('_', " ")
        );
        for row in dev.iter().filter(|r| r["subject"] == subject).take(5) {
            let c = row["choices"].as_array().expect("choices");
            want += &format!(
                "{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer: {}\n\n",
                row["question"].as_str().expect("q").trim(),
                c[0].as_str().expect("c"),
                c[1].as_str().expect("c"),
                c[2].as_str().expect("c"),
                c[3].as_str().expect("c"),
                letters[row["answer_index"].as_u64().expect("gold") as usize]
            );
        }
        assert!(
            requests[0].context.starts_with(&want),
            "{}: {:?}",
            item.id,
            requests[0].context
        );
        assert_eq!(requests[0].context.matches("\nAnswer:").count(), 6);
    }
    let err = shipped("mmlu.toml", Some(6))
        .item(0)
        .expect_err("only 5 dev rows per subject");
    assert!(err.to_string().contains("6 few-shot examples asked"), "{err}");
}

#[test]
fn batching_strategies_agree_with_each_other_and_with_the_runtime_log_likelihood() {
    let t = tiny("base");
    let dir = tempfile::tempdir().expect("tempdir");
    for (file, rows) in [
        ("arc_challenge.toml", 6),
        ("winogrande.toml", 6),
        ("mmlu.toml", 6),
    ] {
        let task = small_task(dir.path(), file, rows);
        let run = |b, budget| {
            Evaluator::new(&t.model, &t.tokenizer, opts(b, budget, None))
                .run(&task)
                .expect("scores")
        };
        let shared = run(Batching::SharedPrefix, 1024);
        for other in [
            run(Batching::SharedPrefix, 0),
            run(Batching::Full, 1024),
            run(Batching::Full, 0),
        ] {
            for (a, b) in shared.items.iter().zip(&other.items) {
                let (a, b) = (a.as_choice().expect("choice"), b.as_choice().expect("choice"));
                for (x, y) in a.loglik.iter().zip(&b.loglik) {
                    assert!((x - y).abs() < 1e-4, "{file} {}: {x} vs {y}", a.id);
                }
                assert_eq!(a.is_greedy, b.is_greedy, "{file} {}", a.id);
            }
        }
        // Independently: the runtime's own per-token log-likelihood of the whole sequence.
        for (i, item) in shared.items.iter().enumerate() {
            let c = item.as_choice().expect("choice");
            let ItemRequests::Choices { requests, .. } = task.item(i).expect("item").requests else {
                panic!("choices")
            };
            for (k, r) in requests.iter().enumerate() {
                let (ctx, cont) = t
                    .tokenizer
                    .encode_pair(&r.context, &r.continuation)
                    .expect("encode");
                assert_eq!(cont, c.cont_token_ids[k]);
                let ids: Vec<u32> = ctx.iter().chain(&cont).copied().collect();
                let per_token = t.model.log_likelihood(&ids).expect("log_likelihood");
                let want: f64 = per_token[per_token.len() - cont.len()..].iter().sum();
                assert!(
                    (c.loglik[k] - want).abs() < 1e-4,
                    "{file} {} choice {k}: {} vs {want}",
                    c.id,
                    c.loglik[k]
                );
            }
        }
    }
}

#[test]
fn the_score_cache_serves_repeats_and_scores_only_missing_items() {
    let t = tiny("base");
    let dir = tempfile::tempdir().expect("tempdir");
    let task = small_task(dir.path(), "arc_challenge.toml", 8);
    let cache = ScoreCache::open(&dir.path().join("cache")).expect("cache");
    let key = ModelKey::of_checkpoint(&t.ckpt).expect("key");
    let run = |limit| {
        Evaluator::new(&t.model, &t.tokenizer, opts(Batching::SharedPrefix, 1024, limit))
            .with_cache(cache.clone(), key.clone())
            .run(&task)
            .expect("scores")
    };
    let first = run(Some(3));
    assert_eq!((first.n_items, first.scored_now), (3, 3));
    let again = run(Some(3));
    assert_eq!((again.n_items, again.scored_now), (3, 0));
    assert_eq!(again.items, first.items);
    let fewer = run(Some(2));
    assert_eq!((fewer.n_items, fewer.scored_now), (2, 0));
    let more = run(None);
    assert_eq!((more.n_items, more.scored_now), (8, 5));
    assert_eq!(more.items[..3], first.items[..]);
    let uncached = Evaluator::new(&t.model, &t.tokenizer, opts(Batching::SharedPrefix, 1024, None))
        .run(&task)
        .expect("scores");
    assert_eq!(more.metrics, uncached.metrics);

    // Another model's key misses; a damaged entry is rescored, not trusted.
    let other = Evaluator::new(
        &t.model,
        &t.tokenizer,
        opts(Batching::SharedPrefix, 1024, Some(2)),
    )
    .with_cache(cache.clone(), ModelKey::new("some merge"))
    .run(&task)
    .expect("scores");
    assert_eq!(other.scored_now, 2);
    let settings = Evaluator::new(&t.model, &t.tokenizer, EvalOptions::default()).settings();
    std::fs::write(cache.path(&key, &task, &settings), "{ not json").expect("damage");
    assert_eq!(run(Some(3)).scored_now, 3);
}

#[test]
fn model_keys_follow_the_weights_not_the_directory() {
    let base = Checkpoint::open(&zoo("base")).expect("open");
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(zoo("base").join(f), dir.path().join(f)).expect("copy");
    }
    let copy = Checkpoint::open(dir.path()).expect("open copy");
    let ft1 = Checkpoint::open(&zoo("ft1")).expect("open");
    let key = ModelKey::of_checkpoint(&base).expect("key");
    assert!(
        key.as_str().starts_with("sha256-") && key.as_str().len() == 7 + 64,
        "{key}"
    );
    assert_eq!(ModelKey::of_checkpoint(&copy).expect("key"), key);
    assert_ne!(ModelKey::of_checkpoint(&ft1).expect("key"), key);
}

#[test]
fn the_json_report_round_trips_with_per_task_metrics_and_items() {
    let t = tiny("base");
    let dir = tempfile::tempdir().expect("tempdir");
    let tasks = [
        small_task(dir.path(), "arc_challenge.toml", 3),
        small_task(dir.path(), "winogrande.toml", 3),
    ];
    let report = Evaluator::new(&t.model, &t.tokenizer, opts(Batching::SharedPrefix, 1024, None))
        .run_all(&tasks)
        .expect("scores");
    let json = serde_json::to_string_pretty(&report).expect("serialises");
    let back: EvalReport = serde_json::from_str(&json).expect("deserialises");
    assert_eq!(back, report);
    let v: Value = serde_json::from_str(&json).expect("JSON");
    assert!(v["tasks"][0]["metrics"]["acc_norm"]["value"].is_number());
    assert!(v["tasks"][0]["items"][2]["loglik"]
        .as_array()
        .is_some_and(|a| a.len() == 4));
    assert_eq!(v["tasks"][1]["primary_metric"], "acc");
    let mean = (report.tasks[0].primary() + report.tasks[1].primary()) / 2.0;
    assert_eq!(report.mean_primary, mean);
}

/// Greedy tokens of `prompt`, recomputing the whole sequence each step (no cache).
fn greedy_without_cache(model: &Model, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    for _ in 0..steps {
        let x = Tensor::new(&ids[..], &Device::Cpu)
            .expect("ids")
            .unsqueeze(0)
            .expect("batch");
        let logits = model.forward(&x).expect("forward");
        let last: Vec<f32> = logits
            .get(0)
            .expect("row")
            .get(ids.len() - 1)
            .expect("pos")
            .to_vec1()
            .expect("vec");
        let mut best = 0;
        for (i, &v) in last.iter().enumerate() {
            if v > last[best] {
                best = i;
            }
        }
        ids.push(best as u32);
    }
    ids[prompt.len()..].to_vec()
}

#[test]
fn gsm8k_generation_is_greedy_stops_and_extracts_like_lm_eval() {
    let t = tiny("base");
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(repo_root().join("tasks/gsm8k.toml")).expect("read");
    let mut spec = TaskSpec::from_toml(&text, Path::new("gsm8k.toml")).expect("parses");
    // A stop string the tiny model produces, so that cutting is exercised.
    let generation = spec.generation.as_mut().expect("generation table");
    generation.max_gen_toks = 12;
    let task = Task::from_spec(
        spec.clone(),
        dir.path(),
        &TaskOptions {
            data_dir: Some(benchmarks()),
            num_fewshot: Some(2),
        },
    )
    .expect("task");
    let mut o = opts(Batching::SharedPrefix, 1024, Some(3));
    o.generation_batch = 2;
    let result = Evaluator::new(&t.model, &t.tokenizer, o)
        .run(&task)
        .expect("generates");
    assert_eq!(result.n_items, 3);
    for (i, item) in result.items.iter().enumerate() {
        let g = item.as_generation().expect("generation");
        assert!(g.n_gen_tokens <= 12);
        assert!(g.target.ends_with(&format!(
            "#### {}",
            jsonl(&benchmarks().join("gsm8k_test_first300.jsonl"))[i]["answer"]
                .as_str()
                .expect("answer")
        )));
        assert!(!g.generation.contains("Question:"));
        let ItemRequests::Generate { context, .. } = task.item(i).expect("item").requests else {
            panic!("generate")
        };
        assert_eq!(context.matches("Question: ").count(), 3, "2 shots + the item");
        let prompt = t.tokenizer.encode(&context).expect("encode");
        assert_eq!(g.n_ctx_tokens, prompt.len());
        // The cached, batched decoding equals plain recomputation, token for token.
        let want = greedy_without_cache(&t.model, &prompt, g.n_gen_tokens);
        let text = t.tokenizer.inner().decode(&want, true).expect("decode");
        assert!(text.starts_with(&g.generation), "{text:?} vs {:?}", g.generation);
        assert_eq!(g.exact_match, 0.0, "the tiny model cannot do arithmetic");
    }
    assert_eq!(result.metric("exact_match"), Some(0.0));
}

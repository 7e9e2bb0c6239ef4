//! `format = "loglikelihood"` (lm-eval's `output_type: loglikelihood`, LAMBADA) on the tiny Llama
//! of `shared/fixtures/mergekit/zoo/base`: each item's loglik equals the one a multiple-choice
//! task gives the same context and continuation as a choice (that path is pinned to lm-eval's
//! fixtures in `eval_lm_eval.rs`), token and greedy counts equal an independent argmax over the
//! runtime's logits, the aggregates equal their formulas recomputed from the JSON report, the
//! items round-trip through the score cache, and schema mistakes name the file and the key.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use modelglue::checkpoint::Checkpoint;
use modelglue::eval::{
    Batching, EvalOptions, EvalReport, EvalTokenizer, Evaluator, ItemRequests, LoglikResult, Metric,
    ModelKey, ScoreCache, Task, TaskFormat, TaskOptions,
};
use modelglue::runtime::Model;
use serde_json::{json, Value};

fn shared() -> PathBuf {
    std::env::var_os("MODELGLUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
}

struct Tiny {
    ckpt: Checkpoint,
    model: Model,
    tokenizer: EvalTokenizer,
}

fn tiny() -> Tiny {
    let ckpt = Checkpoint::open(&shared().join("fixtures/mergekit/zoo/base")).expect("open tiny checkpoint");
    Tiny {
        model: Model::load(&ckpt).expect("load"),
        tokenizer: EvalTokenizer::from_checkpoint(&ckpt).expect("tokenizer"),
        ckpt,
    }
}

fn opts(batching: Batching, token_budget: usize) -> EvalOptions {
    EvalOptions {
        batching,
        token_budget,
        progress: false,
        ..EvalOptions::default()
    }
}

/// The ids the model predicts greedily after `prompt`, one full forward per step.
fn greedy(model: &Model, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    for _ in 0..steps {
        let next = argmaxes(model, &ids).pop().expect("a position");
        ids.push(next);
    }
    ids[prompt.len()..].to_vec()
}

/// The argmax of the logits at every position of `ids` (first index on ties).
fn argmaxes(model: &Model, ids: &[u32]) -> Vec<u32> {
    let x = Tensor::new(ids, &Device::Cpu)
        .expect("ids")
        .unsqueeze(0)
        .expect("batch");
    let logits: Vec<Vec<f32>> = model
        .forward(&x)
        .expect("forward")
        .get(0)
        .expect("row")
        .to_dtype(candle_core::DType::F32)
        .expect("f32")
        .to_vec2()
        .expect("vec");
    logits
        .iter()
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

const CONTEXTS: [&str; 5] = [
    "The cat sat on the",
    "Once upon a time there was a",
    "She opened the door and saw her",
    "Numbers: one, two, three,",
    "He said that the answer was",
];

/// Rows `{id, ctx, word, choices, answer_index}` of hand-written continuations (scored after the
/// default delimiter `" "`).
fn word_rows() -> Vec<Value> {
    let words = ["mat", "dragon", "mother", "four", "forty-two"];
    CONTEXTS
        .iter()
        .zip(words)
        .enumerate()
        .map(|(i, (ctx, word))| row(format!("w{i}"), ctx, word))
        .collect()
}

/// Rows whose continuation (after an empty delimiter) is the model's own greedy next token, so
/// that the greedy counts are not all 0: contexts ending in punctuation, so that a letter token
/// after them is a token of its own when the pair is encoded again.
fn greedy_rows(t: &Tiny) -> Vec<Value> {
    let mut rows = Vec::new();
    for word in [
        "cat", "dog", "tree", "house", "river", "stone", "light", "green", "apple", "music",
    ] {
        for punct in [":", ",", "(", "-", "."] {
            let ctx = format!("The {word}{punct}");
            let prompt = t.tokenizer.encode(&ctx).expect("encode");
            let next = greedy(&t.model, &prompt, 1);
            let text = t.tokenizer.decode(&next).expect("decode");
            let ascii = !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric());
            if ascii && t.tokenizer.encode_pair(&ctx, &text).expect("encode").1 == next {
                rows.push(row(format!("g{}", rows.len()), &ctx, &text));
            }
        }
    }
    rows
}

fn row(id: String, ctx: &str, target: &str) -> Value {
    json!({"id": id, "ctx": ctx, "word": target, "choices": ["zzz", target, "the"], "answer_index": 1})
}

fn write_task(dir: &Path, name: &str, toml: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).expect("write");
    path
}

const LOGLIK_TOML: &str = r#"
name = "mini_lambada"
format = "loglikelihood"
file = "items.jsonl"
text = "ctx"
target = "{{word}}"
metrics = ["perplexity", "token_perplexity", "acc", "token_acc"]
"#;

const MC_TOML: &str = r#"
name = "mini_lambada_mc"
format = "multiple_choice"
file = "items.jsonl"
text = "ctx"
choices = "choices"
target = "answer_index"
metrics = ["acc"]
"#;

/// A loglikelihood task and a multiple-choice task over the same rows, with `extra` appended
/// to both definitions.
fn setup(rows: &[Value], extra: &str) -> (tempfile::TempDir, Task, Task) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.path().join("items.jsonl"), data).expect("write");
    let load = |name: &str, toml: &str| {
        Task::load(
            &write_task(dir.path(), name, &format!("{toml}{extra}")),
            &TaskOptions::default(),
        )
        .expect("task loads")
    };
    let (ll, mc) = (load("ll", LOGLIK_TOML), load("mc", MC_TOML));
    (dir, ll, mc)
}

#[test]
fn loglik_and_token_counts_equal_the_multiple_choice_path_and_an_independent_argmax() {
    let t = tiny();
    let greedy = greedy_rows(&t);
    assert!(!greedy.is_empty(), "no context with a greedy letter token");
    let mut greedy_tokens = 0;
    for (rows, extra, delim) in [(word_rows(), "", " "), (greedy, "target_delimiter = \"\"\n", "")] {
        greedy_tokens += check_against_multiple_choice(&t, &rows, extra, delim);
    }
    // The greedy continuations make the accuracies non-trivial.
    assert!(greedy_tokens > 0, "no greedy token at all");
}

/// Checks every item of a task over `rows`; returns the number of greedy tokens.
fn check_against_multiple_choice(t: &Tiny, rows: &[Value], extra: &str, delim: &str) -> usize {
    let (_dir, ll, mc) = setup(rows, extra);
    assert_eq!(ll.spec().format, TaskFormat::Loglikelihood);
    // One row per forward, no padding: both tasks run exactly the same computation per request.
    let exact = opts(Batching::Full, 0);
    let r_ll = Evaluator::new(&t.model, &t.tokenizer, exact.clone())
        .run(&ll)
        .expect("scores");
    let r_mc = Evaluator::new(&t.model, &t.tokenizer, exact)
        .run(&mc)
        .expect("scores");
    // The default batching (shared prefixes, padded rows) agrees up to float rounding.
    let r_shared = Evaluator::new(&t.model, &t.tokenizer, opts(Batching::SharedPrefix, 1024))
        .run(&ll)
        .expect("scores");
    assert_eq!(r_ll.items.len(), ll.len());
    let mut greedy_tokens = 0;
    for (i, (a, c)) in r_ll.items.iter().zip(&r_mc.items).enumerate() {
        let a = a.as_loglik().expect("a loglikelihood result");
        let c = c.as_choice().expect("a choice result");
        assert!(
            (a.loglik - c.loglik[1]).abs() < 1e-9,
            "{}: {} vs {}",
            a.id,
            a.loglik,
            c.loglik[1]
        );
        assert_eq!(a.is_greedy, c.is_greedy[1], "{}", a.id);
        assert_eq!(a.cont_token_ids, c.cont_token_ids[1], "{}", a.id);
        let s = r_shared.items[i].as_loglik().expect("loglik");
        assert!(
            (a.loglik - s.loglik).abs() < 1e-4,
            "{}: {} vs {}",
            a.id,
            a.loglik,
            s.loglik
        );
        assert_eq!((a.n_tokens, a.n_greedy), (s.n_tokens, s.n_greedy), "{}", a.id);

        // The request is `text`, then the delimiter and `target`; counts from the tokenizer and
        // from the argmax of a plain forward over the whole sequence.
        let ItemRequests::Continuation { request } = ll.item(i).expect("item").requests else {
            panic!("a continuation request")
        };
        assert_eq!(request.context, rows[i]["ctx"].as_str().expect("ctx"));
        let target = rows[i]["word"].as_str().expect("word");
        assert_eq!(request.continuation, format!("{delim}{target}"));
        let (ctx, cont) = t
            .tokenizer
            .encode_pair(&request.context, &request.continuation)
            .expect("encode");
        assert_eq!(a.n_tokens, cont.len(), "{}", a.id);
        assert_eq!(a.n_ctx_tokens, ctx.len(), "{}", a.id);
        assert_eq!(a.cont_token_ids, cont, "{}", a.id);
        let ids: Vec<u32> = ctx.iter().chain(&cont).copied().collect();
        let predicted = argmaxes(&t.model, &ids[..ids.len() - 1]);
        let want_greedy = predicted[ctx.len() - 1..]
            .iter()
            .zip(&cont)
            .filter(|(p, c)| p == c)
            .count();
        assert_eq!(a.n_greedy, want_greedy, "{}", a.id);
        assert_eq!(a.is_greedy, want_greedy == cont.len(), "{}", a.id);
        let per_token = t.model.log_likelihood(&ids).expect("log_likelihood");
        let want: f64 = per_token[per_token.len() - cont.len()..].iter().sum();
        assert!((a.loglik - want).abs() < 1e-4, "{}: {} vs {want}", a.id, a.loglik);
        greedy_tokens += a.n_greedy;
    }
    greedy_tokens
}

#[test]
fn aggregates_are_the_lm_eval_formulas_of_the_items_in_the_json_report() {
    let t = tiny();
    let mut rows = word_rows();
    rows.extend(greedy_rows(&t));
    let (dir, ll, mc) = setup(&rows, "");
    let tasks = [ll, mc];
    let cache = ScoreCache::open(&dir.path().join("cache")).expect("cache");
    let key = ModelKey::of_checkpoint(&t.ckpt).expect("key");
    let run = || {
        Evaluator::new(&t.model, &t.tokenizer, opts(Batching::SharedPrefix, 1024))
            .with_cache(cache.clone(), key.clone())
            .run_all(&tasks)
            .expect("scores")
    };
    let report = run();
    let v: Value = serde_json::to_value(&report).expect("JSON");
    let back: EvalReport = serde_json::from_value(v.clone()).expect("round-trips");
    assert_eq!(back, report);

    let task = &v["tasks"][0];
    let items: Vec<LoglikResult> = serde_json::from_value(task["items"].clone()).expect("loglik items");
    let n = items.len() as f64;
    let ll_sum: f64 = items.iter().map(|i| i.loglik).sum();
    let tokens: f64 = items.iter().map(|i| i.n_tokens as f64).sum();
    let greedy: f64 = items.iter().map(|i| i.n_greedy as f64).sum();
    let want = [
        ("perplexity", (-ll_sum / n).exp()),
        ("token_perplexity", (-ll_sum / tokens).exp()),
        ("acc", items.iter().filter(|i| i.is_greedy).count() as f64 / n),
        ("token_acc", greedy / tokens),
    ];
    for (name, want) in want {
        let got = task["metrics"][name]["value"].as_f64().expect(name);
        assert!(
            (got - want).abs() <= 1e-12 * want.abs().max(1.0),
            "{name}: {got} vs {want}"
        );
        assert!(
            task["metrics"][name]["stderr"].as_f64().expect(name) >= 0.0,
            "{name}"
        );
    }
    // Delta-method stderr of the per-item perplexity: exp(-mean) · se(mean loglik).
    let mean = ll_sum / n;
    let var = items.iter().map(|i| (i.loglik - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let se = (-mean).exp() * (var / n).sqrt();
    let got = task["metrics"]["perplexity"]["stderr"].as_f64().expect("stderr");
    assert!((got - se).abs() <= 1e-12 * se.max(1.0), "{got} vs {se}");

    // Lower is better: the primary metric is negated in the fitness a search maximises.
    assert_eq!(task["primary_metric"], "perplexity");
    assert!(!Metric::Perplexity.higher_is_better() && Metric::TokenAcc.higher_is_better());
    let r = &report.tasks[0];
    assert_eq!(r.fitness(), -r.primary());
    assert_eq!(
        report.mean_primary,
        (r.fitness() + report.tasks[1].primary()) / 2.0
    );

    // The cache serves the same items back.
    let again = run();
    assert_eq!(again.tasks[0].scored_now, 0);
    assert_eq!(again.tasks[0].items, report.tasks[0].items);
    assert_eq!(again.tasks[0].metrics, report.tasks[0].metrics);
}

#[test]
fn defaults_are_token_perplexity_primary_and_token_acc() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("items.jsonl"),
        "{\"ctx\": \"a\", \"word\": \"b\"}\n",
    )
    .expect("write");
    let toml = "name = \"d\"\nformat = \"loglikelihood\"\nfile = \"items.jsonl\"\ntext = \"ctx\"\ntarget = \"word\"\n";
    let task = Task::load(&write_task(dir.path(), "d", toml), &TaskOptions::default()).expect("loads");
    assert_eq!(task.spec().metrics(), [Metric::TokenPerplexity, Metric::TokenAcc]);
    assert_eq!(task.spec().primary_metric(), Metric::TokenPerplexity);
    let ItemRequests::Continuation { request } = task.item(0).expect("item").requests else {
        panic!("continuation")
    };
    assert_eq!(
        (request.context.as_str(), request.continuation.as_str()),
        ("a", " b")
    );
}

#[test]
fn schema_mistakes_name_the_task_file_and_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("items.jsonl"),
        "{\"ctx\": \"a\", \"word\": \"b\"}\n",
    )
    .expect("write");
    let head = "name = \"bad\"\nformat = \"loglikelihood\"\nfile = \"items.jsonl\"\ntext = \"ctx\"\n";
    let cases = [
        ("not_for_format", format!("{head}target = \"word\"\nmetrics = [\"acc_norm\"]\n"), &["metrics", "acc_norm", "loglikelihood"][..]),
        ("unknown_metric", format!("{head}target = \"word\"\nmetrics = [\"bogus\"]\n"), &["metrics", "bogus"][..]),
        ("no_target", head.to_string(), &["`target`", "loglikelihood"][..]),
        ("choices", format!("{head}target = \"word\"\nchoices = \"c\"\n"), &["`choices`"][..]),
        ("ppl_in_mc", "name = \"m\"\nformat = \"multiple_choice\"\nfile = \"items.jsonl\"\ntext = \"ctx\"\nchoices = \"c\"\ntarget = \"t\"\nmetrics = [\"perplexity\"]\n".to_string(), &["metrics", "perplexity", "multiple_choice"][..]),
    ];
    for (name, toml, words) in cases {
        let path = write_task(dir.path(), name, &toml);
        let err = Task::load(&path, &TaskOptions::default())
            .expect_err(name)
            .to_string();
        assert!(err.contains(&format!("{name}.toml")), "{name}: {err}");
        for w in words {
            assert!(err.contains(w), "{name}: `{w}` missing from: {err}");
        }
    }
}

// Scratch timing (not committed).
use std::path::{Path, PathBuf};
use std::time::Instant;
use modelglue::checkpoint::Checkpoint;
use modelglue::eval::*;
use modelglue::runtime::Model;

fn cpu_s() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

#[test]
#[ignore]
fn timing() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("eval_lm_eval/smollm2-f32");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let model = Model::load(&ckpt).unwrap();
    let tok = EvalTokenizer::from_checkpoint(&ckpt).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let topts = TaskOptions { data_dir: Some(root.join("../shared/data/benchmarks")), num_fewshot: None };
    let n: usize = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    let configs = std::env::var("CFG").unwrap_or("s0,s256,s1024,f1024".into());
    for file in std::env::var("TASKS").unwrap_or("arc_challenge.toml".into()).split(',') {
        let task = Task::load(&root.join("tasks").join(file), &topts).unwrap();
        for cfg in configs.split(',') {
            let (b, budget) = (if cfg.starts_with('s') { Batching::SharedPrefix } else { Batching::Full }, cfg[1..].parse().unwrap());
            let o = EvalOptions { limit: Some(n), batching: b, token_budget: budget, progress: false, max_length: Some(8192), ..EvalOptions::default() };
            let (t, c) = (Instant::now(), cpu_s());
            let r = Evaluator::new(&model, &tok, o).run(&task).unwrap();
            let load = std::fs::read_to_string("/proc/loadavg").unwrap();
            eprintln!("{file} {cfg}: {n} items wall {:.1}s cpu {:.1}s -> {:.2} items/s wall, {:.2} items/cpu-s  acc {:?} load {}", t.elapsed().as_secs_f64(), cpu_s() - c, n as f64 / t.elapsed().as_secs_f64(), n as f64 / (cpu_s() - c), r.metric("acc"), load.trim());
        }
    }
}

#!/usr/bin/env bash
# Evaluator throughput: `mglue eval` against lm-evaluation-harness 0.4.13 (HF backend, float32,
# batch 1, CPU) on ARC-Challenge with SmolLM2-135M-Instruct, side by side in one run, same items,
# same threads.
#
#   bench/eval_bench.sh [ITEMS] [REPS]     (defaults: 100 items, 1 repetition per tool)
#
# What it does:
#   1. installs lm-eval==0.4.13 into bench/venv (which holds torch + transformers) if missing;
#   2. builds the release `mglue`; fetches the SmolLM2 GGUF (scripts/fetch-models.sh) and converts
#      it with `mglue convert` to a Hugging Face directory (.cache/bench-eval/smollm2) that both
#      tools load;
#   3. runs lm-eval on a local copy of the ARC task (the YAML of shared/fixtures/lm-eval/tasks,
#      reading shared/data/benchmarks/arc_challenge_test_first300.jsonl) with `--limit ITEMS`, and
#      `mglue eval --task tasks/arc_challenge.toml --limit ITEMS --no-cache`, alternating which goes
#      first, each REPS times; threads: OMP_NUM_THREADS=MKL_NUM_THREADS=2 and
#      torch.set_num_threads(2) for lm-eval (OMP_WAIT_POLICY=PASSIVE, as the fixture runs: on a
#      shared machine spin-waiting makes 2-thread torch ~3x slower), RAYON_NUM_THREADS=2 for mglue;
#   4. prints items/s of each (evaluation time: lm-eval's `total_evaluation_time_seconds`, mglue's
#      task `seconds`; and whole-process wall time incl. start-up and model load), the ratio, and
#      whether the two agree on every item's acc / acc_norm prediction; the table is also written
#      to .cache/bench-eval/result.md for BENCHMARKS.md.
#
# Run it with `nice` on a shared machine; it prints the load average before and after.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$PWD"
items="${1:-100}"
reps="${2:-1}"
threads=2
work="$repo/.cache/bench-eval"
venv="$repo/bench/venv"
shared="$(cd "$repo/../shared" && pwd)"
mkdir -p "$work"
log() { printf 'eval_bench: %s\n' "$*" >&2; }

if ! "$venv/bin/python" -c 'import lm_eval, sys; sys.exit(lm_eval.__version__ != "0.4.13")' 2>/dev/null; then
    log "installing lm-eval==0.4.13 into $venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q "lm-eval==0.4.13"
fi
cargo build --release --locked --bin mglue >&2
mglue="$repo/target/release/mglue"
gguf="$(scripts/fetch-models.sh | grep SmolLM2)"
model="$work/smollm2"
if [[ ! -f "$model/model.safetensors" ]]; then
    "$mglue" convert "$gguf" "$model" --overwrite >&2
fi

tasks="$work/lm-eval-tasks"
mkdir -p "$tasks"
sed "s#test: shared/data/benchmarks/#test: $shared/data/benchmarks/#" \
    "$shared/fixtures/lm-eval/tasks/arc_challenge_first300.yaml" >"$tasks/arc_challenge_first300.yaml"

run_lm_eval() {
    local out="$work/lm-eval-out"
    rm -rf "$out"
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads OMP_WAIT_POLICY=PASSIVE \
        /usr/bin/time -f '%e %U %S %M' -o "$work/time.txt" \
        "$venv/bin/python" -c '
import sys, torch
torch.set_num_threads(int(sys.argv[1])); torch.set_num_interop_threads(int(sys.argv[1]))
from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm_eval"] + sys.argv[2:]
cli_evaluate()
' "$threads" run --model hf --model_args "pretrained=$model,dtype=float32" --device cpu \
        --batch_size 1 --num_fewshot 0 --include_path "$tasks" --tasks mg_arc_challenge_first300 \
        --limit "$items" --log_samples --output_path "$out" >"$work/lm-eval.log" 2>&1 || {
        tail -30 "$work/lm-eval.log" >&2
        return 1
    }
    local results samples
    results="$(find "$out" -name 'results_*.json' | head -n 1)"
    samples="$(find "$out" -name 'samples_*.jsonl' | head -n 1)"
    cp "$samples" "$work/lm-eval-samples.jsonl"
    "$venv/bin/python" - "$results" "$work/time.txt" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
wall, user, sys_, rss = open(sys.argv[2]).read().split()
print(json.dumps({"eval_s": float(r["total_evaluation_time_seconds"]), "wall_s": float(wall),
                  "cpu_s": float(user) + float(sys_), "rss_mib": int(rss) // 1024}))
PY
}

run_mglue() {
    RAYON_NUM_THREADS=$threads /usr/bin/time -f '%e %U %S %M' -o "$work/time.txt" \
        "$mglue" -q eval --model "$model" --task "$repo/tasks/arc_challenge.toml" --limit "$items" \
        --no-cache --json >"$work/mglue.json"
    python3 - "$work/mglue.json" "$work/time.txt" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["tasks"][0]
wall, user, sys_, rss = open(sys.argv[2]).read().split()
print(json.dumps({"eval_s": r["seconds"], "wall_s": float(wall), "cpu_s": float(user) + float(sys_),
                  "rss_mib": int(rss) // 1024}))
PY
}

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
: >"$work/runs.jsonl"
for rep in $(seq 1 "$reps"); do
    order=(lm_eval mglue)
    if ((rep % 2 == 0)); then order=(mglue lm_eval); fi
    for tool in "${order[@]}"; do
        log "rep $rep: $tool ($items items)"
        line="$(run_"$tool")"
        printf '{"tool": "%s", "rep": %d, "load": "%s", "m": %s}\n' \
            "$tool" "$rep" "$(cut -d' ' -f1-3 /proc/loadavg)" "$line" >>"$work/runs.jsonl"
    done
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$work" "$items" "$threads" "$load_before" "$load_after" "$(git rev-parse --short HEAD)" <<'PY'
import json, statistics, sys, datetime, os
work, items, threads, lb, la, commit = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
runs = [json.loads(l) for l in open(f"{work}/runs.jsonl")]
def med(tool, key):
    return statistics.median(r["m"][key] for r in runs if r["tool"] == tool)
lm = {k: med("lm_eval", k) for k in ("eval_s", "wall_s", "cpu_s", "rss_mib")}
mg = {k: med("mglue", k) for k in ("eval_s", "wall_s", "cpu_s", "rss_mib")}
# Agreement of the predictions on the same items.
ours = {i["id"]: i for i in json.load(open(f"{work}/mglue.json"))["tasks"][0]["items"]}
diff_acc = diff_norm = n = 0
for line in open(f"{work}/lm-eval-samples.jsonl"):
    s = json.loads(line)
    doc = s["doc"]
    lls = [float(r[0]) for r in s["filtered_resps"]]
    pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
    lens = [len(c) for c in doc["choices"]]
    pred_n = max(range(len(lls)), key=lambda i: (lls[i] / lens[i], -i))
    o = ours[doc["id"]]
    n += 1
    diff_acc += o["pred_acc"] != pred
    diff_norm += o["pred_acc_norm"] != pred_n
rate = lambda s: items / s
rows = [
    "| tool | items | eval time | items/s (eval) | wall (process) | items/s (wall) | CPU (user+sys) | max RSS |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
    f"| lm-eval 0.4.13 (hf, f32, batch 1) | {items} | {lm['eval_s']:.1f} s | {rate(lm['eval_s']):.2f} | {lm['wall_s']:.1f} s | {rate(lm['wall_s']):.2f} | {lm['cpu_s']:.1f} s | {lm['rss_mib']} MiB |",
    f"| mglue eval (f32, shared-prefix batching) | {items} | {mg['eval_s']:.1f} s | {rate(mg['eval_s']):.2f} | {mg['wall_s']:.1f} s | {rate(mg['wall_s']):.2f} | {mg['cpu_s']:.1f} s | {mg['rss_mib']} MiB |",
    f"| **ratio mglue / lm-eval** | | | **{lm['eval_s'] / mg['eval_s']:.2f}x** | | {lm['wall_s'] / mg['wall_s']:.2f}x | {lm['cpu_s'] / mg['cpu_s']:.2f}x (CPU) | |",
]
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
head = (f"Run **{now}** · `bench/eval_bench.sh {items} {len(runs) // 2}` · commit {commit} · {threads} threads each · "
        f"{os.cpu_count()} CPUs · load average before {lb}, after {la} · medians of {len(runs) // 2} run(s) per tool")
agree = f"Predictions on the {n} items: acc differs on {diff_acc}, acc_norm on {diff_norm}."
text = "\n".join([head, "", *rows, "", agree]) + "\n"
open(f"{work}/result.md", "w").write(text)
print(text)
PY

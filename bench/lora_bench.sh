#!/usr/bin/env bash
# LoRA fine-tuning speed, mglue vs PEFT on transformers (the peer), same machine, same run:
# SmolLM2-135M-Instruct (f32), rank 8 on q/k/v/o/gate/up/down of the top 10 blocks, AdamW, batches
# of 8 GSM8K-train sequences cut to 192 tokens, loss on the solution only.
#
#   bench/lora_bench.sh [STEPS] [THREADS]      (default 8 steps, 2 threads; the first step of each
#                                               side is a warm-up and is not counted)
#
# Needs bench/venv (bench/run.sh makes it; this adds nothing to it) and the SmolLM2 zoo's base at
# target/zoo/smollm2/models/smollm2 (`mglue zoo smollm2` makes it). Prints a Markdown row.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
steps="${1:-8}"
threads="${2:-2}"
model=target/zoo/smollm2/models/smollm2
data=../shared/data/train
[ -f "$model/config.json" ] || { echo "lora_bench: no $model; run mglue zoo smollm2 first" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cargo build --release --bin mglue -q
CANDLE_NUM_THREADS="$threads" /usr/bin/time -f '%M' -o "$tmp/mglue.rss" ./target/release/mglue -q zoo smollm2 --train \
    --train-only --domain math --steps "$steps" --adapters "$tmp/adapters" --out "$tmp/zoo" --data "$data"
OMP_NUM_THREADS="$threads" bench/venv/bin/python bench/lora_bench.py "$model" "$data" "$steps" "$threads" >"$tmp/peer.json"
python3 - "$tmp/adapters/math/training_log.json" "$tmp/peer.json" "$tmp/mglue.rss" <<'PY'
import json, sys
ours = json.load(open(sys.argv[1])); peer = json.load(open(sys.argv[2]))
rss = int(open(sys.argv[3]).read().split()[-1]) / 1024
o = sum(ours["step_seconds"][1:]) / (len(ours["step_seconds"]) - 1)
p = sum(peer["step_seconds"][1:]) / (len(peer["step_seconds"]) - 1)
pt = sum(peer["padded_tokens"][1:]) / (len(peer["padded_tokens"]) - 1)
print("| tool | trainable | s / step (8 × ≤192 tokens) | peak RSS MB |")
print("|---|---:|---:|---:|")
print(f"| mglue | {ours['trainable']} | {o:.2f} | {rss:.0f} |")
print(f"| PEFT 0.21 + transformers 5.24 (torch 2.15) | {peer['trainable']} | {p:.2f} (≈{pt:.0f} padded tokens) | {peer['peak_rss_mb']:.0f} |")
print(f"\nmglue / peer step time: {o / p:.2f}×")
PY

#!/usr/bin/env python3
"""The peer side of bench/lora_bench.sh: PEFT LoRA on transformers, the same model, adapter shape,
optimiser, batch and data as `mglue zoo smollm2 --train` (math domain), timed per step.

    lora_bench.py MODEL_DIR TRAIN_DIR STEPS THREADS
"""
import json, sys, time

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

model_dir, train_dir, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
rows = []
with open(f"{train_dir}/gsm8k_train.jsonl") as f:
    for line in f:
        r = json.loads(line)
        ctx, cont = f"Question: {r['prompt']}\nAnswer:", f" {r['solution']}"
        ids = tok.encode(ctx + cont, add_special_tokens=False).ids[:192]
        first = min(len(tok.encode(ctx, add_special_tokens=False).ids), 191)
        rows.append((ids, first))
rows = rows[:-100]  # the held-out items, as mglue keeps them out
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                 layers_to_transform=list(range(20, 30)))
model = get_peft_model(model, cfg)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1.5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
g = torch.Generator().manual_seed(0)
times, tokens = [], []
for step in range(steps):
    batch = [rows[i] for i in torch.randint(len(rows), (8,), generator=g).tolist()]
    n = max(len(r[0]) for r in batch)
    ids = torch.zeros((8, n), dtype=torch.long)
    labels = torch.full((8, n), -100, dtype=torch.long)
    mask = torch.zeros((8, n), dtype=torch.long)
    for b, (r, first) in enumerate(batch):
        ids[b, : len(r)] = torch.tensor(r)
        labels[b, first : len(r)] = torch.tensor(r[first:])
        mask[b, : len(r)] = 1
    t = time.perf_counter()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t)
    tokens.append(8 * n)
print(json.dumps({"trainable": sum(p.numel() for p in params), "step_seconds": times, "padded_tokens": tokens,
                  "peak_rss_mb": __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 1024}))

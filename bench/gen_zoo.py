#!/usr/bin/env python3
"""Writes the benchmark's synthetic Llama zoo: a base model and fine-tunes of it.

Each fine-tune is the base plus a sparse, small perturbation (a random `--ft-density` of the
entries of every tensor moved by N(0, (`--ft-scale` x init std)^2)), so the task vectors are
sparse and overlap with conflicting signs: the situation TIES and DARE are made for. With the
default 10% and the benchmark's TIES density 0.5, 90% of each task vector is exactly zero, so
TIES's top-k threshold falls at |delta| = 0; `--ft-dense-scale` adds a dense tiny component
(every entry moves, as in real fine-tunes) so the threshold falls inside the distribution. The models
are float16, in the Hugging Face layout that real checkpoints ship in: config.json, sharded
`model-0000x-of-0000y.safetensors` and `model.safetensors.index.json`.

Deterministic: every tensor of every model comes from its own generator seeded with
(seed, model, tensor index), so the same arguments write the same bytes. The directory is
written under a temporary name and renamed into place when complete. Needs numpy only.

    python3 bench/gen_zoo.py --out bench/zoo/full-8L --layers 8
"""

import argparse
import json
import os
import shutil
import struct
import sys
import time

import numpy as np


def llama_tensors(hidden, intermediate, layers, vocab):
    """(name, shape, kind) in the order transformers saves a LlamaForCausalLM."""
    out = [("model.embed_tokens.weight", (vocab, hidden), "matrix")]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,), "norm"),
            (p + "mlp.down_proj.weight", (hidden, intermediate), "matrix"),
            (p + "mlp.gate_proj.weight", (intermediate, hidden), "matrix"),
            (p + "mlp.up_proj.weight", (intermediate, hidden), "matrix"),
            (p + "post_attention_layernorm.weight", (hidden,), "norm"),
            (p + "self_attn.k_proj.weight", (hidden, hidden), "matrix"),
            (p + "self_attn.o_proj.weight", (hidden, hidden), "matrix"),
            (p + "self_attn.q_proj.weight", (hidden, hidden), "matrix"),
            (p + "self_attn.v_proj.weight", (hidden, hidden), "matrix"),
        ]
    out += [("model.norm.weight", (hidden,), "norm"), ("lm_head.weight", (vocab, hidden), "matrix")]
    return out


def plan_shards(tensors, max_shard_bytes):
    """Groups tensors into shards in order, as transformers' `max_shard_size` does."""
    shards, cur, size = [], [], 0
    for t in tensors:
        n = int(np.prod(t[1])) * 2
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += n
    if cur:
        shards.append(cur)
    return shards


def shard_header(shard):
    meta, off = {}, 0
    for name, shape, _ in shard:
        n = int(np.prod(shape)) * 2
        meta[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    meta["__metadata__"] = {"format": "pt"}
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text, off


def model_tensors(args, tensor_index, shape, kind, n_models):
    """The base and every fine-tune of one tensor, as float16 arrays."""
    n = int(np.prod(shape))
    rng = np.random.default_rng([args.seed, 0, tensor_index])
    if kind == "norm":
        base = 1.0 + 0.05 * rng.standard_normal(n, dtype=np.float32)
        std = 0.05
    else:
        base = args.init_std * rng.standard_normal(n, dtype=np.float32)
        std = args.init_std
    out = [base.astype(np.float16)]
    for m in range(1, n_models):
        rng = np.random.default_rng([args.seed, m, tensor_index])
        ft = base.copy()
        if args.ft_dense_scale:
            ft += (args.ft_dense_scale * std) * rng.standard_normal(n, dtype=np.float32)
        idx = np.flatnonzero(rng.random(n, dtype=np.float32) < args.ft_density)
        ft[idx] += (args.ft_scale * std) * rng.standard_normal(idx.size, dtype=np.float32)
        out.append(ft.astype(np.float16))
    return out


def config_json(args):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "head_dim": args.hidden // args.heads,
        "vocab_size": args.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": args.init_std,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float16",
        "use_cache": True,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="zoo directory (holds base/, ft1/, ...)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5504)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--fine-tunes", type=int, default=3)
    ap.add_argument("--ft-density", type=float, default=0.1, help="fraction of entries a fine-tune moves")
    ap.add_argument("--ft-scale", type=float, default=0.1, help="perturbation std, in units of the init std")
    ap.add_argument("--ft-dense-scale", type=float, default=0.0,
                    help="also move every entry by N(0, (this x init std)^2): dense task vectors, as real fine-tunes "
                         "have (0 = the sparse-only zoo the benchmark uses)")
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--max-shard-bytes", type=int, default=400_000_000)
    ap.add_argument("--seed", type=int, default=20240607)
    args = ap.parse_args()

    names = ["base"] + [f"ft{i}" for i in range(1, args.fine_tunes + 1)]
    tensors = llama_tensors(args.hidden, args.intermediate, args.layers, args.vocab)
    shards = plan_shards(tensors, args.max_shard_bytes)
    total = sum(int(np.prod(s)) for _, s, _ in tensors)
    print(f"zoo: {len(names)} models x {total / 1e6:.1f}M parameters (float16, {len(shards)} shards each) -> {args.out}",
          file=sys.stderr)

    final = os.path.abspath(args.out)
    temp = final + ".partial"
    shutil.rmtree(temp, ignore_errors=True)
    dirs = [os.path.join(temp, n) for n in names]
    for d in dirs:
        os.makedirs(d)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config_json(args), f, indent=2)
            f.write("\n")

    start = time.time()
    weight_map, index = {}, 0
    for s, shard in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        header, _ = shard_header(shard)
        files = [open(os.path.join(d, fname), "wb") for d in dirs]
        for f in files:
            f.write(header)
        for name, shape, kind in shard:
            for f, arr in zip(files, model_tensors(args, index, shape, kind, len(names))):
                f.write(arr.tobytes())
            weight_map[name] = fname
            index += 1
        for f in files:
            f.close()
        print(f"  shard {s + 1}/{len(shards)} written ({time.time() - start:.0f}s)", file=sys.stderr)

    idx = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    for d in dirs:
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump(idx, f, indent=2)
            f.write("\n")
    with open(os.path.join(temp, "zoo.json"), "w") as f:
        json.dump({"args": vars(args), "models": names, "parameters": total}, f, indent=2)
        f.write("\n")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(temp, final)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Writes the small seed corpus of the fuzz targets (fuzz/corpus/<target>/seed-*).

Standard library only. Seeds are tiny but valid inputs, so the fuzzer starts from files that
reach deep into each parser: safetensors files of each dtype, GGUF models of each supported
architecture (F32 and Q8_0 tensors, both tokenizer kinds), and mergekit YAML configs.
Run from the repository root: python3 fuzz/make_seeds.py
"""
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# ---- safetensors ---------------------------------------------------------------------------
def safetensors(tensors, meta=True, pad=True):
    header, data = {}, b""
    if meta:
        header["__metadata__"] = {"format": "pt"}
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


f32 = lambda *v: struct.pack(f"<{len(v)}f", *v)
out("safetensors", "f32", safetensors([("a.weight", "F32", [2, 2], f32(1, 2, 3, 4)), ("b", "F32", [0], b"")]))
out("safetensors", "halves", safetensors([
    ("h", "F16", [3], struct.pack("<3e", 1.0, -2.0, 0.5)),
    ("bf", "BF16", [2], b"\x80\x3f\x00\xc0"),
    ("d", "F64", [1], struct.pack("<d", 3.0)),
]))
out("safetensors", "ints", safetensors([
    ("i64", "I64", [1], struct.pack("<q", -1)),
    ("i32", "I32", [1, 1], struct.pack("<i", 7)),
    ("i16", "I16", [1], struct.pack("<h", 7)),
    ("u32", "U32", [1], struct.pack("<I", 7)),
    ("u8", "U8", [3], b"abc"),
    ("f8", "F8_E4M3", [2], b"\x38\x40"),
], meta=False, pad=False))

# ---- GGUF ----------------------------------------------------------------------------------
U32, I32, F32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gval(ty, v):
    if ty == U32:
        return struct.pack("<I", v)
    if ty == I32:
        return struct.pack("<i", v)
    if ty == F32:
        return struct.pack("<f", v)
    if ty == BOOL:
        return struct.pack("<B", v)
    if ty == STRING:
        return gstr(v)
    if ty == ARRAY:
        ety, items = v
        return struct.pack("<IQ", ety, len(items)) + b"".join(gval(ety, i) for i in items)
    raise ValueError(ty)


def q8_0(values):
    # Blocks of 32: f16 scale, 32 int8.
    outb = b""
    for i in range(0, len(values), 32):
        blk = values[i:i + 32]
        amax = max(abs(x) for x in blk) or 1.0
        d = amax / 127
        outb += struct.pack("<e", d) + bytes((round(x / d) & 0xFF) for x in blk)
    return outb


def gguf(kvs, tensors, alignment=32):
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for k, ty, v in kvs:
        head += gstr(k) + struct.pack("<I", ty) + gval(ty, v)
    data, infos = b"", b""
    for name, shape, ggml_type, raw in tensors:
        data += b"\0" * (-len(data) % alignment)
        dims = list(reversed(shape))  # GGUF stores the innermost dimension first.
        infos += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", ggml_type, len(data))
        data += raw
    head += infos
    head += b"\0" * (-len(head) % alignment)
    return head + data


def tiny(arch, spm=False, quant=False):
    # Q8_0 needs rows that are whole 32-element blocks.
    hidden, heads, kv, ffn, layers = (32, 2, 1, 32, 1) if quant else (8, 2, 1, 8, 1)
    hd = hidden // heads
    if spm:
        tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "\u2581", "a", "b", "ab"]
        tok = [
            ("tokenizer.ggml.model", STRING, "llama"),
            ("tokenizer.ggml.pre", STRING, "default"),
            ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
            ("tokenizer.ggml.scores", ARRAY, (F32, [-1000.0] * 4 + [-1.0, -2.0, -3.0, -4.0])),
            ("tokenizer.ggml.token_type", ARRAY, (I32, [3, 3, 3, 3, 1, 1, 1, 1])),
            ("tokenizer.ggml.bos_token_id", U32, 2),
            ("tokenizer.ggml.eos_token_id", U32, 1),
            ("tokenizer.ggml.unknown_token_id", U32, 3),
            ("tokenizer.ggml.padding_token_id", U32, 0),
            ("tokenizer.ggml.add_bos_token", BOOL, 1),
        ]
    else:
        tokens = ["<|endoftext|>", "a", "b", "ab"]
        tok = [
            ("tokenizer.ggml.model", STRING, "gpt2"),
            ("tokenizer.ggml.pre", STRING, "qwen2" if arch == "qwen2" else "gpt-2"),
            ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
            ("tokenizer.ggml.token_type", ARRAY, (I32, [3, 1, 1, 1])),
            ("tokenizer.ggml.merges", ARRAY, (STRING, ["a b"])),
            ("tokenizer.ggml.eos_token_id", U32, 0),
            ("tokenizer.chat_template", STRING, "{{ messages[0]['content'] }}"),
        ]
    vocab = len(tokens)
    kvs = [
        ("general.architecture", STRING, arch),
        (f"{arch}.embedding_length", U32, hidden),
        (f"{arch}.block_count", U32, layers),
        (f"{arch}.attention.head_count", U32, heads),
        (f"{arch}.attention.head_count_kv", U32, kv),
        (f"{arch}.feed_forward_length", U32, ffn),
        (f"{arch}.context_length", U32, 64),
        (f"{arch}.attention.layer_norm_rms_epsilon", F32, 1e-6),
        (f"{arch}.rope.freq_base", F32, 10000.0),
    ] + tok
    tensors = []

    def add(name, shape):
        n = 1
        for d in shape:
            n *= d
        vals = [((i * 7 + len(tensors)) % 13 - 6) / 8 for i in range(n)]
        if quant and shape[-1] % 32 == 0:
            tensors.append((name, shape, 8, q8_0(vals)))
        else:
            tensors.append((name, shape, 0, struct.pack(f"<{n}f", *vals)))

    add("token_embd.weight", [vocab, hidden])
    add("output_norm.weight", [hidden])
    for i in range(layers):
        b = f"blk.{i}."
        add(b + "attn_q.weight", [heads * hd, hidden])
        add(b + "attn_k.weight", [kv * hd, hidden])
        add(b + "attn_v.weight", [kv * hd, hidden])
        add(b + "attn_output.weight", [hidden, heads * hd])
        add(b + "ffn_gate.weight", [ffn, hidden])
        add(b + "ffn_up.weight", [ffn, hidden])
        add(b + "ffn_down.weight", [hidden, ffn])
        add(b + "attn_norm.weight", [hidden])
        add(b + "ffn_norm.weight", [hidden])
        if arch == "qwen2":
            add(b + "attn_q.bias", [heads * hd])
            add(b + "attn_k.bias", [kv * hd])
            add(b + "attn_v.bias", [kv * hd])
        if arch == "gemma3":
            add(b + "post_attention_norm.weight", [hidden])
            add(b + "post_ffw_norm.weight", [hidden])
            add(b + "attn_q_norm.weight", [hd])
            add(b + "attn_k_norm.weight", [hd])
    if arch == "qwen2":
        add("output.weight", [vocab, hidden])
    return gguf(kvs, tensors)


out("gguf", "llama-gpt2", tiny("llama"))
out("gguf", "llama-spm-q8", tiny("llama", spm=True, quant=True))
out("gguf", "qwen2", tiny("qwen2"))
out("gguf", "gemma3-spm", tiny("gemma3", spm=True))

# ---- mergekit YAML -------------------------------------------------------------------------
src = os.path.join(HERE, "..", "..", "shared", "fixtures", "mergekit")
yamls = []
for root, _, files in os.walk(src):
    for f in sorted(files):
        if f.endswith((".yml", ".yaml")):
            yamls.append(os.path.join(root, f))
for p in sorted(yamls)[:24]:
    rel = os.path.relpath(p, src).replace(os.sep, "-")
    shutil.copyfile(p, os.path.join(HERE, "corpus", "mergekit_yaml", "seed-" + rel))
out("mergekit_yaml", "inline-ties", b"""merge_method: ties
base_model: ./base
models:
  - model: ./a
    parameters:
      weight: [0.0, 0.5, 1.0]
      density: {filter: mlp, value: 0.5}
  - model: ./b
    parameters: {weight: 0.3}
parameters:
  normalize: true
  int8_mask: false
dtype: bfloat16
tokenizer_source: union
""")
out("mergekit_yaml", "inline-slices", b"""slices:
  - sources:
      - model: ./a
        layer_range: [0, 2]
      - model: ./b
        layer_range: [0, 2]
        parameters:
          t: 0.5
merge_method: slerp
base_model: ./a
dtype: float16
""")
out("mergekit_yaml", "inline-moe", b"""base_model: ./base
gate_mode: random
dtype: bfloat16
experts:
  - source_model: ./a
    positive_prompts: ["code"]
  - source_model: ./b
""")

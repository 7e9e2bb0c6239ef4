#!/usr/bin/env python3
"""The mglue-vs-mergekit merge benchmark driver (stdlib only; `bench/run.sh` calls it).

For every method it writes one mergekit YAML config (absolute model paths) that both tools
run unchanged, then, for each repetition, runs mglue and mergekit in alternating order plus
the I/O floor, each under `measure.py` (wall, user+sys CPU, peak RSS). Before every run the
previous output is removed and dirty pages are flushed (`sync`, untimed), so no run pays for
the writeback of another. After the first repetition of a method the two outputs are
compared tensor by tensor (`compare.py`, untimed). Results go to a JSON file and to a
Markdown table between the `<!-- bench:begin -->` / `<!-- bench:end -->` markers of
`--markdown` (the text around the markers is kept).

    python3 bench/bench.py --zoo bench/zoo/full-8L --reps 3 --markdown BENCHMARKS.md
    python3 bench/bench.py render bench/zoo/work-full-8L/results.json --markdown BENCHMARKS.md
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import measure  # noqa: E402

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# Targets of the issue "Every merge method as a plugin ... several times faster than mergekit".
SPEEDUP_TARGET = {"linear": 5.0, "ties": 20.0}
RSS_TARGET = {"linear": 1 / 3}
FLOOR_TARGET = 3.0


def method_configs(zoo):
    """(method, plugin name or None for a built-in, YAML text, input model dirs, donor dir)."""
    base, fts = os.path.join(zoo, "base"), [os.path.join(zoo, f"ft{i}") for i in (1, 2, 3)]
    ft_lines = "".join(f"  - model: {m}\n    parameters:\n      weight: 1.0\n      density: 0.5\n" for m in fts)
    lin_lines = "".join(f"  - model: {m}\n    parameters:\n      weight: 0.25\n" for m in [base] + fts)
    return [
        ("linear", "linear",
         f"merge_method: linear\nmodels:\n{lin_lines}parameters:\n  normalize: true\ndtype: float16\n",
         [base] + fts, base),
        ("ties", "ties",
         f"merge_method: ties\nbase_model: {base}\nmodels:\n{ft_lines}parameters:\n  normalize: true\ndtype: float16\n",
         [base] + fts, base),
        ("dare_ties", "dare_ties",
         f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n{ft_lines}parameters:\n  normalize: true\ndtype: float16\n",
         [base] + fts, base),
        # Built into mglue (no plugin): the tools' own read-one-model, write-it-back I/O path.
        ("passthrough", None,
         f"merge_method: passthrough\nmodels:\n  - model: {base}\ndtype: float16\n",
         [base], base),
        ("slerp", "slerp",
         f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {fts[0]}\n"
         f"parameters:\n  t: 0.5\ndtype: float16\n",
         [base, fts[0]], base),
    ]


def shard_files(model_dir):
    return sorted(os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.endswith(".safetensors"))


def dir_bytes(d):
    return sum(os.path.getsize(f) for f in shard_files(d)) if os.path.isdir(d) else 0


def output_ok(out, expected_bytes):
    """The output exists, has a config and safetensors holding at least the tensor bytes."""
    if not os.path.isfile(os.path.join(out, "config.json")):
        return False, "no config.json"
    got = dir_bytes(out)
    if got < expected_bytes:
        return False, f"safetensors hold {got} bytes, expected >= {expected_bytes}"
    return True, f"{got} bytes"


def sh(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def mglue_plugins(mglue, env):
    r = sh([mglue, "plugins", "list", "--json"], env=env)
    try:
        return {p["name"] for p in json.loads(r.stdout)}
    except (json.JSONDecodeError, TypeError):
        return set()


def machine_info(args):
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    info["nproc"] = os.cpu_count()
    try:
        info["nproc"] = int(sh(["nproc"]).stdout.strip())
    except ValueError:
        pass
    with open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    info["cpu"] = models[0] if models else platform.processor()
    with open("/proc/meminfo") as f:
        mem = {line.split(":")[0]: line.split(":")[1].strip() for line in f}
    info["memory"] = f"{int(mem['MemTotal'].split()[0]) / 1024 / 1024:.1f} GiB"
    info["kernel"] = platform.release()
    info["rustc"] = sh(["rustc", "--version"]).stdout.strip()
    info["mglue_commit"] = sh(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
    dirty = sh(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    if dirty:
        info["mglue_commit"] += " (+ uncommitted changes)"
    build_info = os.path.join(os.path.dirname(args.mglue), "BUILD_INFO")
    if os.path.exists(build_info):
        with open(build_info) as f:
            lines = f.read().splitlines()
        info["mglue_commit"] = next((x.split(": ", 1)[1] for x in lines if x.startswith("commit: ")), info["mglue_commit"])
        info["mglue_built"] = next((x.split(": ", 1)[1] for x in lines if x.startswith("built: ")), "?")
        info["mglue_binaries"] = [x for x in lines if ":" not in x]
    info["mglue_version"] = sh([args.mglue, "--version"]).stdout.strip()
    py = args.python
    r = sh([py, "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'), "
            "m.version('transformers'))"])
    parts = r.stdout.split()
    info["mergekit"], info["torch"], info["transformers"] = (parts + ["?"] * 3)[:3]
    info["python"] = sh([py, "-c", "import platform; print(platform.python_version())"]).stdout.strip()
    return info


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_bench(args):
    zoo = os.path.abspath(args.zoo)
    work = os.path.abspath(args.work)
    os.makedirs(os.path.join(work, "configs"), exist_ok=True)
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    with open(os.path.join(zoo, "zoo.json")) as f:
        zoo_info = json.load(f)
    expected = zoo_info["parameters"] * 2
    t = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t, RAYON_NUM_THREADS=t,
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RUST_LOG", None)
    plugins = mglue_plugins(args.mglue, env)
    results = {"machine": machine_info(args), "zoo": zoo_info, "threads": args.threads, "reps": args.reps,
               "command": args.command, "load_before": loadavg(), "methods": {}}
    print(f"machine: {results['machine']}", file=sys.stderr)
    print(f"mglue plugins: {sorted(plugins)}", file=sys.stderr)

    # Start-up cost alone (interpreter + imports / plugin loading), a part of every merge's wall time.
    results["startup"] = {"mglue": [], "mergekit": []}
    for _ in range(3):
        for tool, cmd in (("mglue", [args.mglue, "plugins", "list"]),
                          ("mergekit", [os.path.join(os.path.dirname(args.python), "mergekit-yaml"), "--help"])):
            r = measure(cmd, log=os.path.join(work, "logs", f"startup-{tool}.log"), env=env)
            r["ok"] = r["rc"] == 0
            results["startup"][tool].append(r)
    print("startup: " + ", ".join(f"{k} {med(v, 'wall_s'):.2f}s" for k, v in results["startup"].items()), file=sys.stderr)

    todo = []
    for method, plugin, yaml, inputs, donor in method_configs(zoo):
        if args.methods and method not in args.methods:
            continue
        cfg = os.path.join(work, "configs", f"{method}.yml")
        with open(cfg, "w") as f:
            f.write(yaml)
        entry = {"config": cfg, "inputs": inputs, "runs": {"mglue": [], "mergekit": [], "floor": [], "floor_fsync": []}}
        if plugin is not None and plugin not in plugins:
            entry["mglue_unavailable"] = f"no `{plugin}` plugin found by {args.mglue}"
        else:
            r = sh([args.mglue, "-q", "merge", cfg, "--out", os.path.join(work, "dry"), "--dry-run"], env=env)
            if r.returncode != 0:
                entry["mglue_unavailable"] = "config refused: " + (r.stderr.strip().splitlines() or ["?"])[-1]
        results["methods"][method] = entry
        todo.append((method, cfg, inputs, donor, entry))

    def save():
        with open(args.results, "w") as f:
            json.dump(results, f, indent=2)
        if args.markdown:
            write_markdown(results, args.markdown)

    for rep in range(args.reps):
        for mi, (method, cfg, inputs, donor, entry) in enumerate(todo):
            out = {tool: os.path.join(work, f"out-{method}-{tool}") for tool in ("mglue", "mergekit", "floor")}
            cmds = {
                "mglue": [args.mglue, "-q", "merge", cfg, "--out", out["mglue"], "--threads", t],
                "mergekit": [os.path.join(os.path.dirname(args.python), "mergekit-yaml"), cfg, out["mergekit"],
                             "-j", t, "--no-copy-tokenizer", "--quiet", "--random-seed", "42"],
            }
            inputs_q = " ".join(f"'{p}'" for d in inputs for p in shard_files(d))
            donor_q = " ".join(f"'{p}'" for p in shard_files(donor))
            floor_cmd = (f"cat {inputs_q} > /dev/null && mkdir -p '{out['floor']}' && "
                         f"cp {donor_q} '{donor}/config.json' '{donor}/model.safetensors.index.json' '{out['floor']}/'")
            cmds["floor"] = ["sh", "-c", floor_cmd]
            cmds["floor_fsync"] = ["sh", "-c", floor_cmd + f" && sync '{out['floor']}'/*"]
            # Alternate which tool goes first, so neither always runs right after the floor's reads.
            order = ["mglue", "mergekit"] if (rep + mi) % 2 == 0 else ["mergekit", "mglue"]
            order += ["floor", "floor_fsync"]
            for tool in order:
                if tool == "mglue" and "mglue_unavailable" in entry:
                    continue
                target = out["floor" if tool.startswith("floor") else tool]
                shutil.rmtree(target, ignore_errors=True)
                os.sync()
                log = os.path.join(work, "logs", f"{method}-{tool}-rep{rep}.log")
                print(f"[rep {rep + 1}/{args.reps}] {method:<10} {tool:<12} (load {loadavg()}) ...",
                      end="", flush=True, file=sys.stderr)
                r = measure(cmds[tool], log=log, env=env)
                r["ok"], r["check"] = output_ok(target, expected if tool != "floor" else 0) if r["rc"] == 0 \
                    else (False, f"exit {r['rc']}, see {log}")
                if r["rc"] != 0:
                    with open(log, errors="replace") as f:
                        tail = f.read().strip().splitlines()[-3:]
                    r["check"] += ": " + " | ".join(tail)
                r["load"] = loadavg()
                entry["runs"][tool].append(r)
                print(f" wall {r['wall_s']:.1f}s cpu {r['cpu_s']:.1f}s rss {r['max_rss_kb'] / 1024:.0f}MiB "
                      f"{'ok' if r['ok'] else 'FAILED ' + r['check']}", file=sys.stderr)
                save()
            if rep == 0 and args.compare and all(entry["runs"][k] and entry["runs"][k][-1]["ok"]
                                                  for k in ("mglue", "mergekit")):
                r = sh([args.python, os.path.join(os.path.dirname(__file__), "compare.py"),
                        out["mglue"], out["mergekit"], "--json"])
                try:
                    entry["compare"] = json.loads(r.stdout)
                except json.JSONDecodeError:
                    entry["compare"] = {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
                print(f"  compare {method}: {entry['compare'].get('summary', entry['compare'])}", file=sys.stderr)
            for target in out.values():
                shutil.rmtree(target, ignore_errors=True)
            save()
    results["load_after"] = loadavg()
    save()
    return results


def med(runs, key):
    vals = [r[key] for r in runs if r.get("ok")]
    return statistics.median(vals) if vals else None


def fmt_s(v):
    return "—" if v is None else (f"{v:.1f} s" if v >= 10 else f"{v:.2f} s")


def fmt_mb(kb):
    return "—" if kb is None else f"{kb / 1024:.0f} MiB"


def fmt_x(v, digits=1):
    return "—" if v is None else f"{v:.{digits}f}×"


def verdict(ok):
    return "" if ok is None else (" ✅" if ok else " ❌")


def write_markdown(results, path):
    m, z = results["machine"], results["zoo"]
    za = z["args"]
    lines = [BEGIN, ""]
    lines.append(f"Run **{m['date']}** · `{results['command']}`  ")
    lines.append(f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}; "
                 f"load average before {results.get('load_before', '?')}, after {results.get('load_after', 'running')}  ")
    lines.append(f"{m['mglue_version']} built {m.get('mglue_built', '?')} from {m['mglue_commit']}, {m['rustc']}; "
                 f"mergekit {m['mergekit']}, torch {m['torch']} (CPU), transformers {m['transformers']}, "
                 f"Python {m['python']}  ")
    lines.append(f"Zoo: {len(z['models'])} float16 Llama models of {z['parameters'] / 1e6:.0f}M parameters "
                 f"({za['layers']} layers, hidden {za['hidden']}, intermediate {za['intermediate']}, vocab {za['vocab']}, "
                 f"{za['heads']} heads; {z['parameters'] * 2 / 1e9:.2f} GB each); fine-tunes = base + N(0, "
                 f"({za['ft_scale']}·σ)²) on {za['ft_density']:.0%} of the entries.  ")
    lines.append(f"Threads: {results['threads']} for both tools; {results['reps']} repetition(s), tools alternating; "
                 f"medians of successful runs (n= where a cell has another count); the floor is the fastest of its "
                 f"runs with and without fsync, its median in parentheses.")
    lines.append("")
    lines.append("| method | mergekit wall | mglue wall | speed-up (mergekit/mglue) | target | mergekit CPU | mglue CPU "
                 "| CPU ratio | floor wall: fastest (median) | mglue / fastest floor | target |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    mem = []
    for method, e in results["methods"].items():
        R = e["runs"]
        mk_w, mg_w = med(R["mergekit"], "wall_s"), med(R["mglue"], "wall_s")
        mk_c, mg_c = med(R["mergekit"], "cpu_s"), med(R["mglue"], "cpu_s")
        # The floor is a lower bound and noise only inflates it: take the fastest of all its runs
        # (with or without fsync), and show the median beside it.
        floor_walls = [r["wall_s"] for r in R["floor"] + R["floor_fsync"] if r.get("ok")]
        fl = min(floor_walls) if floor_walls else None
        fl_med = statistics.median(floor_walls) if floor_walls else None
        na = e.get("mglue_unavailable")
        n_mg, n_mk = sum(r.get("ok", False) for r in R["mglue"]), sum(r.get("ok", False) for r in R["mergekit"])
        if na:
            mg_cell = "not available"
        elif mg_w is None and R["mglue"]:
            mg_cell = "failed: " + R["mglue"][-1]["check"].replace("|", "/")[:120]
        else:
            mg_cell = fmt_s(mg_w) + (f" (n={n_mg})" if n_mg != results["reps"] else "")
        mk_cell = fmt_s(mk_w) if mk_w is not None or not R["mergekit"] else \
            "failed: " + R["mergekit"][-1]["check"].replace("|", "/")[:120]
        if mk_w is not None and n_mk != results["reps"]:
            mk_cell += f" (n={n_mk})"
        sp = mk_w / mg_w if mk_w and mg_w else None
        tgt = SPEEDUP_TARGET.get(method)
        sp_cell = fmt_x(sp) + (verdict(sp >= tgt) if sp and tgt else "")
        ratio_floor = mg_w / fl if mg_w and fl else None
        rf_cell = fmt_x(ratio_floor) + (verdict(ratio_floor <= FLOOR_TARGET) if ratio_floor else "")
        lines.append(f"| {method} | {mk_cell} | {mg_cell} | {sp_cell} | {'≥ %g×' % tgt if tgt else '—'} "
                     f"| {fmt_s(mk_c)} | {fmt_s(mg_c) if not na else '—'} | {fmt_x(mk_c / mg_c if mk_c and mg_c else None)} "
                     f"| {fmt_s(fl)} ({fmt_s(fl_med)}) | {rf_cell} | ≤ {FLOOR_TARGET:g}× |")
        mk_r, mg_r = med(R["mergekit"], "max_rss_kb"), med(R["mglue"], "max_rss_kb")
        rr = mg_r / mk_r if mk_r and mg_r else None
        rt = RSS_TARGET.get(method)
        mem.append(f"| {method} | {fmt_mb(mk_r)} | {fmt_mb(med(R['mergekit'], 'peak_anon_kb_sampled'))} "
                   f"| {fmt_mb(mg_r) if not na else 'not available'} "
                   f"| {fmt_mb(med(R['mglue'], 'peak_anon_kb_sampled')) if not na else '—'} "
                   f"| {fmt_x(rr, 2) + (verdict(rr <= rt) if rr and rt else '')} | {'≤ 0.33×' if rt else '—'} "
                   f"| {fmt_mb(med(R['floor'], 'max_rss_kb'))} |")
    st = results.get("startup")
    if st:
        lines.append(f"| *start-up only* (`mglue plugins list` / `mergekit-yaml --help`) | {fmt_s(med(st['mergekit'], 'wall_s'))} "
                     f"| {fmt_s(med(st['mglue'], 'wall_s'))} | | | {fmt_s(med(st['mergekit'], 'cpu_s'))} "
                     f"| {fmt_s(med(st['mglue'], 'cpu_s'))} | | | | |")
    lines.append("")
    lines.append("Peak resident memory (kernel's max RSS of the process; it counts the pages of memory-mapped inputs "
                 "the process has touched, which the kernel can drop at will; *anon* is the sampled peak of heap / "
                 "anonymous memory alone):")
    lines.append("")
    lines.append("| method | mergekit max RSS | mergekit anon | mglue max RSS | mglue anon | RSS ratio (mglue/mergekit) "
                 "| target | floor max RSS |")
    lines.append("|---|---|---|---|---|---|---|---|")
    lines += mem
    cmp_lines = []
    for method, e in results["methods"].items():
        c = e.get("compare")
        if c:
            cmp_lines.append(f"| {method} | {c.get('summary', c.get('error', '?'))} |")
    if cmp_lines:
        lines += ["", "Outputs compared (first repetition, mglue vs mergekit, all tensors, in f32):", "",
                  "| method | result |", "|---|---|"] + cmp_lines
    lines.append("")
    lines.append("<details><summary>Every run</summary>")
    lines.append("")
    lines.append("| method | tool | rep | wall | user | sys | max RSS | anon (sampled) | file-backed (sampled) "
                 "| major faults | minor faults | load after | check |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for method, e in results["methods"].items():
        for tool, runs in e["runs"].items():
            for i, r in enumerate(runs):
                lines.append(f"| {method} | {tool} | {i + 1} | {fmt_s(r['wall_s'])} | {fmt_s(r['user_s'])} "
                             f"| {fmt_s(r['sys_s'])} | {fmt_mb(r['max_rss_kb'])} | {fmt_mb(r['peak_anon_kb_sampled'])} "
                             f"| {fmt_mb(r['peak_file_kb_sampled'])} | {r['major_faults']} | {r['minor_faults']} "
                             f"| {r.get('load', '?')} | {'ok' if r['ok'] else r['check'].replace('|', '/')[:160]} |")
    lines += ["", "</details>", "", END]
    block = "\n".join(lines)
    text = open(path).read() if os.path.exists(path) else ""
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        post = rest.split(END, 1)[1]
        text = pre + block + post
    else:
        text = (text.rstrip() + "\n\n" if text else "# Benchmarks\n\n") + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "render":
        ap = argparse.ArgumentParser(prog="bench.py render")
        ap.add_argument("results")
        ap.add_argument("--markdown", required=True)
        a = ap.parse_args(sys.argv[2:])
        with open(a.results) as f:
            write_markdown(json.load(f), a.markdown)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--work", help="configs, logs, outputs and results (default: <zoo>-work)")
    ap.add_argument("--mglue", default="target/release/mglue")
    ap.add_argument("--python", default="bench/venv/bin/python", help="the mergekit virtualenv's python")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="*", help="subset of linear ties dare_ties passthrough slerp")
    ap.add_argument("--no-compare", dest="compare", action="store_false")
    ap.add_argument("--results", help="JSON results (default: <work>/results.json)")
    ap.add_argument("--markdown", help="Markdown file whose bench:begin/end block receives the table")
    ap.add_argument("--command", default=" ".join(sys.argv), help="the command line to record")
    a = ap.parse_args()
    a.work = a.work or a.zoo.rstrip("/") + "-work"
    a.results = a.results or os.path.join(a.work, "results.json")
    a.mglue = os.path.abspath(a.mglue)
    a.python = os.path.abspath(a.python)
    t0 = time.time()
    run_bench(a)
    print(f"done in {time.time() - t0:.0f}s; results in {a.results}" + (f" and {a.markdown}" if a.markdown else ""),
          file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The load test at benchmark size: one `mglue merge` of 12 models of 536M parameters (float16,
1.07 GB each), its measured peak memory against the bound its pre-flight line prints.

The 12 model directories are hard links to the 4 models of bench/zoo/full-8L (written by
bench/gen_zoo.py), 3 links each, so nothing is copied: they are 12 distinct checkpoints to the
merge (each opened and memory-mapped on its own), sharing the page cache. Peak memory is the
child's ru_maxrss from wait4. The merged output is deleted afterwards. Standard library only.

    python3 bench/load12.py [--mglue target/release/mglue] [--threads 2] [--method linear]
    python3 bench/load12.py --method ties --base --model-params density=0.5
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mglue", default=os.path.join(ROOT, "target", "release", "mglue"))
    ap.add_argument("--zoo", default=os.path.join(HERE, "zoo", "full-8L"))
    ap.add_argument("--work", default=os.path.join(HERE, "zoo", "load12"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="linear")
    ap.add_argument("--base", action="store_true", help="pass the zoo's base model as --base")
    ap.add_argument("--param", action="append", default=[], help="K=V, repeatable (global parameter)")
    ap.add_argument("--model-params", default="", help="extra per-model K=V,... after weight")
    args = ap.parse_args()

    sources = [os.path.join(args.zoo, m) for m in ("base", "ft1", "ft2", "ft3")]
    shutil.rmtree(args.work, ignore_errors=True)
    models = []
    for i in range(12):
        src, dst = sources[i % 4], os.path.join(args.work, f"m{i:02}")
        os.makedirs(dst)
        for f in os.listdir(src):
            os.link(os.path.join(src, f), os.path.join(dst, f))
        models.append(dst)
    out = os.path.join(args.work, "merged")
    cmd = [args.mglue, "-q", "merge", "--method", args.method, "--threads", str(args.threads), "--out", out]
    extra = f",{args.model_params}" if args.model_params else ""
    for m in models:
        cmd += ["--model", f"{m}:weight={1 / 12}{extra}"]
    if args.base:
        cmd += ["--base", sources[0]]
    for p in args.param:
        cmd += ["--param", p]

    start = time.time()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = child.communicate()
    # communicate() reaped it; its rusage is what RUSAGE_CHILDREN now holds for this process,
    # which has started no other child.
    import resource

    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    wall = time.time() - start
    text = stdout + stderr
    if child.returncode != 0:
        sys.exit(f"mglue failed ({child.returncode}):\n{text}")
    m = re.search(r"peak memory bound ≈ ([0-9.]+) MB", text)
    if not m:
        sys.exit(f"no pre-flight estimate in:\n{text}")
    bound = float(m.group(1)) * 1e6
    out_bytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    shutil.rmtree(args.work)
    print("| models | method | threads | output | wall | peak RSS | printed bound | peak / bound |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| 12 x 536M f16 | {args.method} | {args.threads} | {out_bytes / 1e9:.2f} GB | {wall:.0f} s "
        f"| {peak / 1e9:.2f} GB | {bound / 1e9:.2f} GB | {peak / bound:.2f} |"
    )
    if peak > bound:
        sys.exit("peak exceeds the printed bound")


if __name__ == "__main__":
    main()

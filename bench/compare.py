#!/usr/bin/env python3
"""Compares two Hugging Face safetensors checkpoints tensor by tensor (numpy + safetensors).

Prints, over all tensors: how many elements are bit-identical, the largest absolute
difference, the largest difference in units of the last place (ulp, of the stored dtype) and
the relative L2 error ||a - b|| / ||b||. Random methods (DARE) draw different masks in the two
tools, so only their scale is comparable, not their elements.

    bench/venv/bin/python bench/compare.py OUT_A OUT_B [--json]
"""

import argparse
import json
import math
import os

import numpy as np
from safetensors import safe_open


def tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            h = safe_open(os.path.join(d, f), framework="numpy")
            for k in h.keys():
                out[k] = (h, k)
    return out


def ulp_diff(a, b):
    """|a - b| in ulps for float16/float32 arrays of one dtype (ordered-integer trick)."""
    it = {np.dtype(np.float16): np.int16, np.dtype(np.float32): np.int32}.get(a.dtype)
    if it is None:
        return None
    ia, ib = a.view(it).astype(np.int64), b.view(it).astype(np.int64)
    sign = np.int64(1) << (8 * a.dtype.itemsize - 1)
    ia = np.where(ia < 0, -(ia + sign), ia)
    ib = np.where(ib < 0, -(ib + sign), ib)
    return int(np.abs(ia - ib).max()) if ia.size else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ta, tb = tensors(args.a), tensors(args.b)
    only = sorted(set(ta) ^ set(tb))
    n = same = 0
    max_abs, max_ulp, num, den = 0.0, 0, 0.0, 0.0
    dtypes = set()
    for name in sorted(set(ta) & set(tb)):
        a = ta[name][0].get_tensor(name)
        b = tb[name][0].get_tensor(name)
        dtypes.add(f"{a.dtype}/{b.dtype}")
        if a.shape != b.shape:
            only.append(f"{name} (shape {a.shape} vs {b.shape})")
            continue
        if a.dtype == b.dtype:
            ut = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize]
            same += int(np.count_nonzero(a.view(ut) == b.view(ut)))
            u = ulp_diff(a, b)
            if u is not None:
                max_ulp = max(max_ulp, u)
        n += a.size
        fa, fb = a.astype(np.float32), b.astype(np.float32)
        d = fa - fb
        max_abs = max(max_abs, float(np.abs(d).max()) if d.size else 0.0)
        num += float(np.dot(d.ravel().astype(np.float64), d.ravel().astype(np.float64)))
        den += float(np.dot(fb.ravel().astype(np.float64), fb.ravel().astype(np.float64)))
    rel = math.sqrt(num / den) if den else 0.0
    r = {
        "elements": n,
        "identical_fraction": same / n if n else 0.0,
        "max_abs_diff": max_abs,
        "max_ulp": max_ulp,
        "rel_l2": rel,
        "dtypes": sorted(dtypes),
        "mismatched_tensors": only,
    }
    r["summary"] = (f"{r['identical_fraction']:.4%} of {n / 1e6:.0f}M elements bit-identical; max abs diff {max_abs:.3g} "
                    f"({max_ulp} ulp); rel. L2 error {rel:.2e}; dtypes {', '.join(sorted(dtypes))}"
                    + (f"; {len(only)} tensors differ in name/shape" if only else ""))
    print(json.dumps(r, indent=2) if args.json else r["summary"])


if __name__ == "__main__":
    main()

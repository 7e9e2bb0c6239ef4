#!/usr/bin/env python3
"""Independent float64 reference for the `nuslerp` plugin (numpy only, no mergekit code).

Written from the math in shared/reference/ALGORITHMS.md (B.3, nuslerp):
  t = w2 / (w1 + w2), or 0.5 when |w1 + w2| < 1e-6
  with a base: out = base + nuslerp(m1 - base, m2 - base)
  per vector: u = x / max(||x||, 1e-7); cos = clamp(u0 . u1, -1, 1); theta = acos(cos)
              out = (sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta), lerp where |sin| < 1e-8
  flatten: one vector per tensor; otherwise vectors along the last dim, or along dim 0 with row_wise.

The inputs are small dyadic matrices, exact in float32, rebuilt by the Rust test with the same
integer formulas. Run: python3 plugins/slerp/tests/nuslerp_reference.py
The printed arrays are pasted into `nuslerp_matches_independent_float64_reference` in src/lib.rs.
"""
import numpy as np

R, C = 3, 4
I, J = np.meshgrid(np.arange(R), np.arange(C), indexing="ij")
A = ((I * 7 + J * 3) % 11 - 5) / 4.0
B = ((I * 5 + J * 2 + 3) % 13 - 6) / 8.0
BASE = ((I * 3 + J * 5 + 1) % 7 - 3) / 16.0


def vec_slerp(t, v0, v1):
    n0 = max(np.linalg.norm(v0), 1e-7)
    n1 = max(np.linalg.norm(v1), 1e-7)
    cos = np.clip(np.dot(v0 / n0, v1 / n1), -1.0, 1.0)
    theta = np.arccos(cos)
    s = np.sin(theta)
    if abs(s) < 1e-8:
        return (1 - t) * v0 + t * v1
    return (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / s


def nuslerp(t, v0, v1, flatten, row_wise):
    if flatten:
        return vec_slerp(t, v0.ravel(), v1.ravel()).reshape(v0.shape)
    if row_wise:  # vectors along dim 0: W[:, j]
        return np.stack([vec_slerp(t, v0[:, j], v1[:, j]) for j in range(v0.shape[1])], axis=1)
    return np.stack([vec_slerp(t, v0[i, :], v1[i, :]) for i in range(v0.shape[0])], axis=0)


def merge(w1, w2, flatten, row_wise, base=None):
    total = w1 + w2
    t = 0.5 if abs(total) < 1e-6 else w2 / total
    if base is None:
        return nuslerp(t, A, B, flatten, row_wise)
    return base + nuslerp(t, A - base, B - base, flatten, row_wise)


CASES = [
    ("flat_w1_3", dict(w1=1.0, w2=3.0, flatten=True, row_wise=False)),
    ("rows_w2_1", dict(w1=2.0, w2=1.0, flatten=False, row_wise=False)),
    ("cols_w1_1", dict(w1=1.0, w2=1.0, flatten=False, row_wise=True)),
    ("base_flat_w03_07", dict(w1=0.3, w2=0.7, flatten=True, row_wise=False, base=BASE)),
    ("base_rows_w1_m1", dict(w1=1.0, w2=-1.0, flatten=False, row_wise=False, base=BASE)),
]

if __name__ == "__main__":
    for name, kw in CASES:
        out = merge(**kw)
        vals = ", ".join(f"{v:.9e}" for v in out.ravel())
        print(f"{name}: [{vals}]")

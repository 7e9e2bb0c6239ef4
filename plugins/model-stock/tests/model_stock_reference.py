#!/usr/bin/env python3
"""Independent float64 reference for the `model_stock` plugin (numpy only, no mergekit code).

Written from the math in shared/reference/ALGORITHMS.md (B.3, model_stock) and the fixture
MANIFEST's numeric semantics:
  offsets o_i = theta_i - theta_0 (one vector per tensor, or per row with filter_wise)
  cos_ij = clamp((o_i . o_j) / max(||o_i|| ||o_j||, 1e-6), -1, 1), averaged over i < j
  t = N cos / (1 + (N - 1) cos), t = 0 where |1 + (N - 1) cos| < 1e-6
  out = t * mean_i(theta_i) + (1 - t) * theta_0

The inputs are small dyadic matrices, exact in float32, rebuilt by the Rust test with the same
integer formulas. Run: python3 plugins/model-stock/tests/model_stock_reference.py
The printed arrays are pasted into `model_stock_matches_independent_float64_reference` in src/lib.rs.
"""
import numpy as np

R, C = 3, 4
I, J = np.meshgrid(np.arange(R), np.arange(C), indexing="ij")
BASE = ((I * 3 + J * 5 + 1) % 7 - 3) / 16.0
MODELS = [BASE + ((k * I * 3 + J * (k + 2) + k) % 9 - 4) / 32.0 for k in (1, 2, 3)]


def ratio(cos, n):
    den = 1 + (n - 1) * cos
    return 0.0 if abs(den) < 1e-6 else n * cos / den


def stock_vectors(base, models):
    """One t for the given (flat) vectors."""
    offsets = [m - base for m in models]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            prod = max(np.linalg.norm(offsets[i]) * np.linalg.norm(offsets[j]), 1e-6)
            cosines.append(np.clip(np.dot(offsets[i], offsets[j]) / prod, -1.0, 1.0))
    return ratio(np.mean(cosines), len(models))


def model_stock(base, models, filter_wise):
    avg = sum(models) / len(models)
    if not filter_wise:
        t = stock_vectors(base.ravel(), [m.ravel() for m in models])
        return t * avg + (1 - t) * base, [t]
    ts = np.array([stock_vectors(base[r], [m[r] for m in models]) for r in range(base.shape[0])])
    return ts[:, None] * avg + (1 - ts[:, None]) * base, list(ts)


if __name__ == "__main__":
    for name, fw in (("whole", False), ("filter_wise", True)):
        out, ts = model_stock(BASE, MODELS, fw)
        print(f"{name} t: [{', '.join(f'{t:.9e}' for t in ts)}]")
        print(f"{name}: [{', '.join(f'{v:.9e}' for v in out.ravel())}]")

"""A dense float64 replay of xcent.init's scale search for the brute-force tests: every
logit of every grid scale computed in full (no chunks, no online log-sum-exp, no
shared GEMM), then the search's documented rule (xcent.init.search_scale) applied."""

import math

import numpy as np

from xcent.init import COARSE_POINTS, DUAL_FLOOR, FINE_STEPS


def objective(x: np.ndarray, y: np.ndarray, w: np.ndarray, scale: float) -> tuple[float, float]:
    """``(ce, dual)`` of rows ``x`` under ``scale * w``: the mean full-softmax CE and the
    mean ``log mean_{j != y} exp(z_j - z_y)``, both densely in float64."""
    logits = (x.astype(np.float64) * scale) @ w.T
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    ce = float((lse - logits[np.arange(len(y)), y]).mean())
    z = logits - logits[np.arange(len(y)), y][:, None]
    z[np.arange(len(y)), y] = -np.inf
    zm = z.max(axis=1, keepdims=True)
    log_s = zm[:, 0] + np.log(np.exp(z - zm).sum(axis=1)) - math.log(w.shape[0] - 1)
    return ce, float(log_s.mean())


def dense_search(x: np.ndarray, y: np.ndarray, w: np.ndarray, lo: float, hi: float) -> float:
    """The scale the search's rule picks in ``[lo, hi]``, every probe dense."""
    u_lo, u_hi = math.log(lo), math.log(hi)
    last = (COARSE_POINTS - 1) * FINE_STEPS
    fine = (u_hi - u_lo) / last

    def run(ms):
        u = [u_lo + fine * m for m in ms]
        values = [objective(x, y, w, math.exp(v)) for v in u]
        ce, dual = [v[0] for v in values], [v[1] for v in values]
        obj = [c if d >= -DUAL_FLOOR else math.inf for c, d in zip(ce, dual)]
        return u, ce, dual, int(np.argmin(obj))

    *_, k = run(range(0, last + 1, FINE_STEPS))
    ms = list(range(max(0, (k - 1) * FINE_STEPS), min(last, (k + 1) * FINE_STEPS) + 1))
    u, ce, dual, j = run(ms)
    best = u[j]
    if 0 < j < len(ms) - 1:
        curvature = ce[j - 1] - 2 * ce[j] + ce[j + 1]
        if curvature > 0:
            best = min(max(best + fine * (ce[j - 1] - ce[j + 1]) / (2 * curvature), u[j - 1]), u[j + 1])
    if j < len(ms) - 1 and dual[j + 1] < -DUAL_FLOOR:
        best = min(best, u[j] + fine * (dual[j] + DUAL_FLOOR) / (dual[j] - dual[j + 1]))
    return math.exp(best)

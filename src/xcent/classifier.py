"""The linear classifier's step and evaluation, touching only what they need.

* :func:`in_batch_logits` gathers the rows of the batch's distinct labels ``U`` from
  the (C, D) weight and builds the (B, K) relative logits
  ``z_ij = (w_{U_j} - w_{y_i}) . x_i`` with ``-inf`` at each row's own class.
* :func:`sparse_sgd_step` turns the algorithm's gradient weights ``G = dL/dz`` into
  the gradient of the K touched rows and applies plain SGD to them only:

      grad w_{U_j} = sum_i G_ij x_i  -  sum_{i: y_i = U_j} (sum_k G_ik) x_i
                   = (M^T X)_j,   M = G with M[i, pos(y_i)] = -sum_k G_ik,

  one (K, B) x (B, D) matmul; rows outside ``U`` are neither read nor written, so
  the update equals dense SGD over all C rows exactly (their gradient is zero).
* :func:`scan_classes` is the one class-chunk kernel behind every full-softmax
  quantity: evaluation (:func:`full_softmax_stats`: the softmax CE over all C
  classes and the rank of the true class, ties counted against the model), top-k
  prediction and log-probabilities (:class:`xcent.Classifier`), and the
  class-sharded evaluation (each rank scans its classes). Cache-sized
  (rows x classes) blocks with an online logsumexp; never an N x C matrix.
* The rank rule, in one place: :func:`tie_threshold` (what "at least as high as the
  true class" means in float arithmetic, whatever GEMM kernel computed the scores),
  :func:`count_at_least` (the count) and :func:`rank_or_wrong` (a row whose scores
  are not all finite is wrong at every k).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .sync import to_device, to_host

__all__ = [
    "PRECISIONS",
    "ClassScan",
    "InBatch",
    "count_at_least",
    "full_softmax_stats",
    "in_batch_logits",
    "init_weight",
    "matmul_nt",
    "max_row_norm",
    "rank_or_wrong",
    "relative_logits",
    "relative_logits_",
    "row_gradient_weights_",
    "scan_classes",
    "score_error_bound",
    "sparse_sgd_step",
    "target_logits",
    "tie_threshold",
]


#: ``fp32``: every GEMM in float32. ``bf16``: the score GEMMs (in-batch and
#: evaluation) read bfloat16 copies of their operands and accumulate in float32; the
#: weight, the duals, the log-sum-exp and the row update stay float32.
PRECISIONS = ("fp32", "bf16")


def _has_mm_out_dtype() -> bool:
    """Whether this torch has ``torch.mm(..., out_dtype=)`` (CUDA only: the CPU has no
    kernel for ``aten::mm.dtype``)."""
    try:
        torch.mm(torch.zeros(1, 1, dtype=torch.bfloat16, device="meta"),
                 torch.zeros(1, 1, dtype=torch.bfloat16, device="meta"), out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return False
    return True


_MM_OUT_DTYPE = _has_mm_out_dtype()


def matmul_nt(a: Tensor, b: Tensor, precision: str = "fp32", out: Tensor | None = None) -> Tensor:
    """``a @ b.T`` in float32 (``a`` (n, D), ``b`` (m, D), both float32), the score GEMM
    of the step and of the evaluation at ``precision`` (see :data:`PRECISIONS`).

    ``bf16``: the operands are rounded to bfloat16. On CUDA the product is one
    bf16 GEMM with float32 accumulation and float32 output (``torch.mm(...,
    out_dtype=torch.float32)`` where this torch has it); elsewhere the bf16 GEMM's
    result is cast to float32 (the CPU kernel accumulates in float32 but rounds its
    output to bf16: a further ~0.4% relative error per score)."""
    if precision == "fp32":
        return torch.mm(a, b.T, out=out) if out is not None else a @ b.T
    if precision != "bf16":
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    if _MM_OUT_DTYPE and a.is_cuda:
        product = torch.mm(a16, b16.T, out_dtype=torch.float32)
    else:
        product = torch.mm(a16, b16.T).to(a.dtype)
    if out is None:
        return product
    return out.copy_(product)


@dataclass
class InBatch:
    """One minibatch in the classifier's terms.

    ``logits`` (B, K) relative logits with ``-inf`` at the own class; ``classes`` (K,)
    sorted distinct labels; ``label_pos`` (B,) position of each row's label in
    ``classes``; ``class_weight`` (K, D) the gathered rows; ``features`` (B, D) in the
    weight's dtype. Class-sharded (:func:`xcent.step.sharded_in_batch`): this process
    holds only the classes ``classes[owned]``, rows ``rows`` of its weight shard, and
    ``class_weight`` holds those rows only; a single process owns every column
    (``owned = slice(None)``, ``rows = None`` meaning ``classes``). ``host_rows``: the
    same ids as :attr:`local_rows` on the host (where they were computed: the step
    never reads them back from the device)."""

    logits: Tensor
    classes: Tensor
    label_pos: Tensor
    class_weight: Tensor
    features: Tensor
    rows: Tensor | None = None
    owned: slice = field(default_factory=lambda: slice(None))
    host_rows: Tensor | None = None

    @property
    def local_rows(self) -> Tensor:
        """Row ids, in this process's weight, of ``class_weight``."""
        return self.classes if self.rows is None else self.rows

    @property
    def num_distinct(self) -> int:
        """K (a shape: known on the host)."""
        return int(self.classes.shape[0])


#: rows per independently seeded block of the initial weight
INIT_BLOCK_ROWS = 65536


def init_weight(num_classes: int, feature_dim: int, seed: int, device="cpu", dtype=torch.float32,
                rows: tuple[int, int] | None = None) -> Tensor:
    """``W ~ N(0, 0.01^2)``, (num_classes, feature_dim), reproducible from ``seed``.

    Generated on the CPU in blocks of :data:`INIT_BLOCK_ROWS` rows, block ``k`` from
    its own generator seeded with ``(seed, k)``, so that ``rows=(lo, hi)`` (a class
    shard) yields exactly rows lo..hi of the full weight without materialising it,
    and a seed gives the same weight on every device and process count."""
    lo, hi = (0, num_classes) if rows is None else rows
    weight = torch.empty(hi - lo, feature_dim, dtype=dtype)
    for block in range(lo // INIT_BLOCK_ROWS, (hi + INIT_BLOCK_ROWS - 1) // INIT_BLOCK_ROWS):
        b_lo = block * INIT_BLOCK_ROWS
        b_hi = min(b_lo + INIT_BLOCK_ROWS, num_classes)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + block)
        values = torch.empty(b_hi - b_lo, feature_dim, dtype=dtype).normal_(0.0, 0.01, generator=gen)
        a, b = max(lo, b_lo), min(hi, b_hi)
        weight[a - lo:b - lo] = values[a - b_lo:b - b_lo]
    return weight.to(device)


def in_batch_logits(features: Tensor, labels: Tensor, weight: Tensor, precision: str = "fp32",
                    read_rows=None) -> InBatch:
    """Relative in-batch logits of a minibatch (see the module docstring).

    ``features`` (B, D) of any float dtype (cast to the weight's), ``labels`` (B,)
    integer, ``weight`` (C, D). Reads only the K rows of the distinct labels, with
    ``read_rows(weight, classes, classes_on_host)`` when given (e.g. rows caught up
    lazily by an optimizer), else ``weight.index_select``.

    The distinct labels and each row's position among them (``torch.unique``, whose
    output size depends on the data) are computed on the host: pass ``labels`` on the
    CPU and nothing is read back from the weight's device; labels on the device cost
    one host read (:func:`xcent.sync.to_host`, a sync on CUDA).

    Differentiable: when autograd records (``features`` or ``weight`` requiring a
    gradient), the logits are built out of place so that a loss of
    :mod:`xcent.losses` can be back-propagated through them; otherwise in place."""
    x = features.to(device=weight.device, dtype=weight.dtype)
    host_classes, host_pos = torch.unique(to_host(labels), sorted=True, return_inverse=True)
    classes, label_pos = to_device(weight.device, host_classes, host_pos)
    class_weight = (weight.index_select(0, classes) if read_rows is None
                    else read_rows(weight, classes, host_classes))
    scores = matmul_nt(x, class_weight, precision)
    if torch.is_grad_enabled() and scores.requires_grad:
        logits = relative_logits(scores, label_pos)
    else:
        logits = relative_logits_(scores, label_pos)
    return InBatch(logits, classes, label_pos, class_weight, x, host_rows=host_classes)


def relative_logits(scores: Tensor, label_pos: Tensor) -> Tensor:
    """:func:`relative_logits_` out of place (autograd-safe): a new (B, K) tensor."""
    own = label_pos[:, None]
    logits = scores - scores.gather(1, own)
    return logits.scatter(1, own, float("-inf"))


def relative_logits_(scores: Tensor, label_pos: Tensor) -> Tensor:
    """In place on the (B, K) in-batch ``scores`` ``w_{U_j} . x_i``: subtract each
    row's own-class score and set that entry to ``-inf``. One allocation (the
    caller's), two light passes. Returns ``scores``."""
    own = label_pos[:, None]
    scores.sub_(scores.gather(1, own))
    return scores.scatter_(1, own, float("-inf"))


def row_gradient_weights_(label_pos: Tensor, grad_logits: Tensor) -> Tensor:
    """``M``, in place on ``G``: ``M[i, pos(y_i)] = -sum_k G_ik`` (``G`` is zero
    there), so that the gradient of the touched rows is ``M^T X``. Returns ``G``."""
    own = label_pos[:, None]
    return grad_logits.scatter_(1, own, grad_logits.sum(dim=1, keepdim=True).neg_())


def sparse_sgd_step(weight: Tensor, batch: InBatch, grad_logits: Tensor, lr: float) -> Tensor:
    """``W[U] <- W[U] - lr * grad W[U]`` in place; returns the new (K, D) rows.

    Plain SGD (no momentum or weight decay), so leaving the other C - K rows alone is
    exact. The new rows are returned so that a caller can check them for
    divergence without reading W again. ``grad_logits`` is consumed (overwritten)
    when it already has the weight's dtype: pass a copy to keep it."""
    M = row_gradient_weights_(batch.label_pos, grad_logits.to(batch.features.dtype))
    # One fused GEMM: class_weight - lr * M^T X, no (K, D) gradient temporary.
    # Class-sharded: only this process's columns of M (its rows); a view, no copy.
    new_rows = torch.addmm(batch.class_weight, M[:, batch.owned].T, batch.features, alpha=-lr)
    weight.index_copy_(0, batch.local_rows, new_rows)
    return new_rows


#: (rows, classes) of one CPU score block: 8 MB of float32 scores, cache-sized
CPU_BLOCK = (256, 8192)


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


# --------------------------------------------------------------------------- the rank rule

#: unit roundoff of the operands a float32 GEMM really multiplies, per
#: ``torch.get_float32_matmul_precision()``: "highest" is float32 itself, "high" lets
#: the GEMM round its operands to TF32 (10 stored bits), "medium" to bfloat16 (7)
_FP32_OPERAND_UNIT = {"highest": 0.0, "high": 2.0 ** -11, "medium": 2.0 ** -8}
#: unit roundoff of bfloat16 (8 significant bits)
_BF16_UNIT = 2.0 ** -8


def score_error_bound(feature_dim: int, dtype: torch.dtype = torch.float32, precision: str = "fp32",
                      device: torch.device | str = "cpu") -> float:
    """``eta`` such that every score the GEMM of :func:`matmul_nt` returns satisfies

        ``|fl(w . x) - w~ . x~| <= eta * ||x||_2 * ||w||_2``

    whatever kernel, blocking, summation order, FMA use or thread count computed it,
    ``x~``, ``w~`` being the operands the GEMM multiplies: ``x`` and ``w`` themselves,
    or their bfloat16 roundings (``bf16``; TF32/bfloat16 under
    ``torch.set_float32_matmul_precision("high"/"medium")``), which are the same for
    equal rows, so an exact tie stays one.

    Derivation (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
    section 3.1): a dot product of length D summed in *any* order, with or without
    fused multiply-adds, has ``|fl(x . w) - x . w| <= gamma_D * sum_k |x_k w_k|``,
    ``gamma_D = D u / (1 - D u)``, ``u`` the unit roundoff of the accumulation
    (2^-24 in float32, 2^-53 in float64); by Cauchy-Schwarz ``sum_k |x_k w_k| <=
    ||x|| ||w||``. A result rounded to bfloat16 (``bf16`` without a float32-output
    GEMM: the CPU) adds ``u_out = 2^-8`` of it, and the rounded operands' norms exceed
    the given ones by at most ``(1 + u_in)^2``: ``eta = ((1 + gamma_D)(1 + u_out) - 1)
    (1 + u_in)^2``. No bound exists once ``D u >= 1`` (``inf``).

    This is the worst case. Two kernels usually differ by far less (a few ``u``
    measured, at D = 4096), but a kernel that adds many same-signed terms (nonnegative
    features, nonnegative class means) into one accumulator drifts by a fair fraction
    of ``D u`` where a kernel that splits the sum across vector lanes does not; only
    the worst case holds on every CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    unit = torch.finfo(dtype).eps / 2
    if precision == "bf16":
        u_in = _BF16_UNIT
        u_out = 0.0 if _MM_OUT_DTYPE and torch.device(device).type == "cuda" else _BF16_UNIT
    else:
        u_in = _FP32_OPERAND_UNIT.get(torch.get_float32_matmul_precision(), _BF16_UNIT) \
            if dtype == torch.float32 else 0.0
        u_out = 0.0
    if feature_dim * unit >= 1:
        return float("inf")
    gamma = feature_dim * unit / (1 - feature_dim * unit)
    return ((1 + gamma) * (1 + u_out) - 1) * (1 + u_in) ** 2


def max_row_norm(weight: Tensor) -> Tensor:
    """``max_c ||w_c||_2`` of a (C, D) weight, a (1,) float64 tensor on its device
    (float64: the norm itself adds no rounding worth counting; a tensor: no host read,
    and a class shard all-reduces it with ``MAX``). 0 for an empty weight."""
    if weight.shape[0] == 0:
        return torch.zeros(1, dtype=torch.float64, device=weight.device)
    return torch.linalg.vector_norm(weight, dim=1, dtype=torch.float64).amax().reshape(1)


def tie_threshold(x: Tensor, target: Tensor, weight_norm: Tensor, precision: str = "fp32") -> Tensor:
    """Per row, the score a class must reach to count as scoring *at least as high as
    the true class*: the largest value of ``x``'s dtype that is ``<= target_i - tau_i``,

        ``tau_i = 2 * eta * ||x_i||_2 * max_c ||w_c||_2``     (``eta``: :func:`score_error_bound`),

    ``weight_norm`` being ``max_c ||w_c||`` over *all* C classes (:func:`max_row_norm`;
    a class shard passes the maximum over the shards, so that every process count
    draws the same line).

    Why. The target ``t_i = w_{y_i} . x_i`` and a score ``s_ic = w_c . x_i`` are two
    float dot products; each is within ``eta ||x_i|| max_c ||w_c||`` of its exact
    value, so the computed difference ``s_ic - t_i`` is within ``tau_i`` of the exact
    one. Comparing ``s_ic >= t_i - tau_i`` therefore guarantees, on any CPU or GPU, at
    any thread count and for any class chunk width (each of which may pick another
    GEMM kernel, and so another summation order):

    * a class whose exact score is at least the target's (an exact tie: identical
      rows, an all-zero weight) is always counted: ties count against the model;
    * a class whose exact score is more than ``2 tau_i`` below the target's is never
      counted.

    Between the two, float32 cannot tell which is higher in the worst case; the rule
    counts such a near tie against the model when the computed scores say so. The
    exact-score statements are about the operands the GEMM multiplies (with ``bf16``,
    the bfloat16-rounded ones). A NaN target (or NaN ``x``) gives a NaN threshold,
    which :func:`count_at_least` counts every class against."""
    tau = (2 * score_error_bound(x.shape[1], x.dtype, precision, x.device)) \
        * torch.linalg.vector_norm(x, dim=1, dtype=torch.float64) * weight_norm.to(x.device)
    exact = target.to(torch.float64) - tau
    threshold = exact.to(x.dtype)
    # rounding to x's dtype may land above t - tau: step down one ulp there, so that
    # comparing a score of that dtype with it is comparing with t - tau exactly
    above = threshold.to(torch.float64) > exact
    return torch.where(above, torch.nextafter(threshold, torch.full_like(threshold, float("-inf"))), threshold)


def count_at_least(scores: Tensor, threshold: Tensor, out: Tensor | None = None) -> Tensor:
    """``#{c : not (scores[i, c] < threshold[i])}`` per row, int64 (n,): the classes of
    a (n, m) score block that count as at least as high as the true class
    (``threshold`` from :func:`tie_threshold`). Written as *not below* so that a NaN
    score, or a NaN threshold, counts against the model: NaN never ranks a true class
    first. ``out``: a float (n, m) buffer for the flags (0/1 floats are faster to write
    and sum than a bool mask; counts up to 2^24 are exact in float32)."""
    below = torch.lt(scores, threshold[:, None], out=out)
    return scores.shape[1] - below.sum(dim=1).long()


def rank_or_wrong(rank: Tensor, num_classes: int | Tensor, *stats: Tensor) -> Tensor:
    """``rank`` (n,) where every one of ``stats`` (each (n,) or (G, n): the row's
    log-normaliser, its target score) is finite, else ``num_classes``: a row whose
    scores hold a NaN or an overflow has no ranking, and a rank of C is wrong at every
    k (``rank < k`` fails for every k <= C). The last step of every accuracy kernel."""
    ok = torch.ones_like(rank, dtype=torch.bool)
    for stat in stats:
        ok &= torch.isfinite(stat).reshape(-1, rank.shape[0]).all(dim=0)
    return torch.where(ok, rank, torch.as_tensor(num_classes, dtype=rank.dtype, device=rank.device))


class ClassScan(NamedTuple):
    """What :func:`scan_classes` returns; the fields not asked for are None.

    ``lse`` (n,) ``log sum_c exp(s_ic)`` over the weight's classes (not finite when a
    score of the row is NaN or infinite: a caller refuses or counts that row, see
    :func:`rank_or_wrong`); ``rank`` (n,) int64 ``#{c != y_i : s_ic >= threshold_i}``
    (:func:`tie_threshold`); ``top_scores`` / ``top_ids`` (n, k) the k largest
    scores, best first, and their class ids (plus ``class_offset``)."""

    lse: Tensor
    rank: Tensor | None
    top_scores: Tensor | None
    top_ids: Tensor | None


@torch.no_grad()
def scan_classes(x: Tensor, weight: Tensor, *, target: Tensor | None = None, labels: Tensor | None = None,
                 weight_norm: Tensor | None = None, k: int = 0, scores_out: Tensor | None = None,
                 class_chunk: int = 32768, row_chunk: int | None = None, class_offset: int = 0,
                 precision: str = "fp32") -> ClassScan:
    """THE class-chunk kernel: every full-softmax quantity over all C classes
    (evaluation, ``xcent eval``, the class-sharded evaluation, top-k prediction,
    log-probabilities) is one walk over the classes of ``weight`` in chunks.

    ``x`` (n, D) in the weight's dtype and device, ``weight`` (C, D). For each block of
    rows, the classes are visited in chunks; one reusable (row_chunk, class_chunk)
    block receives the scores ``s_ic = w_c . x_i`` of a chunk (the only temporary that
    grows with the chunk sizes: never (n, C)), the optional consumers read it, and
    then it is turned in place into the terms of an online logsumexp (running max
    ``m`` and rescaled sum ``S``: ``S <- S exp(m - m') + sum_c exp(s_ic - m')``,
    Milakov and Gimelshein 2018, "Online normalizer calculation for softmax").
    Consumers, each run on the block before the logsumexp overwrites it:

    * ``target`` (n,): the rank of the true class, counted as the number of *other*
      classes scoring at least as high: ``rank_i = #{c != y_i : s_ic >= threshold_i}``
      with ``threshold_i`` = ``target_i`` less the float rounding bound of the two
      dot products (:func:`tie_threshold`; :func:`count_at_least` counts), so that
      an exact tie counts against the model whichever GEMM kernel scored each class
      chunk: with an all-zero weight every row has rank C - 1. ``weight_norm``:
      ``max_c ||w_c||`` over all classes (:func:`max_row_norm`; default: of this
      ``weight``, which a class shard must not use alone). ``labels`` (n,) are the
      true classes as rows of this ``weight`` (``y - class_offset``); a row whose
      label is outside ``[0, C)`` (another rank's class) has no own class here to
      leave out. The own class is discounted from the count rather than masked (no
      write into the block). ``target`` comes from :func:`target_logits`.
    * ``k`` > 0: a running top-k; a chunk's own top-k is all that can enter the
      global top-k, so merging 2k candidates keeps the state (n, k) however large C
      is. Ties among the k are broken by ``torch.topk`` (arbitrarily); a NaN score
      sorts first there, and the row's ``lse`` is NaN, which callers check.
    * ``scores_out`` (n, C): the raw scores are copied into it (log-probabilities:
      the caller subtracts ``lse``).

    ``row_chunk=None``: all rows at once on an accelerator; on the CPU, blocks of at
    most :data:`CPU_BLOCK` (rows, classes), which measured fastest
    (``benchmarks/evaluate.py``: the block stays in cache across the passes that
    follow its GEMM). ``precision``: of the score GEMM (:func:`matmul_nt`); ``target``
    must then come from :func:`target_logits` at the same precision."""
    n, num_classes = x.shape[0], weight.shape[0]
    want_rank, k = target is not None, min(int(k), num_classes)
    if want_rank and labels is None:
        raise ValueError("scan_classes: target needs labels (the own class is left out of the rank)")
    if want_rank:
        threshold = tie_threshold(x, target, max_row_norm(weight) if weight_norm is None else weight_norm,
                                  precision)
    if x.device.type == "cpu":
        row_chunk = min(row_chunk or CPU_BLOCK[0], CPU_BLOCK[0])
        class_chunk = min(class_chunk, CPU_BLOCK[1])
    row_chunk = max(1, min(row_chunk or n, n))
    # comparison flags are counted as 0.0/1.0 floats (count_at_least); per-block
    # counts (<= class_chunk < 2^24) are exact in float32
    class_chunk = max(1, min(class_chunk, num_classes, 1 << 23))
    dev, dt = x.device, x.dtype
    lse = torch.empty(n, dtype=dt, device=dev)
    rank = torch.zeros(n, dtype=torch.long, device=dev) if want_rank else None
    top_scores = torch.empty(n, k, dtype=dt, device=dev) if k else None
    top_ids = torch.empty(n, k, dtype=torch.long, device=dev) if k else None
    # one block reused by every chunk: a fresh allocation per chunk costs page faults
    # comparable to the GEMM itself on a CPU
    block = torch.empty(row_chunk, class_chunk, dtype=dt, device=dev)
    flags = torch.empty(block.shape, dtype=torch.float64 if dt == torch.float64 else torch.float32,
                        device=dev) if want_rank else None
    for r0, r1 in _chunks(n, row_chunk):
        xr, rows = x[r0:r1], r1 - r0
        if want_rank:
            yr, tr = labels[r0:r1], threshold[r0:r1]
        run_max = torch.full((rows,), float("-inf"), dtype=dt, device=dev)
        run_sum = torch.zeros(rows, dtype=dt, device=dev)
        best = torch.empty(rows, 0, dtype=dt, device=dev)
        best_ids = torch.empty(rows, 0, dtype=torch.long, device=dev)
        for c0, c1 in _chunks(num_classes, class_chunk):
            scores = block[:rows, :c1 - c0]
            matmul_nt(xr, weight[c0:c1], precision, out=scores)
            if want_rank:
                at_least = count_at_least(scores, tr, out=flags[:rows, :c1 - c0])
                inside = (yr >= c0) & (yr < c1)
                own = scores.gather(1, (yr - c0).clamp(0, c1 - c0 - 1)[:, None]).squeeze(1)
                rank[r0:r1] += at_least - (inside & ~(own < tr)).long()
            if scores_out is not None:
                scores_out[r0:r1, c0:c1] = scores
            if k:
                vals, idx = torch.topk(scores, min(k, c1 - c0), dim=1)
                best, pos = torch.topk(torch.cat([best, vals], dim=1), min(k, best.shape[1] + vals.shape[1]), dim=1)
                best_ids = torch.cat([best_ids, idx + (c0 + class_offset)], dim=1).gather(1, pos)
                chunk_max = vals[:, 0]  # the chunk's top-1 is its max: no extra pass
            else:
                chunk_max = scores.amax(dim=1)
            new_max = torch.maximum(run_max, chunk_max)
            run_sum.mul_(torch.exp(run_max - new_max))
            run_sum.add_(scores.sub_(new_max[:, None]).exp_().sum(dim=1))
            run_max = new_max
        lse[r0:r1] = run_sum.log_().add_(run_max)
        if k:
            top_scores[r0:r1], top_ids[r0:r1] = best, best_ids
    return ClassScan(lse, rank, top_scores, top_ids)


@torch.no_grad()
def full_softmax_stats(features: Tensor, labels: Tensor, weight: Tensor, class_chunk: int = 32768,
                       class_offset: int = 0, row_chunk: int | None = None,
                       precision: str = "fp32") -> tuple[Tensor, Tensor, Tensor]:
    """Per-row full-softmax statistics over the classes of ``weight`` (the evaluation
    use of :func:`scan_classes`).

    Returns ``(lse, target, rank)``, each (n,): ``lse_i = logsumexp_c w_c . x_i``,
    ``target_i = w_{y_i} . x_i`` (0 where the label is not among this weight's
    classes, i.e. outside ``[class_offset, class_offset + C)``), and
    ``rank_i = #{c != y_i : w_c . x_i >= target_i}`` in the sense of
    :func:`tie_threshold` (an exact tie counts against the model, on any machine),
    or C for a row whose scores are not all finite (:func:`rank_or_wrong`). CE =
    lse - target; top-k correct iff rank < k, i.e. fewer than k other classes score
    at least as high as the true class. Memory: one (row_chunk, class_chunk) block of
    scores at a time. ``precision``: of the score GEMMs (:func:`matmul_nt`).
    """
    x = features.to(device=weight.device, dtype=weight.dtype)
    y = labels.to(device=weight.device, dtype=torch.long) - class_offset
    target = target_logits(x, y, weight, precision)
    scan = scan_classes(x, weight, target=target, labels=y, class_chunk=class_chunk, row_chunk=row_chunk,
                        precision=precision)
    return scan.lse, target, rank_or_wrong(scan.rank, weight.shape[0], scan.lse, target)


def target_logits(x: Tensor, y: Tensor, weight: Tensor, precision: str = "fp32") -> Tensor:
    """``w_{y_i} . x_i`` for the rows whose (local) label ``y_i`` is a row of
    ``weight``, 0 for the others (a class shard sums these over ranks).

    Computed as the diagonal of small GEMMs ``X_b W[y_b]^T`` (blocks of
    :data:`CPU_BLOCK` rows, so the extra work is ``rows / C`` of the evaluation's),
    in the arithmetic of the scores of :func:`scan_classes` (:func:`matmul_nt`).
    These GEMMs have other shapes than the class chunks, so the kernel, and the
    last bits, may differ from a class's score: the comparison absorbs that
    (:func:`tie_threshold`)."""
    owned = (y >= 0) & (y < weight.shape[0])
    target = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    if owned.any():
        xo, wo = x[owned], weight.index_select(0, y[owned])
        parts = [matmul_nt(xo[a:b], wo[a:b], precision).diagonal() for a, b in _chunks(xo.shape[0], CPU_BLOCK[0])]
        target[owned] = torch.cat(parts)
    return target

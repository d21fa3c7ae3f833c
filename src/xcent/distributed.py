"""Class-sharded multi-process training over torch.distributed (Partial-FC style, no sampling).

Launch with torchrun; the flags are those of ``xcent train``::

    torchrun --nproc-per-node P -m xcent train --data-dir D ...          # one node
    torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d \\
             --rdzv-endpoint HOST:PORT -m xcent train --data-dir D ...   # several

Design. Rank r owns the contiguous class range ``[lo_r, hi_r)`` (``ceil(C / P)``
classes each) and holds only those weight rows; no rank ever holds the full weight.
For each global batch (``--batch-size`` is the global batch; every rank draws the
same permutation from --seed):

1. rank r reads its slice of the batch rows from the memory-mapped split and the
   feature rows are all-gathered (B x D); labels are in every rank's memory;
2. every rank computes the distinct labels U (K of them, a contiguous block of which
   it owns) and the scores of its own block, ``X W[U_r]^T``; one all-reduce of the
   (B, K) score matrix (each entry is non-zero on exactly one rank, so the sum is
   exact) gives every rank the same full in-batch scores, hence the same relative
   logits, row statistics, dual update and ``G`` as a single process;
3. each rank applies the sparse update to the rows it owns, using the row sums of
   ``G`` it already has.

Steps 2-3 are :func:`xcent.step.train_step` itself (``process_group`` and ``lo``):
the single-process step is the same code with one process and no collectives.

Communication per step: B x D features (all-gather) plus B x K scores (all-reduce),
independent of C. The duals ``nu`` are replicated: every rank performs the same
update on the same rows (4 + 1 bytes per training row and rank: 85 MB at 17M rows,
500 MB at 100M rows), which costs no communication and keeps resume with another
process count trivial. Evaluation is sharded the same way: the target logit comes
from the owner (all-reduce), the per-rank log-sum-exps are all-gathered and
combined, and the counts of classes scoring at least as high as the target are summed.

Checkpoints of a P-process run are directories ``epoch_K/`` holding
``shard_RRRRR.pt`` (each rank's rows) and ``manifest.pt`` (everything else, nu
included); they are written into a temporary directory and renamed once every rank
has written (barrier), and can be resumed by any number of processes.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .classifier import max_row_norm, rank_or_wrong, scan_classes, target_logits
from .errors import UsageError
from .evaluate import summarize

__all__ = ["DistContext", "all_gather_rows", "batch_part", "class_range", "complete_batch_rows", "gather_batch_rows",
           "init_from_env", "sharded_stats"]


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous classes owned by ``rank``: ``ceil(C / P)`` each, the last fewer."""
    per = math.ceil(num_classes / world_size)
    lo = min(rank * per, num_classes)
    return lo, min(lo + per, num_classes)


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def group(self):
        """The process group of the run (torch's default group), for
        :func:`xcent.step.train_step`'s ``process_group``."""
        return dist.group.WORLD

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device, timeout_s: float) -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...):
    nccl on CUDA, gloo on CPU. Collectives time out after ``timeout_s`` so a dead peer
    ends the job instead of hanging it."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_batch_rows(split, index: Tensor, ctx: DistContext, dtype: torch.dtype) -> Tensor:
    """Features of the global batch ``index`` (every rank passes the same ``index``):
    rank r reads only its slice from disk (:func:`batch_part`), then the slices are
    all-gathered (:func:`complete_batch_rows`)."""
    mine, _ = split.gather(batch_part(index, ctx))
    return complete_batch_rows(mine, index, ctx, dtype)


def batch_part(index: Tensor, ctx: DistContext) -> Tensor:
    """The rows of the global batch ``index`` that this rank reads from disk."""
    return index.tensor_split(ctx.world_size)[ctx.rank]


def complete_batch_rows(mine: Tensor, index: Tensor, ctx: DistContext, dtype: torch.dtype) -> Tensor:
    """The features of the global batch ``index`` from each rank's rows ``mine`` (those
    of :func:`batch_part`): one all-gather, on ``ctx.device`` in ``dtype``. A collective:
    every rank calls it for the same batches in the same order (from one thread)."""
    sizes = [part.shape[0] for part in index.tensor_split(ctx.world_size)]
    return all_gather_rows(mine.to(device=ctx.device, dtype=dtype), sizes)


def all_gather_rows(mine: Tensor, sizes: list[int], group=None) -> Tensor:
    """Concatenation over the ranks of ``group`` (in rank order) of each rank's rows
    ``mine`` (n_r, ...), given every rank's row count ``sizes``: one all-gather of
    pieces padded to the longest (torch's all-gather needs equal shapes)."""
    longest = max(sizes)
    padded = mine
    if mine.shape[0] != longest:
        padded = torch.zeros((longest, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
        padded[:mine.shape[0]] = mine
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded.contiguous(), group=group)
    return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])


@torch.no_grad()
def sharded_stats(features: Tensor, labels: Tensor, shard: Tensor, lo: int, ctx: DistContext | None,
                  class_chunk: int = 32768, precision: str = "fp32", group=None) -> tuple[Tensor, Tensor, Tensor]:
    """Full-softmax ``(lse, target, rank)`` over all C classes, the classes sharded:
    every rank passes the same rows and gets the same result, that of
    :func:`xcent.classifier.full_softmax_stats` on the whole weight (the same tie
    threshold: the largest row norm is the maximum over the shards). ``precision``:
    of the score GEMMs (:func:`xcent.classifier.matmul_nt`). The collectives run over
    ``group`` when given (``ctx`` may then be None; the library head's own group),
    else over the default group of ``ctx``."""
    world_size = ctx.world_size if group is None else dist.get_world_size(group)
    x = features.to(device=shard.device, dtype=shard.dtype)
    y_local = labels.to(shard.device, torch.long) - lo
    target = target_logits(x, y_local, shard, precision)
    dist.all_reduce(target, group=group)
    weight_norm = max_row_norm(shard)
    dist.all_reduce(weight_norm, op=dist.ReduceOp.MAX, group=group)
    scan = scan_classes(x, shard, target=target, labels=y_local, weight_norm=weight_norm, class_chunk=class_chunk,
                        precision=precision)
    pieces = [torch.empty_like(scan.lse) for _ in range(world_size)]
    dist.all_gather(pieces, scan.lse, group=group)
    # the shard's class count rides along with the counts: C for rank_or_wrong
    counts = torch.cat([scan.rank, torch.tensor([shard.shape[0]], dtype=scan.rank.dtype, device=scan.rank.device)])
    dist.all_reduce(counts, group=group)
    lse = torch.logsumexp(torch.stack(pieces), dim=0)
    return lse, target, rank_or_wrong(counts[:-1], counts[-1], lse, target)


@torch.no_grad()
def sharded_evaluate(split, shard: Tensor, lo: int, ctx: DistContext, rows: Tensor | None = None,
                     chunk_rows: int = 4096, class_chunk: int = 32768, precision: str = "fp32") -> dict:
    """:func:`xcent.evaluate.evaluate` with sharded classes: each rank reads a slice of
    every row chunk (all-gathered), the class work is split across ranks."""
    all_rows = torch.arange(split.num_samples) if rows is None else rows

    def chunk_stats():
        for start in range(0, all_rows.shape[0], chunk_rows):
            index = all_rows[start:start + chunk_rows]
            feats = gather_batch_rows(split, index, ctx, shard.dtype)
            yield sharded_stats(feats, split.labels.index_select(0, index), shard, lo, ctx, class_chunk,
                                precision)

    return summarize(chunk_stats())


def check_world(num_classes: int, world_size: int) -> None:
    if num_classes < world_size:
        raise UsageError(f"{world_size} processes need at least as many classes, the data has {num_classes}")

"""The training recipe behind ``xcent train``: data, schedules, the step, metrics, checkpoints.

One epoch: shuffle the training rows (a permutation derived from ``--seed`` and the
epoch, so a resumed run sees the same order), set the algorithm's dual schedule and
the epoch's learning rate, and apply :func:`xcent.step.train_step` to each batch
(the last partial batch included). After the epoch: exact full-softmax metrics on a
fixed subset of training rows (or the reference implementation's running mean), on val, and on test
whenever val accuracy improves; one JSONL line; a checkpoint every
``--save-frequency`` epochs and at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from . import modelio as ckpt_io
from .batches import BatchLoader, prefetch_enabled, read_batch
from .classifier import full_softmax_stats, init_weight
from .config import TrainConfig
from .data import Dataset, load_dataset
from .device import ThreadPolicy, resolve_device
from .divergence import check_divergence
from .errors import DivergenceError, UsageError
from .evaluate import evaluate
from .fileio import exclusive_lock, write_text_atomic
from .limits import check_weight_fits
from .loggers import JsonlLogger, MultiLogger, TensorBoardLogger
from .losses import build
from .losses import get as get_algorithm
from .rundir import (
    Replacement,
    changed_data,
    changed_settings,
    check_aside,
    data_fingerprint,
    describe_changes,
    holds_nothing,
    read_records,
    recover_replaced,
    refuse_non_run,
    resume_point,
    searched_lr,
)
from .step import LazySGD, StepMonitor, train_step

log = logging.getLogger("xcent")

TIMING_KEYS = ("epoch_seconds", "samples_per_second", "eval_seconds")


# ----------------------------------------------------------------------------- schedules


def lr_at(epoch: int, epochs: int, lr: float, warmup_epochs: int = 0) -> float:
    """Per-epoch learning rate (1-based ``epoch``): cosine without floor,
    ``lr (1 + cos(pi (e - 1) / E)) / 2``; with ``warmup_epochs = W > 0`` epochs 1..W
    ramp ``lr (0.1 + 0.9 (e - 1) / W)`` and the cosine runs over the other E - W."""
    if warmup_epochs > 0 and epoch <= warmup_epochs:
        return lr * (0.1 + 0.9 * (epoch - 1) / warmup_epochs)
    e, span = epoch - warmup_epochs, epochs - warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * (e - 1) / span))


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The row order of ``epoch``: a function of (seed, epoch) only, so resume needs
    no generator state."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_samples, generator=gen)


def train_subset(num_samples: int, size: int, seed: int) -> torch.Tensor | None:
    """Fixed sorted subset of training rows for the end-of-epoch train loss (None = all)."""
    if size <= 0 or size >= num_samples:
        return None
    gen = torch.Generator().manual_seed(int(seed) + 7_777)
    return torch.randperm(num_samples, generator=gen)[:size].sort().values


# ----------------------------------------------------------------------------- algorithm


def build_loss(c: TrainConfig, num_samples: int):
    return build(c.algorithm, num_samples, **c.hparams)


# ----------------------------------------------------------------------------- run directory


class RunDir:
    """``OUT = out_dir/name``: config.yaml, out.log, eval_NAME.jsonl, steps_NAME.jsonl,
    tensorboard/, checkpoints/."""

    def __init__(self, out_dir, name):
        self.path = Path(out_dir) / name
        self.name = name
        self.jsonl = self.path / f"eval_{name}.jsonl"
        self.steps = self.path / f"steps_{name}.jsonl"
        self.tensorboard = self.path / "tensorboard"
        self.checkpoints = self.path / "checkpoints"
        self.config = self.path / "config.yaml"
        self.log = self.path / "out.log"

    def holds_run(self) -> bool:
        """A run to continue: it has a checkpoint to resume from (:func:`xcent.rundir.resume_point`).
        A start stopped before any checkpoint holds nothing to continue: the plain command
        starts it afresh (its remains kept aside until the new run's first checkpoint)."""
        return resume_point(self.checkpoints) is not None

    def read_jsonl(self, upto_epoch: int | None = None, path: Path | None = None) -> list[dict]:
        """The epoch records (or those of ``path``) up to ``upto_epoch``; a torn last line
        or records past it are dropped with a warning (:func:`xcent.rundir.read_records`)."""
        records, warnings = read_records(path or self.jsonl, upto_epoch)
        for warning in warnings:
            log.warning(warning)
            print(f"xcent train: warning: {warning}", file=sys.stderr)
        return records

    def write_jsonl(self, records: list[dict], path: Path | None = None) -> None:
        write_text_atomic(path or self.jsonl, "".join(json.dumps(r) + "\n" for r in records))


def _attach_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


# ----------------------------------------------------------------------------- engines


def _row_optimizer(weight, c, resume_path, lo: int, hi: int) -> LazySGD:
    """``--momentum`` / ``--weight-decay``: the exact sparse SGD of this process's rows
    (:class:`xcent.step.LazySGD`; plain SGD when both are 0), its rows ``lo:hi`` of the
    momentum buffer resumed from the checkpoint (file or sharded, saved with any number
    of processes; zero if the checkpoint has none)."""
    opt = LazySGD(weight.shape[0], weight.shape[1], c.momentum, c.weight_decay, weight.dtype, weight.device)
    if opt.buf is not None and resume_path is not None:
        buf = ckpt_io.load_rows(resume_path, lo, hi, key="momentum_buffer")
        if buf is not None:
            opt.buf.copy_(buf)
    return opt


def _momentum_rows(optimizer: LazySGD) -> dict:
    return {} if optimizer.buf is None else {"momentum_buffer": optimizer.buf}


class LocalEngine:
    """One process holds the whole (C, D) weight."""

    world_size, is_main, lo, ctx = 1, True, 0, None

    def __init__(self, data: Dataset, device, c, resume_path):
        self.data, self.device, self.c = data, device, c
        if resume_path is not None:
            self.weight = ckpt_io.load_rows(resume_path, 0, data.num_classes).to(device, torch.float32).contiguous()
        else:
            self.weight = init_weight(data.num_classes, data.feature_dim, c.seed, device)
        self.optimizer = _row_optimizer(self.weight, c, resume_path, 0, data.num_classes)

    def batch(self, index):
        """(features on the device, labels on the host) of the rows ``index``, read now."""
        b = read_batch(self.data.train, index, self.device)
        return b.features, b.labels

    def batches(self, order) -> BatchLoader:
        """The epoch's batches in ``order`` (:mod:`xcent.batches`; read ahead per --prefetch)."""
        return BatchLoader(self.data.train, order, self.c.batch_size, self.device,
                           prefetch=prefetch_enabled(self.c.prefetch, self.device))

    def step(self, loss_fn, feats, labels, index, lr, check_finite=True):
        return train_step(self.weight, loss_fn, feats, labels, index, lr, check_finite, optimizer=self.optimizer,
                          precision=self.c.precision)

    def flush(self) -> None:
        self.optimizer.flush(self.weight)

    def batch_full_ce_sum(self, feats, labels) -> float:
        lse, target, _ = full_softmax_stats(feats, labels, self.weight, precision=self.c.precision)
        return float((lse - target).double().sum())

    def evaluate(self, split, rows=None) -> dict:
        return evaluate(split, self.weight, rows=rows, chunk_rows=self.c.eval_chunk_rows,
                        precision=self.c.precision)

    def save(self, run: RunDir, epoch: int, meta: dict, name: str | None = None) -> Path:
        path = run.checkpoints / (f"{name}.pt" if name else f"epoch_{epoch}.pt")
        ckpt_io.save_atomic({**meta, "weight": self.weight.detach().cpu(), **_momentum_rows(self.optimizer)}, path)
        return path


class ShardedEngine:
    """This rank holds the weight rows of its classes (see :mod:`xcent.distributed`)."""

    def __init__(self, data: Dataset, device, c, resume_path, ctx):
        from . import distributed as xd

        self.xd, self.ctx, self.data, self.c = xd, ctx, data, c
        self.world_size, self.is_main, self.device = ctx.world_size, ctx.is_main, ctx.device
        xd.check_world(data.num_classes, ctx.world_size)
        self.lo, self.hi = xd.class_range(data.num_classes, ctx.rank, ctx.world_size)
        if resume_path is not None:
            rows = ckpt_io.load_rows(resume_path, self.lo, self.hi)
        else:
            rows = init_weight(data.num_classes, data.feature_dim, c.seed, rows=(self.lo, self.hi))
        self.weight = rows.to(self.device, torch.float32).contiguous()
        self.optimizer = _row_optimizer(self.weight, c, resume_path, self.lo, self.hi)

    def _rows_of(self, index):
        return self.xd.batch_part(index, self.ctx)  # this rank reads its slice of the batch

    def _finish(self, mine, index):
        return self.xd.complete_batch_rows(mine, index, self.ctx, torch.float32)  # the all-gather

    def batch(self, index):
        """(features on the device, labels on the host) of the global batch ``index``."""
        b = read_batch(self.data.train, index, self.device, rows_of=self._rows_of)
        return self._finish(b.features, b.index), b.labels

    def batches(self, order) -> BatchLoader:
        """The epoch's batches: each rank reads its slice ahead in a thread (per --prefetch);
        the all-gather runs on the training thread, in step order on every rank."""
        return BatchLoader(self.data.train, order, self.c.batch_size, self.device,
                           prefetch=prefetch_enabled(self.c.prefetch, self.device), rows_of=self._rows_of,
                           finish=self._finish)

    def step(self, loss_fn, feats, labels, index, lr, check_finite=True):
        return train_step(self.weight, loss_fn, feats, labels, index, lr, check_finite, lo=self.lo,
                          process_group=self.ctx.group,
                          optimizer=self.optimizer, precision=self.c.precision)

    def flush(self) -> None:
        self.optimizer.flush(self.weight)

    def batch_full_ce_sum(self, feats, labels) -> float:
        lse, target, _ = self.xd.sharded_stats(feats, labels, self.weight, self.lo, self.ctx,
                                               precision=self.c.precision)
        return float((lse - target).double().sum())

    def evaluate(self, split, rows=None) -> dict:
        return self.xd.sharded_evaluate(split, self.weight, self.lo, self.ctx, rows=rows,
                                        chunk_rows=self.c.eval_chunk_rows, precision=self.c.precision)

    def save(self, run: RunDir, epoch: int, meta: dict, name: str | None = None) -> Path:
        return ckpt_io.save_sharded(self.ctx, run.checkpoints, epoch, self.weight, self.lo, self.hi, meta,
                                    momentum_buffer=self.optimizer.buf, name=name)


# ----------------------------------------------------------------------------- training


def _epoch_metrics(data: Dataset, engine, subset, running):
    metrics = {}
    start = time.perf_counter()
    if running is not None:
        metrics["train_loss"] = running
    else:
        train_m = engine.evaluate(data.train, rows=subset)
        metrics["train_loss"], metrics["train_acc"] = train_m["loss"], train_m["top1"]
    val = engine.evaluate(data.splits["val"])
    metrics.update(val_loss=val["loss"], val_acc=val["top1"], val_top5=val["top5"])
    return metrics, time.perf_counter() - start


def _update_best(best: dict, metrics: dict, data: Dataset, engine) -> float:
    """Track the best val accuracy; evaluate test when it improves. Returns seconds."""
    start = time.perf_counter()
    metrics["test_loss"] = metrics["test_acc"] = None
    if best.get("best_val_acc") is None or metrics["val_acc"] > best["best_val_acc"]:
        best["best_val_acc"] = metrics["val_acc"]
        best["best_val_epoch"] = metrics["epoch"]
        if "test" in data.splits:
            test = engine.evaluate(data.splits["test"])
            metrics["test_loss"], metrics["test_acc"] = test["loss"], test["top1"]
            best["best_test_acc"], best["best_test_loss"] = test["top1"], test["loss"]
    metrics.update(best_val_acc=best["best_val_acc"], best_test_acc=best.get("best_test_acc"),
                   best_test_loss=best.get("best_test_loss"))
    return time.perf_counter() - start


def _format_row(r: dict) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)
    return (f"{r['epoch']:>5} {f(r.get('lr'), '9.4g')} {f(r['train_loss'], '10.4f')} {f(r['val_loss'], '9.4f')} "
            f"{f(r['val_acc'], '8.4f')} {f(r['val_top5'], '8.4f')} {f(r.get('samples_per_second'), '10.0f')}")


TABLE_HEADER = (
    f"{'epoch':>5} {'lr':>9} {'train_loss':>10} {'val_loss':>9} {'val_acc':>8} {'val_top5':>8} {'samples/s':>10}"
)


def _meta(engine, loss_fn, epoch, best, c, data, provenance) -> dict:
    """A checkpoint's metadata. ``provenance`` (:func:`_train_loop`): ``lr_search``, whether the
    config's lr is the one ``--lr auto`` chose (:func:`xcent.rundir.searched_lr`), and
    ``data_fingerprint``, checked when the run is resumed (:func:`xcent.rundir.changed_data`)."""
    return {
        "format": ckpt_io.FORMAT, "nu": loss_fn.nu.detach().cpu(), "nu_set": loss_fn.nu_set.detach().cpu(),
        "epoch": epoch, "best": dict(best), "algorithm": c.algorithm, "num_classes": data.num_classes,
        "feature_dim": data.feature_dim, "num_samples": data.train.num_samples, "config": c.to_dict(),
        "rng_state": torch.get_rng_state(), "world_size": engine.world_size,
        "lr_search": bool(provenance["lr_search"]), "data_fingerprint": provenance["data_fingerprint"],
    }


def _save(run: RunDir, engine, loss_fn, epoch, best, c, data, provenance) -> Path:
    return engine.save(run, epoch, _meta(engine, loss_fn, epoch, best, c, data, provenance))


def _keep_best(run: RunDir, engine, loss_fn, metrics: dict, best: dict, c, data, provenance) -> None:
    """``--keep-best``: save ``checkpoints/best`` when ``--best-by`` improves (the
    first record, epoch 0 included, always does)."""
    key = c.best_by
    value, kept = metrics[key], best.get("kept_value")
    if kept is not None and not (value < kept if key == "val_loss" else value > kept):
        return
    best.update(kept_value=value, kept_epoch=metrics["epoch"], kept_by=key)
    epoch = metrics["epoch"]
    engine.save(run, epoch, _meta(engine, loss_fn, epoch, best, c, data, provenance), name="best")


#: --lr auto reads the search's training rows once when they hold at most this many
#: floats (256 MiB in float32), else per step
SEARCH_CACHE_FLOATS = 2**26


def _prepare_start(c: TrainConfig, data: Dataset, engine, subset, run: RunDir, echo) -> TrainConfig:
    """A fresh run's start (before epoch 0): the data report, ``--init class-means``
    (:mod:`xcent.init`) and ``--lr auto`` (:mod:`xcent.lr_search`); returns the
    config with the chosen lr. Every rank computes the same report and choices."""
    from .init import class_means_init, class_means_rows
    from .inspect import data_report, format_report
    from .lr_search import SAFETY, SAFETY_CLASS_MEANS, lr_candidates, lr_guess, make_plan, search_lr

    report = data_report(data, seed=c.seed)
    if engine.is_main:
        write_text_atomic(run.path / "data_report.json", json.dumps(report, indent=2) + "\n")
    echo(format_report(report))
    scale = None
    threads = ThreadPolicy(c.threads, device=engine.device)  # as the epochs: per phase
    if c.init == "class-means":
        start = time.perf_counter()
        with threads.evaluation(data.feature_dim):  # full-softmax scoring of held-out rows, repeatedly
            init = class_means_init(data.train, data.num_classes, subset, ctx=engine.ctx, device=engine.device)
        engine.weight = init.weight.to(engine.device, torch.float32).contiguous()
        scale = init.scale
        echo(f"init: class means x {scale:.4g} (CE {init.loss:.4f}, top-1 {init.top1:.4f} on training rows held "
             f"out of the means; {init.classes_with_rows} classes with rows; {time.perf_counter() - start:.1f}s)")
        if engine.is_main:
            log.info("init: %s", json.dumps(init.summary()))
    if c.lr != "auto":
        return c
    rpc, norm = report["train_rows_per_class"], report["feature_norm"]
    tuned = get_algorithm(c.algorithm).defaults["lr"]
    guess = lr_guess(tuned, norm["mean_sq"], rpc["mean"])
    candidates = lr_candidates(guess)
    plan = make_plan(data.train.labels, data.num_classes, c.batch_size, len(candidates), c.seed,
                     c.lr_search_budget)
    hparams = {k: v for k, v in c.hparams.items() if k != "lr"}

    def make_loss(num_samples):  # duals for the plan's rows only (local ids)
        loss_fn = build(c.algorithm, num_samples, epochs=c.epochs, **hparams).to(engine.device)
        loss_fn.set_epoch(1)
        return loss_fn

    # S's training rows are read once (the search's time counts it) and every pass
    # indexes them in memory, as the trainer's prefetch keeps its reads off the
    # steps; S is at most budget / 11 of the split (capped, else read per step)
    cached = []

    def step(loss_fn, index, local, lr):
        if not cached and plan.rows_per_pass * data.feature_dim <= SEARCH_CACHE_FLOATS:
            cached.append(engine.batch(plan.train_rows))
        if cached:
            feats, labels = cached[0]  # features on the device, labels on the host
            return engine.step(loss_fn, feats.index_select(0, local.to(feats.device)), labels.index_select(0, local),
                               local, lr)
        feats, labels = engine.batch(index)
        return engine.step(loss_fn, feats, labels, local, lr)

    start_rows = None
    if scale is not None:  # the class-mean start of S without its held-out rows
        hi = engine.lo + engine.weight.shape[0]
        mine = plan.classes[(plan.classes >= engine.lo) & (plan.classes < hi)]
        start_rows = class_means_rows(data.train, mine, plan.train_rows, scale)
    # candidates take plain SGD steps: they interleave (successive halving), and one
    # momentum buffer of all C rows per candidate is too much; with --momentum m the
    # plain-SGD choice is scaled by (1 - m), the same long-run step
    engine.optimizer = _row_optimizer(engine.weight, c.replace(momentum=0.0, weight_decay=0.0), None, engine.lo,
                                      engine.lo + engine.weight.shape[0])
    safety = SAFETY if scale is None else SAFETY_CLASS_MEANS
    held_flops = 2.0 * plan.held_rows.numel() * data.num_classes * data.feature_dim

    def score():
        with threads.evaluation(data.feature_dim, held_flops):
            return engine.evaluate(data.train, rows=plan.held_rows)

    with ThreadPolicy.use(threads.step_threads(c.batch_size, data.feature_dim)):  # the candidates' steps
        result = search_lr(plan, candidates, data.num_classes, engine.weight, engine.lo, make_loss, step, score,
                           start_rows, guess=guess, safety=safety, batch_size=c.batch_size)
    if c.momentum:
        result.best_lr *= 1.0 - c.momentum
        result.rule += f", x (1 - momentum {c.momentum:g})"
    c = c.replace(lr=result.best_lr)
    engine.optimizer = _row_optimizer(engine.weight, c, None, engine.lo, engine.lo + engine.weight.shape[0])
    records = result.as_records()
    if engine.is_main:
        write_text_atomic(run.path / "lr_search.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    echo(f"lr auto: guess {guess:.4g} (tuned {tuned:g} x data scale), {len(candidates)} candidates by successive "
         f"halving over {len(plan.passes)} passes ({'+'.join(map(str, plan.schedule))} candidate-passes) of "
         f"{plan.rows_per_pass} rows of {plan.classes.numel()} classes, scored on {plan.held_rows.numel()} "
         f"held-out rows")
    for r in result.candidates:
        shown = "diverged" if r["diverged"] else f"CE {r['loss']:.4f} top-1 {r['top1']:.4f}"
        echo(f"  lr {r['lr']:<10.4g} {shown} ({r['passes']} pass{'es' if r['passes'] != 1 else ''})")
    echo(f"lr auto: {result.best_lr:.4g} ({result.rule}; start CE {result.start['loss']:.4f}); "
         f"{result.cost_line()}")
    return c


def check_trainable(data: Dataset, c: TrainConfig, device, world_size: int = 1) -> None:
    """What the data and the flags ask for can be trained, before anything is allocated:
    at least two classes (a softmax over one class is 1 whatever the weight: its loss
    is 0 and its accuracy 1), and a weight (each process's rows of it, and its momentum
    buffer with ``--momentum``) that fits in the memory of ``device``
    (:func:`xcent.limits.check_weight_fits`)."""
    if data.num_classes < 2:
        if c.num_classes is not None:
            raise UsageError(f"--num-classes {c.num_classes}: training needs at least 2 classes")
        raise UsageError(f"--data-dir {c.data_dir}: every label is 0, a single class; training needs at least 2 "
                         f"classes (a softmax over one class is 1 whatever the weight)")
    if c.lr == "auto":
        from .lr_search import check_searchable

        check_searchable(torch.bincount(data.train.labels, minlength=data.num_classes))
    rows = -(-data.num_classes // max(world_size, 1))
    asked = f"{data.classes_from} with feature dimension {data.feature_dim}"
    check_weight_fits(rows, data.feature_dim, asked, device, copies=2 if c.momentum else 1)


def train(c: TrainConfig, echo=print) -> dict:
    """Run the training described by the resolved config ``c`` (see
    :func:`xcent.config.config_from_argv`); returns the last JSONL record. Raises
    UsageError on bad input (before touching OUT) and DivergenceError on a
    non-finite step. Under torchrun (WORLD_SIZE > 1) the classes are sharded
    over the processes (:mod:`xcent.distributed`); only rank 0 writes logs."""
    from . import distributed as xd

    run = RunDir(c.out_dir, c.name)
    # one writer per run directory, held from the start (before the data is read): of two
    # processes on one run, the later one exits 2 whichever gets further first, and a run
    # is never replaced while another process trains it. The kernel drops it if we die.
    is_main = xd.world_size_from_env() == 1 or os.environ.get("RANK", "0") == "0"
    lock = exclusive_lock(run.path, "run").acquire() if is_main else None
    try:
        data = load_dataset(c.data_dir, num_classes=c.num_classes, feature_dim=c.feature_dim,
                            data_size=c.data_size, check_features=c.check_features,
                            low_memory=c.low_memory)
        device = resolve_device(c.device)
        check_trainable(data, c, device, xd.world_size_from_env())
        ctx = xd.init_from_env(device, c.dist_timeout) if xd.world_size_from_env() > 1 else None
        try:
            with ThreadPolicy.use(torch.get_num_threads()):  # the caller's thread count comes back
                return _train(c, data, device, ctx, echo, run)
        finally:
            if ctx is not None:
                xd.shutdown()
    finally:
        if lock is not None:
            lock.release()


def _train(c, data, device, ctx, echo, run) -> dict:
    is_main = ctx is None or ctx.is_main
    if not is_main:
        echo = lambda *_: None  # noqa: E731  rank-0 discipline
    return _train_locked(c, data, device, ctx, echo, run, is_main)


def _check_resumed_data(c, ckpt: dict, path, fingerprint: dict, echo) -> None:
    """Resume only on the data the run was trained on (its checkpoint's fingerprint,
    :func:`xcent.rundir.changed_data`), unless ``--allow-changed-settings``; a
    checkpoint saved before fingerprints were recorded resumes, and says so."""
    saved = ckpt.get("data_fingerprint")
    if not isinstance(saved, dict):
        if echo is not None:
            echo(f"xcent train: {path} records no fingerprint of its data (saved by an older xcent or imported): "
                 f"the data cannot be checked against the run's; checkpoints from now on record it")
        return
    changes = changed_data(saved, fingerprint)
    if changes and not c.allow_changed_settings:
        raise UsageError(f"--resume {path}: --data-dir {c.data_dir} differs from the data the run was trained on "
                         f"({', '.join(changes)}); resuming would mix two datasets in one log: pass "
                         f"--allow-changed-settings to resume on it anyway")
    if changes and echo is not None:
        echo(f"xcent train: resuming on changed data ({', '.join(changes)}), as --allow-changed-settings asks")


def _has_checkpoint(path: Path) -> bool:
    return bool(ckpt_io.epoch_checkpoints(Path(path) / "checkpoints"))


def _train_locked(c, data, device, ctx, echo, run, is_main) -> dict:
    check_aside(run.path)  # on every rank: a refusal must not leave the others waiting
    if is_main and (note := recover_replaced(run.path, _has_checkpoint)):
        log.warning(note)
        echo(f"xcent train: {note}")
    if ctx is not None:
        ctx.barrier()  # rank 0 has recovered an interrupted --overwrite before anyone looks
    # a file, the data, a folder of the user's: never written into or replaced (a resumed run
    # writes only its own files: other files beside them may stay)
    refuse_non_run(run.path, others_ok=bool(c.resume))
    resume_ckpt, resume_path = None, None
    # what every checkpoint records of the data, checked on resume (every rank: a refusal
    # must not leave the others waiting)
    provenance = {"data_fingerprint": data_fingerprint(data), "lr_search": c.lr == "auto"}
    if c.resume:
        resume_path = resume_point(run.checkpoints) if c.resume == "latest" else Path(c.resume)
        if resume_path is None:
            raise UsageError(f"--resume latest: no checkpoint in {run.checkpoints}: the run stopped before its "
                             f"first; run the command without --resume to start it afresh")
        resume_ckpt = ckpt_io.load(resume_path, mmap=True, weight=False)  # the engine reads its rows
        ckpt_io.check_compatible(resume_ckpt, resume_path, c.algorithm, data.num_classes, data.feature_dim,
                                 data.train.num_samples)
        if resume_ckpt["epoch"] >= c.epochs:
            raise UsageError(f"--resume {resume_path}: already at epoch {resume_ckpt['epoch']} "
                             f"of --epochs {c.epochs}")
        _check_resumed_data(c, resume_ckpt, resume_path, provenance["data_fingerprint"], echo if is_main else None)
        # --lr auto is the lr the run's search chose (the search is not run again)
        searched = searched_lr(resume_ckpt, run.config)
        if c.lr == "auto" and searched is not None:
            c = c.replace(lr=searched)
        provenance["lr_search"] = searched is not None and c.lr == searched
        changed = changed_settings(resume_ckpt["config"], c.to_dict(), get_algorithm(c.algorithm).keys)
        if changed and not c.allow_changed_settings:
            raise UsageError(f"--resume {resume_path}: settings differ from the run's: {describe_changes(changed)}; "
                             f"pass --allow-changed-settings to resume with them")
        if is_main and c.epochs != resume_ckpt["config"].get("epochs"):
            echo(f"xcent train: --epochs {resume_ckpt['config'].get('epochs')} -> {c.epochs}: epochs "
                 f"{resume_ckpt['epoch'] + 1}.. follow the schedule of a {c.epochs}-epoch run")
        # the start is the run's: a run begun before class-means became the default (no
        # `init` saved) or with --init random stays random in its config, whatever --init says now
        started = resume_ckpt["config"].get("init", "random")
        if is_main and c.init != started:
            echo(f"xcent train: the run started from --init {started}; a resumed run keeps its start")
        c = c.replace(resume=str(resume_path), init=started)
    elif run.holds_run() and not c.overwrite:
        raise UsageError(f"{run.path} already holds a run; pass --resume latest to continue it "
                         f"or --overwrite to replace it")
    elif not holds_nothing(run.path) and run.path.is_symlink():
        raise UsageError(f"{run.path} is a symbolic link: a new run does not replace it (--resume continues "
                         f"the run it points to); remove the link or choose another --name")
    c = c.replace(num_classes=data.num_classes, feature_dim=data.feature_dim, data_size=data.train.num_samples)
    # the weight is allocated (or read) before OUT changes: a failure here leaves an old run as it was
    engine = (LocalEngine(data, device, c, resume_path) if ctx is None
              else ShardedEngine(data, device, c, resume_path, ctx))
    if ctx is not None:
        ctx.barrier()  # every rank has checked OUT before rank 0 changes it
    handler, replacement = None, None
    try:
        if is_main:
            # --overwrite, or a start that never reached a checkpoint: the old contents are
            # kept aside until the new run's first checkpoint
            if not c.resume and not holds_nothing(run.path):
                replacement = Replacement(run.path)
                replacement.begin()
            run.path.mkdir(parents=True, exist_ok=True)
            ckpt_io.clean_stale_temp(run.checkpoints)
            # config.yaml first: from the first entry on, the directory reads as a run (not_a_run);
            # it keeps `lr: auto` for a searched lr (the command as given; checkpoints hold the lr)
            written = {**c.to_dict(), **({"lr": "auto"} if provenance["lr_search"] else {})}
            write_text_atomic(run.config, yaml.safe_dump(written, sort_keys=False))
            handler = _attach_log_file(run.log)
        if ctx is not None:
            ctx.barrier()
        return _train_loop(c, data, engine, run, resume_ckpt, provenance, echo,
                           on_saved=replacement.commit if replacement is not None else None)
    except BaseException:
        if replacement is not None:
            if handler is not None:
                log.removeHandler(handler)
                handler.close()
                handler = None
            replacement.rollback()  # no-op once the new run has a checkpoint
        raise
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _train_loop(c, data: Dataset, engine, run: RunDir, resume_ckpt, provenance: dict, echo,
                on_saved=None) -> dict:
    """``provenance``: what every checkpoint records of the run's start and data (``lr_search``,
    ``data_fingerprint``), added to :func:`_meta`."""
    num_samples, batch_size = data.train.num_samples, c.batch_size
    is_main = engine.is_main
    subset = train_subset(num_samples, c.train_eval_size, c.seed)
    if resume_ckpt is None:
        c = _prepare_start(c, data, engine, subset, run, echo)
    loss_fn = build_loss(c, num_samples)
    if resume_ckpt is not None:
        loss_fn.load_state_dict({"nu": resume_ckpt["nu"], "nu_set": resume_ckpt["nu_set"]})
        start_epoch, best = resume_ckpt["epoch"] + 1, dict(resume_ckpt["best"])
        torch.set_rng_state(resume_ckpt["rng_state"])
        records = run.read_jsonl(resume_ckpt["epoch"]) if is_main else []
        if is_main:
            run.write_jsonl(records)
            run.write_jsonl(run.read_jsonl(resume_ckpt["epoch"], run.steps), run.steps)
            log.info("resumed from %s at epoch %d", c.resume, resume_ckpt["epoch"])
    else:
        start_epoch, best, records = 1, {}, []
    loss_fn.to(engine.device)
    if is_main:
        log.info("run %s: %s, %d classes, %d x %d training rows, device %s, %d process(es)", run.name,
                 c.algorithm, data.num_classes, num_samples, data.feature_dim, engine.device, engine.world_size)
    echo(f"xcent train: {c.algorithm} on {c.data_dir} ({data.num_classes} classes, "
         f"{num_samples} rows, dim {data.feature_dim}, {engine.world_size} process(es)) -> {run.path}")
    echo(TABLE_HEADER)
    for r in records:
        echo(_format_row(r))
    steps_per_epoch = math.ceil(num_samples / batch_size)
    epoch_log, step_log = _loggers(c, run, is_main, steps_per_epoch, start_epoch)
    try:
        return _epochs(c, data, engine, run, loss_fn, start_epoch, best, records, subset, steps_per_epoch,
                       epoch_log, step_log, echo, provenance, on_saved)
    finally:
        epoch_log.close()
        step_log.close()


def _loggers(c, run: RunDir, is_main: bool, steps_per_epoch: int, start_epoch: int):
    """(epoch logger, step logger): JSONL always, TensorBoard with ``--logger``; no-ops
    off rank 0. TensorBoard draws both against the global step (epoch e at e x steps
    per epoch) and, on resume, drops what an interrupted run wrote past the checkpoint."""
    if not is_main:
        return MultiLogger([]), MultiLogger([])
    epoch_log = [JsonlLogger(run.jsonl, "epoch", fsync=True)]
    step_log = [JsonlLogger(run.steps, "step")] if c.log_every_steps > 0 else []
    if "tensorboard" in c.logger:
        tb = TensorBoardLogger(run.tensorboard, "epoch/", purge_step=(start_epoch - 1) * steps_per_epoch + 1,
                               step_scale=steps_per_epoch)
        epoch_log.append(tb)
        if step_log:
            step_log.append(tb.with_prefix("step/"))
    return MultiLogger(epoch_log), MultiLogger(step_log)


GAMMA_KEYS = ("gamma/mean", "gamma/median", "gamma/min", "gamma/max")


def _step_values(loss_fn, result, nu_old, first, nu_index) -> dict:
    """The step log's statistics of one step as device values, read nowhere (the
    caller reads them with the step monitor's check: one host read): the surrogate,
    the reference implementation's ``loss`` and ``gamma/*`` (the dual step weight of
    the batch's revisited rows), ``nu/mean|median|min|max`` of the batch's duals after
    the step, and ``revisits`` (how many rows had a dual step: the ``gamma/*`` are
    dropped when none had). The revisited rows are masked, not selected (a boolean
    index would read the device)."""
    values = {"surrogate_loss": result.loss, "loss": loss_fn.reference_loss(result.num_distinct)}
    if loss_fn.grad_nu is not None:
        nu = loss_fn.nu[nu_index]
        values.update({"nu/mean": nu.mean(), "nu/median": nu.median(), "nu/min": nu.min(), "nu/max": nu.max()})
        revisit = ~first
        rate = loss_fn.dual_rate(nu_old)  # elementwise, or one number: first visits are masked below
        if isinstance(rate, torch.Tensor):
            values.update({"gamma/mean": torch.where(revisit, rate, math.nan).nanmean(),
                           "gamma/median": torch.where(revisit, rate, math.nan).nanmedian(),
                           "gamma/min": torch.where(revisit, rate, math.inf).amin(),
                           "gamma/max": torch.where(revisit, rate, -math.inf).amax()})
        elif isinstance(rate, float):
            values.update({k: torch.full((), rate, device=nu.device) for k in GAMMA_KEYS})
        values["revisits"] = revisit.sum()
    return {k: v.detach().to(torch.float64).reshape(()) for k, v in values.items()}


def _step_record(values: dict, numbers: list) -> dict:
    """The read numbers of :func:`_step_values` as the step log's fields."""
    record = dict(zip(values, numbers))
    if not record.pop("revisits", 0):
        for k in GAMMA_KEYS:
            record.pop(k, None)
    return record


def _against_start(metrics: dict, best: dict, records: list[dict]) -> dict:
    """An epoch record's comparison with the start (epoch 0): ``start_val_loss``,
    ``start_val_acc`` and ``improved_over_start`` (val CE below the start's). The start
    is kept in the checkpoint's ``best``; a run resumed from a checkpoint written before
    it was kept takes it from its epoch-0 record (rank 0 holds the records), else {}."""
    if "start_val_loss" not in best:
        first = records[0] if records and records[0]["epoch"] == 0 else None
        if first is None:
            return {}
        best.update(start_val_loss=first["val_loss"], start_val_acc=first["val_acc"])
    start = best["start_val_loss"]
    return {"start_val_loss": start, "start_val_acc": best["start_val_acc"],
            "improved_over_start": bool(metrics["val_loss"] < start)}


def outcome_line(last: dict, best: dict, keep_best: bool) -> str | None:
    """The run's last console line: val CE and top-1 at the start (epoch 0) and at the
    end, and whether training improved on the start (val CE); None without a start."""
    if "improved_over_start" not in last:
        return None
    ce = f"val CE {last['start_val_loss']:.4f} at the start -> {last['val_loss']:.4f} at epoch {last['epoch']}"
    top1 = f"val top-1 {last['start_val_acc']:.4f} -> {last['val_acc']:.4f}"
    if last["improved_over_start"]:
        return f"result: improved over the start: {ce}, {top1}"
    kept = ""
    if keep_best and best.get("kept_epoch") is not None:
        kept = ("; checkpoints/best is the start" if best["kept_epoch"] == 0
                else f"; checkpoints/best is epoch {best['kept_epoch']} (--best-by {best.get('kept_by')})")
    return f"result: NOT improved over the start: {ce}, {top1}{kept}"


def _diverged(bar, run: RunDir, c, epoch: int, step: int, lr: float):
    bar.close()
    last = resume_point(run.checkpoints)
    raise DivergenceError(
        f"training diverged at epoch {epoch}, step {step} ({c.algorithm}, lr {lr:.4g}): "
        f"non-finite loss or weights; lower --lr. Last good checkpoint: {last or 'none'}")


def _epochs(c, data, engine, run, loss_fn, start_epoch, best, records, subset, steps_per_epoch, epoch_log,
            step_log, echo, provenance, on_saved=None) -> dict:
    num_samples, batch_size, epochs, is_main = data.train.num_samples, c.batch_size, c.epochs, engine.is_main
    every = c.log_every_steps  # on every rank: a step-log step is a check step, a collective under torchrun
    threads = ThreadPolicy(c.threads, device=engine.device)
    # the flops of an epoch's evaluation (train subset or none, val; 2 rows C D): sizes the probe's budget
    eval_rows = (len(subset) if subset is not None and c.train_loss != "running" else 0) \
        + data.splits["val"].num_samples
    eval_flops = 2.0 * eval_rows * data.num_classes * data.feature_dim
    # the steps' health, read every --check-every-steps steps (xcent.step.StepMonitor)
    monitor = StepMonitor(c.check_every_steps, engine.device, None if engine.ctx is None else engine.ctx.group)

    def finish_epoch(record):
        if is_main:
            epoch_log.log_dict({k: v for k, v in record.items() if k != "epoch"}, record["epoch"])
            log.info(json.dumps(record))
        records.append(record)
        echo(_format_row(record))

    # epoch 0: the initial model, so curves start at log C; not again when resuming from a
    # checkpoint of epoch 0 (the kept best one) whose record the log holds
    if start_epoch == 1 and not records:
        with threads.evaluation(data.feature_dim, eval_flops):
            metrics, eval_s = _epoch_metrics(data, engine, subset, None)
            metrics["epoch"] = 0
            eval_s += _update_best(best, metrics, data, engine)
        best.update(start_val_loss=metrics["val_loss"], start_val_acc=metrics["val_acc"])
        finish_epoch({"epoch": 0, **metrics, "lr": 0.0, "epoch_seconds": 0.0, "samples_per_second": 0.0,
                      "skipped_steps": 0, "eval_seconds": eval_s})
        if c.keep_best:  # after the record: a checkpoint's epoch is always in the log
            _keep_best(run, engine, loss_fn, metrics, best, c, data, provenance)

    from tqdm.auto import tqdm

    for epoch in range(start_epoch, epochs + 1):
        loss_fn.set_epoch(epoch, epochs)
        lr = lr_at(epoch, epochs, c.lr, c.warmup_epochs)
        order = epoch_permutation(num_samples, c.seed, epoch)
        skipped, running_sum, steps = 0, 0.0, 0
        # summed on the device (float64, as a Python float would): no sync per step
        surrogate_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        start = time.perf_counter()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False,
                   disable=None if is_main else True, file=sys.stderr)
        # the step's threads for the whole loop (evaluations switch and come back)
        torch.set_num_threads(threads.step_threads(batch_size, data.feature_dim))
        with engine.batches(order) as batches:  # the thread reading ahead stops however the loop ends
            for batch in batches:
                step, index, labels, feats = batch.step, batch.index, batch.labels, batch.features
                if c.train_loss == "running":
                    engine.flush()  # the full CE needs every row current (a pass over C rows, as the CE itself)
                    with threads.evaluation(data.feature_dim,
                                            2.0 * len(index) * data.num_classes * data.feature_dim):
                        batch_ce = engine.batch_full_ce_sum(feats, labels)
                    running_sum += batch_ce
                logging_step = every > 0 and step % every == 0  # the reference's batches 0, 100, 200, ...
                if logging_step and is_main:  # the old duals, for the dual step weight (a B-row gather)
                    nu_index = index.to(loss_fn.nu.device, non_blocking=True)
                    nu_old, first = loss_fn.nu[nu_index].clone(), ~loss_fn.nu_set[nu_index]
                result = engine.step(loss_fn, feats, labels, index, lr, check_finite=False)
                if result.skipped:
                    skipped += 1
                else:
                    monitor.record(result.health, step + 1)
                    surrogate_sum += result.loss.double()
                    steps += 1
                if not result.skipped and (logging_step or monitor.due):  # one host read: health (+ step log)
                    values = (_step_values(loss_fn, result, nu_old, first, nu_index) if logging_step and is_main
                              else {})
                    bad, numbers = monitor.check(torch.stack(list(values.values())) if values else None)
                    if bad is not None:
                        _diverged(bar, run, c, epoch, bad, lr)
                    if values:
                        record = {"epoch": epoch, "batch": step, "lr": lr, **_step_record(values, numbers)}
                        if c.train_loss == "running":
                            record["train_loss"] = batch_ce / len(index)
                        step_log.log_dict(record, (epoch - 1) * steps_per_epoch + step + 1)
                bar.update(1)
        bad, _ = monitor.check()  # every step of the epoch healthy before anything is evaluated or saved
        if bad is not None:
            _diverged(bar, run, c, epoch, bad, lr)
        bar.close()
        engine.flush()  # every row current (momentum / weight decay) before evaluating and saving
        train_seconds = time.perf_counter() - start
        running = running_sum / num_samples if c.train_loss == "running" else None
        with threads.evaluation(data.feature_dim, eval_flops):
            metrics, eval_s = _epoch_metrics(data, engine, subset, running)
            metrics["epoch"] = epoch
            if (why := check_divergence(metrics, data.num_classes)) is not None:
                # before logging or saving: the last checkpoint is always one that passed the rule
                raise DivergenceError(
                    f"training diverged at epoch {epoch} ({c.algorithm}, lr {lr:.4g}): {why}; lower --lr. "
                    f"Last good checkpoint: {resume_point(run.checkpoints) or 'none'}")
            eval_s += _update_best(best, metrics, data, engine)
        if skipped and is_main:
            log.warning("epoch %d: %d step(s) skipped (batch with a single label)", epoch, skipped)
        finish_epoch({"epoch": epoch, **metrics, **_against_start(metrics, best, records), "lr": lr,
                      "surrogate_loss": float(surrogate_sum) / max(steps, 1), "epoch_seconds": train_seconds,
                      "samples_per_second": num_samples / max(train_seconds, 1e-9),
                      "skipped_steps": skipped, "eval_seconds": eval_s})
        if c.keep_best:  # after the record: a checkpoint's epoch is always in the log
            _keep_best(run, engine, loss_fn, metrics, best, c, data, provenance)
        if epoch % c.save_frequency == 0 or epoch == epochs:
            _save(run, engine, loss_fn, epoch, best, c, data, provenance)
            if on_saved is not None and is_main:
                on_saved()  # --overwrite: the replaced run may go now
                on_saved = None
    echo(f"outputs: {run.path} (eval_{run.name}.jsonl, checkpoints/, config.yaml, out.log)")
    if (line := outcome_line(records[-1], best, c.keep_best)) is not None:
        echo(line)
    return records[-1]

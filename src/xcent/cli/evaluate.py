"""``xcent eval``: full-softmax CE, top-1/top-5 and macro accuracy of trained weights on a
split, overall and by class frequency in train (:mod:`xcent.evaluate`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data import load_dataset
from ..device import ThreadPolicy, parse_threads, resolve_device
from ..errors import UsageError
from ..evaluate import _aggregate, bucket_metrics, per_class_stats, train_class_counts


def _f(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str]) -> int:
    from ..modelio import load_model
    from ..yamlio import argument_parser

    p = argument_parser(prog="xcent eval",
                        description="Full-softmax CE, top-1/top-5 and macro accuracy of a checkpoint (or a "
                                    "safetensors export) on a split, overall and by class frequency in train.")
    p.add_argument("--checkpoint", type=str, required=True, help="an xcent checkpoint or safetensors export")
    p.add_argument("--data-dir", type=str, required=True)
    p.add_argument("--split", type=str, default="val", help="train, val or test")
    p.add_argument("--device", type=str, default="auto")
    p.add_argument("--chunk-rows", type=int, default=4096)
    p.add_argument("--class-chunk", type=int, default=32768)
    p.add_argument("--precision", type=str, default="fp32", choices=["fp32", "bf16"],
                   help="of the score GEMMs: bf16 reads bfloat16 operands with float32 accumulation")
    p.add_argument("--buckets", type=bool, default=True,
                   help="break metrics down by train frequency (head/torso/tail thirds of the classes, unseen)")
    p.add_argument("--json", type=bool, nargs="?", const=True, default=False,
                   help="print one JSON object instead of text (--json or --json true)")
    p.add_argument("--threads", type=str, default="auto",
                   help="CPU intra-op threads: auto (one or all cores, whichever a short probe finds faster; "
                        "OMP_NUM_THREADS caps it) or a number")
    a = p.parse_args(argv)
    parse_threads(a.threads)  # a bad value fails before any work
    if a.split not in ("train", "val", "test"):
        raise UsageError(f"--split {a.split}: expected train, val or test")
    if a.chunk_rows < 1 or a.class_chunk < 1:
        raise UsageError("--chunk-rows and --class-chunk must be positive")
    weight, meta = load_model(a.checkpoint)
    data = load_dataset(a.data_dir, splits=(a.split,), required=(a.split,), num_classes=weight.shape[0],
                        feature_dim=weight.shape[1])
    counts = train_class_counts(a.data_dir, weight.shape[0]) if a.buckets else None
    device = resolve_device(a.device)
    split = data.splits[a.split]
    flops = 2.0 * split.num_samples * weight.shape[0] * weight.shape[1]
    with ThreadPolicy(a.threads, device=device).evaluation(weight.shape[1], flops):
        stats = per_class_stats(data.splits[a.split], weight.to(device, torch.float32), chunk_rows=a.chunk_rows,
                                class_chunk=a.class_chunk, precision=a.precision)
    overall = _aggregate(stats)
    metrics = {"checkpoint": str(Path(a.checkpoint)), "split": a.split, "epoch": meta["epoch"],
               "num_classes": int(weight.shape[0]), **overall}
    if counts is not None:
        metrics["buckets"] = bucket_metrics(stats, counts)
    if a.json:
        print(json.dumps(metrics))
        return 0
    print(f"{a.split}: loss {metrics['loss']:.4f}  top1 {metrics['top1']:.4f}  top5 {metrics['top5']:.4f}  "
          f"macro-top1 {metrics['macro_top1']:.4f}  ({metrics['num_rows']} rows, epoch {metrics['epoch']})")
    if a.buckets and counts is None:
        print(f"(no train split in {a.data_dir}: no head/torso/tail breakdown)")
    elif counts is not None:
        print(f"{'bucket':<7} {'classes':>8} {'train rows/class':>17} {'rows':>8} {'loss':>8} {'top1':>7} "
              f"{'top5':>7} {'macro-top1':>10}")
        for name, b in metrics["buckets"].items():
            span = "0" if name == "unseen" else (f"{b['train_count_min']}..{b['train_count_max']}"
                                                 if b["num_classes"] else "-")
            print(f"{name:<7} {b['num_classes']:>8} {span:>17} {b['num_rows']:>8} {_f(b['loss']):>8} "
                  f"{_f(b['top1']):>7} {_f(b['top5']):>7} {_f(b['macro_top1']):>10}")
    return 0

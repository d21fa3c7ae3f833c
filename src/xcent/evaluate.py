"""Exact evaluation: full-softmax cross-entropy and top-1/top-5 accuracy over all C
classes, in chunks of bounded memory, and the ``xcent eval`` command."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .classifier import full_softmax_stats
from .data import Split, load_dataset
from .errors import UsageError


@torch.no_grad()
def evaluate(split: Split, weight: Tensor, rows: Tensor | None = None, chunk_rows: int = 4096,
             class_chunk: int = 32768) -> dict:
    """``{"loss", "top1", "top5", "num_rows"}`` of ``weight`` on ``split`` (or on its
    ``rows``): mean full-softmax CE and top-k accuracy. Reads the split chunk by chunk;
    peak extra memory is one (chunk_rows, class_chunk) block. Never changes any
    training state."""
    total_loss = torch.zeros((), dtype=torch.float64)
    correct1 = correct5 = count = 0
    for feats, labels in split.chunks(rows, chunk_rows):
        lse, target, rank = full_softmax_stats(feats, labels, weight, class_chunk)
        total_loss += (lse - target).double().sum().cpu()
        correct1 += int((rank < 1).sum())
        correct5 += int((rank < 5).sum())
        count += int(labels.shape[0])
    return {"loss": float(total_loss) / count, "top1": correct1 / count, "top5": correct5 / count,
            "num_rows": count}


def main(argv: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from . import checkpoint as ckpt_io

    p = ArgumentParser(prog="xcent eval", description="Full-softmax CE, top-1 and top-5 of a checkpoint on a split.")
    p.add_argument("--checkpoint", type=str, required=True)
    p.add_argument("--data-dir", type=str, required=True)
    p.add_argument("--split", type=str, default="val", help="train, val or test")
    p.add_argument("--device", type=str, default="auto")
    p.add_argument("--chunk-rows", type=int, default=4096)
    p.add_argument("--json", type=bool, default=False, help="print one JSON object instead of text")
    a = p.parse_args(argv)
    if a.split not in ("train", "val", "test"):
        raise UsageError(f"--split {a.split}: expected train, val or test")
    ckpt = ckpt_io.load(a.checkpoint)
    weight = ckpt["weight"]
    data = load_dataset(a.data_dir, splits=(a.split,), required=(a.split,), num_classes=weight.shape[0],
                        feature_dim=weight.shape[1])
    device = resolve_device(a.device)
    metrics = evaluate(data.splits[a.split], weight.to(device, torch.float32), chunk_rows=a.chunk_rows)
    metrics = {"checkpoint": str(Path(a.checkpoint)), "split": a.split, "epoch": ckpt.get("epoch"), **metrics}
    if a.json:
        print(json.dumps(metrics))
    else:
        print(f"{a.split}: loss {metrics['loss']:.4f}  top1 {metrics['top1']:.4f}  top5 {metrics['top5']:.4f}"
              f"  ({metrics['num_rows']} rows, epoch {metrics['epoch']})")
    return 0


def resolve_device(name: str) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (cpu, cuda, cuda:N or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device

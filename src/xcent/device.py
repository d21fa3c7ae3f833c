"""Where the work runs: the one place that turns ``--device`` into a ``torch.device``."""

from __future__ import annotations

import torch

from .errors import UsageError

__all__ = ["resolve_device"]


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (or empty) picks CUDA when present, else the CPU; anything else must be a
    valid, available torch device, or a one-line ``UsageError`` naming ``--device``."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (cpu, cuda, cuda:N or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device

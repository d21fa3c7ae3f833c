"""The bounds on sizes and numbers that xcent checks before it acts on them.

Absurd input (a seed of 30 digits, a label of 2**40, ``--num-classes 99999999999``)
is refused here with one line saying what was asked, instead of an overflow deep in
a random generator or an allocation of terabytes that fails (or, under memory
overcommit, gets the process killed) after minutes of work.

* :func:`check_seed`: every seed of every command (``--seed`` flags and config keys,
  ``xcent compare --seeds``) is an integer in ``[0, MAX_SEED]``: the range of
  numpy's legacy seeds, which every generator xcent uses accepts (numpy's
  ``default_rng`` refuses negative seeds; torch's ``manual_seed`` takes 64 bits,
  and xcent derives per-epoch seeds as ``seed * 1_000_003 + epoch``, which stays
  far inside that). :class:`Seed` is the jsonargparse type of those flags.
* :data:`MAX_EPOCHS`: ``--epochs`` and the epoch a checkpoint records.
* :func:`check_fits`: an allocation proportional to the number of classes, rows or
  features is compared, before it is made, with the memory of the machine that would
  hold it (:func:`memory_limit`). The rule refuses only what cannot fit at all: the
  limit is the machine's *total* memory (RAM capped by a cgroup limit and by
  ``ulimit -v``; a GPU's total memory), not what is free now, and the size checked is
  a lower bound of what the command needs. Anything that passes may still run out of
  memory later, when other programs hold the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError

__all__ = ["MAX_EPOCHS", "MAX_SEED", "MAX_TIMEOUT_SECONDS", "Seed", "check_fits", "check_seed", "check_weight_fits",
           "format_bytes", "memory_limit", "seed_type"]

#: the largest seed (numpy's legacy range: 32 bits)
MAX_SEED = 2**32 - 1
#: the most epochs of a run (and the largest epoch a checkpoint may record): a million passes
MAX_EPOCHS = 1_000_000
#: the longest ``--dist-timeout`` (about 31 years; a timedelta or a collective's
#: millisecond timeout overflows far beyond it)
MAX_TIMEOUT_SECONDS = 1e9


def _seed_problem(value) -> tuple[int | None, str]:
    """``(seed, "")`` or ``(None, why value is not a seed)``."""
    rule = f"a seed is a whole number in [0, {MAX_SEED}]"
    if isinstance(value, bool):
        return None, f"{value} is not a whole number; {rule}"
    try:
        seed = value if isinstance(value, int) else int(str(value).strip())
    except ValueError:
        return None, f"{value} is not a whole number; {rule}"
    if not 0 <= seed <= MAX_SEED:
        return None, f"{seed} is out of range; {rule}"
    return int(seed), ""


def check_seed(value, flag: str = "--seed") -> int:
    """``value`` as a seed (an integer in ``[0, MAX_SEED]``), or a UsageError naming ``flag``."""
    seed, why = _seed_problem(value)
    if seed is None:
        raise UsageError(f"{flag}: {why}")
    return seed


class Seed(int):
    """A seed flag's value (jsonargparse type): :func:`check_seed`."""


def _parse_seed(value) -> Seed:
    seed, why = _seed_problem(value)
    if seed is None:
        raise ValueError(why)  # jsonargparse names the flag
    return Seed(seed)


def seed_type() -> type:
    """:class:`Seed`, registered with jsonargparse (typed, range-checked, shown as int)."""
    from jsonargparse.typing import get_registered_type, register_type

    if get_registered_type(Seed) is None:
        register_type(Seed, serializer=int, deserializer=_parse_seed)
    return Seed


# ----------------------------------------------------------------------------- memory


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units: ``8.0 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB" if n < 1024 else f"{n:.4g} PiB"


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max`` up the tree, or v1
    ``memory.limit_in_bytes``), or None."""
    limits = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("0::"):
            part = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            root = Path("/sys/fs/cgroup")
            while True:
                try:
                    text = (part / "memory.max").read_text().strip()
                    if text != "max":
                        limits.append(int(text))
                except (OSError, ValueError):
                    pass
                if part == root or root not in part.parents:
                    break
                part = part.parent
    try:
        v1 = int(Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").read_text().strip())
        if v1 < 1 << 60:  # "no limit" is a huge number there
            limits.append(v1)
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def memory_limit(device=None) -> tuple[int, str]:
    """``(bytes, what)``: the most memory ``device`` can hold (None or a CPU: this
    machine's RAM, capped by a cgroup limit and by ``ulimit -v``; a CUDA device: its
    total memory) and words for it."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        device = torch.device(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        return int(total), f"the memory of {device} ({format_bytes(total)})"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    what = f"this machine's memory ({format_bytes(total)})"
    cgroup = _cgroup_limit()
    if cgroup is not None and cgroup < total:
        total, what = cgroup, f"this process's memory limit ({format_bytes(cgroup)}, cgroup)"
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY and soft < total:
            total, what = soft, f"this process's address-space limit ({format_bytes(soft)}, ulimit -v)"
    except (ImportError, OSError, ValueError):
        pass
    return int(total), what


def check_fits(num_bytes: int, asked: str, holds: str, device=None) -> None:
    """Refuse, before allocating, ``num_bytes`` (the least that ``asked`` needs: what
    the user asked for, in their words, e.g. ``--num-classes 99999999999``; ``holds``
    what the bytes are, e.g. ``the float32 weight``) when they exceed
    :func:`memory_limit` of ``device``: one UsageError saying both."""
    limit, what = memory_limit(device)
    if num_bytes > limit:
        raise UsageError(f"{asked}: {holds} alone would take {format_bytes(num_bytes)}, more than {what}")


def check_weight_fits(num_classes: int, feature_dim: int, asked: str, device=None, copies: int = 1) -> None:
    """:func:`check_fits` for a float32 (num_classes, feature_dim) weight (``copies``
    of it: 2 with a momentum buffer) on ``device``, and on the host, which holds a copy
    when a checkpoint is written."""
    import torch

    num_bytes = 4 * num_classes * feature_dim * copies
    holds = f"the float32 weight ({num_classes} x {feature_dim}{', with its momentum buffer' if copies > 1 else ''})"
    if device is not None and torch.device(device).type != "cpu":
        check_fits(num_bytes, asked, holds, device)
    check_fits(4 * num_classes * feature_dim, asked, f"the float32 weight ({num_classes} x {feature_dim})")

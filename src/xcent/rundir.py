"""A training run's directory is never lost or mixed: the pieces the trainer composes.

* :func:`check_run_name`: ``--name`` is one path component (no ``/``, no ``..``), so a
  run never writes outside ``--out-dir``.
* :class:`Replacement`: ``--overwrite`` renames the old run aside (``.NAME.replaced``,
  atomic, same directory), and deletes it only once the new run has written its first
  checkpoint; a new run that fails before that is removed and the old one renamed
  back. :func:`recover_replaced` finishes the job after a kill (run under the run's
  lock, :func:`xcent.fileio.exclusive_lock`, before anything else looks at it).
* :func:`read_records`: the JSONL of a run, tolerant of what a crash can leave: a
  torn last line (a kill or a full disk mid-append; appends are all-or-nothing since
  :func:`xcent.fileio.append_line_durable`, but older files may hold one) and lines
  past the checkpoint being resumed; both are dropped and reported.
* :func:`changed_settings`: the settings of ``--resume`` that differ from the run's,
  refused unless ``--allow-changed-settings``. ``--epochs`` may grow (see
  docs/reliability.md for how the cosine schedule follows).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from .errors import UsageError

#: settings that shape the trajectory besides the algorithm's own hyper-parameters (``lr``
#: included, from the registry): resuming with another value needs --allow-changed-settings
RESUME_SETTINGS = ("seed", "batch_size", "epochs", "warmup_epochs", "momentum", "weight_decay")

def check_run_name(name: str) -> None:
    """``--name`` must be a single directory name inside ``--out-dir``."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UsageError(f"--name {name!r}: must be a plain directory name (no '/', no '..')")


# ----------------------------------------------------------------------------- overwrite


def replaced_path(path) -> Path:
    """Where ``--overwrite`` keeps the old run until the new one has a checkpoint."""
    path = Path(path)
    return path.with_name(f".{path.name}.replaced")


class Replacement:
    """Move the run at ``path`` aside now; :meth:`commit` deletes it, :meth:`rollback`
    puts it back (removing whatever the new run wrote). Both are idempotent."""

    def __init__(self, path):
        self.path = Path(path)
        self.aside = replaced_path(path)
        self.pending = False

    def begin(self) -> None:
        if self.aside.exists():  # a leftover from an older kill: recover_replaced ran first
            shutil.rmtree(self.aside)
        self.path.rename(self.aside)
        self.pending = True

    def commit(self) -> None:
        if self.pending:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.pending = False

    def rollback(self) -> None:
        if self.pending:
            shutil.rmtree(self.path, ignore_errors=True)
            self.aside.rename(self.path)
            self.pending = False


def recover_replaced(path, has_checkpoint) -> str | None:
    """After a kill during ``--overwrite``: if the new run at ``path`` wrote a checkpoint
    (``has_checkpoint(path)``) the old run is deleted, otherwise the new run's remains
    are removed and the old run restored. Returns what was done, or None."""
    path = Path(path)
    aside = replaced_path(path)
    if not aside.exists():
        return None
    if path.exists() and has_checkpoint(path):
        shutil.rmtree(aside)
        return f"removed the run replaced by --overwrite ({aside})"
    if path.exists():
        shutil.rmtree(path)
    aside.rename(path)
    return f"restored {path}: the --overwrite run that replaced it stopped before its first checkpoint"


# ----------------------------------------------------------------------------- records


def read_records(path, upto_epoch: int | None = None) -> tuple[list[dict], list[str]]:
    """The JSONL records of ``path`` (``[]`` if it does not exist) with epoch <=
    ``upto_epoch`` (None: all), and warnings for what was dropped: a line that is not
    a JSON object (only the last line may be torn; a bad line before it is a
    UsageError, the file is damaged) and records past ``upto_epoch``."""
    path = Path(path)
    if not path.exists():
        return [], []
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    records, warnings = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "epoch" not in record:
                raise ValueError("not a record")
        except ValueError:
            if number == len(lines):
                warnings.append(f"{path}: dropped a torn last line (line {number}: {line[:40]!r})")
                continue
            raise UsageError(f"{path}: line {number} is not a JSON record; the log is damaged") from None
        records.append(record)
    if upto_epoch is not None:
        later = [r["epoch"] for r in records if r["epoch"] > upto_epoch]
        if later:
            warnings.append(f"{path}: dropped {len(later)} record(s) past the resumed checkpoint's epoch "
                            f"{upto_epoch} (epochs {', '.join(map(str, later))})")
        records = [r for r in records if r["epoch"] <= upto_epoch]
    return records, warnings


# ----------------------------------------------------------------------------- resume


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            fa, fb = float(a), float(b)
        except (TypeError, ValueError):
            return a == b
        return fa == fb or (math.isnan(fa) and math.isnan(fb))
    return a == b


def changed_settings(saved: dict, current: dict, hparam_keys=()) -> list[tuple[str, object, object]]:
    """``(key, saved value, current value)`` for each trajectory setting that differs:
    :data:`RESUME_SETTINGS` and ``hparam_keys`` (the algorithm's, e.g. ``("lr",
    "gamma")``). ``epochs`` is listed only when it shrinks: extending a run is the
    legitimate change."""
    changed = []
    for key in (*RESUME_SETTINGS, *hparam_keys):
        if key not in saved or key not in current:
            continue
        old, new = saved[key], current[key]
        if key == "epochs" and new is not None and old is not None and new >= old:
            continue
        if not _same(old, new):
            changed.append((key, old, new))
    return changed

def describe_changes(changed: list[tuple[str, object, object]]) -> str:
    """``--lr 2.0 (run) vs 3.0 (now), --seed 1 (run) vs 2 (now)``."""
    return ", ".join(f"--{key.replace('_', '-')} {old} (run) vs {new} (now)" for key, old, new in changed)

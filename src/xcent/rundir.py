"""A training run's directory is never lost or mixed: the pieces the trainer composes.

* :func:`check_run_name`: ``--name`` is one path component (no ``/``, no ``..``), so a
  run never writes outside ``--out-dir``.
* :func:`not_a_run`: what xcent may write into or replace. A *run* is a directory
  holding only what ``xcent train`` writes (:data:`RUN_FILES`, :data:`RUN_DIRS`, the
  ``eval_*.jsonl`` / ``steps_*.jsonl`` logs and xcent's own temporary files) with a
  ``config.yaml`` that xcent wrote (a mapping that records the run's resolved shapes,
  :data:`RUN_CONFIG_KEYS`); an empty directory may be used as well. Anything else (a
  file, the data directory, a folder of the user's) is never written into, moved or
  deleted: the trainer exits 2 before touching it, ``--overwrite`` or not.
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
  docs/reliability.md for how the cosine schedule follows). ``--lr auto`` is the lr the
  run's search chose (:func:`searched_lr`).
* :func:`data_fingerprint` / :func:`changed_data`: what a checkpoint records of the
  data it was trained on (sizes, a hash of the labels, a hash of evenly spaced feature
  rows), so a resume on changed data is refused instead of mixing two datasets in one
  log.
* :func:`resume_point`: the checkpoint ``--resume latest`` continues from, the newest
  of the epoch checkpoints and the kept best one; a run directory holds a run to
  continue exactly when it has one.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

from .errors import UsageError
from .fileio import foreign_entry, leftover_of
from .yamlio import load_json

#: settings that shape the trajectory besides the algorithm's own hyper-parameters (``lr``
#: included, from the registry): resuming with another value needs --allow-changed-settings
RESUME_SETTINGS = ("seed", "batch_size", "epochs", "warmup_epochs", "momentum", "weight_decay")

def check_run_name(name: str) -> None:
    """``--name`` must be a single directory name inside ``--out-dir``."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UsageError(f"--name {name!r}: must be a plain directory name (no '/', no '..')")


# ----------------------------------------------------------------------------- what a run is

#: the files ``xcent train`` writes in a run directory (``compare_failed.json``: ``xcent compare``)
RUN_FILES = frozenset({"config.yaml", "out.log", "data_report.json", "lr_search.jsonl", "compare_failed.json"})
#: the directories it writes there
RUN_DIRS = frozenset({"checkpoints", "tensorboard"})
#: the epoch and step logs, ``eval_NAME.jsonl`` and ``steps_NAME.jsonl`` (any NAME: a run renamed by hand)
_RUN_LOG = re.compile(r"(?:eval|steps)_.+\.jsonl")
#: keys of every ``config.yaml`` the trainer writes: the settings plus the shapes it resolved from
#: the data (a hand-written ``--config`` rarely holds ``data_size``; a copy of a run's is one)
RUN_CONFIG_KEYS = ("algorithm", "data_dir", "name", "num_classes", "feature_dim", "data_size")


def _is_run_entry(path: Path) -> bool:
    """``path`` is one of a run's entries (by name and kind; by name alone when it does
    not exist: the target of a leftover temporary file)."""
    if path.is_symlink():
        return False
    if path.name in RUN_DIRS:
        return path.is_dir() or not path.exists()
    named = path.name in RUN_FILES or _RUN_LOG.fullmatch(path.name) is not None
    return named and (path.is_file() or not path.exists())


def written_config(path) -> dict | None:
    """The ``config.yaml`` at ``path`` if the trainer wrote it (a mapping with
    :data:`RUN_CONFIG_KEYS`, shapes as integers), else None (absent, unreadable, not
    YAML, over the bounds of :mod:`xcent.yamlio`, or a file of the user's)."""
    from .yamlio import read_yaml

    path = Path(path)
    try:
        config = read_yaml(path) if path.is_file() else None
    except (UsageError, OSError):
        return None
    if not isinstance(config, dict) or not all(k in config for k in RUN_CONFIG_KEYS):
        return None
    if not all(isinstance(config[k], int) for k in ("num_classes", "feature_dim", "data_size")):
        return None
    return config


def not_a_run(path, others_ok: bool = False) -> str | None:
    """Why ``path`` must not be written into, replaced or removed by ``xcent train``,
    or None when it may: absent, an empty directory, or a run (see the module
    docstring; a directory holding only ``compare_failed.json`` is one too). The
    reason reads after the path: ``is a file``, ``holds 'notes.txt', which xcent train
    does not write``. ``others_ok``: entries xcent does not write are allowed beside a
    run's (``--resume`` writes only its own files, so a figure saved into the run
    directory does not stop it)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return "is a broken symbolic link"
    if not path.exists():
        return None
    if not path.is_dir():
        return "is a file, not a run directory"
    try:
        foreign = foreign_entry(path, _is_run_entry)
        names = [n for n in path.iterdir() if _is_run_entry(n)]
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if foreign is not None and not others_ok:
        return f"holds {foreign!r}, which xcent train does not write"
    if {n.name for n in names} <= {"compare_failed.json"} and foreign is None:
        return None
    if not (path / "config.yaml").is_file():
        return "holds no config.yaml"
    if written_config(path / "config.yaml") is None:
        return "has a config.yaml that xcent train did not write"
    return None


def holds_nothing(path) -> bool:
    """``path`` is absent, or a directory holding nothing but leftovers of interrupted
    writes (:func:`xcent.fileio.leftover_of`) and ``compare_failed.json``: a new run
    may start in it as it is."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return not path.exists() and not path.is_symlink()
    return all(n == "compare_failed.json" or leftover_of(n) is not None for n in os.listdir(path))


def refuse_non_run(path, command: str = "xcent train", others_ok: bool = False) -> None:
    """A one-line UsageError (exit 2) if ``path`` is neither absent, empty, nor a run
    (:func:`not_a_run`): nothing there is touched."""
    reason = not_a_run(path, others_ok)
    if reason is not None:
        raise UsageError(f"{path} {reason}: not an xcent run, so {command} neither writes into it nor "
                         f"replaces it (--overwrite replaces only a run); choose another --out-dir or --name, "
                         f"or move it away")


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
        # only a run directory moves (checked again here: a file or a folder of the user's
        # is never renamed, whoever calls), and only a run set aside before is deleted
        refuse_non_run(self.path)
        if self.path.is_symlink() or not self.path.is_dir():
            raise UsageError(f"{self.path}: is a symbolic link or not a directory; --overwrite replaces only "
                             f"a run directory")
        check_aside(self.path)
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


def check_aside(path) -> None:
    """A UsageError if ``.NAME.replaced`` beside ``path`` exists and is not a run (a
    file or a folder an older xcent set aside, or one of the user's): it is never
    deleted or renamed, so the user has to move it."""
    aside = replaced_path(path)
    if not (aside.exists() or aside.is_symlink()):
        return
    reason = "is a symbolic link" if aside.is_symlink() else not_a_run(aside)
    if reason is not None:
        raise UsageError(f"{aside} {reason}: it is not a run set aside by --overwrite, so xcent does not "
                         f"remove it; move it away")


def recover_replaced(path, has_checkpoint) -> str | None:
    """After a kill during ``--overwrite``: if the new run at ``path`` wrote a checkpoint
    (``has_checkpoint(path)``) the old run is deleted, otherwise the new run's remains
    are removed and the old run restored. Returns what was done, or None. Only a run
    is ever deleted or moved (:func:`check_aside`)."""
    path = Path(path)
    aside = replaced_path(path)
    check_aside(path)
    if not aside.exists():
        return None
    if path.exists() and has_checkpoint(path):
        shutil.rmtree(aside)
        return f"removed the run replaced by --overwrite ({aside})"
    if path.exists() or path.is_symlink():
        refuse_non_run(path)  # the new run's remains: a run, unless someone put something else there
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
            record = load_json(line)
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


def searched_lr(ckpt: dict, run_config) -> float | None:
    """The learning rate that ``--lr auto`` chose for the run of ``ckpt``, or None when
    the run was given its lr. Checkpoints record whether the search chose it
    (``lr_search``); for older ones the run's ``config.yaml`` (``run_config``, written
    before the search, so it says ``lr: auto``) tells."""
    lr = ckpt.get("config", {}).get("lr")
    if "lr_search" in ckpt:
        return lr if ckpt["lr_search"] else None
    config = written_config(run_config)
    return lr if config is not None and config.get("lr") == "auto" else None


# ----------------------------------------------------------------------------- the data of a run

#: feature rows hashed per split (evenly spaced, the first and the last included)
FINGERPRINT_ROWS = 1024


def split_fingerprint(split) -> dict:
    """A cheap fingerprint of one split (:class:`xcent.data.Split`): its size and feature
    dim, the features' dtype, a BLAKE2b hash of all labels and one of
    :data:`FINGERPRINT_ROWS` evenly spaced feature rows as stored. Reads 8 bytes a row
    (the labels are in memory) and 1,024 feature rows; a relabelled row anywhere, new
    features (another backbone, a rewritten file) or reordered rows change it."""
    import hashlib

    import numpy as np
    import torch

    n = split.num_samples
    rows = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, FINGERPRINT_ROWS)).round().astype(np.int64))
    feats, _ = split.gather(torch.from_numpy(rows))
    feats = feats.contiguous()
    labels = hashlib.blake2b(split.labels.contiguous().numpy().tobytes(), digest_size=16).hexdigest()
    features = hashlib.blake2b(feats.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
    return {"rows": n, "feature_dim": split.feature_dim, "dtype": str(feats.dtype).replace("torch.", ""),
            "labels": labels, "features": features}


def data_fingerprint(data) -> dict:
    """:func:`split_fingerprint` of every split of ``data`` (:class:`xcent.data.Dataset`)."""
    return {name: split_fingerprint(split) for name, split in data.splits.items()}


def changed_data(saved: dict, current: dict) -> list[str]:
    """What differs between two :func:`data_fingerprint` s, one phrase each
    (``train labels``, ``val rows 20 (run) vs 25 (now)``, ``test split added``)."""
    order = {"train": 0, "val": 1, "test": 2}
    changes = []
    for name in sorted(set(saved) | set(current), key=lambda n: (order.get(n, 3), n)):
        if name not in current:
            changes.append(f"{name} split gone")
        elif name not in saved:
            changes.append(f"{name} split added")
        else:
            old, new = saved[name], current[name]
            if old.get("rows") != new["rows"]:
                changes.append(f"{name} rows {old.get('rows')} (run) vs {new['rows']} (now)")
            elif old.get("labels") != new["labels"]:
                changes.append(f"{name} labels")
            if any(old.get(k) != new[k] for k in ("feature_dim", "dtype", "features")):
                changes.append(f"{name} features")
    return changes


# ----------------------------------------------------------------------------- where a run goes on


def _saved_epoch(path: Path) -> int | None:
    """The epoch a checkpoint (file or sharded directory) was saved at, read from its
    metadata alone; None if it cannot be read (it is then not a resume point)."""
    import torch

    from .modelio import MANIFEST

    try:
        meta = torch.load(path / MANIFEST if path.is_dir() else path, map_location="cpu", mmap=True,
                          weights_only=True)
        epoch = meta.get("epoch") if isinstance(meta, dict) else None
    except Exception:  # noqa: BLE001 - a damaged file of any kind is not a resume point
        return None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def resume_point(checkpoints) -> Path | None:
    """The checkpoint ``--resume latest`` continues from: the newest ``epoch_K``
    checkpoint, or the kept best one (``best.pt``/``best/``) when it is newer (saved at
    epoch 0, or between ``--save-frequency`` checkpoints: it holds the same state as an
    epoch checkpoint of its epoch). None when the run has neither."""
    from .modelio import BEST_NAMES, epoch_checkpoints

    checkpoints = Path(checkpoints)
    found = epoch_checkpoints(checkpoints)
    best = next((checkpoints / n for n in BEST_NAMES if (checkpoints / n).exists()), None)
    if best is not None:
        epoch = _saved_epoch(best)
        if epoch is not None and (not found or epoch > found[-1][0]):
            return best
    return found[-1][1] if found else None

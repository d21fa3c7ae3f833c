"""Crash-safe file writes: every output of xcent is written to a temporary file in
the same directory and renamed over its final name (``os.replace`` is atomic on
POSIX), so an interrupted or failed write leaves the previous file untouched."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that key on it,
    like ``np.save``, behave the same); on success it replaces ``path``, on an
    exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the system or the filesystem cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_dir(path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it takes the place
    of ``path`` whole (any previous directory there is removed), on an exception it is
    removed and ``path`` is left as it was.

    The swap is one ``renameat2(RENAME_EXCHANGE)`` where Linux offers it; elsewhere the
    old directory is renamed aside first, so a crash between the two renames leaves it
    beside ``path`` as ``.NAME.old<pid>``, never half-replaced. Temporary directories
    of processes that died are removed on the next call.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        pid = stale.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)  # now the old directory
        else:
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

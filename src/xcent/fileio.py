"""Crash-safe outputs: atomic writes, exclusive locks, space reservation, and the
translation of a full disk or a read-only directory into one error naming the path.

* :func:`atomic_path` / :func:`write_text_atomic` / :func:`atomic_dir`: every output
  of xcent is written to a temporary file (directory) in the same directory and
  renamed over its final name (``os.replace`` is atomic on POSIX), so an interrupted
  or failed write leaves the previous one untouched.
* :func:`exclusive_lock`: one writer per output (a run directory, a comparison, a
  split or extraction directory) through ``fcntl.flock`` on a lock file *beside* the
  output (``.NAME.lock``), so the output itself can be renamed aside or into place
  while locked. The kernel drops the lock when its process dies, so a killed run
  never leaves a stale lock (only an unlocked file, reused by the next holder); the
  file keeps the holder's PID for the message and is removed on release.
  Hand-written because the standard ``fcntl`` is all it takes (the ``filelock``
  package adds nothing here and does not report the holder).
* :func:`reserve` / :func:`open_memmap_reserved`: a write into a memory-mapped file
  that the filesystem cannot back is a ``SIGBUS`` (a bare ``Bus error``, exit 135),
  not an exception. Allocating the file's blocks first (``posix_fallocate``) turns a
  full disk into an ordinary ``ENOSPC`` before anything is mapped.
* :func:`writing`: the one place that turns a failed write into an ``OSError`` that
  carries the errno *and the path* (torch's zip writer reports a full disk as
  ``RuntimeError: unexpected pos``, ``numpy.save`` as ``OSError: N requested and M
  written`` without errno, ``file.write`` without the file name). The command-line
  dispatcher (:mod:`xcent.cli`) prints such errors as one line, exit status 2.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import UsageError


def why_missing(path) -> str:
    """Why the input ``path`` is not there to be read, in words for a message: ``no
    such file``, ``a symbolic link loop``, ``a broken symbolic link (to T)``,
    ``permission denied``, ... (``Path.exists`` answers False to all of them alike)."""
    path = Path(path)
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop (it points, directly or through others, to itself)"
        if exc.errno == errno.ENOENT and os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        if exc.errno == errno.ENOENT:
            return "no such file or directory"
        return f"cannot be read ({exc.strerror})"
    return "not a regular file" if not path.is_file() and not path.is_dir() else "cannot be read"


#: errnos that mean "this output cannot be written here": reported as one line, exit 2
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})

#: below this many free bytes, a write that failed without an errno is taken for a full disk
_FULL_DISK_BYTES = 1 << 20


def _looks_full(path: Path) -> bool:
    """True when the filesystem holding ``path`` (or its nearest existing parent) has
    (almost) no space left: a failed write filled it up to the failing byte."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _FULL_DISK_BYTES


def output_error(exc: BaseException, path) -> OSError | None:
    """``exc`` (raised while writing ``path``) as an ``OSError`` with an errno from
    :data:`OUTPUT_ERRNOS` and a file name, or None when it is some other failure."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and code in OUTPUT_ERRNOS:
        return exc if exc.filename else OSError(code, os.strerror(code), str(path))
    # writers that hide the errno (torch's zip writer, numpy.save, safetensors): judge by the disk
    if isinstance(exc, Exception) and code is None and _looks_full(Path(path)):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


@contextmanager
def writing(path) -> Iterator[None]:
    """Run a write of ``path``; a full disk or a read-only/forbidden path surfaces as an
    ``OSError`` naming ``path`` (see :func:`output_error`), other errors unchanged."""
    try:
        yield
    except Exception as exc:
        translated = output_error(exc, path)
        if translated is None or translated is exc:
            raise
        raise translated from exc


def describe_output_error(exc: OSError) -> str | None:
    """The one-line message for an ``OSError`` of :data:`OUTPUT_ERRNOS` (None for others):
    ``no space left on device while writing PATH``."""
    if exc.errno not in OUTPUT_ERRNOS:
        return None
    where = exc.filename if exc.filename is not None else "an output file"
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system", errno.EFBIG: "file too large"}.get(
        exc.errno, "permission denied")
    return f"{reason} while writing {where}"


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that key on it,
    like ``np.save``, behave the same); on success it replaces ``path``, on an
    exception it is removed and ``path`` is left as it was. A full disk or a
    read-only directory raises an ``OSError`` naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        with writing(path):
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


#: the names xcent gives its temporary, lock and set-aside files beside an output NAME (or
#: NAME.SUFFIX): ``.NAME.tmpPID.SUFFIX`` (:func:`atomic_path`), ``.NAME.tmpPID`` and
#: ``.NAME.oldPID`` (:func:`atomic_dir`), ``.NAME.tmp`` (a sharded checkpoint being saved),
#: ``.NAME.lock`` (:func:`exclusive_lock`), ``.NAME.replaced`` (``--overwrite``),
#: ``.NAME.partial`` (``xcent synth``)
_LEFTOVER = re.compile(r"\.(?P<stem>.+)\.(?:tmp\d*(?P<suffix>\.[^.]+)?|old\d+|lock|replaced|partial)")


def leftover_of(name: str) -> str | None:
    """The output that the file ``name`` is a temporary, lock or set-aside copy of (see
    :data:`_LEFTOVER`), or None: ``.config.tmp42.yaml`` -> ``config.yaml``."""
    m = _LEFTOVER.fullmatch(name)
    return None if m is None else m.group("stem") + (m.group("suffix") or "")


def foreign_entry(directory, ours) -> str | None:
    """The first entry (sorted) of the existing ``directory`` that xcent did not write:
    ``ours(entry_path)`` is False for it and it is not a leftover (:func:`leftover_of`)
    of an entry that is ours. None when every entry is ours."""
    directory = Path(directory)
    for name in sorted(os.listdir(directory)):
        target = leftover_of(name)
        if ours(directory / name) or (target is not None and ours(directory / target)):
            continue
        return name
    return None


def append_line_durable(path, line: str) -> None:
    """Append one line (``line`` without its newline) to a text file and fsync it. On
    any failure (a full disk mid-line) the file is truncated back to its old length,
    so it holds either the old content or the old content plus the whole line."""
    path = Path(path)
    data = (line + "\n").encode("utf-8")
    with writing(path), open(path, "ab") as f:
        start = f.tell()
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            try:
                f.truncate(start)
                os.fsync(f.fileno())
            except OSError:
                pass  # truncation frees space; if even that fails the reader drops the torn line
            raise


# ----------------------------------------------------------------------------- locks


def lock_path(path) -> Path:
    """The lock file of the output ``path``: ``.NAME.lock`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


class OutputInUse(UsageError):
    """Another process holds the output's lock (:func:`exclusive_lock`): exit status 2.
    A caller that runs several outputs (``xcent compare``) stops on it rather than
    recording the output as failed."""


def _make_parents(directory: Path) -> list[Path]:
    """``mkdir -p directory``; returns the directories this call created, deepest first."""
    missing = []
    probe = directory
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    directory.mkdir(parents=True, exist_ok=True)
    return missing


class ExclusiveLock:
    """An ``fcntl.flock`` held on :func:`lock_path` (``path``); see :func:`exclusive_lock`."""

    def __init__(self, path, what: str):
        self.path, self.what = Path(path), what
        self.file = lock_path(path)
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> ExclusiveLock:
        for attempt in range(100):
            # the parent may be created here (and removed on release when still empty) or
            # removed by another holder's release between the mkdir and the open: retry
            self._created = _make_parents(self.file.parent) or self._created
            try:
                with writing(self.file):
                    fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                if attempt == 99:
                    raise
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise OutputInUse(f"{self.what} {self.path} is in use by {who} (lock {self.file}); "
                                  f"wait for it to finish or stop it") from None
            except BaseException:
                os.close(fd)
                raise
            # the holder before us unlinks the file on release: if we locked that old
            # file, the name now points elsewhere (or nowhere); lock the current one
            try:
                if os.stat(self.file).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise OutputInUse(f"{self.what} {self.path}: its lock {self.file} keeps changing; another process "
                              f"is taking and releasing it")
        try:
            with writing(self.file):  # the PID is only for the message: write it in place
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # a full disk: the lock still holds, the message says "another process"
        self._fd = fd
        return self

    def release(self) -> None:
        # unlinked while still locked, so no file is left beside the output; a process
        # that opened the old file meanwhile notices (acquire's inode check)
        if self._fd is not None:
            with suppress(OSError):  # a read-only filesystem: the empty lock file stays, harmless
                self.file.unlink()
            os.close(self._fd)  # closing drops the flock
            self._fd = None
            for directory in self._created:  # what acquire created, if nothing was written into it
                with suppress(OSError):
                    directory.rmdir()
            self._created = []

    def __enter__(self) -> ExclusiveLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def exclusive_lock(path, what: str) -> ExclusiveLock:
    """Hold the output ``path`` (a file or directory, which need not exist) for this
    process: ``with exclusive_lock(out, "run"): ...``. A second holder, in this or any
    other process on the same filesystem, gets a one-line ``UsageError`` at once that
    names ``what``, ``path`` and the holder's PID. Released on exit and, if the
    process dies, by the kernel."""
    return ExclusiveLock(path, what)


# ----------------------------------------------------------------------------- space


def reserve(path, size: int | None = None) -> None:
    """Allocate the blocks of the file ``path`` up to ``size`` bytes (default: its
    current length) so that later writes, through a memory map in particular, cannot
    fail for lack of space. A full disk raises ``OSError(ENOSPC)`` naming ``path``.
    Filesystems without ``fallocate`` support are left as they are."""
    path = Path(path)
    with writing(path):
        fd = os.open(path, os.O_RDWR)
        try:
            length = os.fstat(fd).st_size if size is None else int(size)
            if length > 0:
                try:
                    os.posix_fallocate(fd, 0, length)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise OSError(exc.errno, exc.strerror, str(path)) from exc
        finally:
            os.close(fd)


def open_memmap_reserved(path, dtype, shape):
    """``numpy.lib.format.open_memmap(path, "w+", dtype, shape)`` with the file's space
    reserved (:func:`reserve`) before any element is written; on a full disk the
    partial file is removed and an ``OSError(ENOSPC)`` names ``path``."""
    import numpy as np

    path = Path(path)
    with writing(path):
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    try:
        reserve(path)
    except BaseException:
        del array
        path.unlink(missing_ok=True)
        raise
    return array

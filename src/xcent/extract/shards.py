"""Reading webdataset tar shards, with an account of every sample that is skipped.

Shards are read with Python's ``tarfile`` rather than the ``webdataset`` package.
The layout is the webdataset one (consecutive tar members sharing a key form one
sample: ``000123.jpg`` + ``000123.cls`` -> ``{"__key__": "000123", "jpg": ..., "cls": ...}``),
but reading it ourselves lets each bad sample be counted under a named reason and the
run go on, where webdataset's handlers either stop the pipeline or drop a sample
without saying which; it also keeps the extraction free of that dependency and of its
API changes between 0.2 and 1.0. Plain ``.tar`` and compressed ``.tar.gz`` (also bzip2,
xz) shards work; the stream is checked to its end, because ``tarfile`` alone takes a
damaged header for the end of the archive and would drop the rest of a shard unseen.

``--data-url`` uses the reference implementation's syntax: bash-style braces (``shard-{000..416}.tar.gz``,
``{a,b}``), several patterns joined by ``::``, and shell wildcards.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import UsageError

#: The reasons a sample can be skipped, in the order the summary lists them.
SKIP_REASONS = (
    "bad_shard",  # the tar stream itself is truncated or corrupt: the rest of that shard is lost
    "missing_jpg",  # a sample without an image member
    "corrupt_image",  # an image PIL cannot decode
    "missing_cls",  # glint360k: no class member
    "bad_cls",  # glint360k: a class member that is not a non-negative integer
    "bad_key",  # glint360k: a key that is not an integer row
    "key_out_of_range",  # a global row outside [0, data_size)
    "unknown_id",  # treeoflife10m: a treeoflife_id absent from the catalog
)

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")


def _matching_brace(text: str, start: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``start``, or -1."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside nested braces."""
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[last:i])
            last = i + 1
    parts.append(text[last:])
    return parts


def _expand_range(match: re.Match) -> list[str]:
    """``{000..416}`` -> ``000``..``416``; zero-padded to the widest end, as bash does."""
    first, last, step = match.group(1), match.group(2), match.group(3)
    lo, hi = int(first), int(last)
    step_size = abs(int(step)) if step else 1
    if step_size == 0:
        step_size = 1
    padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (first, last))
    width = max(len(first), len(last)) if padded else 0
    values = range(lo, hi + 1, step_size) if lo <= hi else range(lo, hi - 1, -step_size)
    return [str(v).zfill(width) if width else str(v) for v in values]


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion of one pattern (numeric ranges, comma lists, nesting).

    A brace pair that is neither a range nor a list with a comma is kept literally.
    """
    start = 0
    while True:
        open_at = pattern.find("{", start)
        if open_at < 0:
            return [pattern]
        close_at = _matching_brace(pattern, open_at)
        if close_at < 0:
            return [pattern]
        inner = pattern[open_at + 1 : close_at]
        range_match = _RANGE.match(inner)
        if range_match:
            choices = _expand_range(range_match)
        else:
            parts = _split_top_level(inner)
            if len(parts) < 2:
                start = open_at + 1  # a literal brace: look for the next one
                continue
            choices = [expanded for part in parts for expanded in expand_braces(part)]
        prefix, suffix = pattern[:open_at], pattern[close_at + 1 :]
        return [prefix + choice + rest for choice in choices for rest in expand_braces(suffix)]


def expand_urls(data_url: str) -> list[str]:
    """All shard paths named by ``--data-url``, in order, without duplicates.

    Raises `UsageError` naming the first path that does not exist (or a wildcard that
    matches nothing), so that a typo is reported before any work starts.
    """
    paths: list[str] = []
    for pattern in data_url.split("::"):
        for path in expand_braces(os.path.expanduser(pattern.strip())):
            if any(ch in path for ch in "*?["):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise UsageError(f"--data-url: no shard matches {path}")
                paths.extend(matches)
            else:
                paths.append(path)
    if not paths:
        raise UsageError("--data-url names no shard")
    seen: set[str] = set()
    unique = [p for p in paths if not (p in seen or seen.add(p))]
    for path in unique:
        if "://" in path or path.startswith("pipe:"):
            raise UsageError(f"--data-url: only local shard files are supported, got {path}")
        if not os.path.isfile(path):
            raise UsageError(f"--data-url: shard not found: {path}")
        if not os.access(path, os.R_OK):
            raise UsageError(f"--data-url: shard not readable: {path}")
    return unique


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/000123.jpg`` -> (``dir/000123``, ``jpg``): the key is everything up to the
    first dot of the file name, as webdataset groups members."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


@dataclass
class ShardBreak:
    """A shard whose tar stream broke off: ``samples_read`` samples were yielded before
    the break, the rest of the shard is lost (counted as one ``bad_shard``)."""

    path: str
    samples_read: int
    error: str


#: bytes of decompressed stream kept behind the read position: tarfile reads ahead in
#: records of 10 KiB, so the block where it stopped always lies within this window
_TAIL_BYTES = 1 << 16


class _TailReader:
    """A read-only stream that remembers its position and the last bytes it returned,
    so that the block on which ``tarfile`` stopped can be looked at afterwards."""

    def __init__(self, stream):
        self.stream = stream
        self.position = 0
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.position += len(data)
        self.tail = (self.tail + data)[-_TAIL_BYTES:]
        return data

    def since(self, offset: int) -> bytes | None:
        """The bytes from ``offset`` up to the position, or None if they left the tail."""
        start = self.position - len(self.tail)
        return self.tail[offset - start :] if offset >= start else None


def _open_decompressed(path: str):
    """The shard's tar bytes: gzip, bzip2 and xz are recognised by their magic bytes
    (not the name) and decompressed with integrity checks (CRC, length) at the end."""
    raw = open(path, "rb")  # noqa: SIM115 - closed by iter_shard, which owns both streams
    magic = raw.read(6)
    raw.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if magic[:3] == b"BZh":
        return bz2.BZ2File(raw, mode="rb"), raw
    if magic == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw, mode="rb"), raw
    return raw, raw


def _check_end(reader: _TailReader, end_offset: int) -> None:
    """Raise `tarfile.ReadError` unless the archive ended properly.

    ``tarfile`` ends an archive quietly on an all-zero block, but also on a block that is
    not a valid header (damaged bytes) or on a stream cut at a member boundary. A proper
    end is a zero block (two by the standard, padded with zeros to a record) and nothing
    but zeros after it; reading the stream to its end also runs the decompressor's own
    check (gzip's CRC and length), which catches damage inside member data.
    """
    rest = reader.since(end_offset)
    if rest is None:
        raise tarfile.ReadError(f"cannot check the end of the archive at byte {end_offset}")
    size, nonzero = len(rest), any(rest)
    while chunk := reader.stream.read(1 << 20):
        size += len(chunk)
        nonzero = nonzero or any(chunk)
    if size < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"archive cut short at byte {end_offset} (no end-of-archive block)")
    if nonzero:
        raise tarfile.ReadError(f"damaged header at byte {end_offset} of the archive")


#: what a broken stream raises: tarfile's own errors, I/O errors (gzip.BadGzipFile,
#: bzip2), a truncated compressed stream (EOFError), zlib and xz errors
_STREAM_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


def iter_shard(path: str) -> Iterator[dict | ShardBreak]:
    """The samples of one shard, as dicts of ``{"__key__", "__url__", ext: bytes}``.

    A tar stream that is truncated or damaged anywhere (including a damaged header,
    which ``tarfile`` alone takes for the end of the archive) ends the shard with one
    `ShardBreak` as the last item; the samples read before the break are yielded first.
    The sample being assembled at the break may miss members: it is dropped, not guessed.
    """
    sample: dict | None = None
    samples_read = 0
    raw = None
    try:
        stream, raw = _open_decompressed(path)
        reader = _TailReader(stream)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if sample is not None and key != sample["__key__"]:
                    yield sample
                    samples_read += 1
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": path}
                handle = tar.extractfile(member)
                sample[ext] = handle.read() if handle is not None else b""
            _check_end(reader, tar.offset)
    except _STREAM_ERRORS as exc:
        yield ShardBreak(path, samples_read, f"{type(exc).__name__}: {exc}")
        return
    finally:
        if raw is not None:
            raw.close()
    if sample is not None:
        yield sample


def format_errors(errors: Counter) -> str:
    """``corrupt_image=2, missing_cls=1`` in the order of `SKIP_REASONS`; ``none`` if empty."""
    parts = [f"{reason}={errors[reason]}" for reason in SKIP_REASONS if errors.get(reason)]
    parts += [f"{reason}={count}" for reason, count in sorted(errors.items()) if reason not in SKIP_REASONS and count]
    return ", ".join(parts) if parts else "none"

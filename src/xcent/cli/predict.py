"""``xcent predict`` (top-k classes of new feature vectors) and ``xcent export`` (weights as
safetensors): command-line front ends of :mod:`xcent.predict` and :mod:`xcent.modelio`."""

from __future__ import annotations

import struct
import time
from pathlib import Path

from ..device import ThreadPolicy, parse_threads, resolve_device
from ..errors import UsageError
from ..modelio import EXPORT_FORMAT, _names_from_data_dir, export_safetensors, load_model, read_label_names
from ..predict import DEFAULT_CHUNK_ROWS, DEFAULT_CLASS_CHUNK, Classifier, load_features, write_predictions
from ..yamlio import load_json


def _check_out(out: str, suffixes: tuple[str, ...], flag: str = "--out", ours=None) -> Path:
    """``--out`` as a path: the right suffix, in an existing directory, and, if it exists,
    a file this command wrote (``ours(path)``): a file of the user's that happens to
    have the suffix is never replaced."""
    path = Path(out)
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {out}: expected a file ending in {' or '.join(suffixes)}")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {out}: directory {path.parent} does not exist")
    if path.is_dir():
        raise UsageError(f"{flag} {out}: is a directory")
    if ours is not None and (path.exists() or path.is_symlink()) and not ours(path):
        raise UsageError(f"{flag} {out}: exists and was not written by this command, so it is not replaced; "
                         f"choose another name or move it away")
    return path


def _head(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b"\0"


def _is_predictions(path: Path) -> bool:
    """An (empty or) earlier ``xcent predict`` output: its first line is the CSV header
    or a JSONL record that it writes."""
    if path.is_symlink() or not path.is_file():
        return False
    first = _head(path, 1 << 16).split(b"\n", 1)[0].rstrip(b"\r")
    if not first:
        return path.stat().st_size == 0
    if first.startswith(b"row,id_1,"):
        return True
    try:
        record = load_json(first)
    except ValueError:
        return False
    return isinstance(record, dict) and {"row", "ids", "probs"} <= record.keys()


def _is_export(path: Path) -> bool:
    """An earlier ``xcent export`` output (safetensors with xcent's format metadata)."""
    if path.is_symlink() or not path.is_file():
        return False
    head = _head(path, 8)
    if len(head) < 8:
        return path.stat().st_size == 0
    (length,) = struct.unpack("<Q", head)
    if length > 100 << 20:
        return False
    try:
        header = load_json(_head(path, 8 + length)[8:])
    except ValueError:
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and metadata.get("format") == EXPORT_FORMAT


def predict_main(argv: list[str]) -> int:
    from ..yamlio import argument_parser

    p = argument_parser(prog="xcent predict",
                        description="Top-k classes and softmax probabilities (over all C classes) of each row "
                                    "of a feature file.")
    p.add_argument("--checkpoint", type=str, required=True, help="an xcent checkpoint or safetensors export")
    p.add_argument("--features", type=str, required=True, help="(N, D) float .npy or .pt")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--out", type=str, default="predictions.jsonl", help="*.jsonl or *.csv")
    p.add_argument("--label-names", type=str, default=None,
                   help="classes.txt (line i = name of class i); default: the export's or DATA_DIR/classes.txt")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows per block")
    p.add_argument("--class-chunk", type=int, default=DEFAULT_CLASS_CHUNK, help="classes per block")
    p.add_argument("--progress", type=bool, default=True, help="progress bar on stderr")
    p.add_argument("--threads", type=str, default="auto",
                   help="CPU intra-op threads: auto (one or all cores, whichever a short probe finds faster; "
                        "OMP_NUM_THREADS caps it) or a number")
    a = p.parse_args(argv)
    parse_threads(a.threads)  # a bad value fails before any work

    # every check happens before the output file is opened
    out = _check_out(a.out, (".jsonl", ".csv"), ours=_is_predictions)
    fmt = "csv" if out.suffix.lower() == ".csv" else "jsonl"
    if a.chunk_rows < 1:
        raise UsageError(f"--chunk-rows {a.chunk_rows}: must be positive")
    if a.class_chunk < 1:
        raise UsageError(f"--class-chunk {a.class_chunk}: must be positive")
    device = resolve_device(a.device)
    # read first so that a bad names file is reported before the (large) weight is loaded
    names = read_label_names(a.label_names) if a.label_names is not None else None
    clf = Classifier.load(a.checkpoint, device=device, chunk_rows=a.chunk_rows, class_chunk=a.class_chunk)
    if names is not None:
        if len(names) != clf.num_classes:
            raise UsageError(f"--label-names {a.label_names}: {len(names)} names for {clf.num_classes} classes")
        clf.label_names = names
    if not 1 <= a.top_k <= clf.num_classes:
        raise UsageError(f"--top-k {a.top_k}: must be between 1 and the number of classes ({clf.num_classes})")
    feats = load_features(a.features, clf.feature_dim)
    t0 = time.perf_counter()
    flops = 2.0 * len(feats) * clf.num_classes * clf.feature_dim
    with ThreadPolicy(a.threads, device=device).evaluation(clf.feature_dim, flops):
        try:
            n = write_predictions(clf, feats, out, a.top_k, fmt, progress=a.progress)
        except UsageError as exc:  # a row the model cannot score: name the file it came from
            raise UsageError(f"--features {a.features}: {str(exc).removeprefix('features: ')}") from None
    seconds = time.perf_counter() - t0
    print(f"wrote {out}: {n} rows, top-{a.top_k} of {clf.num_classes} classes"
          f"{' with names' if clf.label_names is not None else ''} ({seconds:.1f} s, "
          f"{n / max(seconds, 1e-9):.0f} rows/s)")
    return 0


def export_main(argv: list[str]) -> int:
    from ..yamlio import argument_parser

    p = argument_parser(prog="xcent export",
                        description="Write a checkpoint's weight and metadata (num_classes, feature_dim, "
                                    "algorithm, epoch, label names) as safetensors.")
    p.add_argument("--checkpoint", type=str, required=True)
    p.add_argument("--out", type=str, required=True, help="*.safetensors")
    p.add_argument("--label-names", type=str, default=None,
                   help="classes.txt to embed; default: the checkpoint's own or DATA_DIR/classes.txt")
    a = p.parse_args(argv)
    out = _check_out(a.out, (".safetensors",), ours=_is_export)
    if Path(a.checkpoint).resolve() == out.resolve():
        raise UsageError(f"--out {a.out}: is the --checkpoint itself")
    weight, meta = load_model(a.checkpoint)
    if a.label_names is not None:
        meta["label_names"] = read_label_names(a.label_names, meta["num_classes"])
    elif meta["label_names"] is None:
        meta["label_names"] = _names_from_data_dir(meta["data_dir"], meta["num_classes"])
    export_safetensors(weight, meta, out)
    size = out.stat().st_size
    print(f"wrote {out}: {meta['num_classes']} x {meta['feature_dim']} {weight.dtype} weight, "
          f"{meta['algorithm'] or 'unknown algorithm'}, epoch {meta['epoch']}, "
          f"{'with' if meta['label_names'] is not None else 'no'} label names ({size / 2**20:.1f} MiB)")
    return 0

"""``xcent extract`` and ``xcent split``: from webdataset image shards to the feature
layout ``xcent train`` reads (the library: `xcent.extract`).

``xcent extract`` keeps the flags of the reference implementation's
``xc/extract_feat.py`` (Optimization-AI/SCENT) and is resumable; ``xcent split`` writes
train/val/test all or nothing.
"""

from __future__ import annotations

from argparse import ArgumentError
from typing import Literal, Optional

from ..errors import UsageError
from ..limits import seed_type


def _parse(parser, argv: list[str]):
    """Parse, turning jsonargparse's errors into a one-line `UsageError`."""
    from ..config import parse_error_line

    try:
        return parser.parse_args(argv)
    except ArgumentError as exc:
        raise UsageError(parse_error_line(str(exc))) from None


def extract_parser():
    from ..extract.backbones import ARCHS
    from ..extract.datasets import DATASETS
    from ..yamlio import argument_parser

    defaults = ", ".join(f"{spec.default_arch} for {name}" for name, spec in DATASETS.items())
    parser = argument_parser(
        prog="xcent extract",
        description="Extract backbone features from webdataset image shards into "
        "DIR/{features,labels,is_cached}.npy (resumable).",
        exit_on_error=False,
    )
    parser.add_argument("--data", type=Optional[str], default=None, help=f"dataset: {' or '.join(DATASETS)} (required)")
    parser.add_argument(
        "--data-url",
        type=Optional[str],
        default=None,
        help="shards, e.g. 'dir/glint360k-0{000..416}.tar.gz'; '::' joins patterns (required)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument(
        "--num-samples",
        type=Optional[int],
        default=None,
        help="samples in the shards, for the progress bar (default: --data-size)",
    )
    parser.add_argument(
        "--data-size",
        type=int,
        default=18000000,
        help="rows of the output arrays; keys/catalog rows must lie in [0, data-size)",
    )
    parser.add_argument("--out-dir", type=str, default="features", help="output directory (resumed if it exists)")
    parser.add_argument(
        "--pretrained-path",
        type=Optional[str],
        default=None,
        help="backbone weights: a state_dict file (iresnet), an open_clip checkpoint or hf-hub:NAME (bioclip)",
    )
    parser.add_argument(
        "--metadata-path", type=Optional[str], default=None, help="TreeOfLife-10M catalog CSV (treeoflife_id, species)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="data-loader processes reading shards (0: read in the main process)"
    )
    parser.add_argument(
        "--device", type=Optional[str], default=None, help="torch device (default: cuda if available, else cpu)"
    )
    parser.add_argument("--seed", type=seed_type(), default=42, help="torch seed, in [0, 2^32 - 1]")
    parser.add_argument("--feature-dim", type=int, default=512, help="feature size the backbone must produce")
    parser.add_argument(
        "--arch", type=Optional[str], default=None, help=f"backbone: {', '.join(ARCHS)} (default: {defaults})"
    )
    parser.add_argument("--dtype", type=Literal["float32", "float16"], default="float32", help="dtype of features.npy")
    parser.add_argument(
        "--save-pt",
        action="store_true",
        help="also write the reference implementation's features.pt/labels.pt/is_cached.pt at the end",
    )
    parser.add_argument(
        "--max-batches",
        type=Optional[int],
        default=None,
        help="stop after this many batches (a trial run; rerun to resume)",
    )
    return parser


def extract_main(argv: list[str]) -> int:
    """``xcent extract``: see `xcent.extract.run` and ``xcent extract --help``."""
    from ..extract.run import ExtractConfig, extract_features, summary_line

    args = _parse(extract_parser(), argv)
    cfg = ExtractConfig(**{k: v for k, v in vars(args).items() if not k.startswith("__")})
    summary = extract_features(cfg)
    print(summary_line(summary, cfg))
    return 0


def split_parser():
    from ..yamlio import argument_parser

    parser = argument_parser(
        prog="xcent split",
        description="Split the cached rows of an `xcent extract` directory into "
        "OUT/{train,val,test}/{features,labels,rows} (OUT is replaced whole, atomically).",
        exit_on_error=False,
    )
    # '--in' is a Python keyword: its value lives under the dest 'in_dir'
    parser.add_argument(
        "--in", dest="in_dir", type=Optional[str], default=None, help="directory written by xcent extract (required)"
    )
    parser.add_argument(
        "--out",
        dest="out_dir",
        type=Optional[str],
        default=None,
        help="data directory for xcent train (required; new, or a previous split)",
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.05, help="fraction of cached rows (< 1) or row count (>= 1) for val"
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.05, help="fraction of cached rows (< 1) or row count (>= 1) for test"
    )
    parser.add_argument("--seed", type=seed_type(), default=42, help="seed of the split, in [0, 2^32 - 1]")
    parser.add_argument(
        "--stratify",
        action="store_true",
        help="keep every class with at least 3 rows in train; per-class shares of val/test",
    )
    parser.add_argument("--format", type=Literal["npy", "pt"], default="npy", help="file format of the splits")
    return parser


def split_main(argv: list[str]) -> int:
    """``xcent split``: see `xcent.extract.split` and ``xcent split --help``."""
    from ..extract.split import make_split

    args = _parse(split_parser(), argv)
    if not args.in_dir:
        raise UsageError("--in is required (a directory written by xcent extract)")
    if not args.out_dir:
        raise UsageError("--out is required")
    report = make_split(
        args.in_dir, args.out_dir, args.val_fraction, args.test_fraction, args.seed, args.stratify, args.format
    )
    sizes = report["num_samples"]
    print(
        f"xcent split: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test rows "
        f"(of {report['num_cached']} cached; {report['not_cached']} rows not cached were left out) -> {args.out_dir}"
    )
    print(
        f"classes: {report['num_classes']} in total, {report['classes_with_rows']} with rows, "
        f"{report['classes_in_train']} in train; "
        f"absent from train: {report['val_classes_not_in_train']} of the val classes, "
        f"{report['test_classes_not_in_train']} of the test classes"
    )
    return 0

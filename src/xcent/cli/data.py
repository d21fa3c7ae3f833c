"""``xcent synth`` (a seeded synthetic dataset, :func:`xcent.data.synthesize`) and
``xcent inspect`` (the data report, :mod:`xcent.inspect`)."""

from __future__ import annotations

from pathlib import Path

from ..data import check_new_dataset_dir, load_dataset, synthesize_atomic
from ..limits import seed_type


def synth_main(argv: list[str]) -> int:
    from jsonargparse import ActionConfigFile

    from ..yamlio import argument_parser

    p = argument_parser(
        prog="xcent synth", description="Write a seeded long-tailed synthetic dataset in the layout xcent train reads."
    )
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--out", type=str, required=True, help="output data directory")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=50_000, help="rows over all splits")
    p.add_argument("--rows-per-class", type=float, default=None,
                   help="rows per class over all splits (sets --num-samples = this x --num-classes)")
    p.add_argument("--feature-norm", type=float, default=1.0,
                   help="multiply every feature row by this (1: unit norm with --normalize)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--test-fraction", type=float, default=0.05)
    p.add_argument("--noise", type=float, default=0.5, help="noise norm relative to the unit centroid")
    p.add_argument("--tail-exponent", type=float, default=0.8, help="class share ~ rank^-exponent")
    p.add_argument("--normalize", type=bool, default=True, help="scale features to unit norm")
    p.add_argument("--dtype", type=str, default="float32", help="float32 or float16")
    p.add_argument("--format", type=str, default="npy", help="npy or pt")
    p.add_argument("--seed", type=seed_type(), default=0, help="a whole number in [0, 2^32 - 1]")
    a = p.parse_args(argv)
    out = Path(a.out)
    # into a new or empty --out (never over files there), all at once (a failed run leaves
    # nothing to refuse next time)
    check_new_dataset_dir(out, "--out")
    info = synthesize_atomic(out, a.num_classes, a.feature_dim, a.num_samples, a.val_fraction, a.test_fraction,
                             a.seed, a.noise, a.tail_exponent, a.normalize, a.dtype, a.format,
                             rows_per_class=a.rows_per_class, feature_norm=a.feature_norm)
    print(f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return 0


def inspect_main(argv: list[str]) -> int:
    import json

    from ..fileio import write_text_atomic
    from ..inspect import data_report, format_report
    from ..yamlio import argument_parser

    p = argument_parser(prog="xcent inspect", description=(
        "Report rows, classes, train rows per class, feature norms and val/test classes unseen in train "
        "of DATA_DIR, with the settings it suggests."))
    p.add_argument("data_dir", type=str, help="DATA_DIR/{train,val,test}/features|labels.{pt,npy}")
    p.add_argument(
        "--json", type=str, default=None, help="also write the report as JSON to this file ('-': stdout only)"
    )
    p.add_argument("--sample-rows", type=int, default=20000, help="train rows read for the norm figures; 0 = all")
    p.add_argument("--check-features", type=bool, default=False, help="scan every feature for NaN/Inf first")
    a = p.parse_args(argv)
    data = load_dataset(a.data_dir, required=("train",), check_features=a.check_features)
    report = {"data_dir": str(a.data_dir), **data_report(data, a.sample_rows)}
    if a.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    print(f"xcent inspect: {a.data_dir}")
    print(format_report(report))
    if a.json:
        write_text_atomic(a.json, json.dumps(report, indent=2) + "\n")
    return 0

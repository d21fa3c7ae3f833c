"""``xcent synth``: write a seeded synthetic dataset (:func:`xcent.data.synthesize`)."""

from __future__ import annotations

from pathlib import Path

from ..data import synthesize
from ..errors import UsageError


def synth_main(argv: list[str]) -> int:
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(
        prog="xcent synth", description="Write a seeded synthetic long-tailed dataset in the seed layout."
    )
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--out", type=str, required=True, help="output data directory")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=50_000, help="rows over all splits")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--test-fraction", type=float, default=0.05)
    p.add_argument("--noise", type=float, default=0.5, help="noise norm relative to the unit centroid")
    p.add_argument("--tail-exponent", type=float, default=0.8, help="class share ~ rank^-exponent")
    p.add_argument("--normalize", type=bool, default=True, help="scale features to unit norm")
    p.add_argument("--dtype", type=str, default="float32", help="float32 or float16")
    p.add_argument("--format", type=str, default="npy", help="npy or pt")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out)
    if (out / "train").exists():
        raise UsageError(f"--out {out}: already holds a dataset (train/ exists); choose another directory")
    info = synthesize(out, a.num_classes, a.feature_dim, a.num_samples, a.val_fraction, a.test_fraction,
                      a.seed, a.noise, a.tail_exponent, a.normalize, a.dtype, a.format)
    print(f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return 0

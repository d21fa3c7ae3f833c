"""``xcent train`` and ``xcent demo``: parse a :class:`xcent.config.TrainConfig` and run
the recipe :func:`xcent.train.train`."""

from __future__ import annotations

import math

from ..config import config_from_argv, parse_config, resolve, train_parser

#: the built-in dataset of ``xcent demo`` (cached by :func:`xcent.data.cached_synthetic`)
DEMO_DATA = {"num_classes": 2000, "feature_dim": 64, "num_samples": 100_000, "val_fraction": 0.05,
             "test_fraction": 0.05, "seed": 0, "noise": 0.6}


def _exit_status(exc: SystemExit) -> int:
    # --help and --print_config exit through argparse; the dispatcher wants a status
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


def main(argv: list[str]) -> int:
    from ..train import train

    try:
        config = config_from_argv(argv)
    except SystemExit as exc:
        return _exit_status(exc)
    train(config)
    return 0


def demo_main(argv: list[str]) -> int:
    from ..data import cached_synthetic
    from ..train import train

    parser = train_parser(
        prog="xcent demo", defaults={"data_dir": None, "epochs": 5, "overwrite": True},
        description=f"Train SCENT (or --algorithm) on a cached built-in synthetic dataset "
                    f"({DEMO_DATA['num_classes']} classes, {DEMO_DATA['num_samples']} rows, written once to "
                    f"--data-dir, default ~/.cache/xcent/demo-v1) into OUT_DIR/demo_ALGORITHM. Every "
                    f"`xcent train` flag applies.")
    try:
        given = parse_config(argv, parser)
    except SystemExit as exc:
        return _exit_status(exc)
    given = given.replace(name=given.name or f"demo_{str(given.algorithm).lower()}")
    resolve(given.replace(data_dir=given.data_dir or "."))  # bad flags fail before the data is made
    data_dir = cached_synthetic(given.data_dir, "demo-v1", DEMO_DATA, announce="xcent demo")
    last = train(resolve(given.replace(data_dir=str(data_dir))))
    log_c = math.log(DEMO_DATA["num_classes"])
    if "start_val_loss" in last:
        verdict = "improved over the start" if last["improved_over_start"] else "NOT improved over the start"
        print(f"xcent demo: val loss {last['start_val_loss']:.3f} -> {last['val_loss']:.3f} (log C = {log_c:.3f}), "
              f"val top-1 {last['start_val_acc']:.3f} -> {last['val_acc']:.3f}: {verdict}")
    else:
        print(f"xcent demo: val loss {last['val_loss']:.3f} (log C = {log_c:.3f}), val top-1 {last['val_acc']:.3f}")
    return 0

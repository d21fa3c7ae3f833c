"""``xcent import``: convert a checkpoint of the reference implementation
(Optimization-AI/SCENT, ``xc/train.py``) into an xcent checkpoint
(:func:`xcent.modelio.import_reference`), which ``xcent train --resume``, ``eval``,
``predict`` and ``export`` then read like any other."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError


def _is_checkpoint(path: Path) -> bool:
    """``path`` reads as an xcent checkpoint (its metadata; the weight stays on disk)."""
    from ..modelio import load

    try:
        load(path, mmap=True, weight=False, resume=False)
    except UsageError:
        return False
    return True


def import_main(argv: list[str]) -> int:
    from ..modelio import import_reference, save_atomic
    from ..yamlio import argument_parser

    p = argument_parser(prog="xcent import",
                        description="Convert a checkpoint written by the reference implementation's train.py "
                                    "(Optimization-AI/SCENT, xc/) into an xcent checkpoint: the weight, the epoch "
                                    "and the duals (nu == 0 there means unset) come over.")
    p.add_argument("--checkpoint", type=str, required=True, help="the reference's epoch_E.pt")
    p.add_argument("--algorithm", type=str, required=True, help="the algorithm it was trained with")
    p.add_argument("--out", type=str, required=True, help="the xcent checkpoint to write (.pt)")
    p.add_argument("--data-dir", type=str, default=None,
                   help="the data it was trained on: checks the shapes (needed for bsgd, whose checkpoint "
                        "does not record the number of training rows)")
    p.add_argument("--overwrite", type=bool, default=False, help="replace an existing --out")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        raise UsageError(f"--out {out}: already exists (pass --overwrite true to replace it)")
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out}: is a directory")
    if out.exists() and not _is_checkpoint(out):
        raise UsageError(f"--out {out}: exists and is not an xcent checkpoint; --overwrite replaces only one, "
                         f"so choose another name or move it away")
    data = None
    if a.data_dir is not None:
        from ..data import load_dataset

        data = load_dataset(a.data_dir, splits=("train",), required=("train",), check_features=False)
    ckpt, report = import_reference(a.checkpoint, a.algorithm, None if data is None else data.train.num_samples)
    if data is not None:
        if data.feature_dim != report["feature_dim"]:
            raise UsageError(f"--data-dir {a.data_dir}: features have {data.feature_dim} dimensions, the "
                             f"checkpoint's weight {report['feature_dim']}")
        if int(data.train.labels.max()) >= report["num_classes"]:
            raise UsageError(f"--data-dir {a.data_dir}: label {int(data.train.labels.max())} is beyond the "
                             f"checkpoint's {report['num_classes']} classes")
    save_atomic(ckpt, out)
    duals = ("no duals (bsgd)" if report["num_unset"] is None else
             f"{report['num_samples'] - report['num_unset']} duals set, {report['num_unset']} unset "
             f"(nu == 0 in the reference) of {report['num_samples']} rows")
    print(f"xcent import: {out}: epoch {report['epoch']}, weight {report['num_classes']} x {report['feature_dim']}, "
          f"{a.algorithm}, {duals}")
    start_lr = report.get("initial_lr", report.get("lr"))
    if start_lr is not None:
        print(f"the reference run started at learning rate {start_lr} (lr {report.get('lr')} after epoch "
              f"{report['epoch']}); resume with the same --lr and --epochs to continue its schedule")
    for item in report["dropped"]:
        print(f"not carried over: {item}")
    print(f"continue with: xcent train --resume {out} --algorithm {a.algorithm} --data-dir DATA ...")
    return 0

"""Test-only launcher: ``xcent train`` in which one rank dies abruptly after an epoch.

    torchrun ... tests/launch_fail_after_epoch.py EPOCH RANK -- <xcent train flags>

Process RANK (the ``RANK`` torchrun sets) calls ``os._exit(17)`` right after saving
the checkpoint of EPOCH, as a killed or crashed process would. The fault is patched
into :func:`xcent.train._save` here, so the production loop holds no test hook.
"""

import os
import sys

import xcent.train as train_mod
from xcent.cli import main


def install(fail_epoch: int, fail_rank: int) -> None:
    real_save = train_mod._save

    def save_then_die(run, engine, loss_fn, epoch, *rest):
        path = real_save(run, engine, loss_fn, epoch, *rest)
        if epoch == fail_epoch and int(os.environ.get("RANK", "0")) == fail_rank:
            os._exit(17)
        return path

    train_mod._save = save_then_die


if __name__ == "__main__":
    epoch, rank, sep, *flags = sys.argv[1:]
    assert sep == "--", "usage: launch_fail_after_epoch.py EPOCH RANK -- FLAGS"
    install(int(epoch), int(rank))
    sys.exit(main(["train", *flags]))

"""Test-only launcher: ``xcent train`` that stops at a chosen point until told to go on.

    python tests/launch_paused.py WHERE -- <xcent train flags>

WHERE is ``data`` (as the trainer starts reading the dataset) or ``epoch:K`` (right
after the checkpoint of epoch K is saved). There the process prints ``paused`` on
stdout and waits for a line on stdin, so a test can start a second process against a
run that is provably alive at that point. The pause is patched in here, so the
production code holds no test hook.
"""

import sys

import xcent.train as train_mod
from xcent.cli import main


def pause() -> None:
    print("paused", flush=True)
    sys.stdin.readline()


def install(where: str) -> None:
    if where == "data":
        real_load = train_mod.load_dataset

        def load_after_pause(*args, **kwargs):
            pause()
            return real_load(*args, **kwargs)

        train_mod.load_dataset = load_after_pause
        return
    kind, _, epoch = where.partition(":")
    assert kind == "epoch", "WHERE is data or epoch:K"
    real_save = train_mod._save

    def save_then_pause(run, engine, loss_fn, saved_epoch, *rest):
        path = real_save(run, engine, loss_fn, saved_epoch, *rest)
        if saved_epoch == int(epoch):
            pause()
        return path

    train_mod._save = save_then_pause


if __name__ == "__main__":
    where, sep, *flags = sys.argv[1:]
    assert sep == "--", "usage: launch_paused.py WHERE -- FLAGS"
    install(where)
    sys.exit(main(["train", *flags]))

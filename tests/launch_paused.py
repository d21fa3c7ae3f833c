"""Test-only launcher: ``xcent train`` that stops at a chosen point until told to go on.

    python tests/launch_paused.py WHERE -- <xcent train flags>

WHERE is ``data`` (as the trainer starts reading the dataset), ``epoch:K`` (right
after the checkpoint of epoch K is saved) or ``best:K`` (right after ``--keep-best``
considered epoch K, whose record is logged; the next epoch checkpoint is not yet written)
or ``record:K`` (right after the record of epoch K is appended to the epoch log). There the process prints ``paused`` on
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
    assert kind in ("epoch", "best", "record"), "WHERE is data, epoch:K, best:K or record:K"
    if kind == "record":

        class PausingLogger(train_mod.JsonlLogger):
            def log_dict(self, payload, step):
                super().log_dict(payload, step)
                if self.step_key == "epoch" and step == int(epoch):
                    pause()

        train_mod.JsonlLogger = PausingLogger
        return
    if kind == "best":
        real_keep = train_mod._keep_best

        def keep_then_pause(run, engine, loss_fn, metrics, *rest):
            real_keep(run, engine, loss_fn, metrics, *rest)
            if metrics["epoch"] == int(epoch):
                pause()

        train_mod._keep_best = keep_then_pause
        return
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

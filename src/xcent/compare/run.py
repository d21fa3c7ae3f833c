"""Executing a comparison's runs: in sequence, in process, each an ordinary
``xcent train`` run, resumable and independent.

* a run whose ``eval_NAME.jsonl`` reaches the last epoch is skipped;
* an interrupted run continues from its latest checkpoint (``--resume latest``);
* a run that raises (divergence, bad data) is recorded in ``OUT/NAME/compare_failed.json``
  and the others go on; a later call reports it again without rerunning it unless
  ``retry_failed``;
* a run directory whose saved config differs from the planned run is never replaced:
  every run is checked before any is trained, and a difference stops the command
  with a one-line error;
* only xcent's own outputs are written into or replaced: ``--out-dir`` holds nothing
  but a comparison's files and xcent runs (:func:`check_out_dir`), and a planned run's
  directory is an xcent run (:func:`xcent.rundir.not_a_run`); a run that another
  process is training stops the command (exit 2) instead of being recorded as failed.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import losses
from ..errors import UsageError
from ..fileio import OutputInUse, foreign_entry, write_text_atomic
from ..rundir import not_a_run, refuse_non_run, resume_point
from .plan import Plan, RunSpec, train_config
from .report import FAILED_FILE, read_records

__all__ = ["execute", "run_state"]

#: Config keys that must agree between a planned run and the run already on disk
#: (besides the hyper-parameters of its algorithm, from the registry).
_RUN_KEYS = ("algorithm", "seed", "epochs", "batch_size", "warmup_epochs", "train_loss", "train_eval_size", "init")
#: What a saved config without the key meant (runs written before the key existed).
_SAVED_DEFAULTS = {"init": "random"}
_SHAPE_KEYS = ("num_classes", "feature_dim", "data_size")


def _same_value(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def run_state(spec: RunSpec, out_dir: Path) -> str:
    """``done``, ``failed``, ``resume`` (has a checkpoint), ``partial`` (started, no
    checkpoint) or ``new``. Raises UsageError if the directory holds a different run."""
    from ..train import RunDir
    from ..yamlio import read_yaml

    run = RunDir(out_dir, spec.name)
    if not run.path.exists() and not run.path.is_symlink():
        return "new"
    # a folder or file of the user's under a planned run's name is never trained into or replaced
    refuse_non_run(run.path, "xcent compare", others_ok=True)
    if run.config.exists():
        try:
            saved = read_yaml(run.config)
        except UsageError as exc:
            raise UsageError(f"{exc}; move the run directory away") from None
        if not isinstance(saved, dict | None):
            raise UsageError(f"{run.config}: not a mapping of settings; move the run directory away")
        saved = saved or {}
        keys = _RUN_KEYS + losses.get(spec.algorithm).keys
        diffs = [k for k in keys if not _same_value(saved.get(k, _SAVED_DEFAULTS.get(k)), spec.config.get(k))]
        diffs += [k for k in _SHAPE_KEYS if spec.config.get(k) is not None
                  and not _same_value(saved.get(k), spec.config.get(k))]
        if saved.get("data_dir") is not None and \
                Path(str(saved["data_dir"])).resolve() != Path(str(spec.config["data_dir"])).resolve():
            diffs.append("data_dir")
        if diffs:
            detail = ", ".join(f"{k} {saved.get(k, _SAVED_DEFAULTS.get(k))!r} vs {spec.config.get(k)!r}"
                               for k in diffs[:3])
            raise UsageError(f"{run.path}: holds a run with other settings ({detail}); use another --out-dir "
                             f"or move it away")
    elif run.holds_run():
        raise UsageError(f"{run.path}: holds a run without config.yaml; use another --out-dir or move it away")
    if (run.path / FAILED_FILE).exists():
        return "failed"
    records = read_records(run.jsonl) if run.jsonl.exists() else []
    if records and records[-1]["epoch"] >= spec.config["epochs"]:
        return "done"
    if resume_point(run.checkpoints) is not None:
        return "resume"
    refuse_non_run(run.path, "xcent compare")  # restarted with --overwrite: everything in it must be xcent's
    return "partial" if run.holds_run() else "new"


#: the files of a comparison in its --out-dir (beside its runs)
COMPARE_FILES = frozenset({"compare.json", "compare.md", "compare.png", "compare.pdf"})


def _in_comparison(path: Path) -> bool:
    if not path.exists():  # the target of a leftover (.NAME.lock of a run not created, a temp file)
        return not path.is_symlink()
    if path.is_symlink():
        return False
    if path.name in COMPARE_FILES:
        return path.is_file()
    return path.is_dir() and not_a_run(path, others_ok=True) is None


def check_out_dir(out_dir: Path) -> None:
    """``--out-dir`` must be new, empty, or hold only a comparison's files and xcent runs
    (a comparison of other algorithms, or ``xcent train`` runs): anything else (the data,
    a folder of the user's) is refused before anything is written."""
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir}: is a file, not a directory")
    foreign = foreign_entry(out_dir, _in_comparison)
    if foreign is not None:
        raise UsageError(f"--out-dir {out_dir}: holds {foreign!r}, which is neither a comparison's file nor an "
                         f"xcent run: xcent compare writes only into a new or empty directory or one of its own "
                         f"comparisons; use another --out-dir")


def execute(plan: Plan, echo=print) -> dict[str, str]:
    """Run the plan in sequence; returns run name -> final state (done / failed)."""
    from .. import train as train_mod
    from ..train import RunDir

    check_out_dir(plan.out_dir)
    states = {spec.name: run_state(spec, plan.out_dir) for spec in plan.runs}  # all checked before any training
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    todo = [s for s in plan.runs if states[s.name] not in ("done",) and
            not (states[s.name] == "failed" and not plan.retry_failed)]
    echo(f"xcent compare: {len(plan.runs)} runs in {plan.out_dir}: {len(todo)} to run, "
         f"{sum(v == 'done' for v in states.values())} finished, "
         f"{sum(v == 'failed' for v in states.values())} failed before")
    for i, spec in enumerate(plan.runs, 1):
        state, run = states[spec.name], RunDir(plan.out_dir, spec.name)
        if state == "done":
            echo(f"[{i}/{len(plan.runs)}] {spec.name}: finished, skipped")
            continue
        if state == "failed" and not plan.retry_failed:
            echo(f"[{i}/{len(plan.runs)}] {spec.name}: failed before, skipped (--retry-failed reruns it)")
            continue
        (run.path / FAILED_FILE).unlink(missing_ok=True)
        resume = resume_point(run.checkpoints) is not None
        argv_run = spec.argv + (["--resume", "latest"] if resume else ["--overwrite", "true"])
        echo(f"[{i}/{len(plan.runs)}] {spec.name}: {'resuming' if resume else 'training'}")
        try:
            train_mod.train(train_config(argv_run, f"train flags of run {spec.name}"), echo=echo)
            states[spec.name] = "done"
        except OutputInUse:  # another process trains this run: not a failure of the run, stop here
            raise
        except Exception as exc:  # a failed run is recorded; the others go on
            message = " ".join(str(exc).split()) or type(exc).__name__
            run.path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run.path / FAILED_FILE, json.dumps({"error": type(exc).__name__, "message": message}))
            echo(f"[{i}/{len(plan.runs)}] {spec.name}: FAILED ({type(exc).__name__}: {message})")
            states[spec.name] = "failed"
    return states

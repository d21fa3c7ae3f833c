"""Multi-run comparisons (the library behind ``xcent compare`` and ``xcent plot``).

``xcent compare`` composes the trainer (:func:`xcent.train.train`) into the paper's
experiment: :mod:`.plan` turns settings into runs (algorithms x grid points x seeds,
with per-algorithm overrides), :mod:`.run` executes them in sequence, resumably,
recording failures, and :mod:`.report` reads the run directories back into
``compare.json``, ``compare.md`` and the two-panel figure, which ``xcent plot`` also
draws from any run directories. The command-line layer is :mod:`xcent.cli.compare`.
"""

from .plan import CompareSettings, Plan, RunSpec, make_plan
from .report import (
    FAILED_FILE,
    METRICS,
    Curve,
    compare_curves,
    infer_algorithm,
    make_figure,
    read_records,
    run_metrics,
    summarize,
    write_outputs,
)
from .run import execute, run_state

__all__ = [
    "FAILED_FILE",
    "METRICS",
    "CompareSettings",
    "Curve",
    "Plan",
    "RunSpec",
    "compare_curves",
    "execute",
    "infer_algorithm",
    "make_figure",
    "make_plan",
    "read_records",
    "run_metrics",
    "run_state",
    "summarize",
    "write_outputs",
]

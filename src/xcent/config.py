"""The typed configuration of a training run (:class:`TrainConfig`) and its parser.

One dataclass is the single description of every ``xcent train`` setting: its type,
default and help text. The command-line parser, ``--config`` files, the saved
``OUT/config.yaml`` and ``xcent compare`` all derive from it:

* :func:`train_parser` turns the fields into a jsonargparse parser (typed values,
  readable ``--help``, ``--config``/``--config-file`` YAML files);
* :func:`config_from_argv` / :func:`config_from_dict` parse and validate flags or a
  mapping into a *resolved* :class:`TrainConfig` (algorithm defaults filled in);
* :meth:`TrainConfig.to_dict` is what ``OUT/config.yaml`` holds, itself a valid
  ``--config``.

Why the fields are registered one by one instead of with jsonargparse's
``add_class_arguments``: that names each flag after its field (``--data_dir``), and
the flags of xcent and of the reference implementation (Optimization-AI/SCENT, `xc/`)
are dashed (``--data-dir``). Each field is added under its dashed name with its type
hint, so jsonargparse still does the typing, validation and help. Booleans use
jsonargparse's ``ActionYesNo``: ``--overwrite``, ``--overwrite true|false`` and
``--no-overwrite`` all work.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from . import losses
from .device import parse_threads
from .errors import UsageError
from .limits import MAX_EPOCHS, MAX_TIMEOUT_SECONDS, check_seed, seed_type
from .loggers import check_available
from .rundir import check_run_name

__all__ = [
    "LOGGERS",
    "TrainConfig",
    "config_from_argv",
    "config_from_dict",
    "parse_config",
    "parse_error_line",
    "resolve",
    "train_keys",
    "train_parser",
]

#: Metric loggers ``--logger`` accepts (JSONL is always written: resume and compare read it).
LOGGERS = ("jsonl", "tensorboard")


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one ``xcent train`` run (flag ``--foo-bar`` is field ``foo_bar``).

    The algorithms' hyper-parameters (``lr``, ``gamma``, ``softplus_rho``,
    ``umax_delta``, and those of any algorithm registered later) are not fields: they
    come from the registry (:func:`xcent.losses.hyperparameters`) and live in
    ``hparams`` (config key -> value; None: the algorithm's tuned value before
    :func:`resolve`, not used by the algorithm after it). They read as attributes
    (``config.lr``) and are top-level keys of :meth:`to_dict` and of config files."""

    data_dir: str = _help("DATA_DIR/{train,val,test}/features|labels.{pt,npy}")
    algorithm: str = _help("one of the registered algorithms (see --lr, --gamma, ... for each one's "
                           "hyper-parameters)", default="scent")
    feature_dim: int | None = _help("inferred from the data; checked if given", default=None)
    num_classes: int | None = _help("inferred (max label + 1); may be larger", default=None)
    batch_size: int = _help("rows per step (the global batch under torchrun)", default=128)
    data_size: int | None = _help("training rows; inferred, checked if given", default=None)
    epochs: int = _help("passes over the training rows", default=50)
    device: str = _help("cpu, cuda, cuda:N or auto", default="auto")
    precision: Literal["fp32", "bf16"] = _help(
        "of the score GEMMs (in-batch and evaluation): bf16 reads bfloat16 operands with float32 accumulation; "
        "the weight, the duals and the log-sum-exp stay float32", default="fp32")
    out_dir: str = _help("the run goes to OUT_DIR/NAME", default="outputs")
    warmup_epochs: int = _help("epochs of linear learning-rate warmup before the cosine", default=0)
    momentum: float = _help("SGD momentum of the weight rows, exactly torch.optim.SGD's over all C rows while a "
                            "step still touches only its batch's rows; 0: the algorithm as specified", default=0.0)
    weight_decay: float = _help("L2 weight decay of the weight rows, exactly torch.optim.SGD's over all C rows; "
                                "0: the algorithm as specified", default=0.0)
    save_frequency: int = _help("checkpoint every N epochs (and at the end)", default=1)
    hparams: dict = field(default_factory=dict, metadata={"hparams": True})
    resume: str | None = _help("a checkpoint path, or 'latest'", default=None)
    seed: int = _help("weight initialisation and the shuffling of every epoch; a whole number in [0, 2^32 - 1]",
                      default=42)
    name: str | None = _help("run name (default: the algorithm)", default=None)
    train_loss: Literal["subset", "running"] = _help(
        "subset: full CE of the end-of-epoch model on --train-eval-size fixed rows; running: the mean full CE "
        "of each batch before its update, as the reference implementation logs it (C x the step's work)",
        default="subset")
    train_eval_size: int = _help("rows for --train-loss subset; 0 = all", default=20000)
    eval_chunk_rows: int = _help("rows per evaluation chunk", default=4096)
    check_features: bool = _help("scan features for NaN/Inf on load", default=True)
    overwrite: bool = _help("replace an existing run in OUT (kept aside until the new run's first checkpoint, "
                            "restored if the new run fails before it)", default=False)
    allow_changed_settings: bool = _help(
        "with --resume: accept settings that differ from the run's (--lr, --seed, --batch-size, fewer --epochs, "
        "--warmup-epochs, the algorithm's hyper-parameters); without it they are refused. More --epochs is "
        "always accepted", default=False)
    low_memory: bool = _help("unmap feature pages after every batch (.npy splits): peak RSS stays near the "
                             "weight instead of growing to the split's size, at about 0.3 ms per step",
                             default=False)
    prefetch: Literal["auto", "on", "off"] = _help(
        "read the next batch from the memory-mapped split in a background thread while the current step runs "
        "(into pinned memory, copied non-blocking, on a GPU); auto: on with CUDA, off on the CPU, where it lost on "
        "a loaded 2-core machine (docs/performance.md); the same batches either way", default="auto")
    dist_timeout: float = _help("seconds a collective may wait under torchrun before the job fails (a dead peer)",
                                default=300.0)
    logger: str = _help("comma list of metric loggers: jsonl (OUT/eval_NAME.jsonl and steps_NAME.jsonl, always "
                        "written), tensorboard (OUT/tensorboard/; pip install 'xcent[tensorboard]')",
                        default="jsonl")
    log_every_steps: int = _help("log the step's losses and dual statistics every N steps of an epoch "
                                 "(batches 0, N, 2N, ...; as the reference implementation, N = 100); 0: off",
                                 default=100)
    check_every_steps: int = _help(
        "read the steps' finiteness flags from the device every N steps (and at each step-log step and epoch "
        "end, before any evaluation or checkpoint): one host sync per N steps instead of one per step; a "
        "divergence still names its exact step", default=100)
    threads: str = _help("CPU intra-op threads: auto (one thread for the small ops of a training step; for "
                         "evaluation one or all cores, whichever a short probe finds faster; OMP_NUM_THREADS caps "
                         "it) or a number for every phase",
                         default="auto")
    init: Literal["random", "class-means"] = _help(
        "class-means: unit class means of the training rows times one scale, the one minimising the CE of "
        "training rows held out of the means (docs/own-data.md); random: N(0, 0.01^2), the reference "
        "implementation's start, whose epoch-0 loss is log C (pass it to reproduce the paper's curves). A resumed "
        "run keeps the start it had", default="class-means")
    lr_search_budget: float = _help("--lr auto: training rows of all candidates together, as a share of one epoch",
                                    default=0.2)
    keep_best: bool = _help("keep checkpoints/best.pt (best/ under torchrun): the epoch with the best --best-by",
                            default=True)
    best_by: Literal["val_loss", "val_acc"] = _help("--keep-best: val_loss (lowest) or val_acc (highest)",
                                                    default="val_loss")

    def __getattr__(self, name: str):
        # only reached for names that are not fields: the registry's hyper-parameters
        hparams = self.__dict__.get("hparams")
        if hparams is not None and name in hparams:
            return hparams[name]
        raise AttributeError(f"TrainConfig has no setting {name!r}")

    def to_dict(self) -> dict:
        """Plain values, flat (hyper-parameters where ``hparams`` stands): what
        ``OUT/config.yaml`` holds, itself a valid ``--config``."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "hparams":
                out.update(self.hparams)
            else:
                out[f.name] = getattr(self, f.name)
        return out

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes`` (fields or hyper-parameter keys)."""
        fields = {f.name for f in dataclasses.fields(self)}
        hp = {k: changes.pop(k) for k in list(changes) if k not in fields}
        unknown = set(hp) - set(_hparam_keys())
        if unknown:
            raise TypeError(f"unknown setting(s) {sorted(unknown)}")
        if hp:
            changes["hparams"] = {**changes.get("hparams", self.hparams), **hp}
        return dataclasses.replace(self, **changes)


def _hparam_keys() -> list[str]:
    return [hp.key for hp in losses.hyperparameters()]


def train_keys() -> tuple[str, ...]:
    """Every setting's key, as in config files and :meth:`TrainConfig.to_dict` (flag
    ``--a-b`` is key ``a_b``): the fields and the registry's hyper-parameters."""
    keys = []
    for f in dataclasses.fields(TrainConfig):
        keys.extend(_hparam_keys() if f.name == "hparams" else [f.name])
    return tuple(keys)


# ----------------------------------------------------------------------------- parsing

class Real(float):
    """A hyper-parameter value: any float, ``inf`` and ``nan`` included (jsonargparse's
    float type reads ``inf`` as YAML, a string, and refuses it); the valid ranges are
    the registry's (:func:`xcent.losses.resolve_hparams`), which name the flag."""


def _real_type() -> type:
    from jsonargparse.typing import get_registered_type, register_type

    if get_registered_type(Real) is None:
        register_type(Real, serializer=float, deserializer=lambda v: Real(float(v)))
    return Real


def train_parser(prog: str = "xcent train", description: str | None = None, defaults: dict | None = None):
    """The jsonargparse parser of :class:`TrainConfig` (errors raise, never exit);
    ``defaults`` replaces field defaults (a field given one is no longer required)."""
    from jsonargparse import ActionConfigFile, ActionYesNo

    from .yamlio import argument_parser

    defaults = defaults or {}
    p = argument_parser(prog=prog, exit_on_error=False, description=description or (
        "Train a linear classifier over precomputed features with one of the algorithms "
        f"({', '.join(losses.REGISTRY)}). The flags are those of the reference implementation's train.py "
        "(Optimization-AI/SCENT, `xc/`) plus xcent's own; a saved OUT/config.yaml is itself a valid --config."))
    p.add_argument("--config", "--config-file", action=ActionConfigFile, help="YAML config file (keys as the "
                   "flags, with underscores: data_dir, batch_size, ...)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "hparams":  # --lr, --gamma, --softplus-rho, --umax-delta, ...: from the registry
            real = Optional[_real_type()]  # noqa: UP045  (a runtime type value, shown in --help)
            for hp in losses.hyperparameters():
                if hp.key == "lr":  # also 'auto': a short search before training (xcent.lr_search)
                    p.add_argument(hp.flag, type=Optional[Union[_real_type(), Literal["auto"]]],  # noqa: UP007,UP045
                                   default=defaults.get(hp.key),
                                   help=hp.help + "; 'auto': a short search before training (docs/own-data.md)")
                    continue
                p.add_argument(hp.flag, type=real, default=defaults.get(hp.key), help=hp.help)
            continue
        flag, hint, text = "--" + f.name.replace("_", "-"), hints[f.name], f.metadata["help"]
        if f.name == "seed":
            hint = seed_type()  # an int in [0, MAX_SEED] (xcent.limits)
        default = defaults.get(f.name, f.default)
        required = default is dataclasses.MISSING
        default = None if required else default
        if hint is bool:
            p.add_argument(flag, action=ActionYesNo(no_prefix="no-"), nargs="?", default=default, help=text)
        else:
            p.add_argument(flag, type=hint, default=default, required=required, help=text)
    return p


_KEY = re.compile(r'Parser key "([A-Za-z0-9_.]+)"')


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def parse_error_line(message: str) -> str:
    """One line from a (multi-line) jsonargparse/argparse error, naming the flag first:
    ``Parser key "lr": ... Given value: x`` -> ``--lr x: expected float``."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return "invalid flags"
    first = lines[0]
    m = re.match(r"the following arguments are required: (.*)", first)
    if m:
        return ", ".join(_flag(k.strip()) for k in m.group(1).split(",")) + ": required"
    m = re.match(r"argument (--[\w-]+)\S*: invalid _boolean_type value: '(.*)'", first)
    if m:
        return f"{m.group(1)} {m.group(2)}: expected true or false (or the bare flag)"
    m = _KEY.search(first)
    if not m:
        return " ".join(lines)
    flag = _flag(m.group(1))
    given = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Given value:")), None)
    noise = ("Given value", "Subtypes", "Errors", "Does not validate", "- Expected a <class 'NoneType'>")
    reasons = [ln.lstrip("- ") for ln in lines[1:] if not ln.startswith(noise)]
    reason = reasons[0] if reasons else "invalid value"
    own = re.match(r"Not of type Seed: (.*)", reason)  # xcent's own types (Seed) say the value and the rule
    if own:
        return f"{flag}: {own.group(1)}"
    got = re.search(r"\.? Got value: (.*)$", reason)
    if got:
        given, reason = got.group(1), reason[:got.start()]
    bound = re.search(r"(\S+) does not conform to restriction v(\S+)", reason)
    if bound:
        given, reason = bound.group(1), "must be " + re.sub(r"^([<>=!]+)", r"\1 ", bound.group(2))
    literal = re.search(r"Literal\[(.*)\]", reason)
    if literal:
        reason = "expected one of " + literal.group(1).replace("'", "")
    if "could not convert string to float" in reason:
        reason = "expected a number"
    reason = re.sub(r"<class '(\w+)'>", r"\1", reason).replace("Expected a ", "expected ")
    return f"{flag} {given}: {reason}" if given is not None else f"{flag}: {reason}"


def _parse(parser, argv: list[str]):
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(list(map(str, argv)))
    except ArgumentError as exc:
        raise UsageError(parse_error_line(str(exc))) from None


def _plain(value):
    # jsonargparse's restricted types (and Seed) are float and int subclasses; config.yaml wants plain ones
    if isinstance(value, float):
        return float(value)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _from_namespace(ns) -> TrainConfig:
    values = ns.as_dict()
    hparams = {k: _plain(values.get(k)) for k in _hparam_keys()}
    fields = {f.name: _plain(values[f.name]) for f in dataclasses.fields(TrainConfig) if f.name != "hparams"}
    return TrainConfig(**fields, hparams=hparams)


def parse_config(argv: list[str], parser=None) -> TrainConfig:
    """``xcent train`` flags (``--config`` files included) -> a config as given (not
    resolved). Raises UsageError (one line naming the flag) on bad input."""
    return _from_namespace(_parse(parser or train_parser(), argv))


def config_from_argv(argv: list[str], parser=None) -> TrainConfig:
    """``xcent train`` flags (``--config`` files included) -> a resolved config.
    Raises UsageError (one line naming the flag) on bad input."""
    return resolve(parse_config(argv, parser))


def config_from_dict(values: dict) -> TrainConfig:
    """A mapping of settings (keys as fields, or as flags with dashes; e.g. a loaded
    ``config.yaml``) -> a resolved config, typed and validated as the flags are."""
    from jsonargparse import ArgumentError

    keys = set(train_keys())
    cleaned = {}
    for key, value in values.items():
        k = str(key).lstrip("-").replace("-", "_")
        if k not in keys:
            raise UsageError(f"--{k.replace('_', '-')}: not an xcent train setting")
        cleaned[k] = value
    try:
        ns = train_parser().parse_object(cleaned)
    except ArgumentError as exc:
        raise UsageError(parse_error_line(str(exc))) from None
    return resolve(_from_namespace(ns))


# ----------------------------------------------------------------------------- validation


def resolve(config: TrainConfig) -> TrainConfig:
    """Validate ``config`` and fill in the algorithm's tuned hyper-parameters (ranges and
    defaults from the registry; the keys it does not use become None) and the run
    name; returns a new config. Raises UsageError naming the flag."""
    c = config
    algorithm = str(c.algorithm).lower()
    if algorithm not in losses.REGISTRY:
        raise UsageError(f"--algorithm {c.algorithm}: unknown; choose one of {', '.join(losses.REGISTRY)}")
    if c.batch_size < 2:
        raise UsageError(f"--batch-size {c.batch_size}: must be at least 2 (a step needs negatives)")
    if not 1 <= c.epochs <= MAX_EPOCHS:
        raise UsageError(f"--epochs {c.epochs}: must be in [1, {MAX_EPOCHS}]")
    check_seed(c.seed)
    if c.save_frequency < 1:
        raise UsageError(f"--save-frequency {c.save_frequency}: must be at least 1")
    if not 0 <= c.warmup_epochs < c.epochs:
        raise UsageError(f"--warmup-epochs {c.warmup_epochs}: must be in [0, --epochs)")
    if not 0.0 <= c.momentum < 1.0:
        raise UsageError(f"--momentum {c.momentum}: must be in [0, 1)")
    if not (c.weight_decay >= 0.0 and math.isfinite(c.weight_decay)):
        raise UsageError(f"--weight-decay {c.weight_decay}: must be a number >= 0")
    if not 0.0 < c.dist_timeout <= MAX_TIMEOUT_SECONDS:
        raise UsageError(f"--dist-timeout {c.dist_timeout}: must be a number of seconds in "
                         f"(0, {MAX_TIMEOUT_SECONDS:g}]")
    names = [n.strip().lower() for n in str(c.logger).split(",") if n.strip()]
    for n in names:
        if n not in LOGGERS:
            raise UsageError(f"--logger {n}: unknown logger; choose from {', '.join(LOGGERS)}")
        check_available(n)
    if c.log_every_steps < 0:
        raise UsageError(f"--log-every-steps {c.log_every_steps}: must be >= 0 (0: no step log)")
    if c.check_every_steps < 1:
        raise UsageError(f"--check-every-steps {c.check_every_steps}: must be at least 1")
    parse_threads(c.threads)
    if c.train_eval_size < 0:
        raise UsageError(f"--train-eval-size {c.train_eval_size}: must be >= 0 (0 = all training rows)")
    if c.eval_chunk_rows < 1:
        raise UsageError(f"--eval-chunk-rows {c.eval_chunk_rows}: must be at least 1")
    if c.name is not None:
        check_run_name(c.name)
    if not 0 < c.lr_search_budget <= 10:
        raise UsageError(f"--lr-search-budget {c.lr_search_budget}: must be in (0, 10] (a share of an epoch)")
    keys = _hparam_keys()
    auto = c.hparams.get("lr") == "auto"  # chosen before training (xcent.train, xcent.lr_search)
    try:
        own = losses.resolve_hparams(algorithm, {k: c.hparams.get(k) for k in keys if not (auto and k == "lr")})
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    hparams = {k: own.get(k) for k in keys}
    if auto:
        hparams["lr"] = "auto"
    return c.replace(algorithm=algorithm, hparams=hparams,
                     logger=",".join(["jsonl"] + [n for n in dict.fromkeys(names) if n != "jsonl"]),
                     name=c.name if c.name is not None else algorithm)

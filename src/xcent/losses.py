"""The six training algorithms: per-row dual state `nu` and the minibatch surrogate.

Reference: Wei, Zhou, Wang, Lin, Yang (2026), "A Geometry-Aware Efficient Algorithm
for Compositional Entropic Risk Minimization"; the specification is `docs/algorithms.md`.

Notation (one minibatch of B rows, K distinct labels, m = K - 1):

* ``logits[i, j] = z_ij = (w_{U_j} - w_{y_i}) . x_i``, ``-inf`` where ``U_j == y_i``;
  every row has exactly ``m`` finite entries.
* ``log s_i = logsumexp_j z_ij - log m``: the in-batch estimate of
  ``log g_i(W) = log E_j exp(z_ij)``.
* ``nu_i``: one dual per training row, ``nu_i ~ log g_i(W)`` at the optimum. A row
  starts *unset* (explicit mask, never the ``nu == 0`` marker); its first visit sets
  ``nu_i = log s_i`` (softplus: ``log q_i`` at ``nu = 0``), and that value is the one
  used for the step's gradient; no dual step is taken on a first visit.
* ``G_ij = dL/dz_ij``: the gradient weights of the surrogate ``L``; the classifier
  turns them into sparse row updates (see :mod:`xcent.classifier`).

Every algorithm is a small module with one pure rule, ``weights(logits, index) ->
G``, which updates ``nu`` of the batch rows in place (no autograd). ``forward``
returns a scalar surrogate whose autograd gradient with respect to ``logits`` is
exactly ``G`` (a straight-through construction: the value is the surrogate, the
gradient is the closed form), so the modules drop into ordinary PyTorch code.

Everything is computed in log space: ``exp`` is only taken of differences that the
algorithm keeps bounded, and where the mathematics itself is unbounded (an ASGD
dual far below ``log s``) the exponent is saturated at :func:`max_exponent` so the
result stays finite; the trainer then stops with a clear divergence message
instead of writing NaN.

No step reads a value back from the device (see :mod:`xcent.sync`): ``index`` may be
given on the host (the trainer does), rare paths are branch-free, and what softplus
must know about first visits comes from a host mirror of ``nu_set``
(:meth:`Algorithm.visited`), which every algorithm keeps in step with its writes.

The registry (:data:`REGISTRY`, one :class:`AlgorithmSpec` per algorithm, in the
paper's legend order) is the one place that describes an algorithm to the rest of
xcent: its class, tuned defaults, hyper-parameters (flag, config key, valid range,
help) and its legend label/colour/marker. :func:`build`, the ``xcent train`` flags,
``xcent compare``/``plot`` and the tests read it. Adding an algorithm is one class
plus one :func:`register` call (``docs/adding-an-algorithm.md``).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sync import host_copy, to_device, to_host

__all__ = [
    "ALGORITHMS",
    "DEFAULTS",
    "REGISTRY",
    "Algorithm",
    "AlgorithmSpec",
    "HParam",
    "HParamFlag",
    "asgd_dual_step",
    "asgd_rate",
    "build",
    "get",
    "hyperparameters",
    "log_row_stat",
    "max_exponent",
    "register",
    "resolve_hparams",
    "scent_dual_step",
    "sox_dual_step",
    "sox_rate",
    "unregister",
    "validate",
]


def max_exponent(dtype: torch.dtype) -> float:
    """Largest exponent we let ``exp`` see: half of log(max float) (44 for float32,
    354 for float64), so that a sum of B*m such terms times a feature value still
    fits the dtype. Never reached by SCENT, SOX, softplus or BSGD in practice."""
    return 0.5 * math.log(torch.finfo(dtype).max)


def _saturated_exp(x: Tensor) -> Tensor:
    return torch.exp(x.clamp(max=max_exponent(x.dtype)))


def log_row_stat(logits: Tensor) -> Tensor:
    """``log s_i = logsumexp_j z_ij - log m`` for each row (shape (B,))."""
    m = logits.shape[1] - 1
    return torch.logsumexp(logits, dim=1) - math.log(m)


# --------------------------------------------------------------------------- schedules


def sox_rate(gamma: float, epoch: int, epochs: int) -> float:
    """SOX moving-average weight ``r_e = gamma + (1 - gamma) (1 + cos(pi e / E)) / 2``:
    about 1 in epoch 1, ``gamma`` at epoch E. ``gamma == 0`` selects the default
    ``4.177 E^-0.7265``."""
    if gamma == 0:
        gamma = 4.177 * epochs ** -0.7265
    return gamma + (1.0 - gamma) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def asgd_rate(gamma: float, epoch: int, epochs: int) -> float:
    """ASGD-family dual step size ``r_e = gamma (1 + cos(pi e / E)) / 2`` (0 at epoch E)."""
    return gamma * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


# --------------------------------------------------------------------------- dual steps


def scent_dual_step(nu: Tensor, log_s: Tensor, gamma: float) -> Tensor:
    """SCENT: one stochastic proximal mirror-descent step on ``nu``.

    With ``phi(nu) = exp(-nu)`` and step ``alpha = exp(gamma)`` the proximal problem
    ``min_v  v + s e^{-v} + (1/alpha) D_phi(v, nu)`` has the closed form

        nu_new = nu + log(1 + alpha s) - log(1 + alpha e^nu)
               = nu + softplus(gamma + log s) - softplus(gamma + nu),

    i.e. ``e^{nu_new} = (1 - r) e^nu + r s`` with ``r = sigmoid(gamma + nu)``: a
    convex combination, so ``nu`` stays between the ``log s`` values it has seen.
    """
    zero = torch.zeros((), dtype=nu.dtype, device=nu.device)
    return nu + torch.logaddexp(zero, gamma + log_s) - torch.logaddexp(zero, gamma + nu)


def sox_dual_step(nu: Tensor, log_s: Tensor, rate: float) -> Tensor:
    """SOX: ``nu_new = log((1 - r) e^nu + r s)``, in log space."""
    if rate >= 1.0:
        return log_s.clone()
    return torch.logaddexp(nu + math.log1p(-rate), log_s + math.log(rate)) if rate > 0 else nu.clone()


def asgd_dual_step(nu: Tensor, log_stat: Tensor, rate: float) -> Tensor:
    """ASGD: one SGD step on ``nu + s e^{-nu}``: ``nu_new = nu - r (1 - s e^{-nu})``.

    ``log_stat`` is ``log s`` (or ``log q`` for the softplus variant). The ratio
    ``s e^{-nu}`` is unbounded when ``nu`` lags far below ``log s``: this is the
    instability the paper attributes to ASGD; it is saturated, not hidden.
    """
    return nu - rate * (1.0 - _saturated_exp(log_stat - nu))


# --------------------------------------------------------------------------- modules


class Algorithm(nn.Module):
    """Base of the algorithms: per-row dual storage (``nu`` + explicit set-mask), the
    epoch schedule, and the step shared by the dual algorithms.

    A dual algorithm implements :meth:`dual_step` (the update of a revisited row and
    which dual its gradient uses); the base does the rest of :meth:`weights`: one
    ``exp`` pass over the logits (``log s`` and ``G`` share it), first visits set to
    ``log s``, the write-back, ``G = exp(z - nu_grad) / (B m)`` and the surrogate
    value. An algorithm whose surrogate is not the dual form (softplus, BSGD)
    overrides :meth:`weights` and :meth:`surrogate` instead.

    Public state, all set here: ``nu``/``nu_set`` (buffers, so ``state_dict()``
    carries them); ``value`` (0-dim tensor, the surrogate of the last step, NaN
    before one); ``overflow`` (0-dim bool tensor: the last step had to saturate an
    exponent, which the trainer treats as divergence; None for algorithms that
    cannot saturate); ``grad_nu`` (the batch duals the last step's gradient used;
    None for BSGD); ``epoch``/``epochs`` (the schedule position, None until set).
    ``nu`` is held in the wider of float32 and the logits dtype, so float64
    callers get float64 duals.
    """

    name = ""
    #: True when the dual step size follows the epoch schedule: then a step before
    #: :meth:`set_epoch` raises instead of silently using a rate of 0.
    scheduled = False

    def __init__(self, num_samples: int, dtype: torch.dtype = torch.float32, epochs: int | None = None):
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        self.num_samples = int(num_samples)
        # NaN marks "unset" too, so that a bug reading an unset dual is loud.
        self.register_buffer("nu", torch.full((num_samples,), float("nan"), dtype=dtype))
        self.register_buffer("nu_set", torch.zeros(num_samples, dtype=torch.bool))
        self.epoch: int | None = None
        self.epochs: int | None = None if epochs is None else int(epochs)
        self.value: Tensor = torch.tensor(float("nan"), dtype=dtype)
        self.overflow: Tensor | None = None
        self.grad_nu: Tensor | None = None
        # host mirror of nu_set: which rows have a dual, known without a device read
        self._host_set = _HostMask(self.nu_set)

    def set_epoch(self, epoch: int, epochs: int | None = None) -> None:
        """Set the 1-based epoch (and the total, unless given to :func:`build`) that
        the dual schedule reads."""
        epochs = self.epochs if epochs is None else int(epochs)
        if epochs is None:
            raise ValueError(f"{self.name}: set_epoch({epoch}) needs the number of epochs: "
                             f"set_epoch(epoch, epochs) or build(..., epochs=E)")
        if not 1 <= epoch <= epochs:
            raise ValueError(f"epoch must be in [1, {epochs}], got {epoch}")
        self.epoch, self.epochs = int(epoch), epochs

    def _schedule(self) -> tuple[int, int]:
        """(epoch, epochs) for the dual schedule; raises before :meth:`set_epoch`."""
        if self.epoch is None:
            raise RuntimeError(f"{self.name}: the dual step size follows the epoch schedule, but no epoch is "
                               f"set; call set_epoch(epoch, epochs) before the first step")
        return self.epoch, self.epochs

    # -- helpers ------------------------------------------------------------
    def _device_index(self, index: Tensor) -> Tensor:
        """``index`` where the duals are: a host index is copied without a sync."""
        return index if index.device == self.nu.device else index.to(self.nu.device, non_blocking=True)

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda() replace nu_set by a copy with the same values: the host mirror stays valid
        valid = self._host_set.valid(self.nu_set)
        out = super()._apply(fn, *args, **kwargs)
        if valid:
            self._host_set.rebind(self.nu_set)
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if self.nu_set.device.type == "cpu":  # refresh the mirror now, where it costs no sync
            self._host_set.get(self.nu_set)

    def visited(self, index: Tensor) -> Tensor:
        """Host (B,) bool: whether each row of ``index`` has a dual (``nu_set``), from the
        host mirror: no device read for a host ``index`` (a device one costs one)."""
        return self._host_set.get(self.nu_set)[to_host(index)]

    def write_duals(self, index: Tensor, nu: Tensor, visited: Tensor | bool) -> None:
        """``nu[index] = nu``, ``nu_set[index] = visited`` from outside a step (e.g.
        :class:`xcent.SparseSoftmaxHead` undoing and replaying a forward's dual write),
        keeping the host mirror of ``nu_set`` in step. ``visited``: a bool or a host
        (B,) bool tensor; ``index``: host or device (a device one costs one read)."""
        index_host = to_host(index)
        valid = self._host_set.valid(self.nu_set)
        index = self._device_index(index)
        self.nu[index] = nu.to(self.nu.dtype)
        flags = visited if isinstance(visited, bool) else to_device(self.nu_set.device, visited)[0]
        self.nu_set[index] = flags
        if valid:
            self._host_set.mark(self.nu_set, index_host, visited)

    def _read_nu(self, index: Tensor, init: Tensor) -> tuple[Tensor, Tensor]:
        """Old duals of the batch rows, with unset rows replaced by ``init``.
        Returns ``(nu_old, first_visit)``."""
        if self.nu.dtype != init.dtype and init.dtype == torch.float64:
            self.nu = self.nu.to(torch.float64)
        first = ~self.nu_set[index]
        nu_old = torch.where(first, init, self.nu[index].to(init.dtype))
        return nu_old, first

    def _write_nu(self, index: Tensor, nu_new: Tensor, index_host: Tensor | None) -> None:
        # Rows repeated within a batch get identical values, so the write is exact.
        valid = index_host is not None and self._host_set.valid(self.nu_set)
        self.nu[index] = nu_new.to(self.nu.dtype)
        self.nu_set[index] = True
        if valid:  # else the mirror is left stale: rebuilt, with one read, when next asked
            self._host_set.mark(self.nu_set, index_host, True)

    # -- the rule -----------------------------------------------------------
    def dual_step(self, nu: Tensor, log_s: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """``(nu_new, nu_grad)`` of revisited rows: the updated duals and the duals
        the gradient uses (``nu`` itself or ``nu_new``). First visits are handled by
        the caller (both become ``log s``)."""
        raise NotImplementedError

    def surrogate(self, logits: Tensor, nu: Tensor | None) -> Tensor:
        """The minibatch surrogate at fixed duals ``nu`` (B,), differentiable in
        ``logits``: ``G`` of a step is its gradient at ``nu = grad_nu``. Default: the
        dual form ``mean_i(nu_i + s_i e^{-nu_i} - 1)``."""
        return _dual_value(log_row_stat(logits), nu)

    def weights(self, logits: Tensor, index: Tensor) -> Tensor:
        """Update the duals of ``index`` and return ``G`` (B, K) (no autograd)."""
        if self.scheduled:
            self._schedule()
        index_host = index if index.device.type == "cpu" else None
        index = self._device_index(index)
        rows = _RowExp(logits)
        log_s = rows.log_row_stat()
        nu_old, first = self._read_nu(index, log_s)
        nu_new, nu_grad = self.dual_step(nu_old, log_s)
        nu_new = torch.where(first, log_s, nu_new)
        nu_grad = torch.where(first, log_s, nu_grad)
        self._write_nu(index, nu_new, index_host)
        self.grad_nu = nu_grad
        self.value = _dual_value(log_s, nu_grad)
        return self._exp_weights(rows, nu_grad)

    # -- what the reference implementation logs (read on logging steps only) --
    def reference_loss(self, num_columns: int) -> Tensor:
        """The quantity the reference implementation (Optimization-AI/SCENT,
        `xc/loss.py`) logs as ``loss`` for the last step, a 0-dim tensor (no sync):
        ``mean_i (1/m) sum_j exp(z_ij - nu_i)`` at the duals of the gradient, i.e.
        ``mean_i s_i e^{-nu_i}``: 1 when every ``nu_i = log s_i``. Computed from the
        dual-form surrogate ``value = mean_i(nu_i + s_i e^{-nu_i} - 1)`` as
        ``value - mean(grad_nu) + 1``. ``num_columns``: K of the last batch."""
        return self.value - self.grad_nu.mean() + 1.0

    def dual_rate(self, nu_old: Tensor) -> Tensor | float | None:
        """The weight of the last dual step for rows whose old duals are ``nu_old``,
        which the reference implementation logs as ``gamma/mean`` etc.: SCENT's
        per-row ``sigmoid(gamma + nu)``, the epoch's rate of a scheduled algorithm
        (a float), None without a dual step."""
        return getattr(self, "rate", None)

    def _exp_weights(self, rows: _RowExp, nu: Tensor) -> Tensor:
        """``G = exp(z - nu) / (B m)`` from the row exponentials of the logits,
        recording in ``self.overflow`` (a device flag, never read here) whether an
        exponent had to be saturated, i.e. the exact arithmetic leaves the dtype's
        safe range: the trainer treats that as divergence, where the reference
        implementation's code would start producing inf/NaN.
        (``max_ij (z_ij - nu_i) = max_i (M_i - nu_i)``: B values, not a pass over the
        (B, K) matrix.)"""
        shift = rows.row_max - nu
        self.overflow = shift.amax() > max_exponent(shift.dtype)
        return rows.weights(shift)

    def forward(self, logits: Tensor, index: Tensor) -> Tensor:
        """Update the duals of ``index`` and return the surrogate loss.

        The returned scalar's gradient with respect to ``logits`` is exactly ``G``
        (zero at the excluded ``-inf`` entries)."""
        _check_batch(logits, index)
        with torch.no_grad():
            G = self.weights(logits.detach(), index)
            value = self.value
        finite = torch.isfinite(logits)
        z = torch.where(finite, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        return value + (G * (z - z.detach())).sum()


def _check_batch(logits: Tensor, index: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (B, K) with K >= 2, got {tuple(logits.shape)}")
    if index.shape != (logits.shape[0],):
        raise ValueError(f"index must be (B,) = ({logits.shape[0]},), got {tuple(index.shape)}")


class _RowExp:
    """One pass of ``exp`` over the (B, K) logits, shared by ``log s`` and ``G``.

    ``E_ij = exp(z_ij - M_i)`` with ``M_i = max_j z_ij`` (finite: a row has m >= 1
    finite entries) gives ``log s_i = log sum_j E_ij + M_i - log m``, and then
    ``exp(z_ij - nu_i) = E_ij exp(M_i - nu_i)``: the gradient weights are a per-row
    rescaling of ``E``, in place, instead of a second exp over the matrix. Where
    ``M_i - nu_i`` exceeds :func:`max_exponent` the row's scale is saturated:
    ``G_ij = E_ij exp(max_exponent) / (B m)``, so the row's largest weight is
    ``exp(max_exponent) / (B m)`` and the others keep their ratios to it. This is one
    clamp of B values, branch-free (no device read to decide whether a row needs
    it), and it changes nothing when no exponent saturates; where one does, the
    algorithm has left the dtype's range (``overflow``) and the trainer stops."""

    def __init__(self, logits: Tensor):
        self.logits = logits
        self.row_max = logits.amax(dim=1)
        self.E = torch.exp(logits - self.row_max[:, None])
        self.log_sum = torch.log(self.E.sum(dim=1))

    def log_row_stat(self) -> Tensor:
        return self.log_sum + self.row_max - math.log(self.logits.shape[1] - 1)

    def weights(self, shift: Tensor) -> Tensor:
        """``G_ij = exp(z_ij - nu_i) / (B m)`` (saturated as above), given
        ``shift = M - nu``; consumes ``E``."""
        B, K = self.logits.shape
        scale = 1.0 / (B * (K - 1))
        return self.E.mul_((_saturated_exp(shift) * scale)[:, None])


class _HostMask:
    """A host copy of a bool buffer (``nu_set``), so that branching on it needs no
    device read. Valid while the buffer is the same tensor at the same in-place
    version (``Tensor._version``, which every in-place write bumps: a
    ``load_state_dict``, a user's ``nu_set.fill_``); otherwise rebuilt with one read
    (:func:`xcent.sync.host_copy`). ``.to()`` carries it over (:meth:`rebind`).
    Writes through ``.data`` or NumPy views bypass the version and are not seen."""

    def __init__(self, buf: Tensor):
        # a new buffer is all False (unset): known without reading it
        self.mask = torch.zeros(buf.shape, dtype=torch.bool)
        self.rebind(buf)

    def valid(self, buf: Tensor) -> bool:
        return self._src() is buf and self._version == buf._version

    def rebind(self, buf: Tensor) -> None:
        self._src, self._version = weakref.ref(buf), buf._version

    def get(self, buf: Tensor) -> Tensor:
        if not self.valid(buf):
            self.mask = host_copy(buf)
            self.rebind(buf)
        return self.mask

    def __getstate__(self):  # a copy (pickle, deepcopy) re-reads its buffer once
        return {"mask": self.mask, "_version": -1}

    def __setstate__(self, state):
        self.mask, self._version = state["mask"], state["_version"]
        self._src = lambda: None

    def mark(self, buf: Tensor, index_host: Tensor, value) -> None:
        """``buf[index] = value`` was just written on the device (one in-place write
        to a buffer this mirror was valid for): the same here."""
        self.mask[index_host] = value
        self._version = buf._version


def _dual_value(log_s: Tensor, nu: Tensor) -> Tensor:
    """Mean of ``nu + s e^{-nu} - 1``: the dual form of ``log s`` (equal to it at
    ``nu = log s``, above it otherwise), whose z-gradient at fixed nu is
    ``exp(z - nu) / (B m)``."""
    return (nu + _saturated_exp(log_s - nu) - 1.0).mean()


class SCENT(Algorithm):
    """SCENT: stochastic proximal mirror descent on ``nu`` (:func:`scent_dual_step`,
    ``alpha = e^gamma``, no schedule), gradient with the **new** dual:
    ``G_ij = exp(z_ij - nu_new_i) / (B m)``."""

    name = "scent"

    def __init__(self, num_samples: int, *, gamma: float, dtype=torch.float32, epochs: int | None = None):
        super().__init__(num_samples, dtype, epochs)
        self.gamma = float(gamma)

    def dual_step(self, nu: Tensor, log_s: Tensor) -> tuple[Tensor, Tensor]:
        nu_new = scent_dual_step(nu, log_s, self.gamma)
        return nu_new, nu_new

    def dual_rate(self, nu_old: Tensor) -> Tensor:
        """``r = sigmoid(gamma + nu_old)``: ``e^{nu_new} = (1 - r) e^nu + r s``."""
        return torch.sigmoid(self.gamma + nu_old)


class SOX(Algorithm):
    """SOX: moving average ``nu_new = log((1 - r_e) e^nu + r_e s)`` with
    :func:`sox_rate`; gradient with the **new** dual, as SCENT."""

    name = "sox"
    scheduled = True

    def __init__(self, num_samples: int, *, gamma: float, dtype=torch.float32, epochs: int | None = None):
        super().__init__(num_samples, dtype, epochs)
        self.gamma = float(gamma)

    @property
    def rate(self) -> float:
        return sox_rate(self.gamma, *self._schedule())

    def dual_step(self, nu: Tensor, log_s: Tensor) -> tuple[Tensor, Tensor]:
        nu_new = sox_dual_step(nu, log_s, self.rate)
        return nu_new, nu_new


class ASGD(Algorithm):
    """ASGD: SGD on the dual, ``nu_new = nu - r_e (1 - s e^{-nu})`` with
    :func:`asgd_rate`; gradient with the **old** dual:
    ``G_ij = exp(z_ij - nu_old_i) / (B m)``."""

    name = "asgd"
    scheduled = True

    def __init__(self, num_samples: int, *, gamma: float, dtype=torch.float32, epochs: int | None = None):
        super().__init__(num_samples, dtype, epochs)
        self.gamma = float(gamma)

    @property
    def rate(self) -> float:
        return asgd_rate(self.gamma, *self._schedule())

    def dual_step(self, nu: Tensor, log_s: Tensor) -> tuple[Tensor, Tensor]:
        return asgd_dual_step(nu, log_s, self.rate), nu


class UMax(ASGD):
    """U-max: the ASGD step, then a reset ``nu_new = log s`` wherever
    ``nu_new < log s - delta``; gradient with the **new** dual (after the reset).
    ``delta = inf`` is exactly ASGD, old dual in the gradient included."""

    name = "umax"

    def __init__(self, num_samples: int, *, gamma: float, delta: float, dtype=torch.float32,
                 epochs: int | None = None):
        super().__init__(num_samples, gamma=gamma, dtype=dtype, epochs=epochs)
        self.delta = float(delta)

    def dual_step(self, nu: Tensor, log_s: Tensor) -> tuple[Tensor, Tensor]:
        nu_new, nu_old = super().dual_step(nu, log_s)
        if math.isinf(self.delta):  # no reset can fire: plain ASGD
            return nu_new, nu_old
        nu_new = torch.where(nu_new < log_s - self.delta, log_s, nu_new)
        return nu_new, nu_new


class ASGDSoftplus(Algorithm):
    """ASGD on the softplus-smoothed objective, ``rho`` > 0.

    ``e_ij = exp(z_ij - nu_i)``, ``q_i = (1/m) sum_j e_ij / (1 + rho e_ij)``,
    ``nu_new = nu - r_e (1 - q_i)`` (:func:`asgd_rate`), surrogate
    ``L = (1/B) sum_i (1/m) sum_j (1/rho) log(1 + rho e_ij)``, so
    ``G_ij = e_ij / (1 + rho e_ij) / (B m)`` with the **old** dual. First visit:
    ``nu = log q`` computed at ``nu = 0``. Naturally bounded: ``q <= 1/rho``.
    The reference implementation averages over K columns; we use m (a factor (K-1)/K).
    """

    name = "softplus"
    scheduled = True

    def __init__(self, num_samples: int, *, gamma: float, rho: float, dtype=torch.float32,
                 epochs: int | None = None):
        super().__init__(num_samples, dtype, epochs)
        if not rho > 0:
            raise ValueError(f"softplus rho must be > 0, got {rho}")
        self.gamma, self.rho = float(gamma), float(rho)

    @property
    def rate(self) -> float:
        return asgd_rate(self.gamma, *self._schedule())

    def _shifted(self, logits: Tensor, nu: Tensor) -> Tensor:
        """``x_ij = z_ij - nu_i + log rho``: then ``e/(1 + rho e) = sigmoid(x)/rho``
        with ``e = exp(z - nu)``, one stable op instead of exp, softplus and a
        division."""
        return (logits - nu[:, None]).add_(math.log(self.rho))

    def _log_q(self, x: Tensor) -> Tensor:
        """``log q_i = log((1/m) sum_j sigmoid(x_ij)/rho)``, in log space."""
        m = x.shape[1] - 1
        return torch.logsumexp(F.logsigmoid(x), dim=1) - (math.log(self.rho) + math.log(m))

    def _value(self, x: Tensor) -> Tensor:
        # (1/rho) log(1 + rho e) = softplus(x) / rho summed over valid entries
        # (softplus(-inf) = 0; F.softplus returns x above x = 20, where the true value
        # differs by < 2.1e-9: below float32 rounding of a value over 20)
        B, K = x.shape
        return F.softplus(x).sum() / (self.rho * B * (K - 1))

    def surrogate(self, logits: Tensor, nu: Tensor | None) -> Tensor:
        return self._value(self._shifted(logits, nu))

    def reference_loss(self, num_columns: int) -> Tensor:
        """The reference's logged ``loss`` averages the softplus terms over all K
        columns (the excluded one adds 0) where ``value`` averages over m = K - 1."""
        return self.value * ((num_columns - 1) / num_columns)

    def weights(self, logits: Tensor, index: Tensor) -> Tensor:
        self._schedule()
        B, K = logits.shape
        m = K - 1
        # which rows are on a first visit, from the host mirror of nu_set: no device read
        # (a device index costs one read, to look it up)
        index_host = to_host(index)
        fresh = ~self.visited(index_host)
        any_fresh, all_fresh = bool(fresh.any()), bool(fresh.all())
        index = self._device_index(index)
        # log q at nu = 0 only initialises first visits, log q at the old nu only
        # steps revisits: each is computed only when some row needs it.
        if any_fresh:
            log_q0 = self._log_q(self._shifted(logits, torch.zeros(B, dtype=logits.dtype, device=logits.device)))
        else:
            log_q0 = torch.zeros(B, dtype=logits.dtype, device=logits.device)
        nu_old, first = self._read_nu(index, log_q0)
        x = self._shifted(logits, nu_old)
        terms = torch.sigmoid(x)  # rho e/(1 + rho e): both q (revisits) and G need it
        if all_fresh:
            nu_new = log_q0
        else:
            # the dual step needs q itself, not its log: q = sum_j sigmoid(x_ij) / (rho m)
            q = terms.sum(dim=1) / (self.rho * m)
            nu_new = torch.where(first, log_q0, nu_old - self.rate * (1.0 - q))
        self._write_nu(index, nu_new, index_host)
        self.grad_nu = nu_old
        self.value = self._value(x)
        return terms.mul_(1.0 / (self.rho * B * m))


class BSGD(Algorithm):
    """BSGD: biased SGD on the primal, no dual. ``L = (1/B) sum_i logsumexp_j z_ij``,
    so ``G_ij = softmax_j(z_i)_j / B``.

    ``nu``/``nu_set`` exist (all unset, never written) so that every algorithm has
    the same state layout; there is no schedule."""

    name = "bsgd"

    def surrogate(self, logits: Tensor, nu: Tensor | None) -> Tensor:
        return torch.logsumexp(logits, dim=1).mean()

    def reference_loss(self, num_columns: int) -> Tensor:
        """The reference logs the in-batch log-sum-exp itself: ``value``."""
        return self.value

    def dual_rate(self, nu_old: Tensor) -> None:
        return None

    def weights(self, logits: Tensor, index: Tensor) -> Tensor:
        rows = _RowExp(logits)
        self.value = (rows.log_sum + rows.row_max).mean()
        # softmax / B = E / (B sum_j E): a per-row rescaling of E, in place
        return rows.E.div_((rows.E.sum(dim=1) * logits.shape[0])[:, None])


# --------------------------------------------------------------------------- the registry


def _fmt_number(value: float) -> str:
    return format(value, "g")


@dataclass(frozen=True)
class HParam:
    """One hyper-parameter of an algorithm: its keyword for the class (``name``), its
    config key (``key``, default ``name``; the ``xcent train`` flag is ``--key`` with
    dashes), tuned default, help, and valid range ``[low, high]`` (``low_open`` /
    ``high_open`` exclude an end; infinite values are refused unless ``inf_ok``,
    which admits ``+inf``; NaN is always refused). ``argument=False`` marks a value
    the trainer reads rather than the class (the learning rate)."""

    name: str
    default: float
    help: str
    key: str = ""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    inf_ok: bool = False
    argument: bool = True

    def __post_init__(self):
        if not self.key:
            object.__setattr__(self, "key", self.name)

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def range_text(self) -> str:
        """The valid range in words, e.g. ``>= 0 and finite``, ``in [0, 1]``."""
        lo, hi = self.low, self.high
        if lo == -math.inf and hi == math.inf:
            text = "a finite number"
        elif hi == math.inf:
            text = f"{'>' if self.low_open else '>='} {_fmt_number(lo)}"
        elif lo == -math.inf:
            text = f"{'<' if self.high_open else '<='} {_fmt_number(hi)}"
        else:
            text = (f"in {'(' if self.low_open else '['}{_fmt_number(lo)}, {_fmt_number(hi)}"
                    f"{')' if self.high_open else ']'}")
        if hi == math.inf and lo != -math.inf:
            text += " or inf" if self.inf_ok else " and finite"
        return text

    def contains(self, value: float) -> bool:
        if math.isnan(value) or (math.isinf(value) and not (self.inf_ok and value > 0)):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def check(self, value, algorithm: str) -> float:
        """``value`` as a float, or ValueError with one line naming the flag."""
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.flag} {value}: expected a number") from None
        if not self.contains(number):
            raise ValueError(f"{self.flag} {_fmt_number(number)}: must be {self.range_text()} for {algorithm}")
        return number


def _lr(default: float) -> HParam:
    return HParam("lr", default, "learning rate of the per-epoch cosine schedule", low=0.0, low_open=True,
                  argument=False)


@dataclass(frozen=True)
class AlgorithmSpec:
    """Everything xcent knows about one algorithm.

    ``cls(num_samples, dtype=..., epochs=..., **{h.name: value})`` builds it;
    ``lr`` is its tuned learning rate and ``hparams`` its own hyper-parameters
    (with tuned defaults); ``label``/``color``/``marker``/``linestyle`` draw it in
    ``xcent compare``/``plot`` (``color`` None: one from a spare palette);
    ``summary`` is a one-line description for help and docs tables."""

    name: str
    cls: type
    lr: float
    hparams: tuple[HParam, ...] = ()
    label: str = ""
    color: str | None = None
    marker: str = "o"
    linestyle: str = "-"
    summary: str = ""
    parameters: tuple[HParam, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.label:
            object.__setattr__(self, "label", self.name)
        object.__setattr__(self, "parameters", (_lr(self.lr),) + tuple(self.hparams))

    @property
    def defaults(self) -> dict[str, float]:
        """Tuned values by keyword name (``lr`` first): ``{"lr": 5.0, "gamma": 12.0}``."""
        return {p.name: p.default for p in self.parameters}

    @property
    def keys(self) -> tuple[str, ...]:
        """Config keys of the hyper-parameters it uses, ``lr`` first."""
        return tuple(p.key for p in self.parameters)


#: The registered algorithms, name -> spec, in the paper's legend order.
REGISTRY: dict[str, AlgorithmSpec] = {}

#: Colours for registered algorithms that name none (in registration order).
SPARE_COLORS = ("#17becf", "#bcbd22", "#e377c2", "#7f7f7f", "#393b79", "#637939")


def register(spec: AlgorithmSpec) -> AlgorithmSpec:
    """Add ``spec`` to :data:`REGISTRY` (at the end of the legend order). A config key
    already used by another algorithm must mean the same keyword there, so that one
    ``xcent train`` flag maps to one class argument."""
    name = spec.name.lower()
    if name != spec.name or not name.isidentifier():
        raise ValueError(f"algorithm name {spec.name!r}: use a lower-case identifier")
    if name in REGISTRY:
        raise ValueError(f"algorithm {name!r} is already registered")
    for p in spec.parameters:
        if not p.contains(p.default):
            raise ValueError(f"{name}: default {p.name} = {p.default} is outside its range {p.range_text()}")
        for other in REGISTRY.values():
            for q in other.parameters:
                if q.key == p.key and q.name != p.name:
                    raise ValueError(f"{name}: config key {p.key!r} is {other.name}'s {q.name!r}, not {p.name!r}")
    if spec.color is None:
        used = {s.color for s in REGISTRY.values()}
        spare = [c for c in SPARE_COLORS if c not in used] or list(SPARE_COLORS)
        spec = replace(spec, color=spare[0])
    REGISTRY[name] = spec
    return spec


def unregister(name: str) -> AlgorithmSpec:
    """Remove and return an algorithm (for tests that register a temporary one)."""
    return REGISTRY.pop(name)


def get(name: str) -> AlgorithmSpec:
    """The spec of ``name`` (case-insensitive); ValueError naming the choices otherwise."""
    spec = REGISTRY.get(str(name).lower())
    if spec is None:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(REGISTRY)}")
    return spec


class _View(Mapping):
    """A read-only mapping name -> f(spec) that follows the registry."""

    def __init__(self, fn):
        self._fn = fn

    def __getitem__(self, name: str):
        return self._fn(REGISTRY[name])

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)

    def __repr__(self) -> str:
        return repr(dict(self))


#: name -> class (a view of the registry)
ALGORITHMS: Mapping[str, type] = _View(lambda spec: spec.cls)
#: name -> tuned defaults by keyword, ``{"lr": ..., "gamma": ...}`` (a view of the registry)
DEFAULTS: Mapping[str, dict[str, float]] = _View(lambda spec: spec.defaults)


@dataclass(frozen=True)
class HParamFlag:
    """One ``xcent train`` flag over all registered algorithms that use its key."""

    key: str
    flag: str
    name: str
    help: str
    inf_ok: bool
    per_algorithm: dict  # algorithm name -> HParam (its default, range and help)


def hyperparameters() -> list[HParamFlag]:
    """Every hyper-parameter flag of the registered algorithms (``lr`` first), merged by
    config key, with a help text that gives each algorithm's meaning, range and tuned
    default. The trainer's flags are these, each defaulting to None (the algorithm's
    tuned value)."""
    merged: dict[str, list[tuple[str, HParam]]] = {}
    for spec in REGISTRY.values():
        for p in spec.parameters:
            merged.setdefault(p.key, []).append((spec.name, p))
    flags = []
    for key, uses in merged.items():
        first = uses[0][1]
        if key == "lr":
            help_text = (f"{first.help}, {first.range_text()}; default: the algorithm's tuned value ("
                         + ", ".join(f"{a} {_fmt_number(p.default)}" for a, p in uses) + ")")
        else:  # algorithms that share a meaning (the same HParam) share one clause
            clauses: dict[HParam, list[str]] = {}
            for a, p in uses:
                clauses.setdefault(p, []).append(a)
            help_text = "; ".join(f"{', '.join(names)}: {p.help}, {p.range_text()}, default {_fmt_number(p.default)}"
                                  for p, names in clauses.items())
        flags.append(HParamFlag(key, first.flag, first.name, help_text, any(p.inf_ok for _, p in uses),
                                dict(uses)))
    return flags


def validate(name: str, hparams: Mapping) -> dict[str, float]:
    """Check the given hyper-parameters of algorithm ``name`` against their ranges.

    ``hparams`` maps config keys (``gamma``, ``softplus_rho``, ``umax_delta``, ``lr``)
    or class keywords (``rho``, ``delta``) to values; None values are skipped, and so
    are the hyper-parameters of other registered algorithms (a trainer may pass every
    flag to every algorithm). Returns ``{config key: float}`` of the algorithm's own
    given values. Raises ValueError with one line naming the flag."""
    spec = get(name)
    own = {p.key: p for p in spec.parameters} | {p.name: p for p in spec.parameters}
    known = {k for s in REGISTRY.values() for p in s.parameters for k in (p.key, p.name)}
    out = {}
    for k, v in hparams.items():
        if v is None:
            continue
        if k in own:
            out[own[k].key] = own[k].check(v, spec.name)
        elif k not in known:
            raise ValueError(f"unknown hyper-parameter {k!r} for {spec.name}")
    return out


def resolve_hparams(name: str, hparams: Mapping) -> dict[str, float]:
    """:func:`validate`, then the tuned defaults for what is not given: all of the
    algorithm's hyper-parameters by config key, ``lr`` first."""
    given = validate(name, hparams)
    return {p.key: given.get(p.key, p.default) for p in get(name).parameters}


def build(name: str, num_samples: int, dtype: torch.dtype = torch.float32, epochs: int | None = None,
          **hparams) -> Algorithm:
    """The algorithm ``name`` with ``num_samples`` duals.

    ``hparams`` by class keyword or config key (``gamma``, ``rho``/``softplus_rho``,
    ``delta``/``umax_delta``); missing ones take the tuned defaults, None values are
    ignored and so are other algorithms' hyper-parameters (``gamma`` for bsgd), so that
    a trainer can pass every flag to every algorithm; ``lr`` is checked but not used by
    the module. Out-of-range values raise ValueError naming the flag. A scheduled
    algorithm (sox, asgd, softplus, umax) needs :meth:`Algorithm.set_epoch` before its
    first step; ``epochs`` given here lets it be called as ``set_epoch(epoch)``."""
    spec = get(name)
    values = resolve_hparams(spec.name, hparams)
    kwargs = {p.name: values[p.key] for p in spec.parameters if p.argument}
    return spec.cls(num_samples, dtype=dtype, epochs=epochs, **kwargs)


# One object for the ASGD family's shared meaning of --gamma.
_ASGD_GAMMA = HParam("gamma", 1.0, "dual SGD step r_e = gamma (1 + cos(pi e/E))/2", low=0.0)


# The paper's legend order (BSGD first, SCENT last); colours as in its figure.
register(AlgorithmSpec(
    "bsgd", BSGD, lr=1.0, label="BSGD", color="#1f77b4", marker="o",
    summary="biased SGD on the in-batch log-sum-exp (no dual)"))
register(AlgorithmSpec(
    "asgd", ASGD, lr=0.5, label="ASGD", color="#ff7f0e", marker="s",
    hparams=(_ASGD_GAMMA,),
    summary="SGD on the dual, cosine-scheduled step"))
register(AlgorithmSpec(
    "softplus", ASGDSoftplus, lr=0.5, label="ASGD (Softplus)", color="#2ca02c", marker="^", linestyle="--",
    hparams=(_ASGD_GAMMA,
             HParam("rho", 1e-3, "softplus smoothing rho", key="softplus_rho", low=0.0, low_open=True)),
    summary="ASGD on the softplus-smoothed objective"))
register(AlgorithmSpec(
    "umax", UMax, lr=0.5, label="U-max", color="#9467bd", marker="v", linestyle=":",
    hparams=(_ASGD_GAMMA,
             HParam("delta", 1.0, "reset nu to log s when it falls more than delta below it (inf: ASGD)",
                    key="umax_delta", low=0.0, inf_ok=True)),
    summary="ASGD with a reset of lagging duals"))
register(AlgorithmSpec(
    "sox", SOX, lr=5.0, label="SOX", color="#8c564b", marker="D",
    hparams=(HParam("gamma", 1e-5, "final moving-average weight r_E (0: 4.177 E^-0.7265)", low=0.0, high=1.0),),
    summary="moving average of the row statistic, cosine-scheduled weight"))
register(AlgorithmSpec(
    "scent", SCENT, lr=5.0, label="SCENT", color="#d62728", marker="*",
    hparams=(HParam("gamma", 12.0, "log of the mirror-descent step, alpha = e^gamma"),),
    summary="stochastic proximal mirror descent on the dual (the paper's method)"))

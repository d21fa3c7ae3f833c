"""The six training algorithms: per-row dual state `nu` and the minibatch surrogate.

Reference: Wei, Zhou, Wang, Lin, Yang (2026), "A Geometry-Aware Efficient Algorithm
for Compositional Entropic Risk Minimization"; the contract is `ALGORITHMS.md`.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ALGORITHMS",
    "DEFAULTS",
    "build",
    "log_row_stat",
    "max_exponent",
    "scent_dual_step",
    "sox_dual_step",
    "asgd_dual_step",
    "sox_rate",
    "asgd_rate",
]

#: Tuned defaults of the spec (Glint360K, 50 epochs, batch 128).
DEFAULTS: dict[str, dict[str, float]] = {
    "scent": {"lr": 5.0, "gamma": 12.0},
    "sox": {"lr": 5.0, "gamma": 1e-5},
    "bsgd": {"lr": 1.0},
    "asgd": {"lr": 0.5, "gamma": 1.0},
    "softplus": {"lr": 0.5, "gamma": 1.0, "rho": 1e-3},
    "umax": {"lr": 0.5, "gamma": 1.0, "delta": 1.0},
}


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


class _DualLoss(nn.Module):
    """Per-row dual storage shared by the algorithms (``nu`` + explicit set-mask).

    Subclasses implement ``weights(logits, index) -> G``. ``nu`` is held in the
    wider of float32 and the logits dtype, so float64 callers get float64 duals.
    """

    name = ""

    def __init__(self, num_samples: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = int(num_samples)
        # NaN marks "unset" too, so that a bug reading an unset dual is loud.
        self.register_buffer("nu", torch.full((num_samples,), float("nan"), dtype=dtype))
        self.register_buffer("nu_set", torch.zeros(num_samples, dtype=torch.bool))
        self.epoch, self.epochs = 1, 1

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Set the 1-based epoch and total epochs that the dual schedule reads."""
        if not 1 <= epoch <= epochs:
            raise ValueError(f"epoch must be in [1, {epochs}], got {epoch}")
        self.epoch, self.epochs = int(epoch), int(epochs)

    # -- helpers ------------------------------------------------------------
    def _read_nu(self, index: Tensor, init: Tensor) -> tuple[Tensor, Tensor]:
        """Old duals of the batch rows, with unset rows replaced by ``init``.
        Returns ``(nu_old, first_visit)``."""
        if self.nu.dtype != init.dtype and init.dtype == torch.float64:
            self.nu = self.nu.to(torch.float64)
        first = ~self.nu_set[index]
        nu_old = torch.where(first, init, self.nu[index].to(init.dtype))
        return nu_old, first

    def _write_nu(self, index: Tensor, nu_new: Tensor) -> None:
        # Rows repeated within a batch get identical values, so the write is exact.
        self.nu[index] = nu_new.to(self.nu.dtype)
        self.nu_set[index] = True

    def _exp_weights(self, rows: _RowExp, nu: Tensor) -> Tensor:
        """``G = exp(z - nu) / (B m)`` from the row exponentials of the logits,
        recording in ``self.overflow`` (a 0-dim bool tensor) whether an exponent had
        to be saturated, i.e. the exact arithmetic leaves the dtype's safe range: the
        trainer treats that as divergence, where the seed's code would start
        producing inf/NaN. (``max_ij (z_ij - nu_i) = max_i (M_i - nu_i)``: B values,
        not a pass over the (B, K) matrix.)"""
        shift = rows.row_max - nu
        self.overflow = shift.amax() > max_exponent(shift.dtype)
        return rows.weights(nu, shift, self.overflow)

    def weights(self, logits: Tensor, index: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, logits: Tensor, index: Tensor) -> Tensor:
        """Update the duals of ``index`` and return the surrogate loss.

        The returned scalar's gradient with respect to ``logits`` is exactly ``G``
        (zero at the excluded ``-inf`` entries)."""
        _check_batch(logits, index)
        with torch.no_grad():
            G = self.weights(logits.detach(), index)
            value = self._value
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
    ``M_i - nu_i`` exceeds :func:`max_exponent` (so that the saturation of
    ``exp(z - nu)`` could bind) the row falls back to the plain formula, which keeps
    the saturated values ``exp(min(z - nu, max_exponent)) / (B m)`` exactly."""

    def __init__(self, logits: Tensor):
        self.logits = logits
        self.row_max = logits.amax(dim=1)
        self.E = torch.exp(logits - self.row_max[:, None])
        self.log_sum = torch.log(self.E.sum(dim=1))

    def log_row_stat(self) -> Tensor:
        return self.log_sum + self.row_max - math.log(self.logits.shape[1] - 1)

    def weights(self, nu: Tensor, shift: Tensor, overflow: Tensor) -> Tensor:
        """``G_ij = exp(z_ij - nu_i) / (B m)`` (saturated as above),
        given ``shift = M - nu`` and ``overflow = max(shift) > max_exponent``;
        consumes ``E``."""
        B, K = self.logits.shape
        scale = 1.0 / (B * (K - 1))
        G = self.E.mul_((torch.exp(shift) * scale)[:, None])
        if bool(overflow):  # rare (an ASGD dual far below log s): exact saturation
            over = shift > max_exponent(shift.dtype)
            G[over] = _saturated_exp(self.logits[over] - nu[over, None]) * scale
        return G


def _dual_value(log_s: Tensor, nu: Tensor) -> Tensor:
    """Mean of ``nu + s e^{-nu} - 1``: the dual form of ``log s`` (equal to it at
    ``nu = log s``, above it otherwise), whose z-gradient at fixed nu is
    ``exp(z - nu) / (B m)``."""
    return (nu + _saturated_exp(log_s - nu) - 1.0).mean()


class SCENT(_DualLoss):
    """SCENT: stochastic proximal mirror descent on ``nu`` (:func:`scent_dual_step`,
    ``alpha = e^gamma``, no schedule), gradient with the **new** dual:
    ``G_ij = exp(z_ij - nu_new_i) / (B m)``."""

    name = "scent"

    def __init__(self, num_samples: int, gamma: float = DEFAULTS["scent"]["gamma"], dtype=torch.float32):
        super().__init__(num_samples, dtype)
        self.gamma = float(gamma)

    def weights(self, logits: Tensor, index: Tensor) -> Tensor:
        rows = _RowExp(logits)
        log_s = rows.log_row_stat()
        nu_old, first = self._read_nu(index, log_s)
        nu_new = torch.where(first, log_s, scent_dual_step(nu_old, log_s, self.gamma))
        self._write_nu(index, nu_new)
        self._value = _dual_value(log_s, nu_new)
        return self._exp_weights(rows, nu_new)


class SOX(_DualLoss):
    """SOX: moving average ``nu_new = log((1 - r_e) e^nu + r_e s)`` with
    :func:`sox_rate`; gradient with the **new** dual, as SCENT."""

    name = "sox"

    def __init__(self, num_samples: int, gamma: float = DEFAULTS["sox"]["gamma"], dtype=torch.float32):
        super().__init__(num_samples, dtype)
        self.gamma = float(gamma)

    @property
    def rate(self) -> float:
        return sox_rate(self.gamma, self.epoch, self.epochs)

    def weights(self, logits: Tensor, index: Tensor) -> Tensor:
        rows = _RowExp(logits)
        log_s = rows.log_row_stat()
        nu_old, first = self._read_nu(index, log_s)
        nu_new = torch.where(first, log_s, sox_dual_step(nu_old, log_s, self.rate))
        self._write_nu(index, nu_new)
        self._value = _dual_value(log_s, nu_new)
        return self._exp_weights(rows, nu_new)


class ASGD(_DualLoss):
    """ASGD: SGD on the dual, ``nu_new = nu - r_e (1 - s e^{-nu})`` with
    :func:`asgd_rate`; gradient with the **old** dual:
    ``G_ij = exp(z_ij - nu_old_i) / (B m)``."""

    name = "asgd"

    def __init__(self, num_samples: int, gamma: float = DEFAULTS["asgd"]["gamma"], dtype=torch.float32):
        super().__init__(num_samples, dtype)
        self.gamma = float(gamma)

    @property
    def rate(self) -> float:
        return asgd_rate(self.gamma, self.epoch, self.epochs)

    def weights(self, logits: Tensor, index: Tensor) -> Tensor:
        rows = _RowExp(logits)
        log_s = rows.log_row_stat()
        nu_old, first = self._read_nu(index, log_s)
        nu_new = torch.where(first, log_s, asgd_dual_step(nu_old, log_s, self.rate))
        self._write_nu(index, nu_new)
        self._value = _dual_value(log_s, nu_old)
        return self._exp_weights(rows, nu_old)


class UMax(_DualLoss):
    """U-max: the ASGD step, then a reset ``nu_new = log s`` wherever
    ``nu_new < log s - delta``; gradient with the **new** dual (after the reset).
    ``delta = inf`` is exactly ASGD, old dual in the gradient included."""

    name = "umax"

    def __init__(
        self,
        num_samples: int,
        gamma: float = DEFAULTS["umax"]["gamma"],
        delta: float = DEFAULTS["umax"]["delta"],
        dtype=torch.float32,
    ):
        super().__init__(num_samples, dtype)
        self.gamma, self.delta = float(gamma), float(delta)

    @property
    def rate(self) -> float:
        return asgd_rate(self.gamma, self.epoch, self.epochs)

    def weights(self, logits: Tensor, index: Tensor) -> Tensor:
        rows = _RowExp(logits)
        log_s = rows.log_row_stat()
        nu_old, first = self._read_nu(index, log_s)
        nu_new = torch.where(first, log_s, asgd_dual_step(nu_old, log_s, self.rate))
        if math.isinf(self.delta):  # no reset can fire: plain ASGD
            nu_grad = nu_old
        else:
            nu_new = torch.where(nu_new < log_s - self.delta, log_s, nu_new)
            nu_grad = nu_new
        self._write_nu(index, nu_new)
        self._value = _dual_value(log_s, nu_grad)
        return self._exp_weights(rows, nu_grad)


class ASGDSoftplus(_DualLoss):
    """ASGD on the softplus-smoothed objective, ``rho`` > 0.

    ``e_ij = exp(z_ij - nu_i)``, ``q_i = (1/m) sum_j e_ij / (1 + rho e_ij)``,
    ``nu_new = nu - r_e (1 - q_i)`` (:func:`asgd_rate`), surrogate
    ``L = (1/B) sum_i (1/m) sum_j (1/rho) log(1 + rho e_ij)``, so
    ``G_ij = e_ij / (1 + rho e_ij) / (B m)`` with the **old** dual. First visit:
    ``nu = log q`` computed at ``nu = 0``. Naturally bounded: ``q <= 1/rho``.
    The seed averages over K columns; we use m (a factor (K-1)/K).
    """

    name = "softplus"

    def __init__(
        self,
        num_samples: int,
        gamma: float = DEFAULTS["softplus"]["gamma"],
        rho: float = DEFAULTS["softplus"]["rho"],
        dtype=torch.float32,
    ):
        super().__init__(num_samples, dtype)
        if rho <= 0:
            raise ValueError(f"softplus rho must be > 0, got {rho}")
        self.gamma, self.rho = float(gamma), float(rho)

    @property
    def rate(self) -> float:
        return asgd_rate(self.gamma, self.epoch, self.epochs)

    def _shifted(self, logits: Tensor, nu: Tensor) -> Tensor:
        """``x_ij = z_ij - nu_i + log rho``: then ``e/(1 + rho e) = sigmoid(x)/rho``
        with ``e = exp(z - nu)``, one stable op instead of exp, softplus and a
        division."""
        return (logits - nu[:, None]).add_(math.log(self.rho))

    def _log_q(self, x: Tensor) -> Tensor:
        """``log q_i = log((1/m) sum_j sigmoid(x_ij)/rho)``, in log space."""
        m = x.shape[1] - 1
        return torch.logsumexp(F.logsigmoid(x), dim=1) - (math.log(self.rho) + math.log(m))

    def weights(self, logits: Tensor, index: Tensor) -> Tensor:
        B, K = logits.shape
        m = K - 1
        any_fresh = bool((~self.nu_set[index]).any())
        # log q at nu = 0 only initialises first visits, log q at the old nu only
        # steps revisits: each is computed only when some row needs it.
        if any_fresh:
            log_q0 = self._log_q(self._shifted(logits, torch.zeros(B, dtype=logits.dtype, device=logits.device)))
        else:
            log_q0 = torch.zeros(B, dtype=logits.dtype, device=logits.device)
        nu_old, first = self._read_nu(index, log_q0)
        x = self._shifted(logits, nu_old)
        terms = torch.sigmoid(x)  # rho e/(1 + rho e): both q (revisits) and G need it
        if any_fresh and bool(first.all()):
            nu_new = log_q0
        else:
            # the dual step needs q itself, not its log: q = sum_j sigmoid(x_ij) / (rho m)
            q = terms.sum(dim=1) / (self.rho * m)
            nu_new = torch.where(first, log_q0, nu_old - self.rate * (1.0 - q))
        self._write_nu(index, nu_new)
        # (1/rho) log(1 + rho e) = softplus(x) / rho summed over valid entries
        # (softplus(-inf) = 0; F.softplus returns x above x = 20, where the true value
        # differs by < 2.1e-9: below float32 rounding of a value over 20)
        self._value = F.softplus(x).sum() / (self.rho * B * m)
        return terms.mul_(1.0 / (self.rho * B * m))


class BSGD(_DualLoss):
    """BSGD: biased SGD on the primal, no dual. ``L = (1/B) sum_i logsumexp_j z_ij``,
    so ``G_ij = softmax_j(z_i)_j / B``.

    ``nu``/``nu_set`` exist (all unset, never written) so that every algorithm has
    the same state layout; there is no schedule."""

    name = "bsgd"

    def weights(self, logits: Tensor, index: Tensor) -> Tensor:
        rows = _RowExp(logits)
        self._value = (rows.log_sum + rows.row_max).mean()
        # softmax / B = E / (B sum_j E): a per-row rescaling of E, in place
        return rows.E.div_((rows.E.sum(dim=1) * logits.shape[0])[:, None])


#: name -> constructor(num_samples, **hparams)
ALGORITHMS: dict[str, Callable[..., nn.Module]] = {
    "scent": SCENT,
    "sox": SOX,
    "asgd": ASGD,
    "softplus": ASGDSoftplus,
    "umax": UMax,
    "bsgd": BSGD,
}

_HPARAMS = {"scent": {"gamma"}, "sox": {"gamma"}, "asgd": {"gamma"}, "umax": {"gamma", "delta"},
            "softplus": {"gamma", "rho"}, "bsgd": set()}


def build(name: str, num_samples: int, dtype: torch.dtype = torch.float32, **hparams) -> nn.Module:
    """The algorithm ``name`` with ``num_samples`` duals.

    ``hparams``: ``gamma`` (all but bsgd), ``rho`` (softplus), ``delta`` (umax);
    missing ones take the tuned defaults of :data:`DEFAULTS`; ``None`` values are
    ignored (treated as missing) and so is ``gamma`` for bsgd, so that a trainer
    can pass every flag to every algorithm."""
    key = name.lower()
    if key not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    allowed = _HPARAMS[key]
    given = {k: v for k, v in hparams.items() if v is not None}
    unknown = set(given) - allowed - {"gamma", "rho", "delta"}
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {sorted(unknown)} for {key}")
    kwargs = {k: float(v) for k, v in given.items() if k in allowed}
    return ALGORITHMS[key](num_samples, dtype=dtype, **kwargs)

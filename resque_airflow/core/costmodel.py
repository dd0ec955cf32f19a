"""A cost model: predict a retraining cost, with an interval, from the signals of a gate run (DESIGN.md 2.5).

The model is deliberately small enough to read:

- Inputs are the gate's signals (:data:`SIGNALS`, as produced by
  :func:`resque_airflow.core.summary.companion_signals`), each standardised with the training mean and standard
  deviation.
- The target is ``log1p(cost)`` by default: costs are non-negative and spread over orders of magnitude, and a linear
  model on the log scale makes effects multiplicative.
- The fit is a ridge regression whose weights are constrained in sign: a signal declared ``+1`` in ``monotone`` gets a
  weight >= 0, so the predicted cost never decreases when that signal increases (every shift signal is ``+1`` by
  default: more shift never predicts a cheaper retraining). ``-1`` forces a weight <= 0, ``0`` leaves it free.
  The ridge penalty is chosen by leave-one-out error over a small grid.
- The interval is a jackknife (leave-one-out) conformal interval: the prediction plus or minus the
  ``ceil(coverage * (n + 1))``-th smallest absolute leave-one-out residual, on the log scale, mapped back.
- Missing signals: a signal missing (None or NaN) in more than ``max_missing_fraction`` of the training rows is
  dropped; otherwise its gaps are filled with its training mean. At prediction a missing signal also takes its
  training mean (it then contributes nothing). Constant signals are dropped.

Only numpy is used (no scipy, no torch): the constrained ridge is solved by an active-set method on the Gram matrix,
which also makes the leave-one-out refits cheap (a rank-one downdate each).

Example:
    >>> rng = np.random.default_rng(0)
    >>> rows = [{"resque_dist": a, "mmd": b} for a, b in rng.uniform(0, 1, (40, 2))]
    >>> cost = [np.expm1(1 + 2 * r["resque_dist"] + r["mmd"]) for r in rows]
    >>> m = CostModel(signals=("resque_dist", "mmd")).fit(rows, cost)
    >>> p = m.predict({"resque_dist": 0.5, "mmd": 0.5})
    >>> round(p.value, 1), p.low <= p.value <= p.high
    (11.2, True)
    >>> sorted(m.explain()["weights"])
    ['mmd', 'resque_dist']
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from resque_airflow.errors import ResqueInputError

log = logging.getLogger(__name__)

SIGNALS: tuple[str, ...] = (
    "resque_dist", "resque_dist_predicted", "resque_dist_none", "mmd", "ks", "separability", "confidence_drop",
    "acc_drop",
)  # fmt: skip
"""The gate's signals, in the order used by default (names of ``companion_signals``)."""

MIN_HISTORY = 15
"""Retrain runs in the registry's history before the gate trusts the cost model over fixed thresholds.

From the learning curve of ``benchmarks/evidence.py`` (``docs/EVIDENCE.md``, "Learning curve"): fitted on random
subsets of the 155 distribution-shift runs (shift types mixed) and scored on the remaining runs, the model's mean
Spearman correlation with steps-to-target was 0.79 with 5 runs (10th percentile 0.65), 0.83 with 10 (0.77) and 0.85
with 15 (0.81), which is its plateau: 0.84-0.86 for every size from 15 to 120 runs. A 90% jackknife interval is finite
from 9 runs on (``ceil(0.9 * (n + 1)) <= n``). The benchmark is one small model on 8x8 digits: treat 15 as a floor.
"""

FORMAT_VERSION = 1
_ALPHA_GRID = (1e-3, 1e-2, 1e-1, 1.0)  # ridge penalty per training row, on standardised signals


@dataclass(frozen=True)
class Prediction:
    """A predicted cost with its interval, in the cost's own units (e.g. steps).

    ``low <= value <= high``; ``high`` is ``inf`` when the history is too short for the requested coverage.
    """

    value: float
    low: float
    high: float
    coverage: float

    def to_dict(self) -> dict:
        return asdict(self)


def _value(v: object) -> float:
    """A signal value as float; None, non-numbers and non-finite values become NaN (missing)."""
    if v is None:
        return math.nan
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _nn_ridge(gram: np.ndarray, rhs: np.ndarray, alpha: float, sign: np.ndarray) -> np.ndarray:
    """Solve ``min 0.5 w'Hw - w'c`` with ``H = gram + alpha * I`` (intercept ``w[0]`` not penalised).

    Subject to ``w[j] >= 0`` wherever ``sign[j] > 0``. An active-set method (Lawson and Hanson's NNLS, written for the
    quadratic form): variables enter the free set while their gradient says the objective would decrease, and leave
    it when a step would make them negative. ``H`` is positive definite for ``alpha > 0``, so the minimum is unique;
    with at most a handful of signals each solve is a tiny linear system.
    """
    d = rhs.shape[0]
    h = gram + np.diag(np.r_[0.0, np.full(d - 1, alpha)])
    cons = sign > 0
    free = ~cons  # unconstrained variables (the intercept) are always free
    tol = 1e-12 * max(1.0, float(np.abs(rhs).max()))

    def solve(mask: np.ndarray) -> np.ndarray:
        s = np.zeros(d)
        if mask.any():
            s[mask] = np.linalg.solve(h[np.ix_(mask, mask)], rhs[mask])
        return s

    w = solve(free)
    for _ in range(3 * d + 10):
        grad = rhs - h @ w  # minus the gradient: > 0 where increasing w[j] lowers the objective
        enter = cons & ~free & (grad > tol)
        if not enter.any():
            break
        free[int(np.argmax(np.where(enter, grad, -np.inf)))] = True
        for _ in range(d + 1):
            s = solve(free)
            bad = cons & free & (s <= 0)
            if not bad.any():
                w = s
                break
            # Move towards s until the first constrained variable hits zero; it leaves the free set.
            step = float(np.min(w[bad] / (w[bad] - s[bad])))
            w = w + step * (s - w)
            free &= ~(cons & (w <= tol))
            w[cons & ~free] = 0.0
    return w


class CostModel:
    """Sign-constrained ridge regression of ``log1p(cost)`` on standardised gate signals, with a jackknife interval.

    Args:
        signals: candidate signal names (default :data:`SIGNALS`).
        monotone: signal -> +1 (cost non-decreasing in it), -1 (non-increasing) or 0 (free); default +1 for all.
        coverage: nominal coverage of the intervals, in (0, 1).
        log_target: model ``log1p(cost)`` (default) rather than the cost itself.
        max_missing_fraction: drop a signal missing in more than this fraction of the training rows.
    """

    def __init__(
        self,
        signals: Sequence[str] = SIGNALS,
        *,
        monotone: Mapping[str, int] | None = None,
        coverage: float = 0.9,
        log_target: bool = True,
        max_missing_fraction: float = 0.2,
    ) -> None:
        if not 0 < coverage < 1:
            raise ResqueInputError(f"coverage: expected a value in (0, 1), got {coverage}")
        self.candidates = tuple(signals)
        mono = {s: 1 for s in self.candidates}
        for k, v in (monotone or {}).items():
            if v not in (-1, 0, 1):
                raise ResqueInputError(f"monotone[{k!r}]: expected -1, 0 or +1, got {v!r}")
            mono[k] = int(v)
        self.monotone = {s: mono[s] for s in self.candidates}
        self.coverage = float(coverage)
        self.log_target = bool(log_target)
        self.max_missing_fraction = float(max_missing_fraction)
        # Set by fit():
        self.signals: tuple[str, ...] = ()
        self.dropped: dict[str, str] = {}
        self.mean = np.zeros(0)
        self.scale = np.zeros(0)
        self.coef = np.zeros(0)  # on standardised signals, in the declared direction (>= 0 where monotone)
        self.intercept = 0.0
        self.alpha = 0.0
        self.loo_residuals = np.zeros(0)  # |t_i - prediction without row i|, on the (log) target scale
        self.n_train = 0

    # ---------------------------------------------------------------------------------------------------------------
    def _transform(self, y: np.ndarray) -> np.ndarray:
        return np.log1p(y) if self.log_target else y

    def _inverse(self, t: np.ndarray | float):
        return np.expm1(t) if self.log_target else t

    @property
    def fitted(self) -> bool:
        return self.n_train > 0

    def _design(self, rows: Sequence[Mapping[str, object]]) -> np.ndarray:
        """``(n, k)`` standardised, direction-signed signals of ``rows``; missing values -> 0 (the training mean)."""
        raw = np.array([[_value(r.get(s)) for s in self.signals] for r in rows], dtype=np.float64).reshape(
            len(rows), len(self.signals)
        )
        z = (raw - self.mean) / self.scale
        z = np.where(np.isnan(z), 0.0, z)
        return z * self._direction()

    def _direction(self) -> np.ndarray:
        # A -1 signal is flipped so that one non-negativity constraint serves both directions.
        return np.array([-1.0 if self.monotone[s] < 0 else 1.0 for s in self.signals])

    def fit(self, rows: Sequence[Mapping[str, object]], target: Sequence[float]) -> CostModel:
        """Fit on ``rows`` (one mapping of signal name -> value per past gate run) and their measured ``target`` costs.

        Args:
            rows: ``n`` mappings; missing signals may be absent, None or NaN.
            target: ``(n,)`` measured costs (>= 0 with ``log_target``), e.g. steps to target.

        Returns:
            ``self``.

        Raises:
            ResqueInputError: fewer than 3 rows, lengths that differ, or invalid costs.
        """
        y = np.asarray([_value(v) for v in target], dtype=np.float64)
        n = y.shape[0]
        if len(rows) != n:
            raise ResqueInputError(f"fit: {len(rows)} rows of signals but {n} costs")
        if n < 3:
            raise ResqueInputError(f"fit: need at least 3 past runs, got {n}")
        if np.isnan(y).any() or (self.log_target and (y < 0).any()):
            raise ResqueInputError("fit: costs must be finite (and >= 0 with log_target)")
        raw = np.array([[_value(r.get(s)) for s in self.candidates] for r in rows], dtype=np.float64)
        keep, self.dropped = [], {}
        for j, s in enumerate(self.candidates):
            col = raw[:, j]
            miss = float(np.isnan(col).mean())
            if miss > self.max_missing_fraction:
                self.dropped[s] = f"missing in {miss:.0%} of the training runs"
            elif np.nanstd(col) == 0:
                self.dropped[s] = "constant in the training runs"
            else:
                keep.append(j)
        self.signals = tuple(self.candidates[j] for j in keep)
        x = raw[:, keep]
        self.mean = np.nanmean(x, axis=0) if keep else np.zeros(0)
        self.scale = np.nanstd(x, axis=0) if keep else np.zeros(0)
        z = np.where(np.isnan(x), 0.0, (x - self.mean) / self.scale) * self._direction()
        t = self._transform(y)

        a = np.hstack([np.ones((n, 1)), z])
        sign = np.array([0.0] + [1.0 if self.monotone[s] != 0 else 0.0 for s in self.signals])
        gram, rhs = a.T @ a, a.T @ t

        def loo(alpha: float) -> np.ndarray:
            res = np.empty(n)
            for i in range(n):
                # Removing row i from the Gram matrix is a rank-one downdate: no need to rebuild it.
                w = _nn_ridge(gram - np.outer(a[i], a[i]), rhs - a[i] * t[i], alpha, sign)
                res[i] = t[i] - a[i] @ w
            return res

        grid = [g * n for g in _ALPHA_GRID]
        errors = {alpha: loo(alpha) for alpha in grid}
        self.alpha = min(grid, key=lambda al: (float(np.mean(errors[al] ** 2)), -al))  # ties: more shrinkage
        self.loo_residuals = np.abs(errors[self.alpha])
        w = _nn_ridge(gram, rhs, self.alpha, sign)
        self.intercept, self.coef = float(w[0]), w[1:]
        self.n_train = n
        log.debug("CostModel.fit: n=%d signals=%s alpha=%.3g dropped=%s", n, self.signals, self.alpha, self.dropped)
        return self

    # ---------------------------------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self.fitted:
            raise ResqueInputError("CostModel: not fitted; call fit() or load one with from_dict()")

    def _halfwidth(self, coverage: float) -> float:
        n = self.loo_residuals.shape[0]
        k = math.ceil(coverage * (n + 1))
        return math.inf if k > n else float(np.sort(self.loo_residuals)[k - 1])

    def predict_transformed(self, rows: Sequence[Mapping[str, object]]) -> np.ndarray:
        """``(n,)`` predictions on the model's target scale (``log1p(cost)`` by default); monotone like the cost."""
        self._check_fitted()
        return self.intercept + self._design(rows) @ self.coef

    def predict(self, signals: Mapping[str, object], coverage: float | None = None) -> Prediction:
        """Predicted cost for one gate run's ``signals``, with a ``coverage`` interval (default: the model's).

        Signals the model does not use are ignored; missing ones (absent, None, NaN) take their training mean.
        """
        cov = self.coverage if coverage is None else float(coverage)
        if not 0 < cov < 1:
            raise ResqueInputError(f"coverage: expected a value in (0, 1), got {cov}")
        t = float(self.predict_transformed([signals])[0])
        q = self._halfwidth(cov)
        lo, hi = float(self._inverse(t - q)), float(self._inverse(t + q))
        value = float(self._inverse(t))
        if self.log_target:
            value, lo = max(value, 0.0), max(lo, 0.0)  # log1p of a cost is >= 0: keep the back-transform there
        return Prediction(value=value, low=lo, high=hi, coverage=cov)

    def explain(self) -> dict:
        """Which signals the model uses and how.

        Returns a JSON-serialisable dict: ``weights`` (signal -> change of the target-scale prediction per unit of
        the raw signal), ``standardised_weights`` (per standard deviation), ``dropped`` (signal -> reason),
        ``intercept``, ``alpha``, ``target`` (``"log1p(cost)"`` or ``"cost"``), ``n_train``, ``coverage`` and the
        interval ``halfwidth`` on the target scale.
        """
        self._check_fitted()
        signed = self.coef * self._direction()
        return {
            "target": "log1p(cost)" if self.log_target else "cost",
            "weights": {s: float(w / sd) for s, w, sd in zip(self.signals, signed, self.scale, strict=True)},
            "standardised_weights": {s: float(w) for s, w in zip(self.signals, signed, strict=True)},
            "monotone": {s: self.monotone[s] for s in self.signals},
            "dropped": dict(self.dropped),
            "intercept": self.intercept,
            "alpha": self.alpha,
            "n_train": self.n_train,
            "coverage": self.coverage,
            "halfwidth": self._halfwidth(self.coverage),
        }

    # ---------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-serialisable state (plain lists and numbers); :meth:`from_dict` restores an identical model."""
        self._check_fitted()
        return {
            "format_version": FORMAT_VERSION,
            "candidates": list(self.candidates),
            "monotone": dict(self.monotone),
            "coverage": self.coverage,
            "log_target": self.log_target,
            "max_missing_fraction": self.max_missing_fraction,
            "signals": list(self.signals),
            "dropped": dict(self.dropped),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "alpha": self.alpha,
            "loo_residuals": self.loo_residuals.tolist(),
            "n_train": self.n_train,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> CostModel:
        """Rebuild a fitted model from :meth:`to_dict` output (e.g. after a JSON round trip)."""
        try:
            if int(d["format_version"]) > FORMAT_VERSION:
                raise ResqueInputError(
                    f"cost model: format_version {d['format_version']} is newer than this package supports "
                    f"({FORMAT_VERSION}); upgrade airflow-provider-resque"
                )
            m = cls(
                d["candidates"],
                monotone=d["monotone"],
                coverage=d["coverage"],
                log_target=d["log_target"],
                max_missing_fraction=d["max_missing_fraction"],
            )
            m.signals = tuple(d["signals"])
            m.dropped = dict(d["dropped"])
            m.mean = np.asarray(d["mean"], np.float64)
            m.scale = np.asarray(d["scale"], np.float64)
            m.coef = np.asarray(d["coef"], np.float64)
            m.intercept = float(d["intercept"])
            m.alpha = float(d["alpha"])
            m.loo_residuals = np.asarray(d["loo_residuals"], np.float64)
            m.n_train = int(d["n_train"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ResqueInputError):
                raise
            raise ResqueInputError(f"cost model: malformed serialised model ({exc!r})") from exc
        k = len(m.signals)
        if not (m.mean.shape == m.scale.shape == m.coef.shape == (k,)) or set(m.signals) - set(m.candidates):
            raise ResqueInputError("cost model: serialised arrays do not match its signal list")
        return m

    def __repr__(self) -> str:
        state = f"n_train={self.n_train}, signals={list(self.signals)}" if self.fitted else "unfitted"
        return f"CostModel({state})"

"""The calibrated decision: reuse, retrain or rebuild as the comparison a budget owner would make.

1. **Reuse** when the accuracy (measured with labels, else estimated by ATC) stays at or above the model's retrain
   target with its whole 90% interval, or when no shift is detected at false-alarm rate ``alpha`` (the score is
   within its calibrated null for this model and batch size) and the accuracy guard does not object: a measured
   accuracy below the target (or an estimate whose interval lies below it) is never reused.
2. Otherwise the predicted fine-tuning cost decides: **rebuild** when it exceeds the model's recorded training cost
   (training anew would be cheaper), else **retrain**.
3. With prices, **reuse** when what retraining would recover (accuracy points to recover x the value of a point)
   is worth less than what it would cost (kWh x price per kWh).

Every decision comes with one sentence saying why, built from the numbers that decided it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from resque_airflow.core.decision import Decision
from resque_airflow.core.null import NullCheck
from resque_airflow.errors import ResqueInputError

DEFAULT_TARGET_RELATIVE = 0.95  # a retrain must reach 95% of the reference accuracy (the cost benchmarks' target)


@dataclass(frozen=True)
class Prices:
    """What the user pays and gains, for the cost/benefit rule; all optional (None: that side is not weighed).

    Attributes:
        per_kwh: money per kWh of retraining energy.
        per_accuracy_point: money one accuracy point (0.01) is worth over the period the model serves.
    """

    per_kwh: float | None = None
    per_accuracy_point: float | None = None

    def validate(self) -> Prices:
        for attr, name in (("per_kwh", "price_per_kwh"), ("per_accuracy_point", "value_per_accuracy_point")):
            v = getattr(self, attr)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v < 0):  # fmt: skip
                raise ResqueInputError(f"{name}: expected a non-negative number, got {v!r}")
        return self

    @property
    def complete(self) -> bool:
        return self.per_kwh is not None and self.per_accuracy_point is not None


def check_alpha(alpha: object) -> float:
    """``alpha`` as a float in (0, 1), or a :class:`ResqueInputError` naming it."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) < 1.0:
        raise ResqueInputError(f"alpha: expected a false-alarm rate strictly between 0 and 1, got {alpha!r}")
    return float(alpha)


@dataclass(frozen=True)
class Accuracy:
    """The model's accuracy on the new data: measured (labels) or estimated (ATC), with its interval."""

    value: float
    low: float
    high: float
    source: str  # "measured" or "atc"


@dataclass(frozen=True)
class CostForecast:
    """Predicted fine-tuning cost against the recorded cost of training the model anew (same unit, e.g. kWh)."""

    predicted: float
    low: float
    high: float
    rebuild: float
    unit: str
    basis: str  # "prior", "history" or "prior+history"
    n_history: int = 0
    energy_kwh: float | None = None  # predicted fine-tuning energy, for prices


@dataclass(frozen=True)
class Verdict:
    """The decision and the sentence that explains it."""

    decision: Decision
    reason: str
    policy: str

    def to_dict(self) -> dict:
        return {"decision": self.decision.value, "reason": self.reason, "policy": self.policy}


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def decide_calibrated(
    detection: NullCheck,
    *,
    n_samples: int,
    accuracy: Accuracy | None = None,
    target: float | None = None,
    cost: CostForecast | None = None,
    prices: Prices | None = None,
    signal: str = "RESQUE",
) -> Verdict:
    """Decide from the null check, the accuracy against the target, the cost forecast and the prices.

    >>> from resque_airflow.core.null import NullCheck
    >>> quiet = NullCheck(value=0.011, quantile=0.012, p_value=0.2, alpha=0.01, n_replicates=1000)
    >>> decide_calibrated(quiet, n_samples=2000).reason
    'no shift detected (RESQUE 0.011, null p99 0.012 at n=2,000) -> reuse'
    >>> loud = NullCheck(value=0.031, quantile=0.012, p_value=0.001, alpha=0.01, n_replicates=1000)
    >>> v = decide_calibrated(loud, n_samples=2000, accuracy=Accuracy(0.88, 0.86, 0.9, "atc"), target=0.91,
    ...                       cost=CostForecast(0.3, 0.1, 0.6, 1.2, "kWh", "prior"))
    >>> for part in v.reason.split("; "):
    ...     print(part)
    shift detected (RESQUE 0.031, null p99 0.012 at n=2,000)
    estimated accuracy 0.88 (0.86-0.9) < target 0.91
    predicted fine-tuning 0.1-0.6 kWh, below the rebuild cost 1.2 kWh -> retrain
    """
    q = round(100 * (1 - detection.alpha), 2)
    parts = [
        f"{'shift detected' if detection.detected else 'no shift detected'} ({signal} {_fmt(detection.value)}, "
        f"null p{q:g} {_fmt(detection.quantile)} at n={n_samples:,})"
    ]

    def verdict(decision: Decision, policy: str) -> Verdict:
        return Verdict(decision, "; ".join(parts) + f" -> {decision.value}", policy)

    guarded = False
    if accuracy is not None and target is not None:
        word = "measured" if accuracy.source == "measured" else "estimated"
        meets = accuracy.low >= target  # the whole interval at or above the target: confident it still meets it
        # The accuracy guard: a measured accuracy below the target (or an estimate whose interval lies below it)
        # is never reused, whatever RESQUE says: noise that destroys information can move it little.
        guarded = accuracy.value < target if accuracy.source == "measured" else accuracy.high < target
        sign = ">=" if meets else "<" if guarded else "~"
        parts.append(
            f"{word} accuracy {accuracy.value:.3g} ({accuracy.low:.3g}-{accuracy.high:.3g}) {sign} target {target:.3g}"
        )
        if meets:
            return verdict(Decision.REUSE, "calibrated+accuracy")
    if not detection.detected and not guarded:
        return verdict(Decision.REUSE, "calibrated")
    if cost is None:
        return verdict(Decision.RETRAIN, "calibrated")
    rebuild = cost.predicted > cost.rebuild
    parts.append(
        f"predicted fine-tuning {_fmt(cost.low)}-{_fmt(cost.high)} {cost.unit}, "
        f"{'above' if rebuild else 'below'} the rebuild cost {_fmt(cost.rebuild)} {cost.unit}"
    )
    if rebuild:
        return verdict(Decision.REBUILD, "calibrated+cost")
    if prices is not None and prices.complete and accuracy is not None and target is not None and cost.energy_kwh:
        benefit = max(target - accuracy.value, 0.0) * 100 * prices.per_accuracy_point
        spend = cost.energy_kwh * prices.per_kwh
        parts.append(f"recovers {_fmt(benefit)} for {_fmt(spend)}")
        if benefit < spend:
            return verdict(Decision.REUSE, "calibrated+prices")
    return verdict(Decision.RETRAIN, "calibrated+cost")


__all__ = ["Accuracy", "CostForecast", "Prices", "Verdict", "check_alpha", "decide_calibrated"]

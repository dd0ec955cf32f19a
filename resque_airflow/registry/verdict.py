"""How a gate turns a scored batch into a decision, and the sentence that says why.

- **Calibrated** (the default, ``mode="dist"``): the score against its null at this batch size, the accuracy
  (measured, else estimated by ATC) against the model's retrain target, and the predicted fine-tuning cost (the
  cold-start prior, corrected by the model's own history) against its recorded training cost
  (:func:`resque_airflow.core.policy.decide_calibrated`).
- **Fixed thresholds** when the user gives ``reuse_threshold`` or ``rebuild_threshold`` (and in ``mode="task"``):
  the score against them, with the accuracy guard (with labels, a model below its retrain target is never reused).

A batch that fails the data-sanity checks is never scored as a shift: it is a data issue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from resque_airflow.core.decision import Decision, Thresholds, decide
from resque_airflow.core.policy import DEFAULT_TARGET_RELATIVE, CostForecast, Prices, decide_calibrated
from resque_airflow.core.prior import transfer_signals
from resque_airflow.errors import ResqueInputError
from resque_airflow.registry import names
from resque_airflow.runtime.pipeline import ScoreResult

log = logging.getLogger(__name__)


class DataIssueError(ResqueInputError):
    """The batch looks corrupt rather than shifted, and no data-issue branch was given.

    Attributes:
        checks: the names of the failed checks (``constant_inputs``, ``zero_inputs``, ``out_of_range``,
            ``single_class``); ``details``: one sentence per check.
    """

    def __init__(self, checks: list[str], details: list[str]) -> None:
        self.checks, self.details = checks, details
        super().__init__(
            f"data: the batch fails the data-sanity check(s) {', '.join(checks)}: {'; '.join(details)}; fix the data, "
            "or give the gate a data_issue_task_id to route such batches"
        )


@dataclass(frozen=True)
class GateVerdict:
    """The decision, what produced it (``names.POLICY_*``), why (one sentence) and the cost forecast if any."""

    decision: Decision
    policy: str
    reason: str
    forecast: CostForecast | None = None

    @property
    def prediction(self) -> dict | None:
        """The cost forecast as JSON (the outcome's ``prediction``), or None."""
        f = self.forecast
        if f is None:
            return None
        return {
            "cost_metric": "steps_to_target", "predicted": f.predicted, "low": f.low, "high": f.high,
            "rebuild_cost": f.rebuild, "unit": f.unit, "basis": f.basis, "n_history": f.n_history,
            "energy_kwh": f.energy_kwh,
        }  # fmt: skip


def data_issue_verdict(result: ScoreResult, *, routed: bool) -> GateVerdict | None:
    """The data-issue verdict when the batch fails a sanity check (raises when no branch takes it), else None."""
    if not result.sanity:
        return None
    checks, details = [p.check for p in result.sanity], [p.message for p in result.sanity]
    if not routed:
        raise DataIssueError(checks, details)
    reason = f"data issue ({', '.join(checks)}): {'; '.join(details)} -> data_issue"
    return GateVerdict(Decision.DATA_ISSUE, names.POLICY_DATA_ISSUE, reason)


def threshold_verdict(result: ScoreResult, thresholds: Thresholds, reference_accuracy: float | None) -> GateVerdict:
    """Fixed thresholds on the score, and the accuracy guard."""
    decision = decide(result.score, thresholds)
    reason = f"RESQUE {result.score:.4g} against the fixed thresholds {thresholds.reuse:g} / {thresholds.rebuild:g}"
    acc_drop = result.signals.get("acc_drop")
    if decision is Decision.REUSE and acc_drop is not None and reference_accuracy:
        accuracy = reference_accuracy - acc_drop
        target = DEFAULT_TARGET_RELATIVE * reference_accuracy
        if accuracy < target:
            reason += f"; measured accuracy {accuracy:.3g} < target {target:.3g}"
            return GateVerdict(Decision.RETRAIN, names.POLICY_ACCURACY, f"{reason} -> retrain")
    return GateVerdict(decision, names.POLICY_THRESHOLDS, f"{reason} -> {decision.value}")


def cost_features(result: ScoreResult, reference_accuracy: float | None) -> dict[str, float | None]:
    """The calibrated signals the cost prior and the model's history are indexed by (logged on every gate run)."""
    cal = result.calibration
    accuracy = cal.accuracy.value if cal is not None and cal.accuracy is not None else None
    return transfer_signals(result.score, cal.detection.quantile if cal else None, accuracy, reference_accuracy)


def calibrated_verdict(
    result: ScoreResult,
    *,
    reference_accuracy: float | None,
    forecast: CostForecast | None,
    prices: Prices | None,
) -> GateVerdict:
    """The calibrated decision of DESIGN.md and issue 11: detection, accuracy target, cost against benefit."""
    cal = result.calibration
    target = None if reference_accuracy is None else DEFAULT_TARGET_RELATIVE * reference_accuracy
    v = decide_calibrated(
        cal.detection, n_samples=result.n_samples, accuracy=cal.accuracy, target=target, cost=forecast, prices=prices,
        signal="RESQUE" if result.label_source == "given" else f"RESQUE[{result.label_source}]",
    )  # fmt: skip
    return GateVerdict(v.decision, v.policy, v.reason, forecast)

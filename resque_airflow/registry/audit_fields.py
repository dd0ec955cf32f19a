"""Fields of the audit trail read from one MLflow run: numbers, times, run links, measured costs, calibrated fields.

Pure parsing, no MLflow calls: :mod:`resque_airflow.registry.audit` searches the runs and builds its records with
these. Names are those of :mod:`resque_airflow.registry.names` and of :mod:`resque_airflow.registry.audit_loop`
(the ``measured_<cost>`` metrics a retrain writes back onto its gate run).
"""

from __future__ import annotations

import math
import urllib.parse
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from resque_airflow.registry import names
from resque_airflow.registry.audit_loop import CHALLENGER_OUTCOME_TAG, CHALLENGER_RUN_TAG, MEASURED_PREFIX
from resque_airflow.registry.client import iso_time

if TYPE_CHECKING:
    from mlflow.entities import Run

PREDICTION_KEYS = ("cost_metric", "predicted", "low", "high", "rebuild_cost", "unit", "basis", "n_history",
                   "energy_kwh")  # fmt: skip


def as_float(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (missing, not a number, NaN or infinite)."""
    if isinstance(value, bool):
        return float(value)
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def as_int(value: Any) -> int | None:
    f = as_float(value)
    return int(f) if f is not None else None


def start_time(ms: int | None) -> str | None:
    """A run's start time as ISO 8601 UTC to the second: the precision ``resque audit --json`` has always shown.

    >>> start_time(1767225600123)
    '2026-01-01T00:00:00+00:00'
    """
    iso = iso_time(ms)
    return None if iso is None else datetime.fromisoformat(iso).isoformat(timespec="seconds")


def run_url(mlflow_ui_base: str | None, experiment_id: str, run_id: str) -> str | None:
    """Link to a run in the MLflow UI: ``<base>/#/experiments/<exp_id>/runs/<run_id>``, or ``None`` without a base.

    >>> run_url("http://localhost:5000/", "1", "abc")
    'http://localhost:5000/#/experiments/1/runs/abc'
    >>> run_url(None, "1", "abc") is None
    True
    """
    if not mlflow_ui_base:
        return None
    exp = urllib.parse.quote(str(experiment_id), safe="")
    run = urllib.parse.quote(str(run_id), safe="")
    return f"{mlflow_ui_base.rstrip('/')}/#/experiments/{exp}/runs/{run}"


def per_class(angles: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-class angles ``{class id: angle}`` as ``[{"class": str, "angle": float | None}]``, in class order.

    >>> per_class({"10": 0.5, "2": 0.25})
    [{'class': '2', 'angle': 0.25}, {'class': '10', 'angle': 0.5}]
    """

    def order(kv: tuple[str, Any]) -> tuple[int, int | str]:
        return (0, int(kv[0])) if str(kv[0]).lstrip("-").isdigit() else (1, str(kv[0]))

    return [{"class": str(k), "angle": as_float(v)} for k, v in sorted(angles.items(), key=order)]


def angle_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The per-class angles logged as metrics ``angle_class_<k>`` (finite ones), ``{class id: angle}``."""
    prefix = names.ANGLE_METRIC_PREFIX
    out = {k.removeprefix(prefix): as_float(v) for k, v in metrics.items() if k.startswith(prefix)}
    return {k: v for k, v in out.items() if v is not None}


@dataclass
class MeasuredCost:
    """A retrain or rebuild run triggered by a gate run, with its measured cost (DESIGN.md 2.4)."""

    run_id: str
    experiment_id: str
    kind: str | None
    start_time: str | None
    run_status: str | None
    metrics: dict[str, float | None]
    censored: bool | None = None
    final_accuracy: float | None = None
    mlflow_url: str | None = None


def measured_cost(run: Run, ui_base: str | None) -> MeasuredCost:
    metrics, tags = run.data.metrics, run.data.tags
    censored = as_float(metrics.get(names.CENSORED_METRIC))
    return MeasuredCost(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        kind=tags.get(names.KIND_TAG),
        start_time=start_time(run.info.start_time),
        run_status=run.info.status,
        metrics={m: as_float(metrics[m]) for m in names.COST_METRICS if m in metrics},
        censored=None if censored is None else censored >= 0.5,
        final_accuracy=as_float(metrics.get(names.FINAL_ACCURACY_METRIC)),
        mlflow_url=run_url(ui_base, run.info.experiment_id, run.info.run_id),
    )


def _accuracy(metrics: dict[str, Any], name: str) -> dict[str, float | None] | None:
    value = as_float(metrics.get(name))
    if value is None:
        return None
    return {"value": value, "low": as_float(metrics.get(f"{name}_low")), "high": as_float(metrics.get(f"{name}_high"))}


def calibrated_from_run(metrics: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
    """The calibrated fields a gate run holds as metrics and tags (everything but ``alpha`` and the forecast's
    basis, which only the result artifact has: :func:`calibrated_from_result`)."""
    low, high = as_float(metrics.get("resque_score_low")), as_float(metrics.get("resque_score_high"))
    shift = as_float(metrics.get("shift_detected"))
    prefix = MEASURED_PREFIX
    written = {k.removeprefix(prefix): as_float(v) for k, v in metrics.items() if k.startswith(prefix)}
    prediction = None
    for cost in names.COST_METRICS:  # the forecast the gate decided with is the one with an interval
        value, lo, hi = (as_float(metrics.get(f"predicted_{cost}{s}")) for s in ("", "_low", "_high"))
        if value is not None and lo is not None and hi is not None:
            prediction = {"cost_metric": cost, "predicted": value, "low": lo, "high": hi,
                          "rebuild_cost": as_float(metrics.get("rebuild_cost"))}  # fmt: skip
            break
    return {
        "interval": [low, high] if low is not None and high is not None else None,
        "null_quantile": as_float(metrics.get("null_quantile")),
        "p_value": as_float(metrics.get("p_value")),
        "shift_detected": None if shift is None else shift >= 0.5,
        "accuracy_measured": _accuracy(metrics, "accuracy_measured"),
        "accuracy_estimated": _accuracy(metrics, "accuracy_estimated"),
        "reason": tags.get(names.REASON_TAG) or None,
        "prediction": prediction,
        "measured_back": {k: v for k, v in written.items() if v is not None},
        "challenger_run_id": tags.get(CHALLENGER_RUN_TAG),
        "challenger_outcome": tags.get(CHALLENGER_OUTCOME_TAG),
        "gate_key": tags.get(names.GATE_KEY_TAG),
        "angles": angle_metrics(metrics),
    }


def calibrated_from_result(result: dict[str, Any]) -> dict[str, Any]:
    """The calibrated fields of ``resque/gate_result.json`` (``GateOutcome.to_dict()``); only those it holds."""
    out: dict[str, Any] = {}
    interval = result.get("interval")
    if isinstance(interval, list) and len(interval) == 2 and None not in (as_float(v) for v in interval):
        out["interval"] = [as_float(interval[0]), as_float(interval[1])]
    if result.get("reason"):
        out["reason"] = str(result["reason"])
    cal = result.get("calibration") if isinstance(result.get("calibration"), dict) else {}
    det = cal.get("detection") if isinstance(cal.get("detection"), dict) else {}
    for key, src in (("null_quantile", "null_quantile"), ("p_value", "p_value"), ("alpha", "alpha")):
        if as_float(det.get(src)) is not None:
            out[key] = as_float(det[src])
    if isinstance(det.get("detected"), bool):
        out["shift_detected"] = det["detected"]
    for key in ("accuracy_measured", "accuracy_estimated"):
        acc = cal.get(key)
        if isinstance(acc, dict) and as_float(acc.get("value")) is not None:
            out[key] = {k: as_float(acc.get(k)) for k in ("value", "low", "high")}
    pred = result.get("prediction")
    if isinstance(pred, dict) and pred:
        out["prediction"] = {
            k: (pred.get(k) if k in ("cost_metric", "unit", "basis") else as_float(pred.get(k)))
            for k in PREDICTION_KEYS
            if k in pred
        }
        if "n_history" in pred:
            out["prediction"]["n_history"] = as_int(pred["n_history"])
    return out

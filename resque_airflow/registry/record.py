"""What a gate writes about itself beyond its params: the metrics of a decided run, the marks of a failed one."""

from __future__ import annotations

import logging
import math

from resque_airflow.errors import first_line
from resque_airflow.registry import names
from resque_airflow.registry.verdict import cost_features
from resque_airflow.runtime.pipeline import ScoreResult

log = logging.getLogger(__name__)


def gate_metrics(result: ScoreResult, prediction: dict | None, reference_accuracy: float | None) -> dict[str, float]:
    """The gate run's metrics: the score, counts, signals, calibration, per-class angles and the cost prediction."""
    metrics = {names.SCORE_METRIC: result.score, "n_samples": result.n_samples, "n_classes": result.n_classes}
    metrics |= {k: v for k, v in result.signals.items() if v is not None}
    metrics |= {f"{names.ANGLE_METRIC_PREFIX}{k}": v for k, v in result.per_class.items()}
    cal = result.calibration
    if cal is not None:
        metrics |= {
            "resque_score_low": cal.interval[0], "resque_score_high": cal.interval[1],
            "null_quantile": cal.detection.quantile, "p_value": cal.detection.p_value,
            "shift_detected": float(cal.detection.detected),
        }  # fmt: skip
        for name, acc in (("accuracy_measured", cal.measured), ("accuracy_estimated", cal.estimated)):
            if acc is not None:
                metrics |= {name: acc.value, f"{name}_low": acc.low, f"{name}_high": acc.high}
        metrics |= {k: v for k, v in cost_features(result, reference_accuracy).items() if v is not None}
    if prediction is not None:
        m = prediction["cost_metric"]
        metrics |= {
            f"predicted_{m}": prediction["predicted"],
            f"predicted_{m}_low": prediction["low"],
            f"predicted_{m}_high": prediction["high"],
            "rebuild_cost": prediction["rebuild_cost"],
        }
        if prediction.get("energy_kwh") is not None:
            metrics["predicted_energy_kwh"] = prediction["energy_kwh"]
    return {k: v for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def fail_run(client, run_id: str, exc: BaseException, params: dict | None = None) -> None:
    """Best effort: mark the gate run failed with the reason; the original error is what the caller sees.

    ``params`` (the request's params, which a gate logs with its result) are logged with the failure marks, so that
    a failed run names what it gated; a param MLflow refuses does not stop the run from being marked failed.
    """
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException

    tags = [
        RunTag(names.STATUS_TAG, names.STATUS_FAILED),
        RunTag(names.ERROR_TAG, f"{type(exc).__name__}: {str(exc)[:4000]}"),
    ]
    logged = [Param(k, str(v)) for k, v in (params or {}).items()]
    try:
        # Two calls, not three: when the registry is what failed, each call spends MLflow's HTTP retries.
        try:
            client.log_batch(run_id, params=logged, tags=tags)
        except MlflowException as refused:  # a param the store refuses (too long, say): the marks still go in
            if not logged or getattr(refused, "error_code", "") != "INVALID_PARAMETER_VALUE":
                raise
            client.log_batch(run_id, tags=tags)
        client.set_terminated(run_id, "FAILED")
    except Exception as inner:  # the registry may be the thing that failed
        log.warning("could not mark gate run %s as failed: %s", run_id, first_line(inner))

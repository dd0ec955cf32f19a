"""A model's retraining cost: its recorded training cost, its retrain history in MLflow, and the forecast.

Every retrain run that a gate triggered carries ``resque.gate_run_id``; joining it to that gate run's calibrated
signals (``excess``, ``accuracy_drop_relative``: :func:`~resque_airflow.core.prior.transfer_signals`) gives one
(signals, measured cost) pair. :func:`forecast_cost` predicts the fine-tuning cost of new data as a fraction of the
model's recorded training cost with the shipped cold-start prior, corrected and narrowed by that history
(:mod:`resque_airflow.core.prior`), so that a model with no history still gets a prediction.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from resque_airflow.core.policy import CostForecast
from resque_airflow.core.prior import PRIOR_SIGNALS, forecast_relative
from resque_airflow.registry import names
from resque_airflow.registry.client import registry_call, search_literal

log = logging.getLogger(__name__)

DEFAULT_COST_METRIC = "steps_to_target"


@dataclass(frozen=True)
class HistoryPoint:
    """One retrain run joined to the gate run that triggered it: the gate's signals and the measured cost."""

    gate_run_id: str
    retrain_run_id: str
    signals: dict
    cost: float
    censored: bool


def retrain_history(
    client, model_name: str, *, cost_metric: str = DEFAULT_COST_METRIC, max_runs: int = 5000
) -> list[HistoryPoint]:
    """(signals, cost) pairs of every retrain run of ``model_name`` that names its triggering gate run."""
    name_literal = search_literal(model_name)
    if name_literal is None:  # MLflow's filter syntax cannot spell a name holding both kinds of quote
        log.info("cost model not used: model name %r cannot be searched for in MLflow", model_name)
        return []
    exp = registry_call("reading the retrain experiment", client.get_experiment_by_name, names.RETRAIN_EXPERIMENT)
    if exp is None:
        return []
    runs = registry_call(
        "reading retrain runs",
        client.search_runs,
        [exp.experiment_id],
        filter_string=(
            f"tags.`{names.KIND_TAG}` = {search_literal(names.KIND_RETRAIN)} "
            f"and tags.`{names.MODEL_NAME_TAG}` = {name_literal}"
        ),
        max_results=max_runs,
    )
    points = []
    for run in runs:
        gate_id = run.data.tags.get(names.GATE_RUN_TAG)
        cost = run.data.metrics.get(cost_metric)
        if not gate_id or cost is None:
            continue
        try:
            gate = client.get_run(gate_id)
        except Exception:  # the gate run was deleted: the pair is lost, not fatal
            continue
        signals = {s: gate.data.metrics.get(s) for s in PRIOR_SIGNALS}
        censored = bool(run.data.metrics.get(names.CENSORED_METRIC, 0.0))
        points.append(HistoryPoint(gate_id, run.info.run_id, signals, float(cost), censored))
    return points


def _training_metrics(client, version) -> dict[str, float]:
    """The metrics of ``version``'s training-cost run (its publish run), read once; empty when it has none."""
    run_id = version.tags.get(names.TRAIN_RUN_MV_TAG) or version.run_id
    if not run_id:
        return {}
    return dict(registry_call("reading the training cost", client.get_run, run_id).data.metrics)


def _cost(metrics: dict[str, float], cost_metric: str) -> float | None:
    value = metrics.get(cost_metric)
    return None if value is None or math.isnan(value) else float(value)


def rebuild_cost(client, version, *, cost_metric: str = DEFAULT_COST_METRIC) -> float | None:
    """The recorded training cost of ``version`` (its publish run), or None when not on file."""
    return _cost(_training_metrics(client, version), cost_metric)


def forecast_cost(client, version, features: dict[str, float | None]) -> CostForecast | None:
    """Predicted fine-tuning cost of data with these ``features`` in the model's own units, or None without a
    recorded training cost (the gate then decides without costs)."""
    recorded = _training_metrics(client, version)  # one read for the steps and the energy
    training = _cost(recorded, DEFAULT_COST_METRIC)
    if training is None or training <= 0:
        log.info("no cost forecast: model %s version %s has no recorded training cost", version.name, version.version)
        return None
    energy = _cost(recorded, "energy_kwh")
    history = [
        (p.signals, p.cost / training)
        for p in retrain_history(client, version.name)
        if not p.censored  # a censored run's cost is only a lower bound
    ]
    rel = forecast_relative(features, history)
    log.info(
        "cost forecast (%s, %d runs of history): fine-tuning %.2f [%.2f, %.2f] x the training cost %g steps",
        rel.basis, rel.n_history, rel.value, rel.low, rel.high, training,
    )  # fmt: skip
    return CostForecast(
        predicted=rel.value * training, low=rel.low * training, high=rel.high * training, rebuild=training,
        unit="steps", basis=rel.basis, n_history=rel.n_history,
        energy_kwh=None if energy is None else rel.value * energy,
    )  # fmt: skip

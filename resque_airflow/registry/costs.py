"""A model's retraining history in MLflow, and the cost-aware policy built on it (DESIGN.md 2.5).

Every retrain run that a gate triggered carries ``resque.gate_run_id``; joining it to that gate run's signals gives
one (signals, measured cost) pair. With at least :data:`~resque_airflow.core.costmodel.MIN_HISTORY` uncensored
pairs, the gate fits a :class:`~resque_airflow.core.costmodel.CostModel`, predicts the retraining cost of the new
data with an interval, and compares it with the model's recorded rebuild cost (the training cost logged when the
version was published). Below that, the gate uses thresholds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

from resque_airflow.core.costmodel import MIN_HISTORY, SIGNALS, CostModel
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
        signals = {s: gate.data.metrics.get(s) for s in SIGNALS}
        censored = bool(run.data.metrics.get(names.CENSORED_METRIC, 0.0))
        points.append(HistoryPoint(gate_id, run.info.run_id, signals, float(cost), censored))
    return points


def rebuild_cost(client, version, *, cost_metric: str = DEFAULT_COST_METRIC) -> float | None:
    """The recorded training cost of ``version`` (its publish run), or None when not on file."""
    run_id = version.tags.get(names.TRAIN_RUN_MV_TAG) or version.run_id
    if not run_id:
        return None
    value = registry_call("reading the training cost", client.get_run, run_id).data.metrics.get(cost_metric)
    return None if value is None or math.isnan(value) else float(value)


@dataclass
class CostDecision:
    """What the cost-aware policy predicted and decided (JSON-serialisable via ``to_dict``)."""

    cost_metric: str
    predicted: float
    low: float
    high: float
    coverage: float
    rebuild_cost: float
    n_history: int
    decision: str
    weights: dict

    def to_dict(self) -> dict:
        return asdict(self)


def cost_policy(
    client, version, signals: dict, *, cost_metric: str = DEFAULT_COST_METRIC, min_history: int = MIN_HISTORY
) -> CostDecision | None:
    """Predict retraining cost from history and choose retrain (cheaper than a rebuild) or rebuild.

    Returns None when the history is shorter than ``min_history`` uncensored points or no rebuild cost is on file:
    the caller then falls back to thresholds. Censored runs (target not reached within the cap) are left out of the
    fit: their cost is only a lower bound.
    """
    points = [p for p in retrain_history(client, version.name, cost_metric=cost_metric) if not p.censored]
    rebuild = rebuild_cost(client, version, cost_metric=cost_metric)
    if len(points) < min_history or rebuild is None:
        log.info(
            "cost model not used: %d uncensored retrain runs on file (need %d), rebuild cost %s",
            len(points), min_history, "on file" if rebuild is not None else "missing",
        )  # fmt: skip
        return None
    model = CostModel().fit([p.signals for p in points], [p.cost for p in points])
    pred = model.predict(signals)
    decision = names.KIND_RETRAIN if pred.value < rebuild else names.KIND_REBUILD
    return CostDecision(
        cost_metric=cost_metric, predicted=pred.value, low=pred.low, high=pred.high, coverage=pred.coverage,
        rebuild_cost=rebuild, n_history=len(points), decision=decision, weights=model.explain().get("weights", {}),
    )  # fmt: skip

"""The closed audit loop in MLflow: what a gate run records beyond its metrics, and what a retrain writes back.

- the incoming batch as the gate run's input dataset (``mlflow.data``: by URI and digest, the data is never copied);
- the score logged against the model version's logged model (MLflow 3), when the version has one;
- one self-contained HTML report per gate run (:mod:`.report`);
- the run named ``<model>@<alias> <decision> <score>`` (the experiment's view is set once, when
  :func:`~resque_airflow.registry.client.ensure_experiment` creates it);
- when a retrain finishes, its measured cost written back onto the triggering gate run as ``measured_<cost>``,
  beside the gate's ``predicted_<cost>``, so "predicted vs measured" charts in the MLflow UI.
"""

from __future__ import annotations

import logging
import math
import warnings

from resque_airflow.registry import names
from resque_airflow.registry.client import registry_call

log = logging.getLogger(__name__)

DATASET_CONTEXT = "gate"
DIGEST_CHARS = 32  # MLflow's dataset digest column holds 36 characters; the full hash is the run's data_hash param
MEASURED_PREFIX = "measured_"
CHALLENGER_RUN_TAG = "resque.challenger_run_id"  # on a gate run: the retrain/rebuild run that acted on it
CHALLENGER_OUTCOME_TAG = "resque.challenger_outcome"  # "met_target" or "missed_target"


def gate_run_name(outcome: dict) -> str:
    """``<model>@<alias> <decision> <score>`` (``<model>/v<version>`` when gated by version)."""
    where = f"@{outcome['model_alias']}" if outcome.get("model_alias") else f"/v{outcome.get('model_version')}"
    return f"{outcome.get('model_name')}{where} {outcome.get('decision')} {float(outcome.get('score') or 0):.4f}"


def batch_dataset(data_uri: str, data_hash: str, name: str | None = None):
    """The batch as an MLflow dataset entity: its source URI and digest only (``mlflow.data.meta_dataset``)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    label = name or (data_uri.rstrip("/").rsplit("/", 1)[-1] or "batch")
    with warnings.catch_warnings():  # resolving a source warns when it falls back to a generic source
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(data_uri)
    return MetaDataset(source=source, name=label[:500], digest=(data_hash or "unknown")[:DIGEST_CHARS])


def record_gate_extras(client, run_id: str, outcome: dict) -> None:
    """Log the batch as the gate run's input dataset (by URI and digest).

    The one extra with a call of its own (MLflow writes inputs apart from metrics, params and tags). The others go
    with the gate's result (:func:`~resque_airflow.registry.gate.run_gate`): the report beside the result JSON in
    one upload, the run name (tag ``mlflow.runName``) and the score on the logged model (the score metric carrying
    the version's ``model_id``) in its one ``log_batch``.
    """
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    data_uri = outcome.get("data_uri") or ""
    if data_uri:
        entity = batch_dataset(data_uri, outcome.get("data_hash") or "")._to_mlflow_entity()
        dataset = DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, DATASET_CONTEXT)])
        registry_call("logging the batch as the gate's input", client.log_inputs, run_id, datasets=[dataset])


def logged_model_id(version) -> str | None:
    """The logged model (MLflow 3) a model version was created from, or None: the score logged with this id shows on
    the model's page."""
    return getattr(version, "model_id", None) or None


def write_back_cost(client, gate_run_id: str, challenger_run_id: str, cost: dict, *, met_target: bool) -> None:
    """Log a retrain's measured cost on the gate run that triggered it (``measured_<cost>``), with its run id."""
    from mlflow.entities import Metric, RunTag

    keys = (*names.COST_METRICS, names.CENSORED_METRIC, names.FINAL_ACCURACY_METRIC)
    metrics = [
        Metric(f"{MEASURED_PREFIX}{k}", float(cost[k]), 0, 0)
        for k in keys
        if cost.get(k) is not None and math.isfinite(float(cost[k]))
    ]
    tags = [RunTag(CHALLENGER_RUN_TAG, challenger_run_id),
            RunTag(CHALLENGER_OUTCOME_TAG, "met_target" if met_target else "missed_target")]  # fmt: skip
    registry_call("writing the measured cost onto the gate run", client.log_batch, gate_run_id, metrics=metrics,
                  tags=tags)  # fmt: skip

"""The post-retrain gate: move ``@champion`` to the challenger only if MLflow's validation says it is better.

RESQUE decides before retraining whether to spend the GPU time; this check decides after it whether the result may
serve. Both versions are evaluated on the held-out part of the retraining data (the same stratified split the
challenger held out while training, :func:`~.challenger.heldout_split`), and
``mlflow.validate_evaluation_results`` compares the challenger's accuracy with the champion's: the challenger must
reach ``min_accuracy`` and beat the champion by at least ``min_absolute_change``. The evaluation is logged as a run
(``resque.kind=promotion``) in the retrain experiment, whatever the outcome.
"""

from __future__ import annotations

import logging
import tempfile

import numpy as np

from resque_airflow.errors import ResqueInputError
from resque_airflow.registry import names
from resque_airflow.registry.artifacts import fetch_model
from resque_airflow.registry.challenger import TARGET_MISSED, TARGET_TAG, heldout_split, load_labelled
from resque_airflow.registry.client import ensure_experiment, registry_call

log = logging.getLogger(__name__)

KIND_PROMOTION = "promotion"
PROMOTED_TAG = "resque.promoted"  # on the promotion run: "true" or "false"
METRIC = "accuracy_score"  # the name mlflow.models.evaluate's classifier evaluator gives accuracy


def _accuracy(model_path, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 accuracy of an ONNX classifier (its first output is the logits) on ``x``, ``y``."""
    from resque_airflow.runtime.session import create_session

    sess = create_session(model_path.read_bytes(), "cpu").session
    name, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    hits = 0
    for i in range(0, len(y), batch_size):
        logits = sess.run([out], {name: x[i : i + batch_size].astype(np.float32)})[0]
        hits += int((np.asarray(logits).argmax(axis=1) == y[i : i + batch_size]).sum())
    return hits / max(len(y), 1)


def promote_challenger(
    client,
    name: str,
    *,
    data_uri: str,
    heldout_fraction: float = 0.25,
    seed: int = 0,
    champion_alias: str = "champion",
    challenger_alias: str = "challenger",
    min_absolute_change: float = 0.0,
    min_accuracy: float | None = None,
    gate_run_id: str | None = None,
) -> dict:
    """Compare ``@challenger`` with ``@champion`` on held-out data; move ``@champion`` only when validation passes.

    Returns ``{promoted, champion_version, challenger_version, champion_accuracy, challenger_accuracy, reason,
    run_id}`` (JSON types). A challenger recorded as missing its target is never promoted.
    """
    import mlflow
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.models.evaluation import EvaluationResult, MetricThreshold
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    champion = registry_call("reading @" + champion_alias, client.get_model_version_by_alias, name, champion_alias)
    try:
        challenger = client.get_model_version_by_alias(name, challenger_alias)
    except MlflowException as exc:
        raise ResqueInputError(
            f"challenger_alias: model {name} has no @{challenger_alias}; nothing to promote ({exc.message[:200]})"
        ) from exc
    x, y = load_labelled(data_uri)
    _, held = heldout_split(y, heldout_fraction, seed)
    with tempfile.TemporaryDirectory(prefix="resque-promote-") as tmp:
        acc = {}
        for label, version in (("champion", champion), ("challenger", challenger)):
            fetched = fetch_model(client, version, f"{tmp}/{label}", need_fingerprint=False)
            acc[label] = _accuracy(fetched.model_path, x[held], y[held])
    # Strictly better than the champion: MLflow's min_absolute_change is exclusive, and 0 would mean no threshold.
    thresholds = {
        METRIC: MetricThreshold(
            threshold=min_accuracy, min_absolute_change=max(min_absolute_change, 1e-9), greater_is_better=True
        )
    }
    if challenger.tags.get(TARGET_TAG) == TARGET_MISSED:
        promoted, reason = False, f"challenger v{challenger.version} missed its target accuracy"
    elif str(challenger.version) == str(champion.version):
        promoted, reason = False, f"@{challenger_alias} and @{champion_alias} are the same version"
    else:
        try:
            mlflow.validate_evaluation_results(
                thresholds,
                candidate_result=EvaluationResult({METRIC: acc["challenger"]}, {}),
                baseline_result=EvaluationResult({METRIC: acc["champion"]}, {}),
            )
            promoted = True
            reason = (f"challenger v{challenger.version} accuracy {acc['challenger']:.4f} passes validation against "
                      f"champion v{champion.version} ({acc['champion']:.4f})")  # fmt: skip
        except ModelValidationFailedException as exc:
            promoted, reason = False, f"validation failed: {str(exc).strip()[:800]}"
    exp_id = ensure_experiment(client, names.RETRAIN_EXPERIMENT)
    tags = {names.KIND_TAG: KIND_PROMOTION, names.MODEL_NAME_TAG: name, PROMOTED_TAG: str(promoted).lower(),
            "resque.champion_version": str(champion.version),
            "resque.challenger_version": str(challenger.version)}  # fmt: skip
    if gate_run_id:
        tags[names.GATE_RUN_TAG] = gate_run_id
    run = registry_call("creating the promotion run", client.create_run, exp_id, tags=tags,
                        run_name=f"{name} promote v{challenger.version}: {'yes' if promoted else 'no'}")  # fmt: skip
    registry_call("logging the promotion check", client.log_batch, run.info.run_id,
                  metrics=[Metric(f"{k}_{METRIC}", v, 0, 0) for k, v in acc.items()],
                  tags=[RunTag("resque.reason", reason[:5000])])  # fmt: skip
    if promoted:
        registry_call("moving @" + champion_alias, client.set_registered_model_alias, name, champion_alias,
                      challenger.version)  # fmt: skip
    registry_call("closing the promotion run", client.set_terminated, run.info.run_id, "FINISHED")
    log.info("promotion of %s: %s", name, reason)
    return {
        "promoted": promoted, "champion_version": str(champion.version),
        "challenger_version": str(challenger.version), "champion_accuracy": acc["champion"],
        "challenger_accuracy": acc["challenger"], "reason": reason, "run_id": run.info.run_id,
    }  # fmt: skip

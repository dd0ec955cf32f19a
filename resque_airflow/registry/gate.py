"""The gate: resolve the production model, score new data, decide, and leave the audit trail (DESIGN.md 5).

Shared by :class:`~resque_airflow.operators.gate.ResqueGateOperator` and ``resque gate``. Order of work, so that a
failure never leaves a half-written trail:

1. validate the request (thresholds, mode, label source) before touching the registry;
2. resolve the alias or version, download the model and fingerprint, check the sha256;
3. open the gate run (one per Airflow task instance: an earlier try's run is soft-deleted);
4. score; on any error the run is marked FAILED with ``resque.status=failed`` and no model-version tag changes;
5. log metrics, the result artifact and the decision, close the run FINISHED;
6. only then tag the model version (newest gate wins).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from resque_airflow.core.decision import DEFAULT_THRESHOLDS, Decision, Thresholds, decide
from resque_airflow.core.errors import RegistryError, ResqueInputError
from resque_airflow.core.summary import LABEL_SOURCES
from resque_airflow.registry import names
from resque_airflow.registry.artifacts import fetch_model
from resque_airflow.registry.client import ModelRef, ensure_experiment, make_client, registry_call, resolve_version
from resque_airflow.runtime import pipeline

log = logging.getLogger(__name__)

MODES = ("dist", "task")
LAST_GATE_TAG = "resque.last_gate"  # one JSON tag with everything, written in a single call


@dataclass
class GateRequest:
    """What to gate. ``reuse_threshold`` / ``rebuild_threshold`` default to the measured values for the mode."""

    model_uri: str
    data: str
    mode: str = "dist"
    label_source: str = "given"
    layer: str = "auto"
    provider: str = "auto"
    reuse_threshold: float | None = None
    rebuild_threshold: float | None = None
    experiment_name: str = names.DEFAULT_EXPERIMENT
    batch_size: int = pipeline.DEFAULT_BATCH_SIZE
    cost_aware: bool = True  # with enough retrain history, decide retrain vs rebuild on predicted cost
    shard_summaries: list[str] | None = None  # fan-in: score merged shard summaries instead of reading ``data``

    def thresholds(self) -> Thresholds:
        if self.mode not in MODES:
            raise ResqueInputError(f"mode: expected one of {MODES}, got {self.mode!r}")
        default = DEFAULT_THRESHOLDS[self.mode]
        for name in ("reuse_threshold", "rebuild_threshold"):
            value = getattr(self, name)
            if isinstance(value, str):  # a rendered template without native rendering
                try:
                    setattr(self, name, None if value.strip() in ("", "None") else float(value))
                except ValueError as exc:
                    raise ResqueInputError(f"{name}: expected a number in [0, 1], got {value!r}") from exc
        return Thresholds(
            reuse=default.reuse if self.reuse_threshold is None else self.reuse_threshold,
            rebuild=default.rebuild if self.rebuild_threshold is None else self.rebuild_threshold,
        ).validate()

    def validate(self) -> Thresholds:
        if self.label_source not in LABEL_SOURCES:
            raise ResqueInputError(f"labels: expected one of {LABEL_SOURCES}, got {self.label_source!r}")
        if not self.data and not self.shard_summaries:
            raise ResqueInputError("data: empty; give a path or URL of the incoming data")
        if self.shard_summaries is not None and self.mode != "dist":
            raise ResqueInputError("shard_summaries: fan-in is supported for mode='dist' only")
        ModelRef.parse(self.model_uri)
        return self.thresholds()


@dataclass(frozen=True)
class AirflowInfo:
    """Where a gate ran from, when run by Airflow."""

    dag_id: str
    run_id: str
    task_id: str
    try_number: int
    map_index: int = -1

    @property
    def key(self) -> str:
        return f"{self.dag_id}/{self.run_id}/{self.task_id}/{self.map_index}"


@dataclass
class GateOutcome:
    """The gate's result. ``to_dict()`` is the JSON pushed to XCom and printed by ``resque gate --json``."""

    score: float
    decision: str
    mode: str
    model_name: str
    model_version: str
    model_alias: str | None
    gate_run_id: str
    provider: str
    n_samples: int
    n_classes: int
    label_source: str
    thresholds: dict
    policy: str
    data_uri: str
    data_hash: str
    branch: list[str] | None = None
    prediction: dict | None = None
    signals: dict = field(default_factory=dict)
    per_class: dict = field(default_factory=dict)
    layer: str = ""
    seconds: float = 0.0

    def to_dict(self, *, per_class: bool = True) -> dict:
        out = asdict(self)
        if not per_class:
            out.pop("per_class")
        return out


def _open_gate_run(client, experiment_name: str, tags: dict, airflow: AirflowInfo | None) -> str:
    exp_id = ensure_experiment(client, experiment_name)
    if airflow is not None:
        # One gate run per task instance: a retry replaces the earlier try's run (soft delete, restorable).
        earlier = registry_call(
            "looking for an earlier try",
            client.search_runs,
            [exp_id],
            filter_string=f"tags.`{names.GATE_KEY_TAG}` = '{airflow.key}'",
        )
        for run in earlier:
            log.info("replacing gate run %s of an earlier try of %s", run.info.run_id, airflow.key)
            client.delete_run(run.info.run_id)
    run = registry_call("creating the gate run", client.create_run, exp_id, tags=tags, run_name="resque-gate")
    return run.info.run_id


def _tag_model_version(client, name: str, version: str, payload: dict) -> bool:
    """Write the model-version tags unless a newer gate already did (newest gate wins). Returns whether written."""
    mv = client.get_model_version(name, version)
    current = mv.tags.get(LAST_GATE_TAG)
    if current:
        try:
            if json.loads(current).get("time", "") > payload["time"]:
                log.info("model version %s/%s already carries a newer gate result; leaving its tags", name, version)
                return False
        except (ValueError, AttributeError):
            pass  # a damaged tag is overwritten
    client.set_model_version_tag(name, version, LAST_GATE_TAG, json.dumps(payload))
    for tag, key in (
        (names.MV_TAG_SCORE, "score"), (names.MV_TAG_DECISION, "decision"), (names.MV_TAG_GATE_RUN, "run_id"),
        (names.MV_TAG_TIME, "time"), (names.MV_TAG_MODE, "mode"),
    ):  # fmt: skip
        client.set_model_version_tag(name, version, tag, str(payload[key]))
    return True


def run_gate(
    request: GateRequest,
    *,
    tracking_uri: str,
    registry_uri: str | None = None,
    airflow: AirflowInfo | None = None,
    branch_for: Callable[[Decision], list[str]] | None = None,
    progress: pipeline.Progress | None = None,
) -> GateOutcome:
    """Run one gate end to end; see the module docstring for the order of work and failure guarantees."""
    from mlflow.entities import Metric, Param, RunTag

    thresholds = request.validate()
    ref = ModelRef.parse(request.model_uri)
    client = make_client(tracking_uri, registry_uri)
    version = resolve_version(client, ref)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="resque-gate-") as tmp:
        fetched = fetch_model(client, version, tmp, need_fingerprint=request.mode == "dist")
        tags = {
            names.KIND_TAG: names.KIND_GATE,
            names.STATUS_TAG: "scoring",
            names.MODEL_NAME_TAG: ref.name,
            names.MODEL_VERSION_TAG: str(version.version),
        }
        if airflow is not None:
            tags[names.GATE_KEY_TAG] = airflow.key
        run_id = _open_gate_run(client, request.experiment_name, tags, airflow)
        params = {
            "model_name": ref.name, "model_version": version.version, "model_alias": ref.alias or "",
            "model_sha256": fetched.sha256, "data_uri": request.data, "mode": request.mode,
            "label_source": request.label_source, "reuse_threshold": thresholds.reuse,
            "rebuild_threshold": thresholds.rebuild,
        }  # fmt: skip
        if airflow is not None:
            params |= {
                "airflow_dag_id": airflow.dag_id, "airflow_run_id": airflow.run_id, "airflow_task_id": airflow.task_id,
                "airflow_try_number": airflow.try_number,
            }  # fmt: skip
        try:
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
            if request.shard_summaries is not None:
                result = _score_shards(request, fetched)
            elif request.mode == "dist":
                result = pipeline.score_dist(
                    fetched.model_path, fetched.fingerprint, request.data, label_source=request.label_source,
                    provider=request.provider, batch_size=request.batch_size, progress=progress, model_ref=str(ref),
                )  # fmt: skip
            else:
                fp = fetched.fingerprint
                layer = fp.layer if fp and request.layer == "auto" else request.layer
                result = pipeline.score_task(
                    fetched.model_path, request.data, layer=layer,
                    provider=request.provider, batch_size=request.batch_size,
                    image_spec=fp.input_spec.image if fp else None, progress=progress,
                )  # fmt: skip
            decision, policy, prediction = _decide(client, version, request, result, thresholds)
            branch = branch_for(decision) if branch_for else None
            now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
            metrics = {names.SCORE_METRIC: result.score, "n_samples": result.n_samples, "n_classes": result.n_classes}
            metrics |= {k: v for k, v in result.signals.items() if v is not None}
            metrics |= {f"angle_class_{k}": v for k, v in result.per_class.items()}
            if prediction is not None:
                m = prediction["cost_metric"]
                metrics |= {
                    f"predicted_{m}": prediction["predicted"],
                    f"predicted_{m}_low": prediction["low"],
                    f"predicted_{m}_high": prediction["high"],
                    "rebuild_cost": prediction["rebuild_cost"],
                }
            stamp = int(time.time() * 1000)
            outcome = GateOutcome(
                score=result.score, decision=decision.value, mode=request.mode, model_name=ref.name,
                model_version=str(version.version), model_alias=ref.alias, gate_run_id=run_id,
                provider=result.provider, n_samples=result.n_samples, n_classes=result.n_classes,
                label_source=result.label_source, thresholds=thresholds.to_dict(), policy=policy, prediction=prediction,
                data_uri=request.data, data_hash=result.data_hash, branch=branch, signals=result.signals,
                per_class={str(k): v for k, v in result.per_class.items()}, layer=result.layer,
                seconds=time.perf_counter() - t0,
            )  # fmt: skip
            client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items()],
                params=[
                    Param(k, str(v))
                    for k, v in (
                        ("provider", result.provider), ("layer", result.layer), ("data_hash", result.data_hash),
                        ("n_samples", result.n_samples), ("n_classes", result.n_classes), ("policy", policy),
                    )
                ],
                tags=[RunTag(names.DECISION_TAG, decision.value), RunTag(names.BRANCH_TAG, json.dumps(branch)),
                      RunTag(names.POLICY_TAG, policy)],
            )  # fmt: skip
            client.log_dict(run_id, outcome.to_dict(), names.GATE_RESULT_ARTIFACT)
            client.set_tag(run_id, names.STATUS_TAG, "decided")
            client.set_terminated(run_id, "FINISHED")
        except BaseException as exc:
            _fail_run(client, run_id, exc)
            raise
    written = registry_call(
        "tagging the model version",
        _tag_model_version,
        client,
        ref.name,
        str(version.version),
        {"score": result.score, "decision": decision.value, "run_id": run_id, "time": now, "mode": request.mode},
    )
    log.info(
        "gate %s: RESQUE_%s=%.4f -> %s (version %s, %d samples, %s)%s",
        ref, request.mode, result.score, decision.value, version.version, result.n_samples, result.provider,
        "" if written else " [a newer gate already tagged this version]",
    )  # fmt: skip
    return outcome


def _decide(client, version, request: GateRequest, result, thresholds: Thresholds):
    """Thresholds decide reuse; above it, predicted cost against rebuild cost decides when history allows."""
    by_threshold = decide(result.score, thresholds)
    if by_threshold is Decision.REUSE or not request.cost_aware or request.mode != "dist":
        return by_threshold, "thresholds", None
    from resque_airflow.registry.history import cost_policy

    cost = cost_policy(client, version, result.signals)
    if cost is None:
        return by_threshold, "thresholds", None
    log.info(
        "cost model (%d runs): predicted %s %.1f [%.1f, %.1f] vs rebuild %.1f -> %s",
        cost.n_history, cost.cost_metric, cost.predicted, cost.low, cost.high, cost.rebuild_cost, cost.decision,
    )  # fmt: skip
    return Decision(cost.decision), "cost_model", cost.to_dict()


def _score_shards(request: GateRequest, fetched) -> pipeline.ScoreResult:
    import hashlib

    from resque_airflow.runtime.shards import merge_shards

    summary, headers = merge_shards(list(request.shard_summaries), fetched.fingerprint)
    digest = hashlib.sha256("".join(sorted(h.data_hash for h in headers)).encode()).hexdigest()
    return pipeline.dist_result(
        fetched.fingerprint, summary, label_source=request.label_source, provider="shards",
        data_uri=request.data or ",".join(h.data_uri for h in headers), data_hash=digest,
    )  # fmt: skip


def _fail_run(client, run_id: str, exc: BaseException) -> None:
    """Best effort: mark the gate run failed with the reason; the original error is what the caller sees."""
    try:
        client.set_tag(run_id, names.STATUS_TAG, "failed")
        client.set_tag(run_id, names.ERROR_TAG, f"{type(exc).__name__}: {str(exc)[:4000]}")
        client.set_terminated(run_id, "FAILED")
    except Exception as inner:  # the registry may be the thing that failed
        log.warning("could not mark gate run %s as failed: %s", run_id, inner)


__all__ = ["AirflowInfo", "GateOutcome", "GateRequest", "RegistryError", "run_gate"]

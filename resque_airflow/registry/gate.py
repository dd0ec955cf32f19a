"""The gate: resolve the production model, score new data, decide, and leave the audit trail (DESIGN.md 5).

Shared by :class:`~resque_airflow.operators.gate.ResqueGateOperator` and ``resque gate``. Order of work, so that a
failure never leaves a half-written trail:

1. validate the request (thresholds, mode, label source) before touching the registry;
2. resolve the alias or version, download the model and fingerprint, check the sha256;
3. open the gate run (one per task instance of an :class:`Origin`: an earlier try's run is soft-deleted);
4. score; on any error the run is marked FAILED with ``resque.status=failed`` (and the request's params) and no
   model-version tag changes;
5. upload the result JSON and the report (one ``log_artifacts``), log the input dataset, then params, metrics and
   decision tags with ``resque.status=decided`` in one ``log_batch`` (the last request of it, when MLflow's limits
   split it), and close the run FINISHED (its end time is the gate's time);
6. only then tag the model version (newest gate wins, see :func:`~.tags.tag_model_version`).

Round trips: the registered model and the model version are read once per gate and passed along (MLflow's own
"is it a prompt?" check runs once, :func:`~.client.prompt_checked_once`), and only the model-version tags that
change are written. On SQLite a first gate makes 20 MlflowClient calls, MLflow's calls to its own public methods
included (33 before issue 16); ``tests/test_mlflow_round_trips.py`` holds the bound.

Registry failures anywhere in steps 2-6 surface as :class:`RegistryError` (the CLI's exit code 3; a retryable
``ResqueGateError`` in Airflow). MLflow's own HTTP retries are bounded by :func:`~.client.make_client`. Whatever
fails, :func:`failed_at` tells which step it was and which gate run (if one was opened) is marked failed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from resque_airflow.core.decision import DEFAULT_THRESHOLDS, Decision, Thresholds
from resque_airflow.core.null import DEFAULT_ALPHA
from resque_airflow.core.policy import Prices, check_alpha
from resque_airflow.core.summary import LABEL_SOURCES
from resque_airflow.errors import RegistryError, ResqueInputError, check_choice, check_finite, redact
from resque_airflow.jsonsafe import finite
from resque_airflow.registry import names
from resque_airflow.registry.artifacts import FetchedModel, download_dir, fetch_model
from resque_airflow.registry.client import (
    ModelRef,
    ensure_experiment,
    iso_time,
    log_text_files,
    prompt_checked_once,
    registry_call,
    resolve_version,
    search_literal,
)
from resque_airflow.registry.record import fail_run, gate_metrics
from resque_airflow.registry.tags import tag_model_version
from resque_airflow.registry.verdict import (
    GateVerdict,
    calibrated_verdict,
    cost_features,
    data_issue_verdict,
    threshold_verdict,
)
from resque_airflow.runtime import pipeline
from resque_airflow.runtime.readers import check_data_exists

log = logging.getLogger(__name__)

MODES = ("dist", "task")

Routes = Mapping[str, Sequence[str]]  # decision value ("reuse", "retrain", "rebuild", "data_issue") -> ids to follow


@dataclass
class GateRequest:
    """What to gate, and how to decide.

    In ``mode="dist"`` the decision is calibrated to the model and the batch (``alpha``: the false-alarm rate of
    the shift test; prices: optional cost/benefit weighing); giving ``reuse_threshold`` or ``rebuild_threshold``
    decides with those fixed thresholds instead (as does ``mode="task"``, with its measured defaults).
    """

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
    shard_summaries: list[str] | None = None  # fan-in: score merged shard summaries instead of reading ``data``
    alpha: float = DEFAULT_ALPHA
    price_per_kwh: float | None = None
    value_per_accuracy_point: float | None = None

    @property
    def calibrated(self) -> bool:
        """Whether the calibrated decision applies (dist mode, no fixed threshold given)."""
        return self.mode == "dist" and self.reuse_threshold is None and self.rebuild_threshold is None

    @property
    def prices(self) -> Prices:
        return Prices(per_kwh=self.price_per_kwh, per_accuracy_point=self.value_per_accuracy_point)

    def thresholds(self) -> Thresholds:
        """The thresholds to decide with: the ones given, else the measured defaults of the mode."""
        check_choice("mode", self.mode, MODES)
        default = DEFAULT_THRESHOLDS[self.mode]
        return Thresholds(
            reuse=default.reuse if self.reuse_threshold is None else self.reuse_threshold,
            rebuild=default.rebuild if self.rebuild_threshold is None else self.rebuild_threshold,
        ).validate()

    def validate(self) -> Thresholds:
        """Check everything that can be checked without the registry; returns :meth:`thresholds`."""
        check_choice("labels", self.label_source, LABEL_SOURCES)
        if not self.data and not self.shard_summaries:
            raise ResqueInputError("data: empty; give a path or URL of the incoming data")
        if self.shard_summaries is not None and self.mode != "dist":
            raise ResqueInputError("shard_summaries: fan-in is supported for mode='dist' only")
        ModelRef.parse(self.model_uri)
        check_alpha(self.alpha)
        self.prices.validate()
        return self.thresholds()


@dataclass(frozen=True)
class Origin:
    """The task instance a gate ran for (an Airflow task instance, or any scheduler's equivalent).

    A retry of the same instance (same :attr:`key`) replaces the earlier try's gate run.
    """

    dag_id: str
    run_id: str
    task_id: str
    try_number: int
    map_index: int = -1

    @property
    def key(self) -> str:
        return f"{self.dag_id}/{self.run_id}/{self.task_id}/{self.map_index}"

    def params(self) -> dict[str, object]:
        """The gate run's params naming this origin (``names.GATE_PARAMS``: ``airflow_*``, public interface)."""
        return {
            "airflow_dag_id": self.dag_id, "airflow_run_id": self.run_id, "airflow_task_id": self.task_id,
            "airflow_try_number": self.try_number,
        }  # fmt: skip


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
    reason: str = ""
    interval: list[float] | None = None  # the score's 90% bootstrap interval (dist mode)
    calibration: dict | None = None  # null check, companions' nulls, accuracy (measured / ATC): core.calibration
    sanity: list = field(default_factory=list)  # failed data-sanity checks, if any

    @classmethod
    def from_result(cls, result: pipeline.ScoreResult, **gate: Any) -> GateOutcome:
        """The outcome of ``result``: the fields a score result shares with the outcome, and ``gate`` for the rest.

        ``gate`` wins where both name a field (``mode``, ``data_uri`` and ``seconds`` are the gate's, not the pass's).
        """
        ours = {f.name for f in fields(cls)}
        shared = {k: v for k, v in result.to_dict().items() if k in ours}  # per_class keys as text, as in JSON
        return cls(**(shared | gate))

    def to_dict(self, *, per_class: bool = True) -> dict:
        """Strict JSON: a value that is not a finite number (an undefined signal, an open interval) is None."""
        out = finite(asdict(self))
        if not per_class:
            out.pop("per_class")
        return out


@dataclass
class _Gate:
    """One gate in progress: what its steps share, and how far it got (attached to an error by :func:`run_gate`)."""

    client: Any
    request: GateRequest
    origin: Origin | None
    stage: str = "validating the request"
    thresholds: Thresholds | None = None
    ref: ModelRef | None = None
    version: Any = None  # mlflow ModelVersion
    fetched: FetchedModel | None = None
    run_id: str | None = None
    exp_id: str | None = None
    params: dict = field(default_factory=dict)  # the request's params, logged with the result (or the failure)
    undecided_run_id: str | None = None  # the gate run a failure left undecided (marked failed, registry permitting)


# Attributes run_gate sets on the exception it re-raises (read them with failed_at).
_STAGE_ATTR = "resque_gate_stage"
_RUN_ATTR = "resque_gate_run_id"


def failed_at(exc: BaseException) -> tuple[str | None, str | None]:
    """``(stage, gate run id)`` of a gate that raised ``exc``: what it was doing, and the gate run it left undecided.

    That run is marked failed, unless the registry was what failed. Both are None for an exception that did not come
    out of :func:`run_gate`; the run id is None when the gate failed before opening its run or after deciding (when
    tagging the model version).
    """
    return getattr(exc, _STAGE_ATTR, None), getattr(exc, _RUN_ATTR, None)


def run_gate(
    request: GateRequest,
    *,
    client,
    routes: Routes | None = None,
    origin: Origin | None = None,
    progress: pipeline.Progress | None = None,
) -> GateOutcome:
    """Run one gate end to end with the MLflow ``client`` (:func:`~.client.make_client`).

    ``routes`` maps each decision value to the task ids to follow (the outcome's ``branch``; None without routes);
    ``origin`` names the task instance, so that a retry replaces its earlier try's run. See the module docstring
    for the order of work and failure guarantees.
    """
    gate = _Gate(client, request, origin)
    t0 = time.perf_counter()
    try:
        gate.thresholds = request.validate()
        gate.ref = ModelRef.parse(request.model_uri)
        with prompt_checked_once(client):  # the registered model is read once, not before each registry call
            gate.stage = "resolving the model version"
            gate.version = resolve_version(client, gate.ref)
            if request.shard_summaries is None:  # before the download: bad data fails in a second, not after it
                check_data_exists(request.data)
            with download_dir() as tmp:  # named by pid: a later gate removes what a killed one left
                gate.stage = "downloading the model"
                gate.fetched = fetch_model(client, gate.version, tmp, need_fingerprint=request.mode == "dist")
                gate.stage = "opening the gate run"
                _open_gate_run(gate)
                outcome, stamp = _score_and_record(gate, routes, progress, t0)
            gate.stage = "tagging the model version"
            record = {"score": outcome.score, "decision": outcome.decision, "run_id": gate.run_id,
                      "time": iso_time(stamp), "mode": request.mode}  # fmt: skip
            # The version as resolved is the first round's reading of its tags; the verifying round reads them again.
            written = registry_call("tagging the model version", tag_model_version, client, gate.ref.name,
                                    outcome.model_version, record, gate.exp_id,
                                    known_tags=dict(gate.version.tags or {}))  # fmt: skip
    except BaseException as exc:
        _attach(exc, gate)
        raise
    log.info(
        "gate %s: RESQUE_%s=%.4f -> %s (version %s, %d samples, %s)%s",
        gate.ref, request.mode, outcome.score, outcome.decision, outcome.model_version, outcome.n_samples,
        outcome.provider, "" if written else " [a newer gate already tagged this version]",
    )  # fmt: skip
    return outcome


def record_action(client, gate_run_id: str, action: str) -> None:
    """Say on a gate run what the branch that followed it did (tag ``resque.action``, e.g. ``"reused"``)."""
    registry_call(f"recording {action!r} on gate run {gate_run_id}", client.set_tag, gate_run_id, names.ACTION_TAG,
                  action)  # fmt: skip


def _attach(exc: BaseException, gate: _Gate) -> None:
    """Record on ``exc`` where the gate failed (see :func:`failed_at`); the innermost gate's record is kept."""
    if failed_at(exc) != (None, None):
        return
    try:
        setattr(exc, _STAGE_ATTR, gate.stage)
        setattr(exc, _RUN_ATTR, gate.undecided_run_id)
    except (AttributeError, TypeError):  # an exception type without instance attributes: the message still says
        pass


def _open_gate_run(gate: _Gate) -> None:
    """Create the gate run (replacing an earlier try's run of the same origin); sets ``run_id`` and ``exp_id``."""
    client, origin = gate.client, gate.origin
    gate.exp_id = ensure_experiment(client, gate.request.experiment_name)
    tags = {
        names.KIND_TAG: names.KIND_GATE, names.STATUS_TAG: names.STATUS_SCORING, names.MODEL_NAME_TAG: gate.ref.name,
        names.MODEL_VERSION_TAG: str(gate.version.version),
    }  # fmt: skip
    if origin is not None:
        tags[names.GATE_KEY_TAG] = origin.key
        # One gate run per task instance: a retry replaces the earlier try's run (soft delete, restorable).
        key = search_literal(origin.key)
        if key is None:  # Airflow's run ids hold no quotes; refuse rather than keep two runs for one instance
            raise ResqueInputError(f"airflow: task instance key {origin.key!r} holds both kinds of quote")
        earlier = registry_call("looking for an earlier try", client.search_runs, [gate.exp_id],
                                filter_string=f"tags.`{names.GATE_KEY_TAG}` = {key}")  # fmt: skip
        for run in earlier:
            log.info("replacing gate run %s of an earlier try of %s", run.info.run_id, origin.key)
            registry_call("replacing the earlier try's gate run", client.delete_run, run.info.run_id)
    run = registry_call("creating the gate run", client.create_run, gate.exp_id, tags=tags,
                        run_name=names.GATE_RUN_NAME)  # fmt: skip
    gate.run_id = run.info.run_id


def _score_and_record(
    gate: _Gate, routes: Routes | None, progress: pipeline.Progress | None, t0: float
) -> tuple[GateOutcome, int]:
    """Steps 4-5 in the open gate run; returns the outcome and the gate's time. On any error the run is failed."""
    try:
        gate.params = _request_params(gate)
        gate.stage = "scoring"
        result = _score(gate, progress)
        gate.stage = "deciding"
        check_finite(f"RESQUE_{gate.request.mode} score of {redact(gate.request.data)}", result.score,
                     "the data or fingerprint holds values that are not numbers; nothing is tagged")  # fmt: skip
        verdict = _decide(gate, result, routes)
        outcome = GateOutcome.from_result(
            result, decision=verdict.decision.value, mode=gate.request.mode, model_name=gate.ref.name,
            model_version=str(gate.version.version), model_alias=gate.ref.alias, gate_run_id=gate.run_id,
            thresholds=gate.thresholds.to_dict(), policy=verdict.policy, prediction=verdict.prediction,
            reason=verdict.reason,
            data_uri=redact(gate.request.data), branch=None if routes is None else list(routes[verdict.decision.value]),
            seconds=time.perf_counter() - t0,
        )  # fmt: skip
        gate.stage = "writing the result"
        stamp = _write_result(gate, result, outcome)
    except BaseException as exc:
        gate.undecided_run_id = gate.run_id
        fail_run(gate.client, gate.run_id, exc, gate.params)
        raise
    return outcome, stamp


def _request_params(gate: _Gate) -> dict[str, object]:
    """The gate run's params known before scoring (what was gated, how, and for which task instance)."""
    request = gate.request
    params = {
        "model_name": gate.ref.name, "model_version": gate.version.version, "model_alias": gate.ref.alias or "",
        "model_sha256": gate.fetched.sha256, "data_uri": redact(request.data), "mode": request.mode,
        "label_source": request.label_source, "reuse_threshold": gate.thresholds.reuse,
        "rebuild_threshold": gate.thresholds.rebuild,
    }  # fmt: skip
    if gate.origin is not None:
        params |= gate.origin.params()
    return params


def _score(gate: _Gate, progress: pipeline.Progress | None) -> pipeline.ScoreResult:
    """One of the three scoring paths: merged shard summaries, RESQUE_dist of the data, or RESQUE_task."""
    request, fetched = gate.request, gate.fetched
    if request.shard_summaries is not None:
        from resque_airflow.registry.shard import score_shards

        return score_shards(request.shard_summaries, fetched.fingerprint, label_source=request.label_source,
                            data_uri=request.data)  # fmt: skip
    fp = fetched.fingerprint
    if request.mode == "dist":
        return pipeline.score_dist(
            fetched.model_path, fp, request.data, label_source=request.label_source, provider=request.provider,
            batch_size=request.batch_size, progress=progress, model_ref=str(gate.ref),
            model_sha256=fetched.sha256,  # fetch_model hashed the file it downloaded: no second hash of it
        )  # fmt: skip
    return pipeline.score_task(
        fetched.model_path, request.data, layer=fp.layer if fp and request.layer == "auto" else request.layer,
        provider=request.provider, batch_size=request.batch_size, image_spec=fp.input_spec.image if fp else None,
        progress=progress,
    )  # fmt: skip


def _decide(gate: _Gate, result: pipeline.ScoreResult, routes: Routes | None) -> GateVerdict:
    """Data sanity first; then the calibrated decision, or fixed thresholds when the request gives them."""
    request, fp = gate.request, gate.fetched.fingerprint
    reference_accuracy = fp.summary.accuracy if fp else None
    if request.mode == "dist":
        issue = data_issue_verdict(result, routed=routes is not None and Decision.DATA_ISSUE.value in routes)
        if issue is not None:
            verdict = issue
        elif request.calibrated:
            from resque_airflow.registry.costs import forecast_cost

            forecast = forecast_cost(gate.client, gate.version, cost_features(result, reference_accuracy))
            verdict = calibrated_verdict(result, reference_accuracy=reference_accuracy, forecast=forecast,
                                         prices=request.prices)  # fmt: skip
        else:
            verdict = threshold_verdict(result, gate.thresholds, reference_accuracy)
    else:
        verdict = threshold_verdict(result, gate.thresholds, None)
    log.info("gate %s: %s", gate.ref, verdict.reason)
    return verdict


def _write_result(gate: _Gate, result: pipeline.ScoreResult, outcome: GateOutcome) -> int:
    """Upload the result and report, log the input, then params, metrics and tags (``decided`` among them) in one
    batch, and close the run; returns the gate's time."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    from resque_airflow.registry.audit_loop import gate_run_name, logged_model_id, record_gate_extras
    from resque_airflow.registry.report import REPORT_ARTIFACT, render_report

    client, run_id = gate.client, gate.run_id
    fp = gate.fetched.fingerprint
    reference_accuracy = fp.summary.accuracy if fp else None
    # One clock reading is the gate's time: the JSON tag's "time" and the run's end time, so that concurrent gates
    # agree on which is newest whether they read the tag or the run.
    stamp = int(time.time() * 1000)
    as_dict = outcome.to_dict()
    registry_call("storing the gate result", log_text_files, client, run_id,
                  {names.GATE_RESULT_ARTIFACT: as_dict, REPORT_ARTIFACT: render_report(as_dict)})  # fmt: skip
    record_gate_extras(client, run_id, as_dict)  # the batch as the run's input dataset
    params = gate.params | {
        "provider": result.provider, "layer": result.layer, "data_hash": result.data_hash,
        "n_samples": result.n_samples, "n_classes": result.n_classes, "policy": outcome.policy,
    }  # fmt: skip
    tags = {names.DECISION_TAG: outcome.decision, names.BRANCH_TAG: json.dumps(outcome.branch),
            names.POLICY_TAG: outcome.policy, names.REASON_TAG: outcome.reason[:5000],
            MLFLOW_RUN_NAME: gate_run_name(as_dict), names.STATUS_TAG: names.STATUS_DECIDED}  # fmt: skip
    model_id = logged_model_id(gate.version)  # the score also shows on the version's logged model (MLflow 3)
    metrics = [Metric(k, float(v), stamp, 0, model_id=model_id if k == names.SCORE_METRIC else None)
               for k, v in gate_metrics(result, outcome.prediction, reference_accuracy).items()]  # fmt: skip
    _log_decided(client, run_id, metrics, [Param(k, str(v)) for k, v in params.items()],
                 [RunTag(k, v) for k, v in tags.items()])  # fmt: skip
    registry_call("closing the gate run", client.set_terminated, run_id, "FINISHED", end_time=stamp)
    return stamp


def _log_decided(client, run_id: str, metrics: list, params: list, tags: list) -> None:
    """One ``log_batch`` of everything, ``resque.status=decided`` in its last request.

    MLflow splits a batch into requests of at most 1000 entities (100 params, 100 tags, 1000 metrics) and sends the
    tags in the first. A gate has fewer than 100 params and tags but may have over 1000 metrics (one angle per
    class): the metrics that do not fit beside the params and tags go first, in a batch of their own, so that a gate
    stopped between two requests is not marked decided without all its metrics.
    """
    from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH

    room = MAX_ENTITIES_PER_BATCH - len(params) - len(tags)
    if len(metrics) > room:
        registry_call("logging the gate's metrics", client.log_batch, run_id, metrics=metrics[:-room])
        metrics = metrics[-room:]
    registry_call("logging the gate's result", client.log_batch, run_id, metrics=metrics, params=params, tags=tags)


__all__ = ["GateOutcome", "GateRequest", "Origin", "RegistryError", "Routes", "failed_at", "record_action", "run_gate"]

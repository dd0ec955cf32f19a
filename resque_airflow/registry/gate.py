"""The gate: resolve the production model, score new data, decide, and leave the audit trail (DESIGN.md 5).

Shared by :class:`~resque_airflow.operators.gate.ResqueGateOperator` and ``resque gate``. Order of work, so that a
failure never leaves a half-written trail:

1. validate the request (thresholds, mode, label source) before touching the registry;
2. resolve the alias or version, download the model and fingerprint, check the sha256;
3. open the gate run (one per Airflow task instance: an earlier try's run is soft-deleted);
4. score; on any error the run is marked FAILED with ``resque.status=failed`` and no model-version tag changes;
5. log metrics, the result artifact and the decision, close the run FINISHED (its end time is the gate's time);
6. only then tag the model version (newest gate wins, see :func:`_tag_model_version`).

Registry failures anywhere in steps 2-6 surface as :class:`RegistryError` (the CLI's exit code 3; a retryable
``ResqueGateError`` in Airflow). MLflow's own HTTP retries are bounded by :func:`~.client.make_client`.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from resque_airflow.core.decision import DEFAULT_THRESHOLDS, Decision, Thresholds, decide
from resque_airflow.core.summary import LABEL_SOURCES
from resque_airflow.errors import RegistryError, ResqueInputError
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
    accuracy_target_relative: float = 0.95  # with given labels: below this x reference accuracy, never reuse
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


def _open_gate_run(client, experiment_name: str, tags: dict, airflow: AirflowInfo | None) -> tuple[str, str]:
    """Create the gate run; returns ``(run_id, experiment_id)``."""
    exp_id = ensure_experiment(client, experiment_name)
    if airflow is not None:
        # One gate run per task instance: a retry replaces the earlier try's run (soft delete, restorable).
        key = search_literal(airflow.key)
        if key is None:  # Airflow's run ids hold no quotes; refuse rather than keep two runs for one instance
            raise ResqueInputError(f"airflow: task instance key {airflow.key!r} holds both kinds of quote")
        earlier = registry_call(
            "looking for an earlier try",
            client.search_runs,
            [exp_id],
            filter_string=f"tags.`{names.GATE_KEY_TAG}` = {key}",
        )
        for run in earlier:
            log.info("replacing gate run %s of an earlier try of %s", run.info.run_id, airflow.key)
            registry_call("replacing the earlier try's gate run", client.delete_run, run.info.run_id)
    run = registry_call("creating the gate run", client.create_run, exp_id, tags=tags, run_name="resque-gate")
    return run.info.run_id, exp_id


def search_literal(value: str) -> str | None:
    """``value`` as a string literal of an MLflow search filter, or None when it cannot be written as one.

    MLflow's filter parser takes single- or double-quoted strings without escapes: a value holding one kind of
    quote is written with the other; one holding both cannot be searched for.
    """
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


def _iso(ms: int) -> str:
    """The gate time as written in ``resque.last_gate``: ISO 8601, UTC, milliseconds (sorts as text)."""
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds")


def _order(payload: dict | None) -> tuple[str, str]:
    """Sort key of a gate result: its time, then its run id (so that two gates in the same millisecond agree)."""
    if not payload:
        return ("", "")
    return (str(payload.get("time", "")), str(payload.get("run_id", "")))


def _tag_payload(tags: dict) -> dict | None:
    """The JSON tag ``resque.last_gate`` of a model version, or None when absent or damaged."""
    try:
        payload = json.loads(tags.get(LAST_GATE_TAG) or "null")
    except ValueError:
        return None
    if not isinstance(payload, dict) or not {"score", "decision", "run_id", "time", "mode"} <= set(payload):
        return None
    return payload


def _derived(payload: dict) -> dict[str, str]:
    """Every model-version tag a gate result sets; the individual ``resque.last_*`` tags derive from the JSON one."""
    # The score as a Python float: the same result read back from a run's metric must give the same text.
    payload = {k: payload[k] for k in ("score", "decision", "run_id", "time", "mode")} | {
        "score": float(payload["score"])
    }
    out = {tag: str(payload[key]) for tag, key in _MV_FIELDS}
    out[LAST_GATE_TAG] = json.dumps(payload)
    return out


_MV_FIELDS = (
    (names.MV_TAG_SCORE, "score"), (names.MV_TAG_DECISION, "decision"), (names.MV_TAG_GATE_RUN, "run_id"),
    (names.MV_TAG_TIME, "time"), (names.MV_TAG_MODE, "mode"),
)  # fmt: skip
_TAG_ROUNDS = 8  # bound on write-and-verify rounds under contention; two suffice without a concurrent gate


def _newest_finished_gate(client, exp_id: str, name: str, version: str) -> dict | None:
    """The newest decided gate run of ``name``/``version`` in ``exp_id``, as a tag payload (None if there is none)."""
    name_literal, version_literal = search_literal(name), search_literal(version)
    if name_literal is None or version_literal is None:
        return None  # the tags alone then decide: still newest-wins, without the repair of a lost update
    runs = client.search_runs(
        [exp_id],
        filter_string=(
            f"tags.`{names.MODEL_NAME_TAG}` = {name_literal} and tags.`{names.MODEL_VERSION_TAG}` = "
            f"{version_literal} and tags.`{names.STATUS_TAG}` = 'decided' and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.end_time DESC"],
        max_results=20,  # enough to break ties of equal end times by run id
    )
    best = None
    for run in runs:
        score = run.data.metrics.get(names.SCORE_METRIC)
        if run.info.end_time is None or score is None or names.DECISION_TAG not in run.data.tags:
            continue
        payload = {
            "score": score, "decision": run.data.tags[names.DECISION_TAG], "run_id": run.info.run_id,
            "time": _iso(run.info.end_time), "mode": run.data.params.get("mode", ""),
        }  # fmt: skip
        if _order(payload) > _order(best):
            best = payload
    return best


# How a database reports two writers inserting the same tag at once (SQLite, MySQL, PostgreSQL), through MLflow.
_WRITE_CONFLICT = ("UNIQUE constraint failed", "IntegrityError", "Duplicate entry", "duplicate key value")


def _set_tag_or_yield(client, name: str, version: str, tag: str, value: str) -> bool:
    """Set one model-version tag; False when a concurrent writer of the same tag won the race.

    MLflow's SQL store sets a tag as "look up, then insert or update": two gates setting a tag that neither saw
    both insert, and the second gets an integrity error (HTTP 400 from a server, which MLflow does not retry).
    Losing that race is not a failure: the caller re-reads the tags and verifies them.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.set_model_version_tag(name, version, tag, value)
        return True
    except MlflowException as exc:
        if not any(marker in str(exc) for marker in _WRITE_CONFLICT):
            raise
        log.info("model version %s/%s: tag %s written concurrently by another gate; verifying", name, version, tag)
        time.sleep(random.uniform(0.0, 0.2))  # let the other writer finish its round before reading
        return False


def _tag_model_version(client, name: str, version: str, payload: dict, exp_id: str | None = None) -> bool:
    """Leave the model-version tags naming the newest gate (by time, then run id). Returns whether it is ours.

    MLflow has no transaction over several tags, and no compare-and-set: a plain "read, compare, write" lets an
    older gate that read before a newer one wrote overwrite it, and lets the tags of two gates interleave. So
    each gate writes and then verifies, until the tags agree with the newest result it can see: its own, the
    newest decided gate run of the same model version in its experiment (gate runs are closed before tagging
    starts, so they are the durable record), or the JSON tag already there. Within a round the individual
    ``resque.last_*`` tags are written first and ``resque.last_gate`` (the authoritative record) last. Two gates
    inserting the same tag at once is a lost race, not an error (:func:`_set_tag_or_yield`).

    Guarantee: the gate that writes last verifies after its last write, so once every gate has returned the tags
    are all equal to the fields of ``resque.last_gate`` and name the newest decided gate. A damaged JSON tag is
    overwritten.
    """
    ours = payload
    for _ in range(_TAG_ROUNDS):
        tags = dict(client.get_model_version(name, version).tags)
        candidates = [ours, _tag_payload(tags)]
        if exp_id is not None:
            candidates.append(_newest_finished_gate(client, exp_id, name, version))
        newest = max((c for c in candidates if c), key=_order)
        wanted = _derived(newest)
        if all(tags.get(k) == v for k, v in wanted.items()):
            if newest is not ours:
                log.info("model version %s/%s carries a newer gate result (%s); leaving it", name, version,
                         newest["run_id"])  # fmt: skip
            return newest is ours
        for tag, value in wanted.items():  # dicts keep insertion order: resque.last_gate comes last
            if tags.get(tag) != value and not _set_tag_or_yield(client, name, version, tag, value):
                break  # another gate wrote this tag at the same moment: re-read, then verify
    log.warning(
        "model version %s/%s: tags still changing after %d rounds; a concurrent gate is tagging and will verify them",
        name, version, _TAG_ROUNDS,
    )  # fmt: skip
    return False


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
        run_id, exp_id = _open_gate_run(client, request.experiment_name, tags, airflow)
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
            registry_call(
                "logging the gate's parameters",
                client.log_batch,
                run_id,
                params=[Param(k, str(v)) for k, v in params.items()],
            )
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
            ref_accuracy = fetched.fingerprint.summary.accuracy if fetched.fingerprint else None
            decision, policy, prediction = _decide(client, version, request, result, thresholds, ref_accuracy)
            branch = branch_for(decision) if branch_for else None
            # One clock reading is the gate's time: the JSON tag's "time" and the run's end time, so that
            # concurrent gates agree on which is newest whether they read the tag or the run.
            stamp = int(time.time() * 1000)
            now = _iso(stamp)
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
            outcome = GateOutcome(
                score=result.score, decision=decision.value, mode=request.mode, model_name=ref.name,
                model_version=str(version.version), model_alias=ref.alias, gate_run_id=run_id,
                provider=result.provider, n_samples=result.n_samples, n_classes=result.n_classes,
                label_source=result.label_source, thresholds=thresholds.to_dict(), policy=policy, prediction=prediction,
                data_uri=request.data, data_hash=result.data_hash, branch=branch, signals=result.signals,
                per_class={str(k): v for k, v in result.per_class.items()}, layer=result.layer,
                seconds=time.perf_counter() - t0,
            )  # fmt: skip
            registry_call(
                "logging the gate's result",
                client.log_batch,
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
            registry_call(
                "storing the gate result", client.log_dict, run_id, outcome.to_dict(), names.GATE_RESULT_ARTIFACT
            )
            registry_call("marking the gate run decided", client.set_tag, run_id, names.STATUS_TAG, "decided")
            registry_call("closing the gate run", client.set_terminated, run_id, "FINISHED", end_time=stamp)
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
        exp_id,
    )
    log.info(
        "gate %s: RESQUE_%s=%.4f -> %s (version %s, %d samples, %s)%s",
        ref, request.mode, result.score, decision.value, version.version, result.n_samples, result.provider,
        "" if written else " [a newer gate already tagged this version]",
    )  # fmt: skip
    return outcome


def _decide(client, version, request: GateRequest, result, thresholds: Thresholds, reference_accuracy: float | None):
    """Thresholds decide reuse; above it, predicted cost against rebuild cost decides when history allows.

    Accuracy guard: with given labels, the gate knows the model's accuracy on the new data. Below
    ``accuracy_target_relative`` x its reference accuracy (the target a retrain must reach) the model cannot be
    reused, whatever the score: information-destroying shifts (additive noise) can score low yet cost a retrain
    (docs/EVIDENCE.md).
    """
    decision, policy = decide(result.score, thresholds), "thresholds"
    acc_drop = result.signals.get("acc_drop")
    if decision is Decision.REUSE and acc_drop is not None and reference_accuracy:
        accuracy = reference_accuracy - acc_drop
        if accuracy < request.accuracy_target_relative * reference_accuracy:
            log.info(
                "accuracy guard: accuracy %.3f is below %.2f x the reference %.3f; retrain despite RESQUE %.4f",
                accuracy, request.accuracy_target_relative, reference_accuracy, result.score,
            )  # fmt: skip
            decision, policy = Decision.RETRAIN, "thresholds+accuracy"
    if decision is Decision.REUSE or not request.cost_aware or request.mode != "dist":
        return decision, policy, None
    from resque_airflow.registry.history import cost_policy

    cost = cost_policy(client, version, result.signals)
    if cost is None:
        return decision, policy, None
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
    from mlflow.entities import RunTag

    try:
        # Two calls, not three: when the registry is what failed, each call spends MLflow's HTTP retries.
        client.log_batch(
            run_id,
            tags=[
                RunTag(names.STATUS_TAG, "failed"),
                RunTag(names.ERROR_TAG, f"{type(exc).__name__}: {str(exc)[:4000]}"),
            ],
        )
        client.set_terminated(run_id, "FAILED")
    except Exception as inner:  # the registry may be the thing that failed
        log.warning("could not mark gate run %s as failed: %s", run_id, str(inner).splitlines()[0][:300])


__all__ = ["AirflowInfo", "GateOutcome", "GateRequest", "RegistryError", "run_gate"]

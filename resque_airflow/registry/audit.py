"""Read the RESQUE audit trail back from MLflow: gate runs, their per-class angles and the retraining they triggered.

Everything here only reads MLflow; nothing is ever written. It reads what :mod:`resque_airflow.registry.gate` writes,
under the names of :mod:`resque_airflow.registry.names` (DESIGN.md section 5):

- gate runs are runs tagged ``resque.kind=gate`` (experiment ``resque-gate`` by default), with the model name and
  version in the tags ``resque.model_name`` / ``resque.model_version``, the score in the metric ``resque_score``, the
  decision, branch (a JSON list of task ids) and status in tags, the thresholds and run facts in params, companion
  signals and ``predicted_<cost>`` metrics, the per-class angles in the metrics ``angle_class_<k>`` and, with the full
  result, in the artifact ``resque/gate_result.json`` (``per_class``: ``{class id: angle}``);
- retrain / rebuild runs, in any experiment, carry the tag ``resque.gate_run_id`` naming the gate run that
  triggered them, and their measured cost in the metrics ``names.COST_METRICS``; the audit loop writes that cost
  back onto the gate run as ``measured_<cost>`` (preferred when present);
- calibrated gate runs add the score's interval, the null quantile, the p-value, the accuracy (measured / ATC) and
  the reason sentence (tag ``resque.reason``); the artifact adds ``alpha`` and the forecast's basis.

Public functions: :func:`gate_history`, :func:`gate_detail`, :func:`gate_runs_for` (an Airflow DAG run's or task
instance's gate runs), :func:`models_with_gates`, :func:`load_gate_result`, :func:`run_url` and
:func:`resolve_ui_base`; the fields of one run are parsed by :mod:`resque_airflow.registry.audit_fields`. The text
forms (table, JSON, ``resque audit``) are in
:mod:`resque_airflow.registry.audit_report`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from resque_airflow.registry import names
from resque_airflow.registry.audit_fields import (
    MeasuredCost,
    as_float,
    as_int,
    calibrated_from_result,
    calibrated_from_run,
    measured_cost,
    per_class,
    run_url,
    start_time,
)
from resque_airflow.registry.client import search_literal

if TYPE_CHECKING:
    import mlflow
    from mlflow.entities import Run

log = logging.getLogger(__name__)

#: Environment variable with the browser-facing MLflow UI URL, used for run links when the tracking URI is not one
#: (an ``sqlite:`` URI, or ``http://mlflow:5000`` which only resolves inside a Docker network).
MLFLOW_UI_URL_ENV = "RESQUE_MLFLOW_UI_URL"

_PAGE = 1000  # MLflow's maximum page size for search_runs
_AIRFLOW_KEYS = ("dag_id", "run_id", "task_id", "try_number")  # gate run params airflow_<key>
_MAX_EXPERIMENTS = 10_000


@dataclass
class GateRecord:
    """One gate run as the audit trail shows it.

    ``per_class`` stays ``None`` in :func:`gate_history` (it lives in an artifact) and is filled by
    :func:`gate_detail`: a list of ``{"class": str, "angle": float | None}`` in class order, ``[]`` when the run
    recorded none.
    """

    run_id: str
    experiment_id: str
    start_time: str | None
    model_name: str | None
    model_version: str | None
    model_alias: str | None
    score: float | None
    mode: str | None
    label_source: str | None
    decision: str | None
    branch: str | None
    thresholds: dict[str, float | None]
    policy: str | None
    provider: str | None
    n_samples: int | None
    n_classes: int | None
    status: str | None
    run_status: str | None
    data_uri: str | None = None
    signals: dict[str, float | None] = field(default_factory=dict)
    predicted_cost: dict[str, dict[str, float | None]] = field(default_factory=dict)
    measured: list[MeasuredCost] = field(default_factory=list)
    airflow: dict[str, str] = field(default_factory=dict)
    mlflow_url: str | None = None
    per_class: list[dict[str, Any]] | None = None
    classes_missing: list[str] | None = None
    error: str | None = None
    detail_error: str | None = None
    # The calibrated decision (issue 11): see audit_fields.calibrated_from_run / calibrated_from_result.
    interval: list[float] | None = None  # the score's 90% interval
    null_quantile: float | None = None  # the null's 1 - alpha quantile at this batch size
    p_value: float | None = None
    shift_detected: bool | None = None
    alpha: float | None = None  # from the result artifact only (gate_detail)
    accuracy_measured: dict[str, float | None] | None = None  # value, low, high
    accuracy_estimated: dict[str, float | None] | None = None  # ATC
    reason: str | None = None
    prediction: dict[str, Any] | None = None  # cost_metric, predicted, low, high, rebuild_cost[, basis, n_history]
    measured_back: dict[str, float] = field(default_factory=dict)  # measured_<cost> written back onto the run
    challenger_run_id: str | None = None
    challenger_outcome: str | None = None
    gate_key: str | None = None
    angles: dict[str, float] = field(default_factory=dict)  # angle_class_<k> metrics (history and detail)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (non-finite numbers are already ``None``)."""
        out = asdict(self)
        out["cost_comparison"] = self.cost_comparison()
        return out

    def latest_measured(self) -> MeasuredCost | None:
        """The most recent triggered retrain/rebuild run, if any."""
        if not self.measured:
            return None
        return max(self.measured, key=lambda m: m.start_time or "")

    def cost_comparison(self) -> list[dict[str, Any]]:
        """Predicted against measured cost, one row per cost metric present on either side (order of COST_METRICS).

        Each row: ``metric``, ``predicted``, ``low``, ``high``, ``measured``: the cost the retrain wrote back onto
        this gate run (``measured_<cost>``), else the latest triggered run's.
        """
        measured = self.latest_measured()
        rows = []
        for metric in names.COST_METRICS:
            pred = self.predicted_cost.get(metric, {})
            got = self.measured_back.get(metric)
            if got is None and measured is not None:
                got = measured.metrics.get(metric)
            if pred.get("value") is None and got is None:
                continue
            row = {"metric": metric, "predicted": pred.get("value"), "low": pred.get("low"), "high": pred.get("high")}
            rows.append(row | {"measured": got})
        return rows


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def resolve_ui_base(mlflow_ui_base: str | None, tracking_uri: str | None) -> str | None:
    """The MLflow UI base URL for run links.

    An explicit ``mlflow_ui_base`` wins (``""`` means no links); then the ``RESQUE_MLFLOW_UI_URL`` environment
    variable; then the tracking URI itself when it is an ``http(s)`` URL; otherwise no links.

    >>> resolve_ui_base("http://localhost:5000", "sqlite:////srv/mlflow.db")
    'http://localhost:5000'
    >>> resolve_ui_base("", "http://mlflow:5000") is None
    True
    """
    if mlflow_ui_base is not None:
        return mlflow_ui_base or None
    env = os.environ.get(MLFLOW_UI_URL_ENV)
    if env:
        return env
    if tracking_uri and urllib.parse.urlparse(tracking_uri).scheme in ("http", "https"):
        return tracking_uri
    return None


def _search(client: mlflow.MlflowClient, experiment_ids: list[str], filter_string: str, max_runs: int) -> Iterator[Run]:
    """Runs matching ``filter_string``, newest first, at most ``max_runs``, paging through MLflow's results."""
    if not experiment_ids or max_runs <= 0:
        return
    token = None
    seen = 0
    while True:
        page = client.search_runs(
            experiment_ids=experiment_ids,
            filter_string=filter_string,
            max_results=min(_PAGE, max_runs - seen),
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        for run in page:
            yield run
            seen += 1
            if seen >= max_runs:
                return
        token = page.token
        if not token:
            return


def _all_experiment_ids(client: mlflow.MlflowClient) -> list[str]:
    ids: list[str] = []
    token = None
    while len(ids) < _MAX_EXPERIMENTS:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids.extend(e.experiment_id for e in page)
        token = page.token
        if not token:
            break
    return ids


def _gate_experiment_ids(client: mlflow.MlflowClient, experiment_names: Sequence[str] | None) -> list[str]:
    """Ids of the named experiments that exist; every experiment when ``experiment_names`` is ``None``."""
    if experiment_names is None:
        return _all_experiment_ids(client)
    ids = []
    for name in experiment_names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            log.debug("resque audit: experiment %r does not exist", name)
            continue
        ids.append(exp.experiment_id)
    return ids


def _branch(tag: str | None) -> str | None:
    """The branch tag for display: the gate writes the task ids it followed as a JSON list (``null`` without).

    >>> _branch('["retrain"]'), _branch("null"), _branch('["a", "b"]'), _branch(None)
    ('retrain', None, 'a, b', None)
    """
    task_ids = json.loads(tag) if tag else None
    return ", ".join(task_ids) if task_ids else None


def _model_of(run: Run) -> str | None:
    return run.data.tags.get(names.MODEL_NAME_TAG)


def _status(tag: str | None, run_status: str | None) -> str | None:
    """The gate run's status as shown: ``interrupted`` for a run marked decided that never closed FINISHED (a gate
    killed between deciding and closing its run: no model-version tag names it), else the ``resque.status`` tag.

    >>> _status("decided", "RUNNING"), _status("decided", "FINISHED"), _status("scoring", "RUNNING")
    ('interrupted', 'decided', 'scoring')
    """
    if tag == names.STATUS_DECIDED and run_status not in (None, "FINISHED"):
        return "interrupted"
    return tag


def _record(run: Run, ui_base: str | None) -> GateRecord:
    """Build a :class:`GateRecord` from a gate run (measured costs and per-class angles are added later)."""
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    predicted: dict[str, dict[str, float | None]] = {}
    for cost in names.COST_METRICS:
        key = f"predicted_{cost}"
        value = as_float(metrics.get(key))
        low = as_float(metrics.get(f"{key}_low"))
        high = as_float(metrics.get(f"{key}_high"))
        if value is not None or low is not None or high is not None:
            predicted[cost] = {"value": value, "low": low, "high": high}
    # The gate writes all four Airflow params (Origin.params(): no optional field), or none without an origin.
    airflow = {key: params[f"airflow_{key}"] for key in _AIRFLOW_KEYS} if "airflow_dag_id" in params else {}
    return GateRecord(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        start_time=start_time(run.info.start_time),
        model_name=_model_of(run),
        model_version=tags.get(names.MODEL_VERSION_TAG),
        model_alias=params.get("model_alias"),
        score=as_float(metrics.get(names.SCORE_METRIC)),
        mode=params.get("mode"),
        label_source=params.get("label_source"),
        decision=tags.get(names.DECISION_TAG),
        branch=_branch(tags.get(names.BRANCH_TAG)),
        thresholds={
            "reuse": as_float(params.get("reuse_threshold")),
            "rebuild": as_float(params.get("rebuild_threshold")),
        },
        policy=params.get("policy"),
        provider=params.get("provider"),
        n_samples=as_int(params.get("n_samples")),
        n_classes=as_int(params.get("n_classes")),
        status=_status(tags.get(names.STATUS_TAG), run.info.status),
        run_status=run.info.status,
        data_uri=params.get("data_uri"),
        error=tags.get(names.ERROR_TAG),
        signals={m: as_float(metrics[m]) for m in names.SIGNAL_METRICS if m in metrics},
        predicted_cost=predicted,
        airflow=airflow,
        mlflow_url=run_url(ui_base, run.info.experiment_id, run.info.run_id),
        **calibrated_from_run(metrics, tags),
    )


def _triggered_runs(
    client: mlflow.MlflowClient, gate_run_ids: Iterable[str], ui_base: str | None, max_runs: int
) -> dict[str, list[MeasuredCost]]:
    """Retrain/rebuild runs in any experiment whose ``resque.gate_run_id`` is one of ``gate_run_ids``."""
    wanted = set(gate_run_ids)
    out: dict[str, list[MeasuredCost]] = {}
    if not wanted:
        return out
    if len(wanted) == 1:  # run ids are hex: always a valid literal
        flt = f"tags.`{names.GATE_RUN_TAG}` = {search_literal(next(iter(wanted)))}"
    else:  # MLflow's filter has no IN for tags: fetch every triggered run, keep ours
        flt = f"tags.`{names.GATE_RUN_TAG}` LIKE '%'"
    for run in _search(client, _all_experiment_ids(client), flt, max_runs):
        gate_id = run.data.tags.get(names.GATE_RUN_TAG)
        if gate_id in wanted:
            out.setdefault(gate_id, []).append(measured_cost(run, ui_base))
    for runs in out.values():
        runs.sort(key=lambda m: m.start_time or "")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Public API

_IS_GATE = f"tags.`{names.KIND_TAG}` = '{names.KIND_GATE}'"


def models_with_gates(
    client: mlflow.MlflowClient,
    *,
    experiment_names: Sequence[str] | None = (names.DEFAULT_EXPERIMENT,),
    max_runs: int = 10_000,
) -> list[str]:
    """Names of the models that have at least one gate run, sorted.

    ``experiment_names=None`` searches every experiment.
    """
    exp_ids = _gate_experiment_ids(client, experiment_names)
    found = {_model_of(run) for run in _search(client, exp_ids, _IS_GATE, max_runs)}
    return sorted(n for n in found if n)


def gate_history(
    client: mlflow.MlflowClient,
    model_name: str,
    *,
    experiment_names: Sequence[str] | None = (names.DEFAULT_EXPERIMENT,),
    max_runs: int = 1000,
    mlflow_ui_base: str | None = None,
) -> list[GateRecord]:
    """The gate runs of ``model_name``, oldest first (the most recent ``max_runs`` of them).

    Each record carries its measured retraining cost when retrain/rebuild runs point back at it. Per-class angles
    are not loaded here (see :func:`gate_detail`). ``mlflow_ui_base``: see :func:`resolve_ui_base`.

    Raises whatever MLflow raises when the tracking server cannot be reached.
    """
    ui_base = resolve_ui_base(mlflow_ui_base, client.tracking_uri)
    exp_ids = _gate_experiment_ids(client, experiment_names)
    literal = search_literal(model_name)
    if literal is None:  # a name MLflow's filter syntax cannot express: filter here
        found = [r for r in _search(client, exp_ids, _IS_GATE, max_runs * 10) if _model_of(r) == model_name]
    else:
        found = list(_search(client, exp_ids, f"{_IS_GATE} and tags.`{names.MODEL_NAME_TAG}` = {literal}", max_runs))
    ordered = sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id))[-max_runs:]
    records = [_record(run, ui_base) for run in ordered]
    measured = _triggered_runs(client, (r.run_id for r in records), ui_base, max_runs=max_runs * 4)
    for rec in records:
        rec.measured = measured.get(rec.run_id, [])
    log.debug("resque audit: %d gate run(s) for model %r", len(records), model_name)
    return records


def load_gate_result(client: mlflow.MlflowClient, run_id: str) -> dict[str, Any]:
    """The gate run's JSON result artifact (``resque/gate_result.json``)."""
    with tempfile.TemporaryDirectory(prefix="resque-audit-") as tmp:
        path = client.download_artifacts(run_id, names.GATE_RESULT_ARTIFACT, tmp)
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{names.GATE_RESULT_ARTIFACT} of run {run_id} is not a JSON object")
    return data


def gate_detail(client: mlflow.MlflowClient, run_id: str, *, mlflow_ui_base: str | None = None) -> GateRecord:
    """One gate run with its per-class angles (from the JSON artifact) and measured retraining cost.

    Raises:
        LookupError: ``run_id`` does not exist or is not a gate run.
    """
    from mlflow.exceptions import MlflowException

    ui_base = resolve_ui_base(mlflow_ui_base, client.tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise LookupError(f"no MLflow run {run_id!r}") from exc
        raise
    if run.data.tags.get(names.KIND_TAG) != names.KIND_GATE:
        raise LookupError(f"run {run_id!r} is not a RESQUE gate run (tag {names.KIND_TAG} != {names.KIND_GATE!r})")
    record = _record(run, ui_base)
    record.measured = _triggered_runs(client, [run_id], ui_base, max_runs=1000).get(run_id, [])
    try:
        result = load_gate_result(client, run_id)
    except Exception as exc:  # missing or unreadable artifact: the run is still worth showing
        angles = record.angles
        if angles:  # the gate logs the same angles as metrics
            log.info("resque audit: %s of run %s unreadable (%s); angles from metrics", names.GATE_RESULT_ARTIFACT,
                     run_id, exc)  # fmt: skip
            record.per_class = per_class(angles)
            return record
        log.warning("resque audit: cannot read %s of run %s: %s", names.GATE_RESULT_ARTIFACT, run_id, exc)
        record.detail_error = f"{names.GATE_RESULT_ARTIFACT} not available ({type(exc).__name__})"
        return record
    record.per_class = per_class(result.get("per_class") or {})
    for key, value in calibrated_from_result(result).items():  # the artifact is complete: it wins
        setattr(record, key, value)
    if "classes_missing" in result:  # not in GateOutcome today; shown when a result carries it
        record.classes_missing = [str(c) for c in result["classes_missing"]]
    return record


def gate_runs_for(
    client: mlflow.MlflowClient,
    dag_id: str,
    run_id: str | None = None,
    task_id: str | None = None,
    map_index: int | None = None,
    *,
    experiment_names: Sequence[str] | None = (names.DEFAULT_EXPERIMENT,),
    max_runs: int = 200,
    mlflow_ui_base: str | None = None,
) -> list[GateRecord]:
    """The gate runs an Airflow DAG, DAG run or task instance recorded (params ``airflow_*``), oldest first.

    ``map_index`` narrows to one mapped task instance through the gate key tag (``dag/run/task/map_index``);
    an earlier try's run is deleted by the retry, so each task instance has one. No measured costs are loaded.
    """
    clauses = [_IS_GATE]
    for key, value in (("dag_id", dag_id), ("run_id", run_id), ("task_id", task_id)):
        if value is None:
            continue
        literal = search_literal(value)
        if literal is None:
            raise LookupError(f"{key} {value!r} cannot be searched for (it holds both kinds of quote)")
        clauses.append(f"params.airflow_{key} = {literal}")
    found = _search(client, _gate_experiment_ids(client, experiment_names), " and ".join(clauses), max_runs)
    ui_base = resolve_ui_base(mlflow_ui_base, client.tracking_uri)
    records = [_record(run, ui_base) for run in sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id))]
    if map_index is not None:
        records = [r for r in records if (r.gate_key or "").rsplit("/", 1)[-1] == str(map_index)]
    return records

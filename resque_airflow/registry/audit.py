"""Read the RESQUE audit trail back from MLflow: gate runs, their per-class angles and the retraining they triggered.

Everything here only reads MLflow; nothing is ever written. It reads what :mod:`resque_airflow.registry.gate` writes,
under the names of :mod:`resque_airflow.registry.names` (DESIGN.md section 5):

- gate runs are runs tagged ``resque.kind=gate`` (experiment ``resque-gate`` by default), with the model name and
  version in the tags ``resque.model_name`` / ``resque.model_version``, the score in the metric ``resque_score``, the
  decision, branch (a JSON list of task ids) and status in tags, the thresholds and run facts in params, companion
  signals and ``predicted_<cost>`` metrics, the per-class angles in the metrics ``angle_class_<k>`` and, with the full
  result, in the artifact ``resque/gate_result.json`` (``per_class``: ``{class id: angle}``);
- retrain / rebuild runs, in any experiment, carry the tag ``resque.gate_run_id`` naming the gate run that
  triggered them, and their measured cost in the metrics ``names.COST_METRICS``.

Public functions: :func:`gate_history`, :func:`gate_detail`, :func:`models_with_gates`, :func:`load_gate_result`,
:func:`run_url` and :func:`resolve_ui_base`. The text forms (table, JSON, ``resque audit``) are in
:mod:`resque_airflow.registry.audit_report`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from resque_airflow.registry import names
from resque_airflow.registry.client import iso_time, search_literal

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

        Each row: ``metric``, ``predicted``, ``low``, ``high``, ``measured`` (from the latest triggered run).
        """
        measured = self.latest_measured()
        rows = []
        for metric in names.COST_METRICS:
            pred = self.predicted_cost.get(metric, {})
            got = measured.metrics.get(metric) if measured else None
            if pred.get("value") is None and got is None:
                continue
            row = {"metric": metric, "predicted": pred.get("value"), "low": pred.get("low"), "high": pred.get("high")}
            rows.append(row | {"measured": got})
        return rows


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def _float(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (missing, not a number, NaN or infinite)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int(value: Any) -> int | None:
    f = _float(value)
    return int(f) if f is not None else None


def _start_time(ms: int | None) -> str | None:
    """A run's start time as ISO 8601 UTC to the second: the precision ``resque audit --json`` has always shown.

    >>> _start_time(1767225600123)
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


def _per_class(angles: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-class angles ``{class id: angle}`` as ``[{"class": str, "angle": float | None}]``, in class order.

    >>> _per_class({"10": 0.5, "2": 0.25})
    [{'class': '2', 'angle': 0.25}, {'class': '10', 'angle': 0.5}]
    """
    return [{"class": k, "angle": _float(v)} for k, v in sorted(angles.items(), key=lambda kv: int(kv[0]))]


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
        value = _float(metrics.get(key))
        low = _float(metrics.get(f"{key}_low"))
        high = _float(metrics.get(f"{key}_high"))
        if value is not None or low is not None or high is not None:
            predicted[cost] = {"value": value, "low": low, "high": high}
    # The gate writes all four Airflow params (Origin.params(): no optional field), or none without an origin.
    airflow = {key: params[f"airflow_{key}"] for key in _AIRFLOW_KEYS} if "airflow_dag_id" in params else {}
    return GateRecord(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        start_time=_start_time(run.info.start_time),
        model_name=_model_of(run),
        model_version=tags.get(names.MODEL_VERSION_TAG),
        model_alias=params.get("model_alias"),
        score=_float(metrics.get(names.SCORE_METRIC)),
        mode=params.get("mode"),
        label_source=params.get("label_source"),
        decision=tags.get(names.DECISION_TAG),
        branch=_branch(tags.get(names.BRANCH_TAG)),
        thresholds={
            "reuse": _float(params.get("reuse_threshold")),
            "rebuild": _float(params.get("rebuild_threshold")),
        },
        policy=params.get("policy"),
        provider=params.get("provider"),
        n_samples=_int(params.get("n_samples")),
        n_classes=_int(params.get("n_classes")),
        status=_status(tags.get(names.STATUS_TAG), run.info.status),
        run_status=run.info.status,
        data_uri=params.get("data_uri"),
        error=tags.get(names.ERROR_TAG),
        signals={m: _float(metrics[m]) for m in names.SIGNAL_METRICS if m in metrics},
        predicted_cost=predicted,
        airflow=airflow,
        mlflow_url=run_url(ui_base, run.info.experiment_id, run.info.run_id),
    )


def _measured(run: Run, ui_base: str | None) -> MeasuredCost:
    metrics, tags = run.data.metrics, run.data.tags
    censored = _float(metrics.get(names.CENSORED_METRIC))
    return MeasuredCost(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        kind=tags.get(names.KIND_TAG),
        start_time=_start_time(run.info.start_time),
        run_status=run.info.status,
        metrics={m: _float(metrics[m]) for m in names.COST_METRICS if m in metrics},
        censored=None if censored is None else censored >= 0.5,
        final_accuracy=_float(metrics.get(names.FINAL_ACCURACY_METRIC)),
        mlflow_url=run_url(ui_base, run.info.experiment_id, run.info.run_id),
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
            out.setdefault(gate_id, []).append(_measured(run, ui_base))
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
        prefix = names.ANGLE_METRIC_PREFIX
        angles = {k.removeprefix(prefix): v for k, v in run.data.metrics.items() if k.startswith(prefix)}
        if angles:  # the gate logs the same angles as metrics
            log.info("resque audit: %s of run %s unreadable (%s); angles from metrics", names.GATE_RESULT_ARTIFACT,
                     run_id, exc)  # fmt: skip
            record.per_class = _per_class(angles)
            return record
        log.warning("resque audit: cannot read %s of run %s: %s", names.GATE_RESULT_ARTIFACT, run_id, exc)
        record.detail_error = f"{names.GATE_RESULT_ARTIFACT} not available ({type(exc).__name__})"
        return record
    record.per_class = _per_class(result.get("per_class") or {})
    if "classes_missing" in result:  # not in GateOutcome today; shown when a result carries it
        record.classes_missing = [str(c) for c in result["classes_missing"]]
    return record

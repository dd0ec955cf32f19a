"""Read the RESQUE audit trail back from MLflow: gate runs, their per-class angles and the retraining they triggered.

Everything here only reads MLflow; nothing is ever written. The names come from
:mod:`resque_airflow.registry.names` (DESIGN.md section 5):

- gate runs are runs tagged ``resque.kind=gate`` (experiment ``resque-gate`` by default), with the model name in the
  tag ``resque.model_name`` (or the param ``model_name``), the score in the metric ``resque_score``, the decision,
  branch and status in tags, the thresholds and run facts in params, companion signals and ``predicted_<cost>``
  metrics, and the full result (per-class angles included) in the artifact ``resque/gate_result.json``;
- retrain / rebuild runs, in any experiment, carry the tag ``resque.gate_run_id`` naming the gate run that
  triggered them, and their measured cost in the metrics ``names.COST_METRICS``.

Public functions: :func:`gate_history`, :func:`gate_detail`, :func:`models_with_gates`, :func:`to_json`,
:func:`format_table` and :func:`audit_main` (the ``resque audit`` command).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from resque_airflow.registry import names

if TYPE_CHECKING:
    import mlflow
    from mlflow.entities import Run

log = logging.getLogger(__name__)

#: Environment variable with the browser-facing MLflow UI URL, used for run links when the tracking URI is not one
#: (an ``sqlite:`` URI, or ``http://mlflow:5000`` which only resolves inside a Docker network).
MLFLOW_UI_URL_ENV = "RESQUE_MLFLOW_UI_URL"

#: Tag the gate writes on a failed run with the reason (``resque_airflow.registry.gate``).
ERROR_TAG = getattr(names, "ERROR_TAG", "resque.error")
#: Per-class angles are also logged as metrics ``angle_class_<k>``: the fallback when the JSON artifact is missing.
ANGLE_METRIC_PREFIX = "angle_class_"

_PAGE = 1000  # MLflow's maximum page size for search_runs
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
    :func:`gate_detail`: a list of ``{"class": str, "angle": float | None, ...}``, ``[]`` when the artifact has none.
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
            rows.append(
                {
                    "metric": metric,
                    "predicted": pred.get("value"),
                    "low": pred.get("low"),
                    "high": pred.get("high"),
                    "measured": got,
                }
            )
        return rows

    def primary_cost(self) -> dict[str, Any] | None:
        """The cost row to show in one table cell: the first with both sides, else the first row, else ``None``."""
        rows = self.cost_comparison()
        both = [r for r in rows if r["predicted"] is not None and r["measured"] is not None]
        return (both or rows or [None])[0]


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


def _iso(ms: int | None) -> str | None:
    """MLflow epoch milliseconds as an ISO 8601 UTC timestamp (seconds precision)."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000.0, tz=timezone.utc).isoformat(timespec="seconds")


def _quote(value: str) -> str | None:
    """``value`` quoted for an MLflow filter string, or ``None`` when it holds both quote characters."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


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


def _client_tracking_uri(client: mlflow.MlflowClient) -> str | None:
    try:
        return str(client.tracking_uri)
    except Exception:  # pragma: no cover - a stub client in tests
        return None


def _search_all(
    client: mlflow.MlflowClient, experiment_ids: list[str], filter_string: str, max_runs: int
) -> Iterator[Run]:
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
    """The branch tag for display: the gate writes a JSON list of task ids (``null`` without branching).

    >>> _branch('["retrain"]'), _branch("null"), _branch("reuse"), _branch('["a", "b"]')
    ('retrain', None, 'reuse', 'a, b')
    """
    if tag is None:
        return None
    try:
        value = json.loads(tag)
    except ValueError:
        return tag
    if value is None:
        return None
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or None
    return str(value)


def _model_of(run: Run) -> str | None:
    return run.data.tags.get(names.MODEL_NAME_TAG) or run.data.params.get("model_name")


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
    airflow = {
        key: params[f"airflow_{key}"]
        for key in ("dag_id", "run_id", "task_id", "try_number")
        if params.get(f"airflow_{key}") not in (None, "", "None")
    }
    return GateRecord(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        start_time=_iso(run.info.start_time),
        model_name=_model_of(run),
        model_version=tags.get(names.MODEL_VERSION_TAG) or params.get("model_version"),
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
        status=tags.get(names.STATUS_TAG),
        run_status=run.info.status,
        data_uri=params.get("data_uri"),
        error=tags.get(ERROR_TAG),
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
        start_time=_iso(run.info.start_time),
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
    experiment_ids = _all_experiment_ids(client)
    if len(wanted) == 1:
        (only,) = wanted
        quoted = _quote(only)
        flt = f"tags.`{names.GATE_RUN_TAG}` = {quoted}" if quoted else f"tags.`{names.GATE_RUN_TAG}` LIKE '%'"
    else:
        flt = f"tags.`{names.GATE_RUN_TAG}` LIKE '%'"
    for run in _search_all(client, experiment_ids, flt, max_runs):
        gate_id = run.data.tags.get(names.GATE_RUN_TAG)
        if gate_id in wanted:
            out.setdefault(gate_id, []).append(_measured(run, ui_base))
    for runs in out.values():
        runs.sort(key=lambda m: m.start_time or "")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Public API


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
    flt = f"tags.`{names.KIND_TAG}` = '{names.KIND_GATE}'"
    found = {_model_of(run) for run in _search_all(client, exp_ids, flt, max_runs)}
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
    ui_base = resolve_ui_base(mlflow_ui_base, _client_tracking_uri(client))
    exp_ids = _gate_experiment_ids(client, experiment_names)
    kind = f"tags.`{names.KIND_TAG}` = '{names.KIND_GATE}'"
    quoted = _quote(model_name)
    runs: dict[str, Run] = {}
    if quoted is None:  # a name MLflow's filter syntax cannot express: filter here
        for run in _search_all(client, exp_ids, kind, max_runs * 10):
            if _model_of(run) == model_name:
                runs[run.info.run_id] = run
    else:
        # Gate runs carry the model name as a tag and as a param; older writers may set only one of them.
        for flt in (f"{kind} and tags.`{names.MODEL_NAME_TAG}` = {quoted}", f"{kind} and params.model_name = {quoted}"):
            for run in _search_all(client, exp_ids, flt, max_runs):
                runs.setdefault(run.info.run_id, run)
    ordered = sorted(runs.values(), key=lambda r: (r.info.start_time or 0, r.info.run_id))[-max_runs:]
    records = [_record(run, ui_base) for run in ordered]
    measured = _triggered_runs(client, (r.run_id for r in records), ui_base, max_runs=max_runs * 4)
    for rec in records:
        rec.measured = measured.get(rec.run_id, [])
    log.debug("resque audit: %d gate run(s) for model %r", len(records), model_name)
    return records


def _normalise_per_class(raw: Any) -> list[dict[str, Any]]:
    """Per-class angles as ``[{"class": str, "angle": float | None, ...}]``, sorted by class.

    Accepts ``{"3": 0.12}``, ``{"3": {"angle": 0.12, ...}}`` and ``[{"class": 3, "angle": 0.12, ...}]``.

    >>> _normalise_per_class({"10": 0.5, "2": 0.25})
    [{'class': '2', 'angle': 0.25}, {'class': '10', 'angle': 0.5}]
    """
    items: list[dict[str, Any]] = []
    if isinstance(raw, dict):
        for key, value in raw.items():
            if isinstance(value, dict):
                extra = {k: v for k, v in value.items() if k not in ("class", "angle", "value")}
                angle = value.get("angle", value.get("value"))
                items.append({"class": str(key), "angle": _float(angle), **extra})
            else:
                items.append({"class": str(key), "angle": _float(value)})
    elif isinstance(raw, list):
        for entry in raw:
            if isinstance(entry, dict):
                label = entry.get("class", entry.get("label", entry.get("k")))
                extra = {k: v for k, v in entry.items() if k not in ("class", "label", "k", "angle", "value")}
                items.append({"class": str(label), "angle": _float(entry.get("angle", entry.get("value"))), **extra})

    def order(item: dict[str, Any]) -> tuple[int, float, str]:
        try:
            return (0, float(item["class"]), "")
        except ValueError:
            return (1, 0.0, item["class"])

    return sorted(items, key=order)


def _find(result: dict[str, Any], key: str) -> Any:
    """``result[key]``, else the first ``value[key]`` of a nested dict (e.g. ``result["dist"]["per_class"]``)."""
    if key in result:
        return result[key]
    for value in result.values():
        if isinstance(value, dict) and key in value:
            return value[key]
    return None


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

    ui_base = resolve_ui_base(mlflow_ui_base, _client_tracking_uri(client))
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise LookupError(f"no MLflow run {run_id!r}") from exc
        raise
    if run.data.tags.get(names.KIND_TAG) != names.KIND_GATE:
        raise LookupError(f"run {run_id!r} is not a RESQUE gate run (tag {names.KIND_TAG} != {names.KIND_GATE!r})")
    record = _record(run, ui_base)
    record.measured = _triggered_runs(client, [run_id], ui_base, max_runs=1000).get(run_id, [])
    try:
        result = load_gate_result(client, run_id)
    except Exception as exc:  # missing or unreadable artifact: the run is still worth showing
        angles = {
            k[len(ANGLE_METRIC_PREFIX) :]: v for k, v in run.data.metrics.items() if k.startswith(ANGLE_METRIC_PREFIX)
        }
        if angles:  # the same angles, logged as metrics
            log.info(
                "resque audit: %s of run %s unreadable (%s); angles from metrics",
                names.GATE_RESULT_ARTIFACT,
                run_id,
                exc,
            )
            record.per_class = _normalise_per_class(angles)
            return record
        log.warning("resque audit: cannot read %s of run %s: %s", names.GATE_RESULT_ARTIFACT, run_id, exc)
        record.detail_error = f"{names.GATE_RESULT_ARTIFACT} not available ({type(exc).__name__})"
        return record
    record.per_class = _normalise_per_class(_find(result, "per_class") or {})
    missing = _find(result, "classes_missing")
    if isinstance(missing, list):
        record.classes_missing = [str(c) for c in missing]
    return record


def to_json(records: Iterable[GateRecord], *, indent: int | None = 2) -> str:
    """The records as a JSON array (strict JSON: no NaN)."""
    return json.dumps([r.to_dict() for r in records], indent=indent, allow_nan=False)


def _fmt(value: float | None, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits, ``-`` when missing.

    >>> _fmt(0.031234), _fmt(12.0), _fmt(None)
    ('0.03123', '12', '-')
    """
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


def cost_cell(record: GateRecord) -> str:
    """Predicted vs measured cost in one short string, e.g. ``epochs_to_target 12 [8-16] / 14``; ``-`` if none."""
    row = record.primary_cost()
    if row is None:
        return "-"
    pred = _fmt(row["predicted"], 3)
    if row["low"] is not None and row["high"] is not None:
        pred += f" [{_fmt(row['low'], 3)}-{_fmt(row['high'], 3)}]"
    return f"{row['metric']} {pred} / {_fmt(row['measured'], 3)}"


def format_table(records: Sequence[GateRecord], *, width: int = 200, title: str | None = None) -> str:
    """The records as a plain-text table (rich), oldest first, for the ``resque audit`` command."""
    from rich.console import Console
    from rich.table import Table

    model = next((r.model_name for r in records if r.model_name), None)
    table = Table(title=title or (f"RESQUE gate runs of {model}" if model else "RESQUE gate runs"))
    for col, kw in (
        ("time (UTC)", {"no_wrap": True}),
        ("version", {}),
        ("score", {"justify": "right"}),
        ("decision", {}),
        ("branch", {}),
        ("status", {}),
        ("mode", {}),
        ("labels", {}),
        ("provider", {}),
        ("n", {"justify": "right"}),
        ("cost: predicted / measured", {"no_wrap": True}),
        ("run id", {"no_wrap": True}),
    ):
        table.add_column(col, **kw)
    for r in records:
        table.add_row(
            (r.start_time or "-").replace("+00:00", "Z"),
            r.model_version or "-",
            _fmt(r.score),
            r.decision or "-",
            r.branch or "-",
            r.status or "-",
            r.mode or "-",
            r.label_source or "-",
            (r.provider or "-").replace("ExecutionProvider", ""),
            "-" if r.n_samples is None else str(r.n_samples),
            cost_cell(r),
            r.run_id,
        )
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False)
    console.print(table)
    return buf.getvalue()


def check_reachable(tracking_uri: str, *, timeout: float = 5.0) -> str | None:
    """Why ``tracking_uri`` cannot be read, or ``None`` when it looks reachable. Never creates anything.

    ``sqlite:`` URIs must name an existing file (MLflow would otherwise create an empty database); ``http(s)`` URIs
    must answer at all (any HTTP status counts: it proves a server is there) within ``timeout`` seconds.
    """
    parsed = urllib.parse.urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        path = tracking_uri[len("sqlite:///") :] if tracking_uri.startswith("sqlite:///") else parsed.path
        path = path.split("?", 1)[0]
        if not path or path == ":memory:" or not os.path.isfile(path):
            return f"no MLflow database at {path or tracking_uri!r}"
        return None
    if parsed.scheme in ("http", "https"):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout):  # http(s) only: checked above
                return None
        except urllib.error.HTTPError:
            return None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"MLflow tracking server {tracking_uri} is unreachable ({reason})"
    if parsed.scheme in ("", "file"):
        path = parsed.path or tracking_uri
        if not os.path.exists(path):
            return f"no MLflow store at {path!r}"
    return None


def audit_main(model: str, tracking_uri: str, as_json: bool, registry_uri: str | None = None) -> int:
    """``resque audit``: print the gate history of ``model`` as a table (or JSON) and return the exit code.

    Returns 0 on success; 2, with a one-line message on stderr, when the registry cannot be read or the model has
    no gate runs.
    """
    problem = check_reachable(tracking_uri)
    if problem is None and registry_uri and registry_uri != tracking_uri:
        problem = check_reachable(registry_uri)
    if problem:
        print(f"resque audit: {problem}", file=sys.stderr)
        return 2
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
        records = gate_history(client, model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"resque audit: cannot read {tracking_uri}: {type(exc).__name__}: {first}"[:500], file=sys.stderr)
        log.debug("resque audit failed", exc_info=True)
        return 2
    if not records:
        print(f"resque audit: model {model!r} has no gate runs at {tracking_uri}", file=sys.stderr)
        return 2
    print(to_json(records) if as_json else format_table(records), end="" if not as_json else "\n")
    return 0

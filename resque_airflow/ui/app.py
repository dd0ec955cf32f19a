"""The RESQUE audit web view: a small read-only FastAPI app over :mod:`resque_airflow.ui.history`.

Pages (server-rendered HTML, no JavaScript, charts as inline SVG):

- ``/``: the models that have gate runs;
- ``/models/{name}``: the score over time with the reuse / rebuild thresholds, one point per gate run coloured by
  decision, and a table of the runs; ``?run=<run_id>`` adds that run's details (per-class angles as bars,
  companion signals, predicted against measured retraining cost).

JSON: ``/api/models``, ``/api/models/{name}/runs``, ``/api/runs/{run_id}``.

The Airflow plugin (:mod:`resque_airflow.ui.plugin`) mounts the app under ``/resque``; every link is built from the
request's ``root_path`` so the app works mounted or standalone (``uvicorn --factory resque_airflow.ui.app:create_app``
with the ``mlflow_default`` connection in ``AIRFLOW_CONN_MLFLOW_DEFAULT``).
"""

from __future__ import annotations

import logging
import math
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from resque_airflow.registry import names
from resque_airflow.ui import history

if TYPE_CHECKING:
    import jinja2
    import mlflow

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

#: Decision -> colour of its points, badges and bars.
DECISION_COLOURS = {"reuse": "#2e7d32", "retrain": "#ef8f00", "rebuild": "#c62828"}
OTHER_COLOUR = "#8a8f98"

#: Sent with every response: no script may run, styles and images come from the app, only same-origin framing
#: (the Airflow UI embeds the page in an iframe).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'none'; "
        "frame-ancestors 'self'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

ClientFactory = Callable[[], "mlflow.MlflowClient"]


def hook_client_factory(mlflow_conn_id: str = "mlflow_default") -> ClientFactory:
    """A client factory reading the Airflow connection ``mlflow_conn_id`` through ``MlflowHook``."""

    def factory() -> mlflow.MlflowClient:
        from resque_airflow.hooks.mlflow import MlflowHook

        return MlflowHook(mlflow_conn_id=mlflow_conn_id).get_client()

    return factory


class _ClientHolder:
    """Builds the MLflow client on first use and keeps it; a failed build is retried on the next request."""

    def __init__(self, factory: ClientFactory) -> None:
        self._factory = factory
        self._client: mlflow.MlflowClient | None = None
        self._lock = threading.Lock()

    def get(self) -> mlflow.MlflowClient:
        with self._lock:
            if self._client is None:
                self._client = self._factory()
            return self._client


class RegistryUnavailable(Exception):
    """MLflow could not be reached or answered with an error."""


# ---------------------------------------------------------------------------------------------------------------
# Chart geometry (SVG user units); the templates only place what is computed here.


def colour(decision: str | None) -> str:
    """Colour of a decision (grey for none or unknown)."""
    return DECISION_COLOURS.get(decision or "", OTHER_COLOUR)


def _nice_ticks(top: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values from 0 to at least ``top``.

    >>> _nice_ticks(0.22)
    [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    """
    if top <= 0:
        return [0.0, 1.0]
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    count = math.ceil(top / step - 1e-9)
    return [round(i * step, 10) for i in range(count + 1)]


def _parse_time(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def score_chart(
    records: Sequence[history.GateRecord], selected: str | None = None, *, width: int = 1120, height: int = 330
) -> dict[str, Any]:
    """Geometry of the score-over-time chart: one marker per gate run, threshold step lines, axes.

    Runs without a score (failed, still scoring) get a hollow marker on the time axis.
    """
    left, right, top, bottom = 56, 120, 18, 46
    pw, ph = width - left - right, height - top - bottom
    times = [_parse_time(r.start_time) for r in records]
    known = [t for t in times if t is not None]
    t0, t1 = (min(known), max(known)) if known else (0.0, 0.0)
    scores = [r.score for r in records if r.score is not None]
    ths = [v for r in records for v in (r.thresholds.get("reuse"), r.thresholds.get("rebuild")) if v is not None]
    ticks = _nice_ticks(max([*scores, *ths, 0.05]) * 1.08)
    y_top = ticks[-1]

    def x_of(i: int) -> float:
        t = times[i]
        if t is None or t1 <= t0:
            return left + pw * ((i + 0.5) / max(len(records), 1) if t1 <= t0 else 0.0)
        return left + pw * (t - t0) / (t1 - t0)

    def y_of(v: float) -> float:
        return top + ph * (1.0 - min(max(v, 0.0), y_top) / y_top)

    points = []
    for i, r in enumerate(records):
        x = x_of(i)
        label = f"{(r.start_time or '?').replace('+00:00', 'Z')} | v{r.model_version or '?'} | "
        label += f"score {r.score:.4g}" if r.score is not None else f"no score ({r.status or r.run_status or '?'})"
        label += f" | {r.decision}" if r.decision else ""
        points.append(
            {
                "run_id": r.run_id,
                "x": round(x, 2),
                "y": round(y_of(r.score), 2) if r.score is not None else round(top + ph, 2),
                "scored": r.score is not None,
                "decision": r.decision or "none",
                "colour": colour(r.decision),
                "selected": r.run_id == selected,
                "title": label,
            }
        )
    trend = " ".join(f"{p['x']},{p['y']}" for p in points if p["scored"])

    lines = []
    for kind, col in (("rebuild", DECISION_COLOURS["rebuild"]), ("reuse", DECISION_COLOURS["reuse"])):
        vals = [(x_of(i), r.thresholds.get(kind)) for i, r in enumerate(records) if r.thresholds.get(kind) is not None]
        if not vals:
            continue
        # A step line: each run's threshold holds until the next run.
        path = [(left, vals[0][1])]
        for x, v in vals:
            if v != path[-1][1]:
                path += [(x, path[-1][1]), (x, v)]
        path.append((left + pw, vals[-1][1]))
        lines.append(
            {
                "kind": kind,
                "colour": col,
                "points": " ".join(f"{round(x, 2)},{round(y_of(v), 2)}" for x, v in path),
                "label": f"{kind} {vals[-1][1]:g}",
                "label_y": round(y_of(vals[-1][1]) + 4, 2),
            }
        )

    x_ticks = []
    if known and t1 > t0:
        span = t1 - t0
        fmt = "%Y-%m-%d" if span > 2 * 86400 else "%m-%d %H:%M"
        n = min(6, len(known))
        for k in range(n):
            t = t0 + span * k / max(n - 1, 1)
            x_ticks.append({"x": round(left + pw * (t - t0) / span, 2), "label": _utc(t, fmt)})
    elif known:
        x_ticks.append({"x": round(left + pw / 2, 2), "label": _utc(t0, "%Y-%m-%d %H:%M")})

    return {
        "width": width,
        "height": height,
        "left": left,
        "top": top,
        "plot_w": pw,
        "plot_h": ph,
        "right_x": left + pw,
        "bottom_y": top + ph,
        "y_ticks": [{"y": round(y_of(v), 2), "label": f"{v:g}"} for v in ticks],
        "x_ticks": x_ticks,
        "points": points,
        "trend": trend,
        "lines": lines,
    }


def _utc(ts: float, fmt: str) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime(fmt)


def class_chart(record: history.GateRecord, *, width: int = 1120, height: int = 270) -> dict[str, Any] | None:
    """Geometry of the per-class angle bars of one gate run (``None`` without per-class angles).

    Bars are coloured by where the class's own angle falls against the run's thresholds; a dashed line marks the
    score (the mean angle).
    """
    items = [c for c in (record.per_class or []) if c.get("angle") is not None]
    if not items:
        return None
    left, right, top, bottom = 56, 120, 14, 44
    pw, ph = width - left - right, height - top - bottom
    reuse, rebuild = record.thresholds.get("reuse"), record.thresholds.get("rebuild")
    ticks = _nice_ticks(max([c["angle"] for c in items] + [v for v in (record.score, rebuild) if v is not None]) * 1.08)
    y_top = ticks[-1]

    def y_of(v: float) -> float:
        return top + ph * (1.0 - min(max(v, 0.0), y_top) / y_top)

    slot = pw / len(items)
    gap = min(slot * 0.2, 6.0)
    show_labels = len(items) <= 40
    bars = []
    for i, c in enumerate(items):
        a = c["angle"]
        if rebuild is not None and a > rebuild:
            col = DECISION_COLOURS["rebuild"]
        elif reuse is not None and a <= reuse:
            col = DECISION_COLOURS["reuse"]
        elif reuse is not None or rebuild is not None:
            col = DECISION_COLOURS["retrain"]
        else:
            col = "#3f6fb5"
        y = y_of(a)
        bars.append(
            {
                "cls": c["class"],
                "angle": a,
                "x": round(left + i * slot + gap / 2, 2),
                "y": round(y, 2),
                "w": round(max(slot - gap, 0.5), 2),
                "h": round(top + ph - y, 2),
                "cx": round(left + (i + 0.5) * slot, 2),
                "colour": col,
                "label": c["class"] if show_labels else "",
                "title": f"class {c['class']}: angle {a:.4g}"
                + "".join(f" | {k} {v}" for k, v in c.items() if k not in ("class", "angle")),
            }
        )
    marks = []
    for kind, value, col in (
        ("score", record.score, "#333a45"),
        ("rebuild", rebuild, DECISION_COLOURS["rebuild"]),
        ("reuse", reuse, DECISION_COLOURS["reuse"]),
    ):
        if value is not None:
            marks.append({"kind": kind, "y": round(y_of(value), 2), "colour": col, "label": f"{kind} {value:.4g}"})
    return {
        "width": width,
        "height": height,
        "left": left,
        "top": top,
        "right_x": left + pw,
        "bottom_y": top + ph,
        "y_ticks": [{"y": round(y_of(v), 2), "label": f"{v:g}"} for v in ticks],
        "bars": bars,
        "marks": marks,
    }


# ---------------------------------------------------------------------------------------------------------------
# The app


def _relative_path(request: Request) -> str:
    """The request path below the app's mount point (``root_path``)."""
    path = request.url.path
    root = str(request.scope.get("root_path", "")).rstrip("/")
    return path[len(root) :] if root and path.startswith(root) else path


def _jinja_env() -> jinja2.Environment:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,  # every template is HTML; never turn this off
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pathq"] = lambda s: urllib.parse.quote(str(s), safe="")
    env.filters["num"] = lambda v, digits=4: "-" if v is None else f"{v:.{digits}g}"
    env.filters["when"] = lambda iso: "-" if not iso else iso.replace("T", " ").replace("+00:00", " UTC")
    env.globals["colour"] = colour
    env.globals["cost_cell"] = history.cost_cell
    return env


def create_app(
    client_factory: ClientFactory | None = None,
    *,
    mlflow_conn_id: str = "mlflow_default",
    mlflow_ui_base: str | None = None,
    experiment_names: Sequence[str] | None = (names.DEFAULT_EXPERIMENT,),
    max_runs: int = 1000,
    dependencies: Sequence[Any] | None = None,
    title: str = "RESQUE audit",
) -> FastAPI:
    """Build the audit app.

    Args:
        client_factory: returns the ``mlflow.MlflowClient`` to read; called once, on the first request. Default:
            the Airflow connection ``mlflow_conn_id`` through ``resque_airflow.hooks.mlflow.MlflowHook``.
        mlflow_conn_id: the connection the default factory reads.
        mlflow_ui_base: base URL of the MLflow UI for run links (see :func:`history.resolve_ui_base`; ``None``: the
            ``RESQUE_MLFLOW_UI_URL`` environment variable, else the tracking URI when it is ``http(s)``).
        experiment_names: experiments holding gate runs; ``None`` searches all experiments.
        max_runs: most recent gate runs shown per model.
        dependencies: FastAPI dependencies applied to every route (the plugin passes Airflow's authentication).
        title: page title.
    """
    holder = _ClientHolder(client_factory or hook_client_factory(mlflow_conn_id))
    env = _jinja_env()
    app = FastAPI(
        title=title,
        description="Read-only view of RESQUE gate runs recorded in MLflow.",
        dependencies=list(dependencies or []),
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    def client() -> mlflow.MlflowClient:
        try:
            return holder.get()
        except Exception as exc:
            log.warning("resque ui: cannot build the MLflow client: %s", exc)
            raise RegistryUnavailable(f"cannot connect to MLflow: {exc}") from exc

    def guarded(fn: Callable[[], Any]) -> Any:
        """Run an MLflow read, turning any failure other than a lookup miss into RegistryUnavailable."""
        try:
            return fn()
        except (LookupError, RegistryUnavailable):
            raise
        except Exception as exc:
            log.warning("resque ui: MLflow read failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
            raise RegistryUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        base = str(request.scope.get("root_path", "")).rstrip("/")
        html = env.get_template(template).render(base=base, title=title, **context)
        return HTMLResponse(html, status_code=status_code)

    @app.exception_handler(RegistryUnavailable)
    async def unavailable(request: Request, exc: RegistryUnavailable) -> HTMLResponse | JSONResponse:
        message = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else "MLflow is unavailable"
        if _relative_path(request).startswith("/api/"):
            return JSONResponse({"detail": message}, status_code=502)
        return render(request, "error.html", status_code=502, message=message)

    def history_of(name: str) -> list[history.GateRecord]:
        return guarded(
            lambda: history.gate_history(
                client(),
                name,
                experiment_names=experiment_names,
                max_runs=max_runs,
                mlflow_ui_base=mlflow_ui_base,
            )
        )

    def detail_of(run_id: str) -> history.GateRecord:
        try:
            return guarded(lambda: history.gate_detail(client(), run_id, mlflow_ui_base=mlflow_ui_base))
        except LookupError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc

    def model_names() -> list[str]:
        return guarded(lambda: history.models_with_gates(client(), experiment_names=experiment_names))

    @app.get("/", response_class=HTMLResponse, summary="Models with gate runs")
    def index(request: Request) -> HTMLResponse:
        return render(request, "index.html", models=model_names(), experiments=experiment_names)

    @app.get("/models/{name:path}", response_class=HTMLResponse, summary="Gate history of one model")
    def model_page(request: Request, name: str, run: str | None = None) -> HTMLResponse:
        records = history_of(name)
        if not records:
            return render(request, "error.html", status_code=404, message=f"No gate runs for model {name!r}.")
        selected = None
        if run:
            if run not in {r.run_id for r in records}:
                raise HTTPException(status_code=404, detail=f"run {run!r} is not a gate run of model {name!r}")
            selected = detail_of(run)
        return render(
            request,
            "model.html",
            name=name,
            records=list(reversed(records)),  # newest first in the table
            chart=score_chart(records, selected.run_id if selected else None),
            selected=selected,
            bars=class_chart(selected) if selected else None,
            cost_metrics=names.COST_METRICS,
        )

    @app.get("/api/models", summary="Models with gate runs (JSON)")
    def api_models() -> dict[str, list[str]]:
        return {"models": model_names()}

    @app.get("/api/models/{name:path}/runs", summary="Gate runs of one model, oldest first (JSON)")
    def api_runs(name: str) -> JSONResponse:
        records = history_of(name)
        if not records:
            raise HTTPException(status_code=404, detail=f"no gate runs for model {name!r}")
        return JSONResponse([r.to_dict() for r in records])

    @app.get("/api/runs/{run_id}", summary="One gate run with its per-class angles (JSON)")
    def api_run(run_id: str) -> JSONResponse:
        return JSONResponse(detail_of(run_id).to_dict())

    return app

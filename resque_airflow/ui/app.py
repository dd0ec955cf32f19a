"""The RESQUE audit web view: a small read-only FastAPI app over :mod:`resque_airflow.registry.audit`.

Pages (server-rendered HTML, no JavaScript, charts as inline SVG):

- ``/``: the models that have gate runs;
- ``/models/{name}``: the score over time (each run's 90% interval and the null's quantile at its batch size, the
  thresholds of runs that decided with them), one point per gate run coloured by decision; predicted against
  measured retraining cost over the model's runs; the per-class angles of recent runs as a heat map; and a table of
  the runs. ``?run=<run_id>`` adds that run's details: the calibrated decision (score and interval, null quantile,
  p-value, "shift detected / not detected at alpha", measured and estimated accuracy, the reason sentence, the cost
  forecast with its basis), which classes moved (bars and a table against the previous run), companion signals,
  predicted against measured cost;
- ``/airflow?dag_id=&run_id=[&task_id=&map_index=]``: the gate run(s) of an Airflow DAG run or task instance (the
  plugin's DAG-run and task-instance tabs open it): one run redirects to its details, several are listed.

JSON: ``/api/models``, ``/api/models/{name}/runs``, ``/api/runs/{run_id}``.

The Airflow plugin (:mod:`resque_airflow.ui.plugin`) mounts the app under ``/resque``; every link is built from the
request's ``root_path`` so the app works mounted or standalone (``uvicorn --factory resque_airflow.ui.app:create_app``
with the ``mlflow_default`` connection in ``AIRFLOW_CONN_MLFLOW_DEFAULT``).
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from resque_airflow.errors import first_line
from resque_airflow.registry import audit, audit_costs, names
from resque_airflow.registry.audit_report import cost_cell
from resque_airflow.ui.charts import class_chart, colour, score_chart
from resque_airflow.ui.charts_costs import class_heatmap, cost_chart

if TYPE_CHECKING:
    import jinja2
    import mlflow

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

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
Render = Callable[..., HTMLResponse]  # render(request, template, status_code=200, **context)


class RegistryUnavailable(Exception):
    """MLflow could not be reached or answered with an error."""


class _Reader:
    """The app's reads of the audit trail, with the app's settings.

    Builds the MLflow client on first use and keeps it (a failed build is retried on the next request), and turns
    any failure other than a lookup miss into :class:`RegistryUnavailable`, which the app answers with a 502.
    """

    def __init__(
        self,
        factory: ClientFactory,
        *,
        experiment_names: Sequence[str] | None,
        max_runs: int,
        mlflow_ui_base: str | None,
    ) -> None:
        self._factory = factory
        self._client: mlflow.MlflowClient | None = None
        self._lock = threading.Lock()
        self.experiment_names = experiment_names
        self.max_runs = max_runs
        self.mlflow_ui_base = mlflow_ui_base

    def client(self) -> mlflow.MlflowClient:
        with self._lock:
            if self._client is None:
                try:
                    self._client = self._factory()
                except Exception as exc:
                    log.warning("resque ui: cannot build the MLflow client: %s", exc)
                    raise RegistryUnavailable(f"cannot connect to MLflow: {exc}") from exc
            return self._client

    def _read(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        client = self.client()
        try:
            return fn(client, *args, **kwargs)
        except LookupError:
            raise
        except Exception as exc:
            log.warning("resque ui: MLflow read failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
            raise RegistryUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def models(self) -> list[str]:
        return self._read(audit.models_with_gates, experiment_names=self.experiment_names)

    def history(self, name: str) -> list[audit.GateRecord]:
        return self._read(
            audit.gate_history,
            name,
            experiment_names=self.experiment_names,
            max_runs=self.max_runs,
            mlflow_ui_base=self.mlflow_ui_base,
        )

    def for_airflow(self, dag_id: str, run_id: str | None, task_id: str | None, map_index: int | None):
        return self._read(
            audit.gate_runs_for,
            dag_id,
            run_id,
            task_id,
            map_index,
            experiment_names=self.experiment_names,
            mlflow_ui_base=self.mlflow_ui_base,
        )

    def detail(self, run_id: str) -> audit.GateRecord:
        """One gate run; a run that does not exist or is not a gate run is a 404."""
        try:
            return self._read(audit.gate_detail, run_id, mlflow_ui_base=self.mlflow_ui_base)
        except LookupError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc


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
    env.globals["cost_cell"] = cost_cell
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
    login_url: Callable[[str], str] | None = None,
) -> FastAPI:
    """Build the audit app.

    Args:
        client_factory: returns the ``mlflow.MlflowClient`` to read; called once, on the first request. Default:
            the Airflow connection ``mlflow_conn_id`` through ``resque_airflow.hooks.mlflow.MlflowHook``.
        mlflow_conn_id: the connection the default factory reads.
        mlflow_ui_base: base URL of the MLflow UI for run links (see :func:`.audit.resolve_ui_base`; ``None``:
            the ``RESQUE_MLFLOW_UI_URL`` environment variable, else the tracking URI when it is ``http(s)``).
        experiment_names: experiments holding gate runs; ``None`` searches all experiments.
        max_runs: most recent gate runs shown per model.
        dependencies: FastAPI dependencies applied to every route (the plugin passes Airflow's authentication).
        title: page title.
        login_url: given the page's URL, the login page to send a browser without a session to (pages get a
            redirect instead of the raw 401 JSON; ``/api/`` keeps the 401).
    """
    if client_factory is None:  # the Airflow connection, read the way the plugin reads it
        from resque_airflow.ui.plugin import hook_client_factory

        client_factory = hook_client_factory(mlflow_conn_id)
    reader = _Reader(
        client_factory, experiment_names=experiment_names, max_runs=max_runs, mlflow_ui_base=mlflow_ui_base
    )
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

    def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        base = str(request.scope.get("root_path", "")).rstrip("/")
        html = env.get_template(template).render(base=base, title=title, **context)
        return HTMLResponse(html, status_code=status_code)

    @app.exception_handler(RegistryUnavailable)
    async def unavailable(request: Request, exc: RegistryUnavailable) -> HTMLResponse | JSONResponse:
        message = first_line(str(exc), 400) or "MLflow is unavailable"
        if _relative_path(request).startswith("/api/"):
            return JSONResponse({"detail": message}, status_code=502)
        return render(request, "error.html", status_code=502, message=message)

    if login_url is not None:
        from fastapi.exception_handlers import http_exception_handler
        from fastapi.responses import RedirectResponse
        from starlette.exceptions import HTTPException as StarletteHTTPException

        @app.exception_handler(StarletteHTTPException)
        async def to_login(request: Request, exc: StarletteHTTPException):  # type: ignore[no-untyped-def]
            if exc.status_code == 401 and not _relative_path(request).startswith("/api/"):
                return RedirectResponse(login_url(str(request.url)), status_code=303)
            return await http_exception_handler(request, exc)

    _add_pages(app, reader, render, experiment_names)
    _add_api(app, reader)
    return app


# C901 11: FastAPI routes are nested functions, and ruff counts their branches as this registration function's.
def _add_pages(app: FastAPI, reader: _Reader, render: Render, experiment_names: Sequence[str] | None) -> None:
    """The HTML pages: the models, and one model's gate history with one run's details."""

    @app.get("/", response_class=HTMLResponse, summary="Models with gate runs")
    def index(request: Request) -> HTMLResponse:
        return render(request, "index.html", models=reader.models(), experiments=experiment_names)

    @app.get("/models/{name:path}", response_class=HTMLResponse, summary="Gate history of one model")
    def model_page(request: Request, name: str, run: str | None = None) -> HTMLResponse:
        records = reader.history(name)
        if not records:
            return render(request, "error.html", status_code=404, message=f"No gate runs for model {name!r}.")
        selected = None
        if run:
            if run not in {r.run_id for r in records}:
                raise HTTPException(status_code=404, detail=f"run {run!r} is not a gate run of model {name!r}")
            selected = reader.detail(run)
        chosen = selected.run_id if selected else None
        # the selected run's record is the complete one (the artifact adds the forecast's basis and alpha)
        pairs = audit_costs.cost_pairs([selected if r.run_id == chosen else r for r in records])
        return render(
            request,
            "model.html",
            name=name,
            records=list(reversed(records)),  # newest first in the table
            chart=score_chart(records, chosen),
            selected=selected,
            bars=class_chart(selected) if selected else None,
            moves=audit_costs.class_moves(records, selected) if selected else None,
            pairs=pairs,
            cost_plot=cost_chart(pairs, chosen),
            heat=class_heatmap(records, chosen),
            cost_metrics=names.COST_METRICS,
        )

    @app.get("/airflow", response_model=None, summary="Gate runs of an Airflow DAG run or task instance")
    def airflow_scope(
        request: Request,
        dag_id: str,
        run_id: str | None = None,
        task_id: str | None = None,
        map_index: str | None = None,
    ) -> HTMLResponse | RedirectResponse:
        # Airflow leaves a placeholder it cannot fill as written ({TASK_ID} on a DAG-run tab, {MAP_INDEX} on an
        # unmapped task instance): those narrow nothing.
        def given(value: str | None) -> str | None:
            return None if not value or (value.startswith("{") and value.endswith("}")) else value

        index = given(map_index)
        scope = {"dag_id": dag_id, "run_id": given(run_id), "task_id": given(task_id)}
        scope["map_index"] = int(index) if index and index.lstrip("-").isdigit() else None
        try:
            records = reader.for_airflow(**scope)
        except LookupError as exc:
            return render(request, "error.html", status_code=404, message=str(exc))
        shown = {k: v for k, v in scope.items() if v is not None}
        if len(records) == 1 and records[0].model_name:
            r = records[0]
            base = str(request.scope.get("root_path", "")).rstrip("/")
            url = f"{base}/models/{urllib.parse.quote(r.model_name, safe='')}?run={urllib.parse.quote(r.run_id)}#detail"
            return RedirectResponse(url, status_code=303)
        what = ", ".join(f"{k} {v}" for k, v in shown.items())
        if not records:
            return render(request, "error.html", status_code=404, message=f"No RESQUE gate run recorded for {what}.")
        return render(request, "scope.html", scope=what, records=list(reversed(records)))


def _add_api(app: FastAPI, reader: _Reader) -> None:
    """The JSON endpoints: the same data as the pages."""

    @app.get("/api/models", summary="Models with gate runs (JSON)")
    def api_models() -> dict[str, list[str]]:
        return {"models": reader.models()}

    @app.get("/api/models/{name:path}/runs", summary="Gate runs of one model, oldest first (JSON)")
    def api_runs(name: str) -> JSONResponse:
        records = reader.history(name)
        if not records:
            raise HTTPException(status_code=404, detail=f"no gate runs for model {name!r}")
        return JSONResponse([r.to_dict() for r in records])

    @app.get("/api/runs/{run_id}", summary="One gate run with its per-class angles (JSON)")
    def api_run(run_id: str) -> JSONResponse:
        return JSONResponse(reader.detail(run_id).to_dict())

"""The Airflow plugin: the RESQUE audit view inside the Airflow UI.

Airflow 3 (3.1+) plugin interface:

- ``fastapi_apps``: the app of :mod:`resque_airflow.ui.app`, mounted by the API server under ``/resque``;
- ``external_views``: the nav entry "RESQUE audit" (category "browse"), which embeds ``resque/`` in the Airflow UI
  (``url_route`` set: an iframe at ``<airflow>/plugin/resque-audit``; ``href`` is relative to the UI's base URL),
  "RESQUE audit (new tab)", the same page outside the iframe (where links to MLflow open: the iframe is sandboxed
  without ``allow-popups``), and two tabs, "RESQUE gate", on every DAG run page (``destination="dag_run"``) and
  task instance page (``destination="task_instance"``): Airflow 3.1+ fills ``{DAG_ID}``, ``{RUN_ID}``, ``{TASK_ID}`` and
  ``{MAP_INDEX}`` in their ``href``, and the app's ``/airflow`` page opens the gate run of that DAG run or task
  instance (read from the gate run's ``airflow_*`` params and ``resque.gate_key`` tag).

Discovery stays cheap: importing this module imports neither FastAPI nor MLflow. The app is built the first time
Airflow reads ``fastapi_apps`` (only the API server and ``airflow plugins`` do) and MLflow is imported on the first
request.

Configuration (``airflow.cfg`` section ``[resque]`` or ``AIRFLOW__RESQUE__*`` environment variables):

- ``mlflow_conn_id`` (default ``mlflow_default``): the connection the view reads;
- ``mlflow_ui_url``: browser-facing MLflow URL for run links (else ``RESQUE_MLFLOW_UI_URL``, else the connection's
  host when it is an ``http(s)`` URL);
- ``gate_experiments`` (default ``resque-gate``): comma-separated experiments holding gate runs, ``*`` for all;
- ``ui_require_auth`` (default ``True``): require an authenticated Airflow user (the UI's ``_token`` cookie or a
  bearer token), like every other Airflow API route. Plugin routes are not protected by Airflow otherwise.

The plugin is registered by the ``airflow.plugins`` entry point of the distribution; ``plugins/resque_plugin.py`` is
the plugins-folder alternative for deployments that do not install the package's entry points.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

try:  # the Task SDK's class, as providers use it (common.compat does the same); core's before Airflow 3.2
    from airflow.sdk.plugins_manager import AirflowPlugin
except ImportError:  # pragma: no cover
    from airflow.plugins_manager import AirflowPlugin

if TYPE_CHECKING:
    import mlflow
    from fastapi import FastAPI

log = logging.getLogger(__name__)

PLUGIN_NAME = "resque"
URL_PREFIX = "/resque"
APP_NAME = "RESQUE audit"

#: The nav entry. ``href`` has no leading slash: the Airflow UI resolves it against its ``<base href>``, so it also
#: works when Airflow is served under a sub-path.
EXTERNAL_VIEW: dict[str, Any] = {
    "name": APP_NAME,
    "href": URL_PREFIX.lstrip("/") + "/",
    "url_route": "resque-audit",
    "destination": "nav",
    "category": "browse",
}

#: The same page as a plain link (no ``url_route``: Airflow opens it in a new tab, outside its iframe). Airflow's
#: iframe is sandboxed without ``allow-popups``, so run links to MLflow cannot open from inside it; here they do.
FULL_PAGE_VIEW: dict[str, Any] = {
    "name": APP_NAME + " (new tab)",
    "href": URL_PREFIX.lstrip("/") + "/",
    "destination": "nav",
    "category": "browse",
}

#: Tabs on the DAG run and task instance pages (Airflow 3.1+ substitutes the placeholders, URL-encoded).
DAG_RUN_VIEW: dict[str, Any] = {
    "name": "RESQUE gate",
    "href": URL_PREFIX.lstrip("/") + "/airflow?dag_id={DAG_ID}&run_id={RUN_ID}",
    "url_route": "resque-gate-run",
    "destination": "dag_run",
}
TASK_INSTANCE_VIEW: dict[str, Any] = {
    "name": "RESQUE gate",
    "href": URL_PREFIX.lstrip("/") + "/airflow?dag_id={DAG_ID}&run_id={RUN_ID}&task_id={TASK_ID}&map_index={MAP_INDEX}",
    "url_route": "resque-gate",
    "destination": "task_instance",
}

_app: FastAPI | None = None
_app_lock = threading.Lock()


def hook_client_factory(mlflow_conn_id: str = "mlflow_default") -> Callable[[], mlflow.MlflowClient]:
    """A client factory reading the Airflow connection ``mlflow_conn_id`` through ``MlflowHook``.

    The hook (and MLflow with it) is imported when the factory is called, on the app's first request.
    """

    def factory() -> mlflow.MlflowClient:
        from resque_airflow.hooks.mlflow import MlflowHook

        return MlflowHook(mlflow_conn_id=mlflow_conn_id).get_client()

    return factory


def _setting(key: str, fallback: str | None = None) -> str | None:
    from airflow.configuration import conf

    value = conf.get("resque", key, fallback=fallback)
    return value if value not in ("", None) else fallback


def build_app() -> FastAPI:
    """The audit app as the plugin serves it, configured from ``[resque]`` (see the module docstring)."""
    from fastapi import Depends

    from resque_airflow.registry import names
    from resque_airflow.ui.app import create_app

    dependencies = []
    require_auth = (_setting("ui_require_auth", "True") or "True").strip().lower() not in ("false", "0", "no", "off")
    if require_auth:
        from airflow.api_fastapi.core_api.security import requires_authenticated

        dependencies.append(Depends(requires_authenticated()))
    else:
        log.warning("resque plugin: [resque] ui_require_auth is off: the audit view is readable without login")
    experiments_setting = _setting("gate_experiments", names.DEFAULT_EXPERIMENT) or names.DEFAULT_EXPERIMENT
    experiments = (
        None
        if experiments_setting.strip() == "*"
        else tuple(e.strip() for e in experiments_setting.split(",") if e.strip())
    )
    return create_app(
        hook_client_factory(_setting("mlflow_conn_id", "mlflow_default") or "mlflow_default"),
        mlflow_ui_base=_setting("mlflow_ui_url"),
        experiment_names=experiments,
        dependencies=dependencies,
        title=APP_NAME,
        login_url=_login_url if require_auth else None,
    )


def _login_url(next_url: str) -> str:
    """Airflow's login page, coming back to ``next_url`` (the auth manager knows where it is)."""
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager().get_url_login(next_url=next_url)


def get_app() -> FastAPI:
    """The plugin's app, built once per process."""
    global _app
    with _app_lock:
        if _app is None:
            _app = build_app()
        return _app


class ResquePlugin(AirflowPlugin):
    """RESQUE audit view: FastAPI app under ``/resque`` and a nav entry "RESQUE audit" in the Airflow UI."""

    name = PLUGIN_NAME
    external_views = [EXTERNAL_VIEW, FULL_PAGE_VIEW, DAG_RUN_VIEW, TASK_INSTANCE_VIEW]  # noqa: RUF012 - Airflow's plugin interface is class attributes

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """Built on first access, so that plugin discovery in schedulers and workers stays cheap.

        A failure to build the app is logged and leaves the view out rather than stopping the API server.
        """
        try:
            app = get_app()
        except Exception:
            log.exception("resque plugin: cannot build the audit app; %s is not served", URL_PREFIX)
            return []
        return [{"app": app, "url_prefix": URL_PREFIX, "name": APP_NAME}]

"""Airflow hook for the ``mlflow`` connection type: ``host`` is the tracking URI."""

from __future__ import annotations

import os
from typing import Any

from airflow.sdk import BaseHook

_CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_SET_BY_HOOK: dict[str, str] = {}  # credential variables this process's hooks set, with the value they set


class MlflowHook(BaseHook):
    """Builds an :class:`mlflow.MlflowClient` from an Airflow connection.

    Connection fields: ``host`` = tracking URI (``http://mlflow:5000`` or ``sqlite:////abs/path.db``);
    extra ``registry_uri`` when the registry differs; ``login`` / ``password`` for a server behind basic auth
    (or ``password`` alone as a bearer token). Credentials are handed to MLflow through the environment variables it
    reads, and are never logged.

    Example connection as an environment variable::

        AIRFLOW_CONN_MLFLOW_DEFAULT='{"conn_type": "mlflow", "host": "http://mlflow:5000"}'
    """

    conn_name_attr = "mlflow_conn_id"
    default_conn_name = "mlflow_default"
    conn_type = "mlflow"
    hook_name = "MLflow"

    def __init__(self, mlflow_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mlflow_conn_id = mlflow_conn_id
        self._conn = None

    @property
    def connection(self):
        if self._conn is None:
            self._conn = self.get_connection(self.mlflow_conn_id)
        return self._conn

    @property
    def tracking_uri(self) -> str:
        host = (self.connection.host or "").strip()
        if not host:
            from resque_airflow.errors import ResqueInputError

            raise ResqueInputError(
                f"connection {self.mlflow_conn_id!r}: host is empty; set it to the MLflow tracking URI"
            )
        if "://" not in host:  # a bare host name from the UI form
            port = f":{self.connection.port}" if self.connection.port else ""
            host = f"http://{host}{port}"
        return host

    @property
    def registry_uri(self) -> str | None:
        return (self.connection.extra_dejson or {}).get("registry_uri") or None

    @property
    def ui_url(self) -> str | None:
        """Extra ``ui_url``: the MLflow UI address for links (needed for SQLite/file stores, optional for servers)."""
        return (self.connection.extra_dejson or {}).get("ui_url") or None

    def configure_credentials(self) -> None:
        """Hand this connection's credentials to MLflow (the environment variables it reads), and only them.

        The variables are process-wide: a worker that ran a task with another connection's credentials must not
        send them to this connection's server. So credentials that a hook set earlier are removed when this
        connection has none; variables set by the deployment itself (not by a hook) are left alone.
        """
        conn = self.connection
        wanted: dict[str, str] = {}
        if conn.login:
            wanted = {"MLFLOW_TRACKING_USERNAME": conn.login, "MLFLOW_TRACKING_PASSWORD": conn.password or ""}
        elif conn.password:
            wanted = {"MLFLOW_TRACKING_TOKEN": conn.password}
        for var in _CREDENTIAL_VARS:
            if var in wanted:
                os.environ[var] = wanted[var]
                _SET_BY_HOOK[var] = wanted[var]
            elif var in _SET_BY_HOOK:
                ours = _SET_BY_HOOK.pop(var)
                if os.environ.get(var) == ours:  # changed since by someone else: theirs to keep
                    del os.environ[var]

    def get_client(self):
        """An :class:`mlflow.MlflowClient` for this connection."""
        from resque_airflow.registry.client import make_client

        self.configure_credentials()
        return make_client(self.tracking_uri, self.registry_uri)

    def test_connection(self) -> tuple[bool, str]:
        """Used by the Airflow UI's "Test" button."""
        try:
            self.get_client().search_experiments(max_results=1)
        except Exception as exc:
            from resque_airflow.errors import first_line

            return False, first_line(exc)
        return True, f"reached MLflow at {self.tracking_uri}"

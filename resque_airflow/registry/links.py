"""Addresses in the MLflow UI of what a gate or a challenger recorded (the operators' extra links).

A server registry (``http(s)://``) serves its UI at the tracking URI itself. A SQLite or file registry has no UI of
its own: the connection's extra ``ui_url`` names the address of an ``mlflow ui`` started on the same database;
without it there is no link, and :func:`ui_base` says why.
"""

from __future__ import annotations

import logging
from urllib.parse import quote, urlsplit, urlunsplit

log = logging.getLogger(__name__)


def ui_base(tracking_uri: str, ui_url: str | None = None) -> str | None:
    """The MLflow UI address for ``tracking_uri`` (credentials removed), or None when there is none to link to."""
    if ui_url:
        return _without_credentials(ui_url.rstrip("/"))
    if urlsplit(tracking_uri).scheme in ("http", "https"):
        return _without_credentials(tracking_uri.rstrip("/"))
    log.info(
        "no MLflow UI link: the registry %s is a local store; set the connection's extra ui_url to the address of "
        "`mlflow ui --backend-store-uri <the same store>` to get links",
        urlsplit(tracking_uri).scheme or "path",
    )
    return None


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI."""
    return f"{base}/#/experiments/{quote(str(experiment_id))}/runs/{quote(str(run_id))}"


def model_version_url(base: str, name: str, version: str | int) -> str:
    """The model version's page in the MLflow UI."""
    return f"{base}/#/models/{quote(str(name), safe='')}/versions/{quote(str(version))}"


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))

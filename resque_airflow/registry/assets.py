"""The model as an Airflow asset: its URI (``mlflow://<tracking-host>/models/<name>``) and the event's extra.

Airflow-free (the registry never imports Airflow): the operators build ``Asset`` objects from these strings, and
Airflow calls :func:`normalize_uri` (declared under ``asset-uris`` in the provider info) to check such URIs.
"""

from __future__ import annotations

from urllib.parse import SplitResult, quote, unquote, urlsplit

SCHEME = "mlflow"
DEFAULT_HOST = "mlflow"  # the compose file's service name; any stable name of the tracking server will do

# Fields of a gate result copied into the asset event's extra (the retrain DAG reads them; all JSON types).
EXTRA_FIELDS = (
    "decision", "score", "interval", "reason", "policy", "model_name", "model_version", "model_alias",
    "gate_run_id", "data_uri", "data_hash", "n_samples", "label_source", "mode",
)  # fmt: skip


def tracking_host(tracking_uri: str) -> str:
    """The host part of a tracking URI without credentials (``local`` for SQLite and file stores)."""
    parts = urlsplit(tracking_uri)
    host = parts.hostname or ""
    if not host or parts.scheme in ("sqlite", "file", ""):
        return "local"
    return f"{host}:{parts.port}" if parts.port else host


def model_asset_uri(name: str, host: str = DEFAULT_HOST) -> str:
    """``mlflow://<host>/models/<name>``: the asset a gate's decision is an event of."""
    if not name or not str(name).strip():
        raise ValueError("model_name: empty; name the registered model the asset stands for")
    return f"{SCHEME}://{host}/models/{quote(str(name), safe='')}"


def model_of_asset_uri(uri: str) -> str | None:
    """The registered model name an ``mlflow://`` asset URI names, or None for any other URI."""
    parts = urlsplit(uri)
    segments = parts.path.strip("/").split("/")
    if parts.scheme != SCHEME or len(segments) != 2 or segments[0] != "models" or not segments[1]:
        return None
    return unquote(segments[1])


def normalize_uri(parts: SplitResult) -> SplitResult:
    """Airflow's asset-URI handler for ``mlflow://``: refuses URIs that name no model, drops a trailing slash."""
    if model_of_asset_uri(parts.geturl()) is None:
        raise ValueError(f"asset uri {parts.geturl()!r}: expected mlflow://<tracking-host>/models/<model name>")
    return parts._replace(path=parts.path.rstrip("/"), query="", fragment="")


def predicted_cost(gate_result: dict) -> dict | None:
    """The gate's cost forecast as ``{metric, predicted, low, high, rebuild_cost}`` (None without a forecast)."""
    p = gate_result.get("prediction")
    if not p:
        return None
    return {
        "metric": p.get("cost_metric"), "predicted": p.get("predicted"), "low": p.get("low"), "high": p.get("high"),
        "rebuild_cost": p.get("rebuild_cost"), "energy_kwh": p.get("energy_kwh"),
    }  # fmt: skip


def event_extra(gate_result: dict, **more: object) -> dict:
    """The asset event's extra for a gate result: the decision, score, interval, predicted cost, version, run id."""
    extra = {k: gate_result.get(k) for k in EXTRA_FIELDS}
    extra["predicted_cost"] = predicted_cost(gate_result)
    return extra | more

"""The one home of what every MLflow caller shares: the client, the spelling of a model URI (:class:`ModelRef`),
model-version resolution (aliases, no stages), the quoting of search filters and the formatting of MLflow times."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from resque_airflow.errors import NotRegisteredError, RegistryError, ResqueInputError, first_line

_URI = re.compile(r"^models:/(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def make_client(tracking_uri: str, registry_uri: str | None = None):
    """An :class:`mlflow.MlflowClient` bound explicitly to ``tracking_uri`` (and ``registry_uri``).

    A relative ``sqlite:///`` path is refused: Airflow task processes do not share the caller's working directory.
    """
    if not tracking_uri:
        raise ResqueInputError(
            "tracking_uri: empty; give the MLflow tracking URI (http://host:5000 or sqlite:////abs/path.db)"
        )
    for uri in (tracking_uri, registry_uri):
        if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            raise ResqueInputError(f"tracking_uri: {uri!r} is a relative SQLite path; use sqlite:////absolute/path.db")
    # An unreachable server should fail a gate in seconds, not after MLflow's default ~2 minutes of backoff.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # Against a server, MLflow writes "View run ... at" lines to stdout whenever a run ends (and asks the server
    # for the run to do so): stdout is the CLI's, where `resque gate --json` prints one JSON object.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow draws a download progress bar on stderr for multi-file artifacts: the CLI's error channel stays one line.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


def artifact_location_for(tracking_uri: str) -> str | None:
    """Where new experiments keep artifacts: beside a SQLite database (absolute), else the server's default.

    MLflow's default for a database backend is ``./mlruns`` relative to the *current* directory, which differs
    between the CLI, the scheduler and each Airflow task process.
    """
    if tracking_uri.startswith("sqlite:////"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / f"{db.stem}-artifacts").as_uri()
    return None


def ensure_experiment(client, name: str) -> str:
    """The id of experiment ``name``, created (with :func:`artifact_location_for`) if missing."""
    from mlflow.exceptions import MlflowException

    exp = registry_call(f"reading experiment {name!r}", client.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location_for(client.tracking_uri))
    except MlflowException:  # created concurrently by another gate
        exp = registry_call(f"reading experiment {name!r}", client.get_experiment_by_name, name)
        if exp is None:
            raise
        return exp.experiment_id


@dataclass(frozen=True)
class ModelRef:
    """A parsed ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""

    name: str
    alias: str | None = None
    version: str | None = None

    @staticmethod
    def spell(name: str, alias: str | None = None, version: str | int | None = None) -> str:
        """The ``models:/`` URI of ``version`` of ``name`` when a version is given, else of its ``alias``; unchecked.

        What an error message names when the parts do not make a valid reference.

        >>> ModelRef.spell("cnn", "champion"), ModelRef.spell("cnn", "champion", 3)
        ('models:/cnn@champion', 'models:/cnn/3')
        """
        if version not in (None, ""):
            return f"models:/{name}/{version}"
        return f"models:/{name}@{alias}"

    @classmethod
    def of(cls, name: str, alias: str | None = None, version: str | int | None = None) -> ModelRef:
        """The reference to ``version`` of ``name`` when a version is given, else to its ``alias``."""
        return cls.parse(cls.spell(name, alias, version))

    @classmethod
    def parse(cls, uri: str) -> ModelRef:
        m = _URI.match(uri or "")
        if not m:
            raise ResqueInputError(f"model_uri: expected models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}")
        return cls(m["name"], m["alias"], m["version"])

    def __str__(self) -> str:
        return self.spell(self.name, self.alias, None if self.alias else self.version)


def registry_call(what: str, fn, *args, **kwargs):
    """Call MLflow, turning connection failures into :class:`RegistryError` that says what was being done."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args, **kwargs)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise RegistryError(f"MLflow: {what} failed: {first_line(exc)}") from exc
    except (OSError, ConnectionError) as exc:
        raise RegistryError(f"MLflow: {what} failed (registry unreachable?): {exc}") from exc


def resolve_version(client, ref: ModelRef):
    """The :class:`~mlflow.entities.model_registry.ModelVersion` that ``ref`` points at.

    Raises:
        NotRegisteredError: the model, alias or version does not exist (the message lists what does).
        RegistryError: the registry could not be asked.
    """
    from mlflow.exceptions import MlflowException

    try:
        if ref.alias:
            return registry_call(f"resolving {ref}", client.get_model_version_by_alias, ref.name, ref.alias)
        return registry_call(f"resolving {ref}", client.get_model_version, ref.name, ref.version)
    except MlflowException as exc:  # registry_call lets only "does not exist" and "invalid value" through
        try:
            model = registry_call(f"reading the registered model {ref.name!r}", client.get_registered_model, ref.name)
        except MlflowException as missing:
            # Only a definite "does not exist" means so: anything else is the registry failing, not the model.
            raise NotRegisteredError(
                f"MLflow: no registered model named {ref.name!r}; publish it first (resque publish)"
            ) from missing
        known = sorted(model.aliases) if ref.alias else [v.version for v in model.latest_versions]
        what = f"alias {ref.alias!r}" if ref.alias else f"version {ref.version}"
        raise NotRegisteredError(f"MLflow: model {ref.name!r} has no {what}; it has {known}") from exc


def search_literal(value: str) -> str | None:
    """``value`` as a string literal of an MLflow search filter, or None when it cannot be written as one.

    MLflow's filter parser takes single- or double-quoted strings without escapes: a value holding one kind of
    quote is written with the other; one holding both cannot be searched for.

    >>> search_literal("digits-cnn")
    "'digits-cnn'"
    >>> print(search_literal("o'brien-cnn"))
    "o'brien-cnn"
    >>> print(search_literal("a'b" + '"c'))
    None
    """
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


def iso_time(ms: int | None) -> str | None:
    """A time in MLflow's milliseconds since the epoch as ISO 8601, UTC, to the millisecond (sorts as text).

    >>> iso_time(1767225600123)
    '2026-01-01T00:00:00.123+00:00'
    """
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds")

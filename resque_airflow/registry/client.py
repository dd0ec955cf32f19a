"""The one home of what every MLflow caller shares: the client, the spelling of a model URI (:class:`ModelRef`),
model-version resolution (aliases, no stages), the quoting of search filters and the formatting of MLflow times."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from resque_airflow.errors import NotRegisteredError, RegistryError, ResqueInputError, first_line, redact

_URI = re.compile(r"^models:/(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_SERVER_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")


def check_tracking_uri(uri: str, *, what: str = "tracking_uri", create: bool = False) -> None:
    """Refuse a tracking or registry URI the gate cannot use, before MLflow touches it.

    - an unknown scheme (``foo://``), or a file store (``file://``, a plain folder): MLflow's file store holds no
      model registry that a gate can rely on (it is in maintenance mode);
    - a relative ``sqlite:///`` path: Airflow task processes do not share the caller's working directory;
    - a ``sqlite:////`` path whose database does not exist (unless ``create``, as ``resque publish`` does): MLflow
      would silently create the folders and an empty database for a mistyped path.
    """
    shown = redact(uri)
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme in ("", "file"):
        raise ResqueInputError(
            f"{what}: {shown!r} is an MLflow file store, which holds no model registry the gate can use; give a "
            "database (sqlite:////abs/path/mlflow.db, postgresql://...) or a server (http://host:5000)"
        )
    if scheme not in _DB_SCHEMES + _SERVER_SCHEMES:
        raise ResqueInputError(
            f"{what}: {shown!r} has an unknown scheme {scheme!r}; expected one of "
            f"{', '.join(s + '://' for s in _SERVER_SCHEMES[:2] + _DB_SCHEMES)}"
        )
    if scheme != "sqlite":
        return
    if not uri.startswith("sqlite:////"):
        raise ResqueInputError(f"{what}: {shown!r} is a relative SQLite path; use sqlite:////absolute/path.db")
    db = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if db.is_file() or (create and db.parent.is_dir()):
        return
    if create:
        raise ResqueInputError(
            f"{what}: the folder {db.parent} of the SQLite database {db} does not exist; create it, or fix the path"
        )
    raise ResqueInputError(
        f"{what}: no MLflow database at {db}; check the path (a registry is created by resque publish)"
    )


def make_client(tracking_uri: str, registry_uri: str | None = None, *, create: bool = False):
    """An :class:`mlflow.MlflowClient` bound explicitly to ``tracking_uri`` (and ``registry_uri``).

    The URIs are checked by :func:`check_tracking_uri` (``create``: a SQLite database may be created, as by
    ``resque publish``). The client redacts credentials from everything it writes (params, tags, artifacts), and
    MLflow's log lines go through the process's logging (Airflow's task log, at their own level) instead of
    MLflow's own handler on stderr.
    """
    from resque_airflow.errors import install_log_redaction

    if not tracking_uri:
        raise ResqueInputError(
            "tracking_uri: empty; give the MLflow tracking URI (http://host:5000 or sqlite:////abs/path.db)"
        )
    check_tracking_uri(tracking_uri, create=create)
    if registry_uri and registry_uri != tracking_uri:
        check_tracking_uri(registry_uri, what="registry_uri", create=create)
    install_log_redaction()
    # An unreachable server should fail a gate in seconds, not after MLflow's default ~2 minutes of backoff.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # Against a server, MLflow writes "View run ... at" lines to stdout whenever a run ends (and asks the server
    # for the run to do so): stdout is the CLI's, where `resque gate --json` prints one JSON object.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow draws a download progress bar on stderr for multi-file artifacts: the CLI's error channel stays one line.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _client_class()  # imports mlflow, which installs its own stderr handler: route its records first
    route_mlflow_logging()
    return _client_class()(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


def route_mlflow_logging() -> None:
    """Send MLflow's log records through the process's logging instead of MLflow's own handler on stderr.

    MLflow gives its ``mlflow`` logger a stderr handler at INFO: under Airflow every such line lands on the task's
    stderr and is shown as ERROR, which breaks grep-for-errors alerting. Routed, an INFO record stays INFO (Airflow's
    task log) and follows the host's level (the CLI shows warnings only). ``MLFLOW_LOGGING_LEVEL``, when set, is
    kept as the ``mlflow`` logger's level.
    """
    import logging

    def mlflows_own(handler: logging.Handler) -> bool:
        return type(getattr(handler, "stream", None)).__name__ == "MlflowLoggingStream"

    for name in ("mlflow", "alembic", "sqlalchemy.engine", "huey"):  # the loggers MLflow configures
        logger = logging.getLogger(name)
        if not any(mlflows_own(h) for h in logger.handlers):
            continue
        logger.handlers = [h for h in logger.handlers if not mlflows_own(h)]
        logger.propagate = True
        if name == "mlflow":
            logger.setLevel(os.environ.get("MLFLOW_LOGGING_LEVEL", "").upper() or logging.NOTSET)


_CLIENT_CLASS = None


def _clean(value):
    """A string redacted (:func:`~resque_airflow.errors.redact`); anything else as it is."""
    return redact(value) if isinstance(value, str) else value


def _clean_tree(obj):
    """``obj`` (JSON-like) with every string in it, keys included, redacted."""
    if isinstance(obj, dict):
        return {_clean(k): _clean_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clean_tree(v) for v in obj)
    return _clean(obj)


# C901 13, kept in one piece: each overridden MlflowClient writer (params, tags, model-version tags, dicts) is one
# small closure, and they belong together so that no write path of the redacting client is missed.
def _client_class():
    """:class:`mlflow.MlflowClient` whose writes are redacted (one subclass, made once)."""
    global _CLIENT_CLASS
    if _CLIENT_CLASS is not None:
        return _CLIENT_CLASS
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    class RedactingMlflowClient(MlflowClient):
        """Every param, tag and JSON artifact this client writes is redacted (credentials in URIs and tokens)."""

        def create_run(self, experiment_id, start_time=None, tags=None, run_name=None):
            return super().create_run(experiment_id, start_time, _clean_tree(tags), run_name)

        def log_param(self, run_id, key, value, synchronous=None):
            return super().log_param(run_id, key, _clean(str(value)), synchronous=synchronous)

        def set_tag(self, run_id, key, value, synchronous=None):
            return super().set_tag(run_id, key, _clean(str(value)), synchronous=synchronous)

        def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
            params = [Param(p.key, _clean(p.value)) for p in params or ()]
            tags = [RunTag(t.key, _clean(t.value)) for t in tags or ()]
            return super().log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

        def log_dict(self, run_id, dictionary, artifact_file):
            return super().log_dict(run_id, _clean_tree(dictionary), artifact_file)

        def log_text(self, run_id, text, artifact_file):
            return super().log_text(run_id, _clean(text), artifact_file)

        def set_model_version_tag(self, name, version=None, key=None, value=None, stage=None):
            return super().set_model_version_tag(name, version, key, _clean(str(value)), stage)

        # MLflow checks before every model-registry write (and before resolving a download URI) that the registered
        # model is not a prompt, with one get_registered_model each: 7 per gate. Within prompt_checked_once() a name
        # that passed is not checked again. (A private MLflow method: if it is renamed, every check runs, as before.)
        _prompt_checked: set | None = None

        def _raise_if_prompt(self, name):
            checked = self._prompt_checked
            if checked is not None and name in checked:
                return
            super()._raise_if_prompt(name)
            if checked is not None:
                checked.add(name)

    _CLIENT_CLASS = RedactingMlflowClient
    return _CLIENT_CLASS


@contextmanager
def prompt_checked_once(client):
    """Within the block, MLflow's "is this registered model a prompt?" check runs once per model name on ``client``
    (a client of :func:`make_client`; any other client checks as MLflow does). A model cannot become a prompt
    within one gate, so the check's answer is shared by the gate's registry calls instead of asked before each."""
    if not hasattr(client, "_prompt_checked"):
        yield
        return
    client._prompt_checked = set()
    try:
        yield
    finally:
        client._prompt_checked = None


def log_text_files(client, run_id: str, files: Mapping[str, str | dict]) -> None:
    """Upload several small artifacts of run ``run_id`` in one ``log_artifacts``: each at its run-relative path
    (``"resque/report.html"``), from one temporary folder. A dict is written as ``log_dict`` writes JSON, a string as
    ``log_text`` does; both redacted as :func:`make_client`'s client redacts them."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="resque-artifacts-") as tmp:
        for rel, content in files.items():
            path = Path(tmp, *PurePosixPath(rel).parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, dict):
                text = json.dumps(_clean_tree(content), indent=2, default=str)
            else:
                text = _clean(content)
            path.write_text(text, encoding="utf-8")
        client.log_artifacts(run_id, tmp)


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
    """The id of experiment ``name``, created (with :func:`artifact_location_for`) if missing.

    The experiment is created with the MLflow 3 UI's view tag (:data:`~.names.EXPERIMENT_KIND_TAG`); an existing one
    without it gets it once. Both tolerate a concurrent gate doing the same (SQLite refuses the second insert).

    Raises:
        ResqueInputError: ``name`` is empty, or the experiment was deleted (MLflow keeps a deleted experiment's
            name: it must be restored or purged, or another name given).
        RegistryError: the registry failed, including a full disk or an unwritable artifact folder while creating.
    """
    from mlflow.exceptions import MlflowException

    from resque_airflow.registry.names import DEFAULT_EXPERIMENT, EXPERIMENT_KIND_ML, EXPERIMENT_KIND_TAG

    if not name or not str(name).strip():
        raise ResqueInputError(f"experiment: the MLflow experiment name is empty ({name!r}); give one, e.g. "
                               f"{DEFAULT_EXPERIMENT!r}")  # fmt: skip
    exp = registry_call(f"reading experiment {name!r}", client.get_experiment_by_name, name)
    if exp is None:
        try:
            return registry_call(f"creating experiment {name!r}", client.create_experiment, name,
                                 artifact_location=artifact_location_for(client.tracking_uri),
                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_ML})  # fmt: skip
        except (MlflowException, RegistryError):  # created concurrently by another gate
            exp = registry_call(f"reading experiment {name!r}", client.get_experiment_by_name, name)
            if exp is None:
                raise
    if getattr(exp, "lifecycle_stage", "active") == "deleted":
        raise ResqueInputError(
            f"experiment: MLflow experiment {name!r} (id {exp.experiment_id}) is deleted; restore it "
            f"(mlflow experiments restore --experiment-id {exp.experiment_id}), purge it (mlflow gc), or give "
            "another experiment name"
        )
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        try:
            registry_call("setting the experiment's view", client.set_experiment_tag, exp.experiment_id,
                          EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_ML)  # fmt: skip
        except RegistryError:  # set concurrently by another gate (a duplicate insert): fine if the tag is there now
            again = registry_call(f"reading experiment {name!r}", client.get_experiment_by_name, name)
            if again is None or EXPERIMENT_KIND_TAG not in (again.tags or {}):
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
        raise RegistryError(f"MLflow: {what} failed: {first_line(exc)}{_fix_for(exc)}") from exc
    except (OSError, ConnectionError) as exc:
        raise RegistryError(f"MLflow: {what} failed (registry unreachable?): {first_line(exc)}{_fix_for(exc)}") from exc


# Causes a database reports through MLflow that the user can fix, and the fix (appended to the one-line error).
_DB_FIXES = (
    (("readonly database", "read-only database", "read-only transaction"),
     "the MLflow database is read-only for this process: give the gate's user write access to the database file and "
     "its folder (SQLite writes a journal beside it), or point --tracking-uri at a writable registry"),
    (("unable to open database file",),
     "SQLite cannot open the database or create its journal: check that the folder exists and is writable"),
)  # fmt: skip


def _fix_for(exc: BaseException) -> str:
    """``"; <fix>"`` when ``exc`` names a cause in :data:`_DB_FIXES`, else ``""``."""
    text = str(exc).lower()
    for markers, fix in _DB_FIXES:
        if any(m in text for m in markers):
            return f"; {fix}"
    return ""


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

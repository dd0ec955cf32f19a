"""Downloading a registered model version: the ONNX file and its fingerprint, checked before anything runs."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from resque_airflow.core.fingerprint import Fingerprint
from resque_airflow.errors import FingerprintError, ModelError, RegistryError
from resque_airflow.registry.client import ModelRef, registry_call
from resque_airflow.runtime.model_file import read_model

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
FINGERPRINT_DIR = "extra_files"  # where mlflow.onnx.log_model(extra_files=...) puts the fingerprint files


TMP_PREFIX = "resque-gate-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_leftovers(tmp: str | os.PathLike | None = None) -> list[Path]:
    """Remove the download folders of gates whose process is gone (a SIGKILLed gate cannot clean up after itself).

    Each gate downloads into ``$TMPDIR/resque-gate-<pid>-*`` (:func:`download_dir`); a folder whose pid is not a
    live process is a leftover. Best effort; returns the folders removed.
    """
    import shutil

    removed = []
    for p in Path(tmp or tempfile.gettempdir()).glob(f"{TMP_PREFIX}*-*"):
        pid = p.name[len(TMP_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.info("removed %d download folder(s) left by killed gates: %s", len(removed), [str(p) for p in removed])
    return removed


def download_dir() -> tempfile.TemporaryDirectory:
    """A private temporary folder for one gate's model download, named by this process's pid, after sweeping the
    folders that killed gates left behind (:func:`sweep_leftovers`)."""
    sweep_leftovers()
    return tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-")


def check_inside(root: Path) -> None:
    """Refuse a download in which any path (or link target) escapes ``root``."""
    base = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if not p.resolve().is_relative_to(base):
                raise RegistryError(f"MLflow: downloaded artifact {p} points outside the download folder; refusing it")


def _refused_file(exc: BaseException) -> str:
    """The file MLflow names in its "##### File X #####" download failure report, or "a file" when none."""
    import re

    m = re.search(r"#####\s*File\s+(\S+)\s*#####", str(exc))
    return m[1] if m else "a file"


@dataclass
class FetchedModel:
    """A downloaded model version: local ONNX path, its sha256, and its fingerprint (None if it has none)."""

    name: str
    version: str
    model_path: Path
    sha256: str
    fingerprint: Fingerprint | None
    run_id: str | None


def fetch_model(client, version, dst: str | os.PathLike, *, need_fingerprint: bool = True) -> FetchedModel:
    """Download ``version`` (a ModelVersion) into ``dst`` and check the model file against its fingerprint.

    Raises:
        FingerprintError: the fingerprint is missing or damaged, or the model file's sha256 differs from it.
        ModelError: the version holds no ``model.onnx``.
    """
    import mlflow.artifacts

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    uri = ModelRef.spell(version.name, version=version.version)
    # The version's own artifact location, downloaded with this client's tracking URI: resolving ``models:/``
    # through mlflow.artifacts would consult the process-wide registry URI instead.
    source = registry_call(f"locating {uri}", client.get_model_version_download_uri, version.name, version.version)
    from mlflow.exceptions import MlflowException

    try:
        local = Path(
            registry_call(
                f"downloading {uri}",
                mlflow.artifacts.download_artifacts,
                artifact_uri=source,
                dst_path=str(dst),
                tracking_uri=client.tracking_uri,
            )
        )
    except MlflowException as exc:  # registry_call passes "does not exist" and "invalid value" through
        detail = " ".join(str(exc).split())[:300]
        if "No such artifact" in str(exc) or getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise ModelError(f"model: the artifacts of {uri} are missing from the artifact store ({detail}); "
                             "publish the model again (resque publish)") from exc  # fmt: skip
        if "outside the artifact directory" in str(exc):  # a link planted in the store, refused by MLflow
            raise RegistryError(
                f"MLflow: the artifact store holds a link in {uri} that points outside it ({_refused_file(exc)}); "
                "refusing it: replace the link with the file itself, or publish the model again (resque publish)"
            ) from exc
        raise RegistryError(f"MLflow: downloading {uri} failed: {detail}") from exc
    check_inside(dst)
    model_path = local / MODEL_FILE
    if not model_path.is_file():
        raise ModelError(f"model: {uri} holds no {MODEL_FILE}; register it with resque publish")
    # Every file of the model: model.onnx and the external weights it names (read from its own folder), as the
    # scoring pass will load them; the fingerprint binds that hash.
    sha = read_model(model_path)[1]
    fp = None
    fp_dir = local / FINGERPRINT_DIR
    if (fp_dir / "fingerprint.json").is_file():
        fp = Fingerprint.load(fp_dir)
        fp.check_model(sha, model_ref=f"{uri} ({MODEL_FILE})")
    elif need_fingerprint:
        raise FingerprintError(
            f"fingerprint: {uri} has no fingerprint; publish the model with resque publish (or publish_model) so "
            "its reference fingerprint is stored beside it"
        )
    return FetchedModel(version.name, str(version.version), model_path, sha, fp, version.run_id)

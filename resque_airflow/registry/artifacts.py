"""Downloading a registered model version: the ONNX file and its fingerprint, checked before anything runs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from resque_airflow.core.fingerprint import Fingerprint, sha256_file
from resque_airflow.errors import FingerprintError, ModelError, RegistryError
from resque_airflow.registry.client import ModelRef, registry_call

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
FINGERPRINT_DIR = "extra_files"  # where mlflow.onnx.log_model(extra_files=...) puts the fingerprint files


def check_inside(root: Path) -> None:
    """Refuse a download in which any path (or link target) escapes ``root``."""
    base = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if not p.resolve().is_relative_to(base):
                raise RegistryError(f"MLflow: downloaded artifact {p} points outside the download folder; refusing it")


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
    local = Path(
        registry_call(
            f"downloading {uri}",
            mlflow.artifacts.download_artifacts,
            artifact_uri=source,
            dst_path=str(dst),
            tracking_uri=client.tracking_uri,
        )
    )
    check_inside(dst)
    model_path = local / MODEL_FILE
    if not model_path.is_file():
        raise ModelError(f"model: {uri} holds no {MODEL_FILE}; register it with resque publish")
    sha = sha256_file(model_path)
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

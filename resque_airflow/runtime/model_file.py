"""A model file as the gate runs it: its bytes with any external weights read from its own folder, and one sha256
that binds every file of the model."""

from __future__ import annotations

from pathlib import Path

from resque_airflow.core.fingerprint import sha256_bytes
from resque_airflow.errors import ResqueInputError


def read_model(model: str | Path | bytes, *, sha256: str | None = None) -> tuple[bytes, str]:
    """Model bytes and their sha256, from a local path or bytes.

    ``sha256``: the hash of these bytes, already computed by the caller (the registry's ``fetch_model`` hashes the
    file it downloaded); it is returned as is instead of hashing the bytes a second time.
    """
    if isinstance(model, bytes):
        if b"location" in model and _external_files(model):  # ONNX Runtime would resolve them from the CWD
            raise ResqueInputError("model: these model bytes name external weight files; pass the model's path")
        return model, sha256 or sha256_bytes(model)
    path = Path(model)
    if not path.is_file():
        raise ResqueInputError(f"model: {path} not found")
    data = path.read_bytes()
    if b"location" in data and _external_files(data):  # cheap test first: a model without external data is as is
        data = inline_external_data(data, path.parent)
        return data, sha256_bytes(data)  # the hash of every file of the model, never of model.onnx alone
    return data, sha256 or sha256_bytes(data)


def _external_files(data: bytes) -> list[str]:
    """The external data files the serialized model ``data`` names (empty when its weights are all inside)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        proto = onnx.load_model_from_string(data)
    except Exception:  # not a model: graph.load_model names that problem
        return []
    return sorted({dict((e.key, e.value) for e in t.external_data).get("location", "")
                   for t in _get_all_tensors(proto) if uses_external_data(t)})  # fmt: skip


def inline_external_data(data: bytes, folder: Path) -> bytes:
    """The model ``data`` with its external weights read from ``folder`` (the model's own folder, never the
    process's current directory) and stored inside, so that its sha256 binds every file of the model.

    Raises:
        ModelError: a weight file is missing, or its location leads outside ``folder``.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    from resque_airflow.errors import ModelError

    base = folder.resolve()
    for location in _external_files(data):
        target = (base / location).resolve()
        if not target.is_relative_to(base):
            raise ModelError(f"model: external weights {location!r} lead outside the model's folder {folder}")
        if not target.is_file():
            raise ModelError(f"model: external weights {location!r} are missing beside the model in {folder}")
    proto = onnx.load_model_from_string(data)
    load_external_data_for_model(proto, str(base))
    return proto.SerializeToString()

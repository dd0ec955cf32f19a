"""The fingerprint: what a gate needs to know about the reference side of a model.

A fingerprint is a folder with two files, ``fingerprint.json`` (metadata, readable by people) and
``fingerprint.npz`` (arrays, loaded with ``allow_pickle=False``). The JSON records the sha256 of the ``.npz`` so a
damaged or swapped array file is detected.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from resque_airflow.core.atc import atc_threshold
from resque_airflow.core.summary import FeatureSummary
from resque_airflow.errors import FingerprintError

FORMAT_VERSION = 2  # 2: bootstrap replicates, the null's pool columns, confidence histogram, input statistics
JSON_NAME = "fingerprint.json"
NPZ_NAME = "fingerprint.npz"


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ImageSpec:
    """How raw images become model input: ``((pixel * scale) - mean) / std``, channels first.

    Attributes:
        mode: PIL mode the image is converted to, ``"L"`` (1 channel) or ``"RGB"`` (3 channels).
        scale: multiplier applied to 0..255 pixel values (``1/255`` maps to [0, 1]).
        mean, std: per-channel normalisation after scaling.
    """

    mode: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


@dataclass(frozen=True)
class InputSpec:
    """The model's input: tensor name, shape (None for dynamic axes), dtype, and image scaling if any."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"
    image: ImageSpec | None = None

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        image = d.get("image")
        return cls(
            name=d["name"],
            shape=tuple(d["shape"]),
            dtype=d.get("dtype", "float32"),
            image=None
            if image is None
            else ImageSpec(
                mode=image["mode"], scale=image["scale"], mean=tuple(image["mean"]), std=tuple(image["std"])
            ),
        )


@dataclass
class Fingerprint:
    """Reference-side summary of a model, bound to one ONNX file by its sha256.

    Attributes:
        model_sha256: sha256 of the ONNX file the reference features were computed with.
        layer: name of the representation tensor in that graph; ``pooling`` says how it was pooled
            (``"spatial"`` over H, W; ``"tokens"`` over T; ``"none"`` for (N, D)).
        logits_output: name of the graph output used for predicted labels, or None.
        input_spec: the model's input.
        summary: the reference :class:`FeatureSummary` (class sums under given / predicted / no labels,
            accuracy and confidence counters, a bounded feature sample).
        class_names: names of the classes, in index order, when known (image folders).
        data_uri: where the reference data came from (informational).
    """

    model_sha256: str
    layer: str
    pooling: str
    logits_output: str | None
    input_spec: InputSpec
    summary: FeatureSummary
    class_names: list[str] | None = None
    data_uri: str | None = None
    format_version: int = FORMAT_VERSION
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def n_samples(self) -> int:
        return self.summary.n

    @property
    def num_classes(self) -> int:
        return self.summary.num_classes

    @property
    def dim(self) -> int:
        return self.summary.dim

    @property
    def atc_threshold(self) -> float | None:
        """The confidence above which the fraction of reference samples equals the reference accuracy (ATC)."""
        acc = self.summary.accuracy
        return None if acc is None or self.summary.confidences.n == 0 else atc_threshold(self.summary.confidences, acc)

    def check_model(self, model_sha256: str, *, model_ref: str = "the model") -> None:
        """Raise :class:`FingerprintError` unless ``model_sha256`` is the file this fingerprint was made from."""
        if model_sha256 != self.model_sha256:
            raise FingerprintError(
                f"fingerprint is for a model with sha256 {self.model_sha256[:12]}..., but {model_ref} has sha256 "
                f"{model_sha256[:12]}...; recompute the fingerprint for this model (resque fingerprint) or use the "
                "model it was made from"
            )

    def metadata(self) -> dict:
        """The JSON part: everything but the arrays."""
        return {
            "format_version": self.format_version,
            "created_at": self.created_at,
            "model_sha256": self.model_sha256,
            "layer": self.layer,
            "pooling": self.pooling,
            "logits_output": self.logits_output,
            "input_spec": asdict(self.input_spec),
            "class_names": self.class_names,
            "data_uri": self.data_uri,
            "n_samples": self.n_samples,
            "reference_accuracy": self.summary.accuracy,
            "reference_confidence": self.summary.confidence,
            "atc_threshold": self.atc_threshold,
            "summary": self.summary.to_scalars(),
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``fingerprint.json`` and ``fingerprint.npz`` into ``directory`` (created if needed).

        Each file is written under a temporary name and renamed, so a reader never sees a partial file.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **self.summary.to_arrays())
        npz = buf.getvalue()
        meta = self.metadata() | {"npz_sha256": sha256_bytes(npz)}
        for name, payload in ((NPZ_NAME, npz), (JSON_NAME, json.dumps(meta, indent=2).encode())):
            tmp = out / f".{name}.tmp"
            tmp.write_bytes(payload)
            os.replace(tmp, out / name)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Fingerprint:
        """Load a fingerprint folder (or the path of its ``fingerprint.json``).

        Raises:
            FingerprintError: the folder is missing a file, a file is damaged, or the format is newer than this
                package reads.
        """
        path = Path(directory)
        if path.name == JSON_NAME:
            path = path.parent
        json_path, npz_path = path / JSON_NAME, path / NPZ_NAME
        for p in (json_path, npz_path):
            if not p.is_file():
                raise FingerprintError(
                    f"fingerprint: {p} not found; a fingerprint is a folder with {JSON_NAME} and {NPZ_NAME} "
                    "(create one with `resque fingerprint`)"
                )
        try:
            meta = json.loads(json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FingerprintError(f"fingerprint: {json_path} is damaged (not valid JSON: {exc})") from exc
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if not isinstance(version, int):
            raise FingerprintError(f"fingerprint: {json_path} has no format_version; it is damaged")
        if version < FORMAT_VERSION:
            raise FingerprintError(
                f"fingerprint: {json_path} has format version {version}, which predates the calibrated null "
                f"(version {FORMAT_VERSION}); recompute it from the reference data (resque fingerprint, or publish "
                "the model again)"
            )
        if version > FORMAT_VERSION:
            raise FingerprintError(
                f"fingerprint: {json_path} has format version {version}, newer than the {FORMAT_VERSION} this "
                "version of airflow-provider-resque reads; upgrade the package"
            )
        npz = npz_path.read_bytes()
        if sha256_bytes(npz) != meta.get("npz_sha256"):
            raise FingerprintError(f"fingerprint: {npz_path} does not match the sha256 in {JSON_NAME}; it is damaged")
        try:
            with np.load(io.BytesIO(npz), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            return cls(
                model_sha256=meta["model_sha256"],
                layer=meta["layer"],
                pooling=meta["pooling"],
                logits_output=meta["logits_output"],
                input_spec=InputSpec.from_dict(meta["input_spec"]),
                summary=FeatureSummary.from_parts(meta["summary"], arrays),
                class_names=meta.get("class_names"),
                data_uri=meta.get("data_uri"),
                format_version=version,
                created_at=meta["created_at"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FingerprintError(f"fingerprint: {path} is damaged ({type(exc).__name__}: {exc})") from exc

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

from resque_airflow import jsonsafe
from resque_airflow.core.atc import atc_threshold
from resque_airflow.core.summary import FeatureSummary
from resque_airflow.errors import FingerprintError, ResqueInputError

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


IMAGE_MODES = ("L", "RGB", "BGR")
IMAGE_LAYOUTS = ("NCHW", "NHWC")
RESIZE_POLICIES = ("stretch", "keep-aspect", "center-crop", "height")
TEXT_PADDING = ("max_length", "longest")


def _choice(what: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ResqueInputError(f"{what}: expected one of {choices}, got {value!r}")


@dataclass(frozen=True)
class ImageSpec:
    """How raw images become model input, declared once (at publish time) and applied by the image reader.

    Each image is converted to ``mode``, resized by ``resize`` to ``size`` (the model's fixed ``(H, W)`` when None),
    turned into ``((pixel * scale) - mean) / std`` per channel, and laid out as ``layout``.

    Attributes:
        mode: ``"L"`` (1 channel), ``"RGB"`` or ``"BGR"`` (3 channels, in that order).
        scale: multiplier applied to 0..255 pixel values (``1/255`` maps to [0, 1]).
        mean, std: per-channel normalisation after scaling: one value, or one per channel.
        layout: ``"NCHW"`` or ``"NHWC"``; None: read from the model's input shape (channels-last when its last axis
            is 1 or 3 and its second is not).
        resize: ``"stretch"`` to ``size`` (aspect not kept); ``"keep-aspect"`` (fit inside ``size``, centred,
            padded with 0 after normalisation); ``"center-crop"`` (shorter side to fit, then the centre);
            ``"height"`` (height to ``size[0]``, width by aspect up to ``max_width``, padded on the right with 0
            after normalisation: text-line models with a dynamic width).
        size: ``(H, W)``; None: the model input's fixed size (required for a dynamic-size model, except the height
            for ``resize="height"``, which needs ``max_width``).
        max_width: the padded width of ``resize="height"`` (a dynamic-width model's widest input).
    """

    mode: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str | None = None
    resize: str = "stretch"
    size: tuple[int, int] | None = None
    max_width: int | None = None

    def __post_init__(self) -> None:
        _choice("image mode (--image-mode)", self.mode, IMAGE_MODES)
        _choice("image resize (--image-resize)", self.resize, RESIZE_POLICIES)
        if self.layout is not None:
            _choice("image layout (--image-layout)", self.layout, IMAGE_LAYOUTS)
        channels = self.channels
        for what, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise ResqueInputError(
                    f"image {what} (--image-{what}): {len(values)} values {tuple(values)} for mode {self.mode!r}, "
                    f"which has {channels} channel{'s' if channels > 1 else ''}; give "
                    + ("1 value" if channels == 1 else f"1 or {channels} values")
                )
        if any(float(s) == 0.0 for s in self.std):
            raise ResqueInputError(f"image std (--image-std): {tuple(self.std)} contains 0; give non-zero values")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ResqueInputError(f"image size (--image-size): expected two positive integers H,W, got {self.size}")
        if self.max_width is not None and self.max_width < 1:
            raise ResqueInputError(f"image max width (--image-max-width): expected >= 1, got {self.max_width}")

    @property
    def channels(self) -> int:
        """1 for ``"L"``, else 3."""
        return 1 if self.mode == "L" else 3

    @classmethod
    def from_dict(cls, d: dict) -> ImageSpec:
        """The spec of :meth:`to_dict` (fields missing from older fingerprints take their defaults)."""
        size = d.get("size")
        return cls(
            mode=d["mode"], scale=float(d["scale"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
            layout=d.get("layout"), resize=d.get("resize", "stretch"), size=None if size is None else tuple(size),
            max_width=d.get("max_width"),
        )  # fmt: skip

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)


@dataclass(frozen=True)
class TextSpec:
    """How raw text becomes token inputs: a Hugging Face ``tokenizers`` tokenizer and its settings.

    The tokenizer's JSON travels inside the fingerprint (bound by ``tokenizer_sha256``), so a gate on raw text needs
    nothing but the data.

    Attributes:
        tokenizer_json: the ``tokenizer.json`` content.
        tokenizer_sha256: its sha256 (checked on load).
        column: the text column of Parquet / field of ``.jsonl`` data.
        max_length: truncation length in tokens (special tokens included).
        padding: ``"max_length"`` (every row padded to ``max_length``) or ``"longest"`` (to the batch's longest).
        ids_input, mask_input, type_ids_input: the model inputs fed with the token ids, the attention mask and the
            token type ids (None where the model has no such input).
    """

    tokenizer_json: str
    tokenizer_sha256: str
    column: str = "text"
    max_length: int = 128
    padding: str = "max_length"
    ids_input: str = "input_ids"
    mask_input: str | None = None
    type_ids_input: str | None = None

    def __post_init__(self) -> None:
        _choice("text padding (--text-padding)", self.padding, TEXT_PADDING)
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ResqueInputError(f"text max length (--max-length): expected >= 1, got {self.max_length!r}")
        if sha256_bytes(self.tokenizer_json.encode()) != self.tokenizer_sha256:
            raise FingerprintError("fingerprint: the stored tokenizer does not match its sha256; it is damaged")

    @classmethod
    def from_dict(cls, d: dict) -> TextSpec:
        """The spec of :meth:`to_dict`."""
        return cls(**{k: d[k] for k in d if k in cls.__dataclass_fields__})

    def to_dict(self, *, with_tokenizer: bool = True) -> dict:
        """JSON-ready fields (``with_tokenizer=False``: without the tokenizer's JSON, for display)."""
        out = asdict(self)
        if not with_tokenizer:
            out.pop("tokenizer_json")
        return out


@dataclass(frozen=True)
class TensorSpec:
    """One model input: name, numpy dtype name (``"float32"``, ``"int64"`` ...), shape (None for dynamic axes)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class InputSpec:
    """The model's inputs and how data becomes them.

    Attributes:
        name, shape, dtype: the main input (the first float input, else the first input): the one whose statistics
            the data-sanity checks keep, and the one images are decoded into.
        image: image preprocessing (image-folder data), if any.
        text: tokenization (raw-text data), if any.
        inputs: every model input, in the graph's order (empty: the main input is the only one).
        label_column: the labels' column of Parquet / field of ``.jsonl`` data.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"
    image: ImageSpec | None = None
    text: TextSpec | None = None
    inputs: tuple[TensorSpec, ...] = ()
    label_column: str = "label"

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        """Every model input (the main one alone when ``inputs`` is empty)."""
        return self.inputs or (TensorSpec(self.name, self.dtype, tuple(self.shape)),)

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        """The spec of :meth:`to_dict`."""
        image, text = d.get("image"), d.get("text")
        return cls(
            name=d["name"],
            shape=tuple(d["shape"]),
            dtype=d.get("dtype", "float32"),
            image=None if image is None else ImageSpec.from_dict(image),
            text=None if text is None else TextSpec.from_dict(text),
            inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in d.get("inputs", ())),
            label_column=d.get("label_column", "label"),
        )

    def to_dict(self, *, with_tokenizer: bool = True) -> dict:
        """JSON-ready fields (``with_tokenizer=False``: without the tokenizer's JSON, for display)."""
        out = asdict(self)
        if self.text is not None:
            out["text"] = self.text.to_dict(with_tokenizer=with_tokenizer)
        return out


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
            "input_spec": self.input_spec.to_dict(),
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
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-probe.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ResqueInputError(
                f"fingerprint: cannot write to {out} ({exc.strerror or type(exc).__name__}); give a writable folder"
            ) from exc
        buf = io.BytesIO()
        np.savez(buf, **self.summary.to_arrays())
        npz = buf.getvalue()
        meta = self.metadata() | {"npz_sha256": sha256_bytes(npz)}
        for name, payload in ((NPZ_NAME, npz), (JSON_NAME, jsonsafe.dumps(meta, indent=2).encode())):
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

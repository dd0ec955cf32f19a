"""The exposed model (what :func:`~resque_airflow.runtime.graph.expose_layer` made of a model) and its disk cache.

A scheduled gate scores the same production model run after run, and the graph edit is the same every time: a
shape inference over the whole model, a copy of every weight, and the ``onnx`` import (0.8 s) that both need. The
cache keeps the edited graph and its description under the model's sha256, the layer and the pooling asked for, so
that a later :class:`~resque_airflow.runtime.embed.Embedder` hands ONNX Runtime a file and never imports ``onnx``.

Where: ``$RESQUE_CACHE_DIR`` (``off`` turns the cache off), else ``$XDG_CACHE_HOME/resque-airflow``, else
``~/.cache/resque-airflow``. One folder per entry under ``exposed/``, written under a temporary name and renamed,
so a reader never sees half an entry; the oldest entries beyond :data:`MAX_ENTRIES` are removed. A cache that cannot
be written or read is logged and passed by: it never fails a gate. The entry is trusted as a model the way the
user's own files are (it lives in their home or in the folder they named).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "RESQUE_CACHE_DIR"
CACHE_OFF = "off"
MAX_ENTRIES = 16
# Part of every key: bump it whenever graph.py or layers.py change what the edit produces, so old entries miss.
EDIT_VERSION = 1
MODEL_FILE = "model.onnx"
INFO_FILE = "exposed.json"


@dataclass(frozen=True)
class ExposedModel:
    """A model with its representation exposed.

    Attributes:
        model: the edited graph (an ``onnx.ModelProto``; outputs ``[logits_output?, pooled_output]``), or None once
            it has been serialised for the session, or when the description came from the cache.
        layer: name of the exposed tensor in the original graph; ``layer_reason`` says why it was chosen.
        pooled_output: name of the new ``(N, D)`` output.
        pooling: ``"spatial"`` (mean over the axes after C of a channels-first ``(N, C, ...)`` tensor),
            ``"spatial-last"`` (mean over H, W of ``(N, H, W, C)``), ``"tokens"`` (mean over T of ``(N, T, D)``),
            ``"tokens-masked"`` (mean over the real tokens, by the attention mask), ``"cls"`` (token 0) or
            ``"none"`` (``(N, D)`` as is); ``pooling_reason`` says why.
        logits_output: the tensor read for predicted labels, or None; ``logits_kind`` is ``"logits"`` or
            ``"probabilities"`` (never softmaxed again); ``logits_reason`` says why that tensor.
        input_name: the model's first input.
        mask_input: the attention-mask input the pooling reads, if any.
        metadata: the model's ONNX ``metadata_props`` (its declared preprocessing, among others).
    """

    model: object | None
    layer: str
    pooled_output: str
    pooling: str
    logits_output: str | None
    input_name: str
    logits_kind: str = "logits"
    layer_reason: str = ""
    mask_input: str | None = None
    pooling_reason: str = ""
    logits_reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One log line: which tensor, which pooling, which class scores, and why each."""
        scores = (
            f"{self.logits_output!r} as {self.logits_kind} ({self.logits_reason})"
            if self.logits_output
            else "none (no float (N, C) output)"
        )
        return (
            f"representation: tensor {self.layer!r} ({self.layer_reason}), pooling {self.pooling} "
            f"({self.pooling_reason}); class scores: {scores}"
        )

    def to_dict(self) -> dict:
        """Every field but the graph itself (JSON-serialisable)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}

    @classmethod
    def from_dict(cls, data: dict) -> ExposedModel:
        known = {f.name for f in dataclasses.fields(cls)} - {"model"}
        return cls(model=None, **{k: v for k, v in data.items() if k in known})


def cache_root() -> Path | None:
    """The cache folder, or None when ``$RESQUE_CACHE_DIR`` is ``off``."""
    env = os.environ.get(CACHE_ENV)
    if env is not None and env.strip().lower() == CACHE_OFF:
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "resque-airflow"


def _entry(root: Path, sha256: str, layer: str, pooling: str) -> Path:
    key = hashlib.sha256(json.dumps([EDIT_VERSION, sha256, layer, pooling]).encode()).hexdigest()
    return root / "exposed" / f"{sha256[:16]}-{key[:16]}"


def lookup(sha256: str, layer: str, pooling: str) -> tuple[Path, ExposedModel] | None:
    """``(model file, description)`` of the cached edit of the model with ``sha256`` at ``layer`` / ``pooling``
    (as asked: ``"auto"`` is its own key), or None."""
    root = cache_root()
    if root is None:
        return None
    entry = _entry(root, sha256, layer, pooling)
    try:
        info = json.loads((entry / INFO_FILE).read_text())
        if info.get("model_sha256") != sha256 or not (entry / MODEL_FILE).is_file():
            return None
        os.utime(entry)  # recently used: pruned last
        return entry / MODEL_FILE, ExposedModel.from_dict(info["exposed"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("exposed-model cache: ignoring the unreadable entry %s (%s)", entry, exc)
        return None


def store(sha256: str, layer: str, pooling: str, edited: bytes, exposed: ExposedModel) -> Path | None:
    """Cache the serialised edited graph and its description; the model file's path, or None when not cached."""
    root = cache_root()
    if root is None:
        return None
    entry = _entry(root, sha256, layer, pooling)
    if (entry / INFO_FILE).is_file():  # written by an earlier or a concurrent gate
        return entry / MODEL_FILE
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        try:
            (tmp / MODEL_FILE).write_bytes(edited)
            info = {"model_sha256": sha256, "layer": layer, "pooling": pooling, "exposed": exposed.to_dict()}
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
            try:
                tmp.rename(entry)
            except OSError:  # a concurrent gate cached the same edit first: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _prune(entry.parent)
    except OSError as exc:
        log.warning("exposed-model cache: cannot write %s (%s); set %s=off to stop trying", entry, exc, CACHE_ENV)
        return None
    return entry / MODEL_FILE


def forget(model_file: Path) -> None:
    """Remove the entry of ``model_file`` (one ONNX Runtime could not load)."""
    log.warning("exposed-model cache: removing %s, which ONNX Runtime cannot load; it is rebuilt", model_file.parent)
    shutil.rmtree(model_file.parent, ignore_errors=True)


def _prune(folder: Path, keep: int = MAX_ENTRIES, stale_s: float = 3600.0) -> None:
    """Keep the ``keep`` most recently used entries; remove temporary folders a killed writer left behind."""
    now = time.time()
    entries = []
    for p in folder.iterdir():
        if p.name.startswith("."):
            if now - p.stat().st_mtime > stale_s:
                shutil.rmtree(p, ignore_errors=True)
        elif p.is_dir():
            entries.append(p)
    for old in sorted(entries, key=lambda p: p.stat().st_mtime, reverse=True)[keep:]:
        shutil.rmtree(old, ignore_errors=True)

"""Stream batches through an ONNX Runtime session with the representation exposed and pooled in the graph."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from resque_airflow.core.errors import ResqueInputError
from resque_airflow.runtime.graph import ExposedModel, expose_layer, load_model
from resque_airflow.runtime.readers import Batch
from resque_airflow.runtime.session import Session, create_session

log = logging.getLogger(__name__)


@dataclass
class EmbeddedBatch:
    """Pooled features ``(n, D)`` float32, logits ``(n, C)`` float32 or None, labels ``(n,)`` or None."""

    features: np.ndarray
    logits: np.ndarray | None
    labels: np.ndarray | None


def prefetch(batches: Iterable[Batch], depth: int = 2) -> Iterator[Batch]:
    """Read ahead up to ``depth`` batches in a background thread so that reading overlaps inference.

    Exceptions raised by the reader are re-raised in the consumer, at the point they occurred.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for b in batches:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    t = threading.Thread(target=work, name="resque-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class Embedder:
    """One ONNX Runtime session over a model whose representation at ``layer`` is exposed and pooled.

    Args:
        model: serialized ONNX model bytes.
        layer: tensor name, or ``"auto"`` (see :func:`~resque_airflow.runtime.graph.find_layer`).
        provider: ``"auto"``, ``"cuda"`` or ``"cpu"``.
        threads: intra-op threads (None: one per physical core).
    """

    def __init__(self, model: bytes, *, layer: str = "auto", provider: str = "auto", threads: int | None = None):
        self.exposed: ExposedModel = expose_layer(load_model(model), layer)
        self.session: Session = create_session(self.exposed.model.SerializeToString(), provider, threads=threads)
        inp = self.session.input
        self.input_name: str = inp.name
        self.input_shape: tuple[int | None, ...] = tuple(d if isinstance(d, int) else None for d in inp.shape)
        self.input_type: str = inp.type
        self.outputs = [self.exposed.pooled_output] + (
            [self.exposed.logits_output] if self.exposed.logits_output else []
        )

    @property
    def provider(self) -> str:
        return self.session.provider

    @property
    def image_size(self) -> tuple[int, int] | None:
        """``(H, W)`` of a fixed-size image input, else None."""
        s = self.input_shape
        if len(s) == 4 and isinstance(s[2], int) and isinstance(s[3], int):
            return s[2], s[3]
        return None

    def check_input(self, x: np.ndarray, source: str) -> None:
        """Raise naming the problem when ``x`` does not fit the model's input (rank, fixed dims, finiteness)."""
        expected = self.input_shape
        if x.ndim != len(expected) or any(
            e is not None and e != a for e, a in zip(expected[1:], x.shape[1:], strict=False)
        ):
            shown = tuple("N" if i == 0 else (d if d is not None else "?") for i, d in enumerate(expected))
            raise ResqueInputError(
                f"data: {source}: input shape {x.shape} does not fit the model input {self.input_name!r} of shape "
                f"{shown}; reshape the data to the model's input"
            )
        if not np.isfinite(x).all():
            raise ResqueInputError(f"data: {source}: contains NaN or infinite values; clean or drop those rows first")

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Forward one batch; returns pooled features and logits (None when the model has no logits output)."""
        sess = self.session.session
        if self.session.provider == "cuda":
            # I/O binding: the input is copied to the device once; only pooled (N, D) and logits come back.
            binding = sess.io_binding()
            binding.bind_cpu_input(self.input_name, x)
            for name in self.outputs:
                binding.bind_output(name, "cpu")
            sess.run_with_iobinding(binding)
            outs = binding.copy_outputs_to_cpu()
        else:
            outs = sess.run(self.outputs, {self.input_name: x})
        feats = np.asarray(outs[0], np.float32)
        if feats.ndim != 2:
            feats = feats.reshape(feats.shape[0], -1)
        logits = np.asarray(outs[1], np.float32) if len(outs) > 1 else None
        if logits is not None and logits.ndim != 2:
            logits = None  # not a classifier head: predicted labels are unavailable
        return feats, logits

    def embed(self, batches: Iterable[Batch], *, prefetch_depth: int = 2) -> Iterator[EmbeddedBatch]:
        """Yield one :class:`EmbeddedBatch` per input batch, reading ahead in a background thread."""
        for b in prefetch(batches, prefetch_depth):
            if b.x.shape[0] == 0:
                continue
            self.check_input(b.x, b.source)
            feats, logits = self.run(b.x)
            yield EmbeddedBatch(feats, logits, b.y)

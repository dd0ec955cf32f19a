"""Stream batches through an ONNX Runtime session with the representation exposed and pooled in the graph."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from resque_airflow.errors import ResqueInputError
from resque_airflow.runtime.graph import ExposedModel, expose_layer, load_model
from resque_airflow.runtime.readers import Batch
from resque_airflow.runtime.session import Session, create_session

log = logging.getLogger(__name__)


@dataclass
class EmbeddedBatch:
    """Pooled features ``(n, D)`` float32, logits ``(n, C)`` float32 or None, labels ``(n,)`` or None, and the
    ``(n, ...)`` input the model was fed (for the data-sanity statistics)."""

    features: np.ndarray
    logits: np.ndarray | None
    labels: np.ndarray | None
    inputs: np.ndarray | None = None


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

    On CUDA, each input batch is copied to the device once, in the read-ahead thread (so the copy of batch i+1
    overlaps the forward pass of batch i), and bound to the session as a device ``OrtValue``; the outputs are
    bound to host memory, so only the pooled ``(N, D)`` features and the ``(N, C)`` logits cross back. The full
    layer activation never leaves the device.

    Args:
        model: serialized ONNX model bytes.
        layer: tensor name, or ``"auto"`` (see :func:`~resque_airflow.runtime.graph.find_layer`).
        provider: ``"auto"``, ``"cuda"`` or ``"cpu"``.
        threads: intra-op threads (None: one per physical core available to the process).
    """

    def __init__(self, model: bytes, *, layer: str = "auto", provider: str = "auto", threads: int | None = None):
        self.exposed: ExposedModel = expose_layer(load_model(model), layer)
        self.session: Session = create_session(self.exposed.model.SerializeToString(), provider, threads=threads)
        inp = self.session.input
        self.input_name: str = inp.name
        self.input_shape: tuple[int | None, ...] = tuple(d if isinstance(d, int) else None for d in inp.shape)
        self.outputs = [self.exposed.pooled_output] + (
            [self.exposed.logits_output] if self.exposed.logits_output else []
        )
        self._device_id = 0
        if self.session.provider == "cuda":
            opts = self.session.session.get_provider_options().get("CUDAExecutionProvider", {})
            self._device_id = int(opts.get("device_id", 0) or 0)

    @property
    def provider(self) -> str:
        """The provider the session really runs on: ``"cuda"`` or ``"cpu"``."""
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

    def _to_device(self, x: np.ndarray):
        """``x`` as an input ``OrtValue`` on the session's CUDA device (one host-to-device copy); None on CPU."""
        if self.session.provider != "cuda":
            return None
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), "cuda", self._device_id)

    def run(self, x: np.ndarray, device_input: object | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Forward one batch ``x`` ``(n, *input_shape)``; returns pooled features ``(n, D)`` float32 and logits
        ``(n, C)`` float32 (None when the model has no logits output).

        ``device_input``: ``x`` already copied to the device (an ``OrtValue`` from the read-ahead thread), if any.
        """
        sess = self.session.session
        if self.session.provider == "cuda":
            binding = sess.io_binding()
            binding.bind_ortvalue_input(
                self.input_name, device_input if device_input is not None else self._to_device(x)
            )
            for name in self.outputs:
                binding.bind_output(name, "cpu")  # ORT copies only these (small) outputs back, at the end of the run
            sess.run_with_iobinding(binding)
            outs = binding.copy_outputs_to_cpu()
        else:
            # ORT reads a C-contiguous float32 array in place: no copy of the input on the way in.
            outs = sess.run(self.outputs, {self.input_name: x})
        feats = np.asarray(outs[0], np.float32)
        if feats.ndim != 2:
            feats = feats.reshape(feats.shape[0], -1)
        logits = np.asarray(outs[1], np.float32) if len(outs) > 1 else None
        if logits is not None and logits.ndim != 2:
            logits = None  # not a classifier head: predicted labels are unavailable
        return feats, logits

    def _staged(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, object]]:
        """Check each non-empty batch and stage it on the device; runs in the read-ahead thread, so this work
        overlaps inference. Errors surface in the consumer in order, after the batches before them."""
        for b in batches:
            if b.x.shape[0] == 0:
                continue
            self.check_input(b.x, b.source)
            yield b, self._to_device(b.x)

    def embed(self, batches: Iterable[Batch], *, prefetch_depth: int = 2) -> Iterator[EmbeddedBatch]:
        """Yield one :class:`EmbeddedBatch` per input batch, reading ahead in a background thread."""
        for b, device_input in prefetch(self._staged(batches), prefetch_depth):
            feats, logits = self.run(b.x, device_input)
            yield EmbeddedBatch(feats, logits, b.y, b.x)

"""Stream batches through an ONNX Runtime session with the representation exposed and pooled in the graph."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from resque_airflow.core.fingerprint import TensorSpec
from resque_airflow.errors import ModelError, first_line
from resque_airflow.runtime import exposed as exposed_cache
from resque_airflow.runtime.exposed import ExposedModel
from resque_airflow.runtime.feed import main_input, model_inputs, prepare
from resque_airflow.runtime.readers import Batch
from resque_airflow.runtime.session import Session, create_session

log = logging.getLogger(__name__)


@dataclass
class EmbeddedBatch:
    """Pooled features ``(n, D)`` float32, logits ``(n, C)`` float32 or None, labels ``(n,)`` or None, and the
    ``(n, ...)`` main input the model was fed (the first float input, else the first: for the data-sanity
    statistics)."""

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

    Every model input is fed in its own dtype (:func:`~resque_airflow.runtime.feed.prepare`). A model with a fixed
    batch size (1, say) is run in chunks of that size. Class scores that are already probabilities (a Softmax or
    Sigmoid output, an ``skl2onnx`` classifier's probabilities or ZipMap) are handed on as log-probabilities, so the
    summary's softmax gives back exactly those probabilities instead of softmaxing them a second time; a single
    column (a sigmoid, or one logit) becomes two classes.

    On CUDA, each input batch is copied to the device once, in the read-ahead thread (so the copy of batch i+1
    overlaps the forward pass of batch i), and bound to the session as a device ``OrtValue``; the outputs are
    bound to host memory, so only the pooled ``(N, D)`` features and the ``(N, C)`` logits cross back. The full
    layer activation never leaves the device.

    Args:
        model: serialized ONNX model bytes.
        layer: tensor name, or ``"auto"`` (see :func:`~resque_airflow.runtime.layers.choose_layer`).
        pooling: ``"auto"``, ``"mean"``, ``"cls"`` or a fingerprint's recorded pooling (see
            :func:`~resque_airflow.runtime.graph.resolve_pooling`).
        provider: ``"auto"``, ``"cuda"`` or ``"cpu"``.
        threads: intra-op threads (None: one per physical core available to the process).
        model_sha256: the sha256 of ``model``; when given, the graph edit is read from and written to the
            exposed-model cache (:mod:`~resque_airflow.runtime.exposed`), so a model seen before skips it.
    """

    def __init__(
        self,
        model: bytes,
        *,
        layer: str = "auto",
        pooling: str = "auto",
        provider: str = "auto",
        threads: int | None = None,
        model_sha256: str | None = None,
    ):
        self.session: Session
        self.exposed: ExposedModel
        self.session, self.exposed = self._open(model, layer, pooling, provider, threads, model_sha256)
        log.info("%s", self.exposed.describe())
        self.inputs: list[TensorSpec] = model_inputs(self.session.session)
        main = main_input(self.inputs)
        self.input_name: str = main.name
        self.input_shape: tuple[int | None, ...] = main.shape
        batch = {s.shape[0] for s in self.inputs if s.shape and isinstance(s.shape[0], int)}
        self.fixed_batch: int | None = min(batch) if batch else None
        self.outputs = [self.exposed.pooled_output] + (
            [self.exposed.logits_output] if self.exposed.logits_output else []
        )
        self._device_id = 0
        if self.session.provider == "cuda":
            opts = self.session.session.get_provider_options().get("CUDAExecutionProvider", {})
            self._device_id = int(opts.get("device_id", 0) or 0)

    def _open(
        self, model: bytes, layer: str, pooling: str, provider: str, threads: int | None, sha256: str | None
    ) -> tuple[Session, ExposedModel]:
        """The session over the exposed model and its description: from the cache when it holds this edit, else
        edited here (and cached).

        Neither the ``onnx`` graph nor its serialised bytes are kept: ONNX Runtime holds its own copy of the
        weights, and a second one through the pass would only raise the peak memory.
        """
        hit = exposed_cache.lookup(sha256, layer, pooling) if sha256 else None
        if hit is not None:
            path, exposed = hit
            try:
                return create_session(str(path), provider, threads=threads), exposed
            except ModelError:
                exposed_cache.forget(path)
        from resque_airflow.runtime.graph import expose_layer, load_model  # imports onnx: only for a new edit

        full = expose_layer(load_model(model), layer, pooling)
        edited = full.model.SerializeToString()
        exposed = dataclasses.replace(full, model=None)
        del full
        if sha256:
            exposed_cache.store(sha256, layer, pooling, edited, exposed)
            resolved = (exposed.layer, exposed.pooling)
            if resolved != (layer, pooling):  # "auto" at publish time: the gates will ask for what it resolved to
                exposed_cache.store(sha256, *resolved, edited, exposed)
        return create_session(edited, provider, threads=threads), exposed

    @property
    def provider(self) -> str:
        """The provider the session really runs on: ``"cuda"`` or ``"cpu"``."""
        return self.session.provider

    @property
    def main_input(self) -> TensorSpec:
        """The input images are decoded into and whose statistics are kept."""
        return main_input(self.inputs)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """``(H, W)`` of a fixed-size channels-first image input, else None (see also
        :func:`~resque_airflow.runtime.preprocess.resolve`, which reads the layout)."""
        s = self.input_shape
        if len(s) == 4 and isinstance(s[2], int) and isinstance(s[3], int):
            return s[2], s[3]
        return None

    def prepare(self, inputs: np.ndarray | Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
        """The feed for ``inputs`` (one array, or arrays by input name), converted and checked (see
        :func:`~resque_airflow.runtime.feed.prepare`)."""
        arrays = {"x": inputs} if isinstance(inputs, np.ndarray) else inputs
        return prepare(arrays, self.inputs, source)

    def check_input(self, x: np.ndarray, source: str) -> None:
        """Raise naming the problem when ``x`` does not fit the model's input (dtype, rank, fixed dims, finiteness)."""
        self.prepare(x, source)

    def _to_device(self, feed: dict[str, np.ndarray]):
        """``feed`` as input ``OrtValue``\\ s on the session's CUDA device (one host-to-device copy each); None on
        CPU, or where the model is run in fixed-size chunks."""
        if self.session.provider != "cuda" or self.fixed_batch is not None:
            return None
        import onnxruntime as ort

        return {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", self._device_id) for k, v in feed.items()}

    def _forward(self, feed: dict[str, np.ndarray], device_input: dict | None) -> list[np.ndarray]:
        sess = self.session.session
        if self.session.provider == "cuda" and self.fixed_batch is None:
            binding = sess.io_binding()
            staged = device_input if device_input is not None else self._to_device(feed)
            for name, value in staged.items():
                binding.bind_ortvalue_input(name, value)
            for name in self.outputs:
                binding.bind_output(name, "cpu")  # ORT copies only these (small) outputs back, at the end of the run
            sess.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        if self.fixed_batch is None:
            # ORT reads C-contiguous arrays of the input's dtype in place: no copy of the input on the way in.
            return sess.run(self.outputs, feed)
        n, b = next(iter(feed.values())).shape[0], self.fixed_batch
        parts: list[list[np.ndarray]] = []
        for i in range(0, n, b):
            chunk = {k: v[i : i + b] for k, v in feed.items()}
            short = b - next(iter(chunk.values())).shape[0]
            if short:  # the model takes exactly b rows: repeat the last one, drop its outputs below
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in chunk.items()}
            outs = sess.run(self.outputs, chunk)
            parts.append([o[: b - short] for o in outs])
        return [np.concatenate([p[j] for p in parts]) for j in range(len(self.outputs))]

    def run(
        self, x: np.ndarray | Mapping[str, np.ndarray], *, source: str = "data"
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Forward one batch (``(n, ...)`` array, or arrays by input name); returns pooled features ``(n, D)``
        float32 and class scores as logits ``(n, C)`` float32 (None when the model has no class-score output)."""
        return self._run_fed(self.prepare(x, source), None, source)

    def _run_fed(
        self, feed: dict[str, np.ndarray], device_input: dict | None, source: str
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`run` on a feed already converted by :meth:`prepare`; ``device_input``: the feed already copied to
        the device (``OrtValue``\\ s from the read-ahead thread), if any."""
        try:
            outs = self._forward(feed, device_input)
        except Exception as exc:  # ORT's own errors (a mask of another length, a shape the graph cannot take)
            raise ModelError(f"model: ONNX Runtime cannot run it on {source}: {first_line(exc)}") from exc
        feats = np.asarray(outs[0], np.float32)
        if feats.ndim != 2:
            feats = feats.reshape(feats.shape[0], -1)
        return feats, self._as_logits(np.asarray(outs[1])) if len(outs) > 1 else None

    def _as_logits(self, scores: np.ndarray) -> np.ndarray | None:
        """``(n, C)`` float32 logits whose softmax is the model's class probabilities (see the class docstring)."""
        if scores.ndim == 1:
            scores = scores[:, None]
        if scores.ndim != 2:
            return None  # not a classifier head: predicted labels are unavailable
        z = scores.astype(np.float32, copy=False)
        if self.exposed.logits_kind == "probabilities":
            if z.shape[1] == 1:
                z = np.concatenate([1.0 - z, z], axis=1)
            with np.errstate(divide="ignore"):
                return np.log(np.clip(z, np.float32(1e-30), None)).astype(np.float32)
        if z.shape[1] == 1:  # one logit: P(class 1) = sigmoid(z) = softmax([0, z])[1]
            return np.concatenate([np.zeros_like(z), z], axis=1)
        return z

    def _staged(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, dict, object]]:
        """Check and convert each non-empty batch and stage it on the device; runs in the read-ahead thread, so this
        work overlaps inference. Errors surface in the consumer in order, after the batches before them."""
        for b in batches:
            if b.rows == 0:
                continue
            feed = self.prepare(b.inputs, b.source)
            yield b, feed, self._to_device(feed)

    def embed(self, batches: Iterable[Batch], *, prefetch_depth: int = 2) -> Iterator[EmbeddedBatch]:
        """Yield one :class:`EmbeddedBatch` per input batch, reading ahead in a background thread."""
        for b, feed, device_input in prefetch(self._staged(batches), prefetch_depth):
            feats, logits = self._run_fed(feed, device_input, b.source)
            yield EmbeddedBatch(feats, logits, b.y, feed[self.input_name])

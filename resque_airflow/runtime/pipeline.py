"""The scoring path shared by the CLI, the operator and the benchmarks: data -> ONNX Runtime -> summaries -> score.

Everything here streams: memory is bounded by the batch size and the fixed-size feature sample.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from resque_airflow.core.calibration import Calibration, calibrate
from resque_airflow.core.fingerprint import Fingerprint, ImageSpec, InputSpec
from resque_airflow.core.metrics import DistScore, resque_dist, resque_task
from resque_airflow.core.null import DEFAULT_ALPHA
from resque_airflow.core.sanity import SanityProblem, sanity_problems
from resque_airflow.core.summary import (
    DEFAULT_SAMPLE_SIZE,
    FeatureSummary,
    Reservoir,
    check_label_source,
    companion_signals,
    sums_for,
)
from resque_airflow.errors import FingerprintError, ResqueInputError
from resque_airflow.runtime.embed import EmbeddedBatch, Embedder
from resque_airflow.runtime.model_file import read_model
from resque_airflow.runtime.readers import DataSource

log = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]
DEFAULT_BATCH_SIZE = 256
DEFAULT_TASK_MAX_SAMPLES = 20_000


@dataclass
class PassStats:
    """What one streaming pass saw: rows, whether labels came with the data, a content hash, timings (s)."""

    n_samples: int = 0
    labelled: bool | None = None
    data_hash: str = ""
    seconds: float = 0.0


A = TypeVar("A")


def _stream(
    embedder: Embedder,
    source: DataSource,
    on_batch: Callable[[EmbeddedBatch], None],
    progress: Progress | None,
) -> PassStats:
    """Run every batch of ``source`` through ``embedder``, handing each :class:`EmbeddedBatch` to ``on_batch``."""
    stats = PassStats()
    digest = hashlib.sha256()
    t0 = time.perf_counter()
    for eb in embedder.embed(source):
        has_y = eb.labels is not None
        if stats.labelled is not None and stats.labelled != has_y:
            raise ResqueInputError(f"data: {source.uri}: some shards have labels (y) and others do not")
        stats.labelled = has_y
        # The hash covers what the model saw: pooled features are a deterministic function of the input.
        digest.update(np.ascontiguousarray(eb.features).view(np.uint8))
        if has_y:
            digest.update(np.ascontiguousarray(eb.labels).view(np.uint8))
        on_batch(eb)
        stats.n_samples += eb.features.shape[0]
        if progress is not None:
            progress(stats.n_samples, source.n_hint)
    stats.seconds = time.perf_counter() - t0
    stats.data_hash = digest.hexdigest()
    if stats.n_samples == 0:
        raise ResqueInputError(f"data: {source.uri} holds no samples")
    return stats


def _pass(
    embedder: Embedder,
    data: str,
    start: Callable[[EmbeddedBatch], A],
    feed: Callable[[A, EmbeddedBatch], object],
    *,
    batch_size: int,
    image_spec: ImageSpec | None = None,
    class_names: list[str] | None = None,
    progress: Progress | None = None,
    source_options: dict | None = None,
) -> tuple[A, PassStats, DataSource]:
    """The one streaming pass of every entry point: read ``data``, run it through ``embedder``, accumulate.

    ``start(first_batch)`` makes the accumulator (its width is known only once the model has produced features);
    ``feed(accumulator, batch)`` adds each batch to it, the first included. Returns the accumulator, what the pass
    saw, and the opened source (its kind and class names go into a fingerprint). ``source_options``: more
    :class:`DataSource` arguments (text spec, label column, class count).
    """
    source = DataSource(
        data, batch_size=batch_size, image_spec=image_spec, class_names=class_names, inputs=embedder.inputs,
        **(source_options or {}),
    )  # fmt: skip
    acc: list[A] = []  # empty until the first batch

    def on_batch(eb: EmbeddedBatch) -> None:
        if not acc:
            acc.append(start(eb))
        feed(acc[0], eb)

    stats = _stream(embedder, source, on_batch, progress)  # raises on empty data: acc is never left empty
    return acc[0], stats, source


def _update_summary(summary: FeatureSummary, eb: EmbeddedBatch) -> FeatureSummary:
    if eb.inputs is not None:
        summary.inputs.update(eb.inputs)
    return summary.update(eb.features, eb.logits, eb.labels)


def fingerprint_model(
    model: str | Path | bytes,
    data: str,
    *,
    layer: str = "auto",
    pooling: str = "auto",
    provider: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    image_spec: ImageSpec | Mapping | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    label_column: str = "label",
    tokenizer: str | Path | None = None,
    text_options: Mapping | None = None,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    progress: Progress | None = None,
) -> Fingerprint:
    """Compute a model's fingerprint from labelled reference data (one forward pass).

    ``num_classes`` defaults to the width of the model's class-score output; give it for models without one.
    ``image_spec``: the image preprocessing, or the fields given (flags) over what the model declares (see
    :func:`~resque_airflow.runtime.preprocess.image_spec_for`). ``class_names``: the classes in id order (image
    folders and class-name labels map to them by name). ``tokenizer``: a ``tokenizer.json`` for raw-text data, with
    ``text_options`` (``column``, ``max_length``, ``padding``: see
    :func:`~resque_airflow.runtime.tokenize.text_spec`). Everything the gate needs to read new data the same way
    (inputs, preprocessing, tokenizer, label column, pooling) is recorded in the fingerprint.
    """
    from resque_airflow.runtime import preprocess

    model_bytes, sha = read_model(model)
    embedder = Embedder(model_bytes, layer=layer, pooling=pooling, provider=provider, model_sha256=sha)
    del model_bytes
    main = embedder.main_input
    image = None
    if len(main.shape) == 4 and np.dtype(main.dtype).kind == "f":  # an image input: its preprocessing is recorded
        path = None if isinstance(model, bytes) else model
        image = preprocess.image_spec_for(main, image_spec, metadata=embedder.exposed.metadata, model_path=path)
    text = None
    if tokenizer is not None:
        from resque_airflow.runtime.tokenize import text_spec

        text = text_spec(tokenizer, embedder.inputs, **dict(text_options or {}))

    def start(eb: EmbeddedBatch) -> FeatureSummary:
        k = num_classes or (eb.logits.shape[1] if eb.logits is not None else None)
        if k is None:
            raise ResqueInputError("num_classes: the model has no logits output; pass num_classes explicitly")
        return FeatureSummary(k, eb.features.shape[1], sample_size=sample_size)

    summary, stats, source = _pass(
        embedder, data, start, _update_summary, batch_size=batch_size, image_spec=image, class_names=class_names,
        progress=progress, source_options={"text": text, "label_column": label_column},
    )  # fmt: skip
    if not stats.labelled and embedder.exposed.logits_output is None:
        raise ResqueInputError(f"data: {data} has no labels and the model has no logits; the fingerprint needs one")
    log.info(
        "fingerprint: %d reference samples through %s in %.1f s", stats.n_samples, embedder.provider, stats.seconds
    )
    return Fingerprint(
        model_sha256=sha,
        layer=embedder.exposed.layer,
        pooling=embedder.exposed.pooling,
        logits_output=embedder.exposed.logits_output,
        input_spec=InputSpec(
            name=main.name,
            shape=main.shape,
            dtype=main.dtype,
            image=image,
            text=text,
            inputs=tuple(embedder.inputs) if len(embedder.inputs) > 1 else (),
            label_column=label_column,
        ),
        summary=summary,
        class_names=source.class_names,
        data_uri=str(data),
    )


@dataclass
class ScoreResult:
    """Everything one scoring pass produced; ``to_dict()`` is JSON-serialisable."""

    mode: str
    score: float
    label_source: str
    n_samples: int
    n_classes: int
    provider: str
    layer: str
    model_sha256: str
    data_uri: str
    data_hash: str
    per_class: dict[int, float] = field(default_factory=dict)
    classes_compared: list[int] = field(default_factory=list)
    classes_missing: list[int] = field(default_factory=list)
    signals: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0
    interval: list[float] | None = None
    calibration: Calibration | None = None
    sanity: list[SanityProblem] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Every field, with ``per_class`` keyed by strings (JSON object keys) and the calibration as a dict."""
        out = asdict(self) | {"calibration": None if self.calibration is None else self.calibration.to_dict()}
        out["per_class"] = {str(k): v for k, v in self.per_class.items()}
        return out


def summarise(
    embedder: Embedder,
    fingerprint: Fingerprint,
    data: str,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> tuple[FeatureSummary, PassStats]:
    """One pass of ``data`` through ``embedder`` into a :class:`FeatureSummary` shaped like the fingerprint's."""
    ref, spec = fingerprint.summary, fingerprint.input_spec
    if embedder.exposed.pooling != fingerprint.pooling:
        raise FingerprintError(
            f"fingerprint: made with pooling {fingerprint.pooling!r}, but the model is read with "
            f"{embedder.exposed.pooling!r}; build the Embedder with pooling=fingerprint.pooling"
        )
    summary, stats, _ = _pass(
        embedder, data, lambda _eb: FeatureSummary(ref.num_classes, ref.dim, sample_size=ref.sample_size),
        _update_summary, batch_size=batch_size, image_spec=spec.image, class_names=fingerprint.class_names,
        progress=progress, source_options={
            "text": spec.text, "label_column": spec.label_column,
            "num_classes": None if fingerprint.class_names else ref.num_classes,
        },
    )  # fmt: skip
    return summary, stats


def score_summary(
    fingerprint: Fingerprint, summary: FeatureSummary, *, label_source: str = "given", task_max_samples: int = 2000
) -> tuple[DistScore, dict]:
    """RESQUE_dist of ``summary`` against the fingerprint under one label source, plus every companion signal.

    ``label_source`` is checked by :func:`~resque_airflow.core.summary.sums_for`.
    """
    if label_source == "given" and summary.given.n == 0:
        raise ResqueInputError("labels='given' but the data has no labels (y); pass labels='predicted' or 'none'")
    if label_source == "predicted" and summary.predicted.n == 0:
        raise ResqueInputError("labels='predicted' but the model has no logits output; pass labels='given' or 'none'")
    ref_sums = sums_for(fingerprint.summary, label_source)
    if ref_sums.n == 0:
        raise ResqueInputError(
            f"labels={label_source!r}: the fingerprint holds no reference sums for this label source; "
            "recompute it from labelled reference data"
        )
    dist = resque_dist(ref_sums, sums_for(summary, label_source))
    signals = companion_signals(fingerprint.summary, summary, task_max_samples=task_max_samples)
    return dist, signals


def dist_result(
    fingerprint: Fingerprint,
    summary: FeatureSummary,
    *,
    label_source: str,
    provider: str,
    data_uri: str,
    data_hash: str,
    seconds: float = 0.0,
    alpha: float = DEFAULT_ALPHA,
) -> ScoreResult:
    """Score a new-data summary (one pass, or merged shards) against the fingerprint, calibrated at ``alpha``."""
    dist, signals = score_summary(fingerprint, summary, label_source=label_source)
    ref = fingerprint.summary
    both_labelled = ref.given.n and summary.given.n
    return ScoreResult(
        mode="dist",
        score=dist.value,
        label_source=label_source,
        n_samples=summary.n,
        n_classes=len(dist.classes_compared),
        provider=provider,
        layer=fingerprint.layer,
        model_sha256=fingerprint.model_sha256,
        data_uri=str(data_uri),
        data_hash=data_hash,
        per_class=dist.per_class,
        classes_compared=dist.classes_compared,
        classes_missing=dist.classes_missing,
        signals=signals,
        seconds=seconds,
        calibration=(cal := calibrate(ref, summary, label_source=label_source, alpha=alpha)),
        interval=list(cal.interval),
        sanity=sanity_problems(
            ref.inputs, summary.inputs, reference_classes=ref.given.counts if both_labelled else None,
            new_classes=summary.given.counts if both_labelled else None,
        ),
    )  # fmt: skip


def score_dist(
    model: str | Path | bytes,
    fingerprint: Fingerprint,
    data: str,
    *,
    label_source: str = "given",
    provider: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
    model_ref: str | None = None,
    model_sha256: str | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> ScoreResult:
    """RESQUE_dist of ``data`` against ``fingerprint`` with ``model`` (sha256-checked before anything runs).

    ``model_sha256``: the model's sha256 when the caller has already computed it from the same file (the registry's
    ``fetch_model`` does, on download); it is still compared with the fingerprint's, but the file is not hashed a
    second time. ``model_ref`` names the model in that comparison's error message.
    """
    model_bytes, sha = read_model(model, sha256=model_sha256)
    fingerprint.check_model(sha, model_ref=model_ref or str(model if not isinstance(model, bytes) else "the model"))
    check_label_source(label_source)  # before the pass, which does not depend on it: a typo fails at once
    embedder = Embedder(
        model_bytes, layer=fingerprint.layer, pooling=fingerprint.pooling, provider=provider, model_sha256=sha
    )
    del model_bytes  # the session holds its own copy: keep the file's bytes (~45 MB for a ResNet-18) out of the peak
    # summarise by its module-level name: benchmarks/throughput_workers.py times the pass by wrapping it.
    summary, stats = summarise(embedder, fingerprint, data, batch_size=batch_size, progress=progress)
    ran_on = embedder.provider
    # The session and its arena go before scoring imports scikit-learn (~120 MB): the two never add up in the peak.
    del embedder
    return dist_result(
        fingerprint, summary, label_source=label_source, provider=ran_on, data_uri=data,
        data_hash=stats.data_hash, seconds=stats.seconds, alpha=alpha,
    )  # fmt: skip


def score_task(
    model: str | Path | bytes,
    data: str,
    *,
    layer: str = "auto",
    provider: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    init: str = "centroids",
    max_samples: int | None = DEFAULT_TASK_MAX_SAMPLES,
    image_spec: ImageSpec | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> ScoreResult:
    """RESQUE_task of labelled new-task ``data`` under ``model``'s representation at ``layer``.

    k-means needs the features in memory: at most ``max_samples`` rows are kept (a uniform reservoir sample,
    then a stratified subsample inside :func:`resque_task`).
    """
    model_bytes, sha = read_model(model)
    embedder = Embedder(model_bytes, layer=layer, provider=provider, model_sha256=sha)
    del model_bytes

    def feed(res: Reservoir, eb: EmbeddedBatch) -> Reservoir:
        if eb.labels is None:
            raise ResqueInputError(f"data: {data} has no labels (y); RESQUE_task needs the new task's labels")
        y = np.asarray(eb.labels)
        if y.dtype.kind not in "iu":
            raise ResqueInputError(f"labels: expected integer class labels, got dtype {y.dtype}")
        return res.update(eb.features, y.astype(np.int64))

    res, stats, _ = _pass(
        embedder, data, lambda eb: Reservoir(max_samples or np.iinfo(np.int64).max, eb.features.shape[1], seed),
        feed, batch_size=batch_size, image_spec=image_spec, progress=progress,
    )  # fmt: skip
    ran_on, layer_used = embedder.provider, embedder.exposed.layer
    del embedder  # the session's memory is released before k-means holds the sample
    task = resque_task(res.x, res.y, init=init, max_samples=max_samples, seed=seed)
    return ScoreResult(
        mode="task",
        score=task.value,
        label_source="given",
        n_samples=stats.n_samples,
        n_classes=task.num_classes,
        provider=ran_on,
        layer=layer_used,
        model_sha256=sha,
        data_uri=str(data),
        data_hash=stats.data_hash,
        signals={"resque_task": task.value, "ari": task.ari},
        seconds=stats.seconds,
    )

"""One pass over a data set, summarised: everything RESQUE_dist and its companion signals need.

A :class:`FeatureSummary` is built batch by batch from the pooled features, the logits and the labels of one forward
pass, in memory bounded by the batch size plus a fixed-size feature sample. Summaries of shards merge with ``+=``
(the protocol of :mod:`resque_airflow.core.accumulator`, shared with :class:`ClassSums` and :class:`Reservoir`).
The reference side of a model is a summary stored in its fingerprint; :func:`companion_signals` compares a new
summary with it (DESIGN.md 2.5).
"""

from __future__ import annotations

import numpy as np

from resque_airflow.core.accumulator import Mergeable
from resque_airflow.core.atc import ConfidenceHistogram
from resque_airflow.core.bootstrap import DEFAULT_REPLICATES, ReplicateSums
from resque_airflow.core.classsums import ClassSums, check_features, check_labels
from resque_airflow.core.metrics import ks_mean, mmd_linear, resque_dist, resque_task
from resque_airflow.core.null import Pool
from resque_airflow.core.sanity import InputStats
from resque_airflow.errors import ResqueInputError, check_choice

LABEL_SOURCES = ("given", "predicted", "none")
DEFAULT_SAMPLE_SIZE = 2000


def softmax_confidence(logits: np.ndarray) -> np.ndarray:
    """Top-class softmax probability of each row of ``(N, C)`` logits, ``(N,)`` float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e.max(axis=1) / e.sum(axis=1)


class Reservoir(Mergeable):
    """A uniform random sample of at most ``size`` rows of ``(N, D)`` features with their labels (Algorithm R).

    Mergeable (:mod:`resque_airflow.core.accumulator`): ``a += b`` leaves a uniform sample of the union (how many
    rows come from each side is drawn from the hypergeometric distribution). Both sides must have the same ``size``
    (with a smaller one on one side, the union's sample would under-represent that side) and ``dim``.

    Example:
        >>> import numpy as np
        >>> r = Reservoir(size=5, dim=2).update(np.zeros((100, 2), np.float32), np.arange(100))
        >>> r.x.shape, r.seen
        ((5, 2), 100)
        >>> r += Reservoir(5, 2).update(np.ones((3, 2), np.float32), np.full(3, -1))
        >>> r.x.shape, r.seen
        ((5, 2), 103)
        >>> r + Reservoir(5, 3)
        Traceback (most recent call last):
        ...
        resque_airflow.errors.ResqueInputError: Reservoir: cannot merge one with dim=3 into one with dim=2
    """

    def __init__(self, size: int, dim: int, seed: int = 0, *, extra: int = 0) -> None:
        self.size = int(size)
        self.dim = int(dim)
        self.seen = 0
        self.x = np.zeros((0, self.dim), np.float32)
        self.y = np.zeros(0, np.int64)
        self.extra = np.zeros((0, int(extra)), np.float64)  # per-row columns kept with each sampled row
        self._rng = np.random.default_rng(seed)

    def update(self, x: np.ndarray, y: np.ndarray, extra: np.ndarray | None = None) -> Reservoir:
        """Offer ``(n, D)`` rows with their ``(n,)`` int labels (-1 where unknown) and ``(n, E)`` extra columns."""
        e = np.zeros((x.shape[0], self.extra.shape[1])) if extra is None else np.asarray(extra, np.float64)
        room = self.size - self.x.shape[0]
        if room > 0:
            take = min(room, x.shape[0])
            self.x = np.concatenate([self.x, x[:take].astype(np.float32)])
            self.y = np.concatenate([self.y, np.asarray(y[:take], np.int64)])
            self.extra = np.concatenate([self.extra, e[:take]])
            x, y, e, self.seen = x[take:], y[take:], e[take:], self.seen + take
        if x.shape[0] == 0:
            return self
        # Row i replaces a random slot with probability size / (seen + i + 1).
        slots = self._rng.integers(0, self.seen + np.arange(1, x.shape[0] + 1))
        hit = np.flatnonzero(slots < self.size)
        self.x[slots[hit]] = x[hit]
        self.y[slots[hit]] = y[hit]
        self.extra[slots[hit]] = e[hit]
        self.seen += x.shape[0]
        return self

    def _signature(self) -> dict[str, int]:
        return {"size": self.size, "dim": self.dim, "extra": self.extra.shape[1]}

    def _merge(self, other: Reservoir) -> None:
        n1, n2 = self.seen, other.seen
        s = min(self.size, self.x.shape[0] + other.x.shape[0])
        k = int(self._rng.hypergeometric(n1, n2, s)) if n1 and n2 else (s if n1 else 0)
        k = min(max(k, s - other.x.shape[0]), self.x.shape[0])
        a = self._rng.choice(self.x.shape[0], k, replace=False)
        b = self._rng.choice(other.x.shape[0], s - k, replace=False)
        self.x = np.concatenate([self.x[a], other.x[b]])
        self.y = np.concatenate([self.y[a], other.y[b]])
        self.extra = np.concatenate([self.extra[a], other.extra[b]])
        self.seen = n1 + n2

    def __repr__(self) -> str:
        return f"Reservoir(size={self.size}, dim={self.dim}, seen={self.seen})"


class FeatureSummary(Mergeable):
    """Class sums under three label sources, accuracy and confidence counters, and a uniform feature sample.

    Attributes:
        given: class sums under the labels that came with the data (empty when there were none).
        predicted: class sums under the model's own predictions, ``argmax(logits)``.
        pooled: sums over all samples as one class (K = 1).
        sample_x: ``(S, D)`` float32 uniform random sample of features (reservoir), S <= ``sample_size``.
        sample_y: ``(S,)`` int64 given labels of the sampled rows, -1 where unknown.

    Summaries merge (:mod:`resque_airflow.core.accumulator`) when ``num_classes``, ``dim`` and ``sample_size``
    agree: every counter adds, and the feature samples merge as :class:`Reservoir` s do.

    Example:
        >>> import numpy as np
        >>> s = FeatureSummary(num_classes=2, dim=2, sample_size=3)
        >>> s.update(np.eye(2, dtype=np.float32), logits=np.array([[2.0, 0.0], [0.0, 1.0]]), labels=np.array([0, 0]))
        FeatureSummary(num_classes=2, dim=2, sample_size=3, n=2)
        >>> s.n, s.accuracy, s.sample_x.shape
        (2, 0.5, (2, 2))
        >>> t = FeatureSummary(2, 2, sample_size=3).update(np.ones((4, 2), np.float32))
        >>> s += t
        >>> s.n, s.sample_x.shape, s.pooled.counts.tolist()
        (6, (3, 2), [6])
        >>> try:
        ...     s + FeatureSummary(2, 2, sample_size=5)
        ... except ResqueInputError as exc:
        ...     print(exc)
        FeatureSummary: cannot merge one with sample_size=5 into one with sample_size=3
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        sample_size: int = DEFAULT_SAMPLE_SIZE,
        replicates: int = DEFAULT_REPLICATES,
        seed: int = 0,
    ):
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.sample_size = int(sample_size)
        self.given = ClassSums(self.num_classes, self.dim)
        self.predicted = ClassSums(self.num_classes, self.dim)
        self.pooled = ClassSums(1, self.dim)
        self.correct = 0
        self.confidence_sum = 0.0
        self.n_logits = 0
        # Sampled rows keep their predicted class and confidence: the pool of the calibrated null (core.null).
        self.sample = Reservoir(self.sample_size, self.dim, seed, extra=2)
        self.replicates = {
            source: ReplicateSums(k, self.dim, replicates)
            for source, k in (("given", self.num_classes), ("predicted", self.num_classes), ("none", 1))
        }
        self.confidences = ConfidenceHistogram()
        self.inputs = InputStats()  # what the model was fed (the pipeline updates it): data sanity

    @property
    def sample_x(self) -> np.ndarray:
        """``(S, D)`` float32 uniform sample of the features seen."""
        return self.sample.x

    @property
    def sample_y(self) -> np.ndarray:
        """``(S,)`` int64 given labels of the sampled rows, -1 where unknown."""
        return self.sample.y

    @property
    def n(self) -> int:
        """Samples seen."""
        return self.pooled.n

    @property
    def pool(self) -> Pool:
        """The sampled rows with their given and predicted classes and confidences (the null's pool)."""
        return Pool(self.sample.x, self.sample.y, self.sample.extra[:, 0].astype(np.int64), self.sample.extra[:, 1])

    @property
    def accuracy(self) -> float | None:
        """Accuracy of the predictions against the given labels, or None without both."""
        n = self.given.n
        return self.correct / n if n and self.n_logits == self.n else None

    @property
    def confidence(self) -> float | None:
        """Mean top-class softmax probability, or None without logits."""
        return self.confidence_sum / self.n_logits if self.n_logits else None

    def update(
        self, features: np.ndarray, logits: np.ndarray | None = None, labels: np.ndarray | None = None
    ) -> FeatureSummary:
        """Add one batch: ``(N, D)`` features, optional ``(N, C)`` logits and ``(N,)`` labels; returns ``self``."""
        x = check_features(features, self.dim)
        n = x.shape[0]
        if n == 0:
            return self
        y = None if labels is None else check_labels(labels, self.num_classes, n)
        self.pooled.update(x)
        self.replicates["none"].update(x)
        if y is not None:
            self.given.update(x, y)
            self.replicates["given"].update(x, y)
        pred, conf = np.full(n, -1, np.int64), np.full(n, np.nan)
        if logits is not None:
            pred, conf = self._update_logits(x, logits, y)
        self.sample.update(x, y if y is not None else np.full(n, -1, np.int64), np.column_stack([pred, conf]))
        return self

    def _update_logits(self, x: np.ndarray, logits: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        n = x.shape[0]
        z = np.asarray(logits)
        if z.ndim != 2 or z.shape[0] != n:
            raise ResqueInputError(f"logits: expected shape ({n}, C), got {z.shape}")
        if z.shape[1] != self.num_classes:
            raise ResqueInputError(
                f"logits: the model predicts {z.shape[1]} classes but the fingerprint has {self.num_classes}"
            )
        pred = z.argmax(axis=1)
        conf = softmax_confidence(z)
        self.predicted.update(x, pred)
        self.replicates["predicted"].update(x, pred)
        self.confidence_sum += float(conf.sum())
        self.confidences.update(conf)
        self.n_logits += n
        if y is not None:
            self.correct += int((pred == y).sum())
        return pred, conf

    def _signature(self) -> dict[str, int]:
        return {
            "num_classes": self.num_classes, "dim": self.dim, "sample_size": self.sample_size,
            "replicates": self.replicates["none"].replicates,
        }  # fmt: skip

    def _merge(self, other: FeatureSummary) -> None:
        self.given += other.given
        self.predicted += other.predicted
        self.pooled += other.pooled
        self.correct += other.correct
        self.confidence_sum += other.confidence_sum
        self.n_logits += other.n_logits
        self.sample += other.sample
        for source, reps in self.replicates.items():
            reps += other.replicates[source]
        self.confidences += other.confidences
        self.inputs += other.inputs

    def __repr__(self) -> str:
        return (
            f"FeatureSummary(num_classes={self.num_classes}, dim={self.dim}, sample_size={self.sample_size}, "
            f"n={self.n})"
        )

    # Serialisation: flat arrays for .npz (no pickle) and scalars for JSON.
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of the summary by name: ``(K, D)`` sums, ``(K,)`` counts per label source, the sample."""
        return {
            "given_sums": self.given.sums, "given_counts": self.given.counts,
            "predicted_sums": self.predicted.sums, "predicted_counts": self.predicted.counts,
            "pooled_sums": self.pooled.sums, "pooled_counts": self.pooled.counts,
            "sample_x": self.sample_x, "sample_y": self.sample_y, "sample_extra": self.sample.extra,
            "confidence_counts": self.confidences.counts,
        } | {
            f"{source}_rep_{part}": arr
            for source, reps in self.replicates.items()
            for part, arr in (("sums", reps.sums), ("weights", reps.weights))
        }  # fmt: skip

    def to_scalars(self) -> dict:
        """The shape and the counters of the summary, JSON-serialisable."""
        return {
            "num_classes": self.num_classes, "dim": self.dim, "sample_size": self.sample_size,
            "correct": self.correct, "confidence_sum": self.confidence_sum, "n_logits": self.n_logits,
            "replicates": self.replicates["none"].replicates, "inputs": self.inputs.to_dict(),
        }  # fmt: skip

    @classmethod
    def from_parts(cls, scalars: dict, arrays: dict[str, np.ndarray]) -> FeatureSummary:
        """Rebuild a summary from :meth:`to_scalars` and :meth:`to_arrays`; raises on inconsistent widths.

        The declared shape is checked against the stored arrays before anything is allocated: a tampered
        ``num_classes`` of 1e9 is a one-line error, not a MemoryError.
        """
        _check_declared(scalars, arrays)
        out = cls(
            scalars["num_classes"], scalars["dim"], sample_size=scalars["sample_size"],
            replicates=scalars["replicates"],
        )  # fmt: skip
        out.given = ClassSums.from_arrays(arrays["given_sums"], arrays["given_counts"])
        out.predicted = ClassSums.from_arrays(arrays["predicted_sums"], arrays["predicted_counts"])
        out.pooled = ClassSums.from_arrays(arrays["pooled_sums"], arrays["pooled_counts"])
        out.correct = int(scalars["correct"])
        out.confidence_sum = float(scalars["confidence_sum"])
        out.n_logits = int(scalars["n_logits"])
        out.sample.x = np.asarray(arrays["sample_x"], np.float32).reshape(-1, out.dim)
        out.sample.y = np.asarray(arrays["sample_y"], np.int64)
        out.sample.extra = np.asarray(arrays["sample_extra"], np.float64).reshape(-1, 2)
        out.sample.seen = out.n
        if not out.sample.x.shape[0] == out.sample.y.shape[0] == out.sample.extra.shape[0]:
            raise ResqueInputError("summary: the feature sample's arrays differ in length")
        out.replicates = {
            source: ReplicateSums.from_arrays(arrays[f"{source}_rep_sums"], arrays[f"{source}_rep_weights"])
            for source in out.replicates
        }
        out.confidences.counts = np.asarray(arrays["confidence_counts"], np.int64)
        if out.confidences.counts.shape != (out.confidences.bins,):
            raise ResqueInputError(f"summary: confidence histogram has shape {out.confidences.counts.shape}")
        out.inputs = InputStats.from_dict(scalars["inputs"])
        for name, cs in (("given", out.given), ("predicted", out.predicted), ("pooled", out.pooled)):
            if cs.dim != out.dim:
                raise ResqueInputError(f"summary: {name} sums have width {cs.dim}, expected {out.dim}")
        return out


def _check_declared(scalars: dict, arrays: dict[str, np.ndarray]) -> None:
    """Raise unless the scalars' ``num_classes``, ``dim`` and ``replicates`` are those of the stored arrays, and the
    stored sums are finite (NaN sums would give a NaN score)."""
    try:
        k, d, r = (int(scalars[key]) for key in ("num_classes", "dim", "replicates"))
        given, reps = np.shape(arrays["given_sums"]), np.shape(arrays["given_rep_sums"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ResqueInputError(f"summary: damaged ({type(exc).__name__}: {exc})") from exc
    if (k, d) != tuple(given) or (r, k, d) != tuple(reps) or int(scalars.get("sample_size", 0)) > 10**8:
        raise ResqueInputError(
            f"summary: declares num_classes={k}, dim={d}, replicates={r}, but its arrays are {tuple(given)} and "
            f"{tuple(reps)}; it is damaged or was tampered with"
        )
    for name in ("given_sums", "predicted_sums", "pooled_sums"):
        if not np.isfinite(np.asarray(arrays[name], np.float64)).all():
            raise ResqueInputError(f"summary: {name} holds NaN or infinite values; it is damaged")


def check_label_source(label_source: str) -> str:
    """Return ``label_source`` if it is one of :data:`LABEL_SOURCES`, else raise :class:`ResqueInputError`.

    The one check of a label source: :func:`sums_for` makes it, and so do callers that must fail before a pass.

    >>> check_label_source("none")
    'none'
    >>> check_label_source("gold")
    Traceback (most recent call last):
    ...
    resque_airflow.errors.ResqueInputError: labels: expected one of ('given', 'predicted', 'none'), got 'gold'
    """
    check_choice("labels", label_source, LABEL_SOURCES)
    return label_source


def sums_for(summary: FeatureSummary, label_source: str) -> ClassSums:
    """The class sums of ``summary`` under one label source: ``given``, ``predicted`` or ``none`` (pooled)."""
    check_label_source(label_source)
    return {"given": summary.given, "predicted": summary.predicted, "none": summary.pooled}[label_source]


def companion_signals(reference: FeatureSummary, new: FeatureSummary, *, task_max_samples: int = 2000) -> dict:
    """Every signal of DESIGN.md 2.5 that the two summaries allow; a signal that cannot be computed is None.

    Keys: ``resque_dist`` (given labels), ``resque_dist_predicted``, ``resque_dist_none``, ``mmd``, ``ks``,
    ``separability`` (RESQUE_task of the new data's sample with its given labels), ``confidence_drop``,
    ``acc_drop``. Floats, JSON-serialisable.
    """

    def dist(label_source: str) -> float | None:
        a, b = sums_for(reference, label_source), sums_for(new, label_source)
        if not ((a.counts > 0) & (b.counts > 0)).any():
            return None
        return resque_dist(a, b).value

    out: dict[str, float | None] = {
        "resque_dist": dist("given"),
        "resque_dist_predicted": dist("predicted"),
        "resque_dist_none": dist("none"),
        "mmd": mmd_linear(reference.pooled.get()[0], new.pooled.get()[0]) if reference.n and new.n else None,
        "ks": ks_mean(reference.sample_x, new.sample_x) if len(reference.sample_x) and len(new.sample_x) else None,
        "separability": None,
        "confidence_drop": None,
        "acc_drop": None,
    }
    labelled = new.sample_y >= 0
    if labelled.any() and np.unique(new.sample_y[labelled]).size >= 2:
        out["separability"] = resque_task(
            new.sample_x[labelled], new.sample_y[labelled], max_samples=task_max_samples
        ).value
    if reference.confidence is not None and new.confidence is not None:
        out["confidence_drop"] = reference.confidence - new.confidence
    if reference.accuracy is not None and new.accuracy is not None:
        out["acc_drop"] = reference.accuracy - new.accuracy
    return out

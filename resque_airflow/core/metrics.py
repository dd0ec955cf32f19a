"""RESQUE_dist, RESQUE_task and the companion signals of DESIGN.md 2.1, 2.2 and 2.5."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from resque_airflow.core.classsums import ClassSums, check_features, check_labels
from resque_airflow.core.clustering import adjusted_rand_index, lloyd
from resque_airflow.errors import ResqueInputError


@dataclass(frozen=True)
class DistScore:
    """Result of :func:`resque_dist`.

    Attributes:
        value: mean angle over compared classes, in [0, 1] (angle / pi).
        per_class: class index -> angle in [0, 1].
        classes_compared: classes with samples on both sides and non-zero sums.
        classes_missing: classes seen on one side only (left out of the mean).
        classes_degenerate: classes whose sum has zero norm on a side (left out, never divided by).
    """

    value: float
    per_class: dict[int, float]
    classes_compared: list[int]
    classes_missing: list[int]
    classes_degenerate: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-serialisable form (class keys as strings)."""
        out = asdict(self)
        out["per_class"] = {str(k): v for k, v in self.per_class.items()}
        return out


def resque_dist(reference: ClassSums, shifted: ClassSums) -> DistScore:
    """RESQUE_dist between the reference and shifted class sums (DESIGN.md 2.1).

    For each class k present on both sides: ``arccos(clip(<s_k, t_k> / (|s_k| |t_k|), -1, 1)) / pi``;
    the score is the mean over those classes. This is the reference procedure, computed in float64.

    Raises:
        ResqueInputError: when the accumulators differ in shape or no class can be compared.
    """
    if (reference.num_classes, reference.dim) != (shifted.num_classes, shifted.dim):
        raise ResqueInputError(
            f"resque_dist: reference has (K, D) = {(reference.num_classes, reference.dim)} but the new data has "
            f"{(shifted.num_classes, shifted.dim)}; score with the fingerprint made from this model and layer"
        )
    both = (reference.counts > 0) & (shifted.counts > 0)
    one = (reference.counts > 0) ^ (shifted.counts > 0)
    s_norm = np.linalg.norm(reference.sums, axis=1)
    t_norm = np.linalg.norm(shifted.sums, axis=1)
    degenerate = both & ((s_norm == 0) | (t_norm == 0))
    compared = both & ~degenerate
    per_class: dict[int, float] = {}
    for k in np.flatnonzero(compared):
        cos = float(np.dot(reference.sums[k], shifted.sums[k]) / (s_norm[k] * t_norm[k]))
        per_class[int(k)] = float(np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi)
    if not per_class:
        raise ResqueInputError(
            "resque_dist: no class has samples on both sides (reference classes "
            f"{np.flatnonzero(reference.counts).tolist()}, new data classes {np.flatnonzero(shifted.counts).tolist()})"
        )
    return DistScore(
        value=float(np.mean(list(per_class.values()))),
        per_class=per_class,
        classes_compared=sorted(per_class),
        classes_missing=np.flatnonzero(one).tolist(),
        classes_degenerate=np.flatnonzero(degenerate).tolist(),
    )


@dataclass(frozen=True)
class TaskScore:
    """Result of :func:`resque_task`: ``value = 1 - ari``; higher means the classes separate worse."""

    value: float
    ari: float
    n_samples: int
    num_classes: int
    init: str
    n_iter: int

    def to_dict(self) -> dict:
        return asdict(self)


def stratified_subsample(labels: np.ndarray, max_samples: int, seed: int = 0) -> np.ndarray:
    """Indices of a stratified random subsample of at most ``max_samples`` (every class keeps >= 1 sample)."""
    n = labels.shape[0]
    if max_samples >= n:
        return np.arange(n)
    from sklearn.model_selection import train_test_split

    classes, counts = np.unique(labels, return_counts=True)
    if max_samples < classes.size:
        raise ResqueInputError(f"max_samples: {max_samples} is below the number of classes ({classes.size})")
    idx = np.arange(n)
    # Classes with a single sample cannot be split by train_test_split; keep them whole.
    single = np.isin(labels, classes[counts < 2])
    keep, rest = idx[single], idx[~single]
    budget = max_samples - keep.size
    if budget < rest.size:
        rest, _ = train_test_split(rest, train_size=budget, stratify=labels[rest], random_state=seed)
    return np.sort(np.concatenate([keep, rest]))


def resque_task(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    init: str = "centroids",
    max_samples: int | None = None,
    seed: int = 0,
) -> TaskScore:
    """RESQUE_task of labelled new-task features (DESIGN.md 2.2).

    k-means with K clusters (Lloyd's iterations, :func:`~resque_airflow.core.clustering.lloyd`: scikit-learn's
    ``KMeans`` with one init), initialised at the class centroids (``init="centroids"``) or by scikit-learn's
    k-means++; the score is ``1 - ARI(labels, clusters)``.

    Args:
        features: ``(N, D)`` float features of the new task under the production model.
        labels: ``(N,)`` labels of the new task (any integers; remapped to 0..K-1).
        init: ``"centroids"`` (the paper's default) or ``"k-means++"``.
        max_samples: if set, cluster a stratified random subsample of that size (k-means holds N x D in memory).
        seed: random state for the subsample and k-means++.
    """
    if init not in ("centroids", "k-means++"):
        raise ResqueInputError(f"init: expected 'centroids' or 'k-means++', got {init!r}")
    x = check_features(features).astype(np.float64, copy=False)
    raw = np.asarray(labels)
    if raw.ndim != 1 or raw.shape[0] != x.shape[0]:
        raise ResqueInputError(f"labels: expected shape ({x.shape[0]},), got {raw.shape}")
    classes, y = np.unique(raw, return_inverse=True)
    y = check_labels(y, classes.size, x.shape[0])
    if classes.size < 2:
        raise ResqueInputError(f"labels: RESQUE_task needs at least 2 classes, got {classes.size}")
    if max_samples is not None:
        idx = stratified_subsample(y, int(max_samples), seed)
        x, y = x[idx], y[idx]
    if init == "centroids":
        start = np.stack([x[y == k].mean(axis=0) for k in range(classes.size)])
    else:  # scikit-learn only for this option: the gate's separability signal never asks for it
        from sklearn.cluster import kmeans_plusplus

        mean = x.mean(axis=0)  # centred as KMeans centres the data before seeding
        start, _ = kmeans_plusplus(x - mean, classes.size, random_state=seed)
        start = start + mean
    clusters, _, n_iter = lloyd(x, start)
    ari = adjusted_rand_index(y, clusters)
    return TaskScore(
        value=1.0 - ari,
        ari=ari,
        n_samples=int(x.shape[0]),
        num_classes=int(classes.size),
        init=init,
        n_iter=n_iter,
    )


def mmd_linear(reference_mean: np.ndarray, new_mean: np.ndarray) -> float:
    """Linear-kernel MMD^2 between two feature sets: the squared distance between their ``(D,)`` means."""
    d = np.asarray(reference_mean, np.float64) - np.asarray(new_mean, np.float64)
    return float(d @ d)


def ks_mean(reference_sample: np.ndarray, new_sample: np.ndarray) -> float:
    """Mean over features of the two-sample Kolmogorov-Smirnov statistic, in [0, 1].

    The statistic of ``scipy.stats.ks_2samp`` (two-sided ``D``, ties handled as it does), for all ``D`` features at
    once: one sort of the stacked samples per feature instead of a Python loop over them (``tests`` compare it with
    scipy's).

    Args:
        reference_sample: ``(M, D)`` features kept in the fingerprint.
        new_sample: ``(N, D)`` features of the new data (or a bounded sample of them).

    >>> a = np.array([[0.0], [1.0], [2.0]]); b = np.array([[1.5], [2.5]])
    >>> ks_mean(a, b)  # the empirical CDFs differ most just below 1.5: 2/3 against 0
    0.6666666666666666
    """
    a = check_features(reference_sample, what="reference feature sample")
    b = check_features(new_sample, a.shape[1], what="new feature sample")
    m, n = a.shape[0], b.shape[0]
    if m == 0 or n == 0:
        raise ResqueInputError("ks_mean: both samples need at least one row")
    z = np.ascontiguousarray(np.concatenate([a, b]).T)  # (D, M + N): each feature's values contiguous, to sort
    order = np.argsort(z, axis=1, kind="stable")
    # Each sorted value moves F_a up by 1/m or F_b by 1/n; in units of 1/(m n) the running gap is an exact integer.
    gap = np.cumsum(np.where(order < m, n, -m), axis=1)  # (F_a - F_b) * m * n after each value
    zs = np.take_along_axis(z, order, axis=1)
    gap[:, :-1][zs[:, 1:] == zs[:, :-1]] = 0  # compare the CDFs only once all equal values are counted
    return float(np.mean(np.abs(gap).max(axis=1)) / (m * n))

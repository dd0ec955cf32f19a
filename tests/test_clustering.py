"""core/clustering.py is scikit-learn's Lloyd k-means and adjusted Rand index, step for step."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from resque_airflow.core.clustering import adjusted_rand_index, lloyd
from resque_airflow.core.metrics import resque_task


def _blobs(seed: int, n: int, d: int, k: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    return rng.normal(0, spread, (k, d))[y] + rng.normal(0, 1, (n, d)), y


@pytest.mark.parametrize(
    ("seed", "n", "d", "k", "spread"),
    [(0, 500, 8, 3, 3.0), (1, 2000, 64, 10, 0.3), (2, 300, 512, 10, 0.1), (3, 1000, 2, 5, 0.0), (4, 50, 16, 10, 0.5)],
)
def test_lloyd_from_class_centroids_is_scikit_learns(seed, n, d, k, spread):
    """Well separated, overlapping, pure noise and tiny-cluster data: the same labels, centres and iterations."""
    x, y = _blobs(seed, n, d, k, spread)
    start = np.stack([x[y == c].mean(axis=0) if (y == c).any() else x[c] for c in range(k)])
    km = KMeans(n_clusters=k, init=start, n_init=1, algorithm="lloyd").fit(x)
    labels, centers, n_iter = lloyd(x, start)
    np.testing.assert_array_equal(labels, km.labels_)
    np.testing.assert_allclose(centers, km.cluster_centers_, rtol=1e-9, atol=1e-9)
    assert n_iter == km.n_iter_
    if spread in (0.3, 0.0):  # overlapping classes and pure noise: the comparison covers many iterations
        assert n_iter > 3


def test_many_clusters_take_the_grouped_sum_path_and_agree(monkeypatch):
    import resque_airflow.core.clustering as clustering

    x, y = _blobs(6, 600, 16, 8, 0.5)
    start = np.stack([x[y == c].mean(axis=0) for c in range(8)])
    want = lloyd(x, start)
    monkeypatch.setattr(clustering, "ONE_HOT_MAX_CLUSTERS", 4)
    got = lloyd(x, start)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12)
    assert got[2] == want[2]


def test_an_empty_cluster_takes_the_farthest_sample_as_scikit_learn_does():
    x = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0]])
    start = np.array([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0]])  # nothing is nearest the third centre
    km = KMeans(n_clusters=3, init=start, n_init=1, algorithm="lloyd").fit(x)
    labels, centers, n_iter = lloyd(x, start)
    np.testing.assert_array_equal(labels, km.labels_)
    np.testing.assert_allclose(centers, km.cluster_centers_, atol=1e-12)
    assert n_iter == km.n_iter_ and len(set(labels)) == 3


@pytest.mark.parametrize("seed", range(6))
def test_adjusted_rand_index_is_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    a = rng.integers(0, int(rng.integers(1, 12)), n)
    b = np.where(rng.random(n) < 0.6, a, rng.integers(0, int(rng.integers(1, 12)), n)) * 7 - 3  # other label values
    assert adjusted_rand_index(a, b) == adjusted_rand_score(a, b)
    assert adjusted_rand_index(a, a) == 1.0


def test_resque_task_with_k_means_plus_plus_is_scikit_learns():
    x, y = _blobs(5, 800, 32, 6, 0.4)
    task = resque_task(x, y, init="k-means++", seed=3)
    km = KMeans(n_clusters=6, init="k-means++", n_init=1, random_state=3, algorithm="lloyd").fit(x)
    assert task.ari == adjusted_rand_score(y, km.labels_)
    assert task.n_iter == km.n_iter_

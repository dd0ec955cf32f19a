"""The digits workload: splits, model, shifts (effect grows with severity), new tasks and the .npz format.

New tasks, photo tiles, the torch-side embedding and the new head are the benchmarks' (``benchmarks/workloads.py``).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import load_benchmark

from resque_airflow.examples import digits as D

W = load_benchmark("workloads")


@pytest.fixture(scope="module")
def splits():
    return D.load_digits_splits(0)


def test_splits_are_disjoint_stratified_and_scaled(splits):
    sizes = {k: len(getattr(splits, k)) for k in ("train", "heldout", "reference", "test")}
    assert sizes == {"train": 898, "heldout": 270, "reference": 270, "test": 359}
    x_all, _ = D.load_digits_arrays()
    for name in sizes:
        s = getattr(splits, name)
        assert s.x.shape == (len(s), 1, 8, 8) and s.x.dtype == np.float32
        assert s.y.dtype == np.int64 and set(np.unique(s.y)) == set(range(10))
        assert s.x.min() >= 0.0 and s.x.max() <= 1.0
    # Disjoint: every image lands in exactly one split (rows of the full array are unique enough to match).
    flat = {name: {r.tobytes() for r in getattr(splits, name).x} for name in sizes}
    assert sum(len(v) for v in flat.values()) == len(set().union(*flat.values()))
    assert sum(sizes.values()) == len(x_all) == 1797
    other = D.load_digits_splits(1)
    assert not np.array_equal(other.test.y, splits.test.y)  # the seed chooses the split


def test_model_and_representation_layer(splits):
    m = D.make_model()
    assert isinstance(dict(m.named_modules())[D.REPRESENTATION_LAYER], torch.nn.Conv2d)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    assert convs[-1] == D.REPRESENTATION_LAYER  # the last Conv is the representation layer
    assert m(torch.from_numpy(splits.test.x[:5])).shape == (5, 10)
    feats, logits = W.embed(m, splits.test.x[:7])
    assert feats.shape == (7, 32) and logits.shape == (7, 10) and feats.dtype == np.float32
    flat, _ = W.embed(m, splits.test.x[:7], pool=False)
    assert flat.shape == (7, 32 * 4 * 4)
    np.testing.assert_allclose(flat.reshape(7, 32, 16).mean(-1), feats, atol=1e-6)
    # Seeded factories are reproducible; a new head keeps the body.
    a, b = D.make_model(seed=3), D.make_model(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    W.replace_head(a, 3, seed=0)
    assert a.fc.out_features == 3 and torch.equal(a.conv2.weight, b.conv2.weight)


@pytest.mark.parametrize("name", sorted(D.SHIFTS))
def test_shift_effect_grows_with_severity(name, splits):
    x = splits.test.x
    assert np.array_equal(D.SHIFTS[name](x, 0.0, 0), x)  # severity 0 is the identity
    changes = []
    for sev in D.SEVERITIES[name]:
        y = D.SHIFTS[name](x, sev, seed=1)
        assert y.shape == x.shape and y.dtype == np.float32
        assert y.min() >= 0.0 and y.max() <= 1.0
        np.testing.assert_array_equal(y, D.SHIFTS[name](x, sev, seed=1))  # deterministic given the seed
        changes.append(float(np.abs(y - x).mean()))
    assert all(b > a for a, b in itertools.pairwise(changes)), changes
    assert len(D.SEVERITIES[name]) >= 5


def test_apply_shift_none_and_unknown(splits):
    x = splits.test.x[:4]
    assert np.array_equal(D.apply_shift(x, "none", 0.0), x)
    with pytest.raises(ValueError, match="shift"):
        D.apply_shift(x, "fog", 0.1)


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("parity", {0, 1}),
        ("ge5", {0, 1}),
        ("mod3", {0, 1, 2}),
        ("pair_3_8", {0, 1}),
        ("pair_1_7", {0, 1}),
        ("pair_4_9", {0, 1}),
        ("photos_china_flower", {0, 1}),
        ("photos_3way", {0, 1, 2}),
    ],
)
def test_tasks_label_sets(name, labels, splits):
    t = W.make_task(name, splits)
    assert t.num_classes == len(labels)
    for part in (t.train, t.heldout, t.test):
        assert set(np.unique(part.y)) == labels
        assert part.x.shape[1:] == (1, 8, 8) and part.x.dtype == np.float32 and part.y.dtype == np.int64
        assert part.x.min() >= 0.0 and part.x.max() <= 1.0
    if name == "parity":
        np.testing.assert_array_equal(t.test.y, splits.test.y % 2)
    if name == "pair_3_8":
        assert len(t.test) == int(np.isin(splits.test.y, [3, 8]).sum())


def test_photo_tiles_and_unknown_task():
    tiles = W.load_photo_tiles()
    assert set(tiles) == {"china", "flower", "grace_hopper"}
    assert tiles["china"].shape == (17 * 26, 1, 8, 8)  # 427x640 photo in 24-pixel tiles
    with pytest.raises(ValueError, match="task"):
        W.make_task("cifar")


def test_write_npz_round_trip(tmp_path, splits):
    p = D.write_npz(tmp_path / "sub" / "batch.npz", splits.test.x[:10], splits.test.y[:10])
    assert p.name == "batch.npz"
    with np.load(p, allow_pickle=False) as z:
        assert z["x"].dtype == np.float32 and z["x"].shape == (10, 1, 8, 8)
        assert z["y"].dtype == np.int64
        np.testing.assert_array_equal(z["y"], splits.test.y[:10])
    p2 = D.write_npz(tmp_path / "unlabelled.npz", splits.test.x[:3].astype(np.float64))
    with np.load(p2) as z:
        assert z.files == ["x"] and z["x"].dtype == np.float32
    with pytest.raises(ValueError, match="y"):
        D.write_npz(tmp_path / "bad.npz", splits.test.x[:3], np.zeros(2, np.int64))

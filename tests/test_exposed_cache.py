"""The exposed-model cache (runtime/exposed.py): a model seen before skips the graph edit, and a cache that is off,
broken or unwritable never changes a result or fails a gate."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_images

from resque_airflow.core import Fingerprint
from resque_airflow.runtime import exposed as exposed_cache
from resque_airflow.runtime import graph
from resque_airflow.runtime.embed import Embedder
from resque_airflow.runtime.model_file import read_model
from resque_airflow.runtime.pipeline import fingerprint_model, score_dist


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(exposed_cache.CACHE_ENV, str(root))
    return root


def _entries(root):
    return sorted(p for p in (root / "exposed").iterdir() if not p.name.startswith(".")) if root.exists() else []


def test_a_model_seen_before_is_not_edited_again(cnn_onnx, cache, monkeypatch):
    data, sha = read_model(cnn_onnx[1])
    x, _ = make_images(16, seed=3)
    first = Embedder(data, layer="conv2", pooling="spatial", model_sha256=sha)
    (entry,) = _entries(cache)
    assert json.loads((entry / exposed_cache.INFO_FILE).read_text())["exposed"]["layer"] == "conv2"

    def no_edit(*_a, **_k):
        raise AssertionError("the graph was edited again")

    monkeypatch.setattr(graph, "expose_layer", no_edit)
    second = Embedder(data, layer="conv2", pooling="spatial", model_sha256=sha)
    assert second.exposed == first.exposed and second.exposed.model is None
    for a, b in zip(first.run(x), second.run(x), strict=True):
        np.testing.assert_array_equal(a, b)


def test_each_layer_and_pooling_is_its_own_entry_and_old_entries_are_pruned(cnn_onnx, cache):
    data, sha = read_model(cnn_onnx[1])
    Embedder(data, layer="conv2", pooling="spatial", model_sha256=sha)
    Embedder(data, layer="relu", pooling="spatial", model_sha256=sha)
    # "auto" resolves to conv2 / spatial, already cached: one more entry, under ("auto", "auto") only.
    Embedder(data, layer="auto", pooling="auto", model_sha256=sha)
    assert len(_entries(cache)) == 3
    (cache / "exposed" / ".half-written").mkdir()  # a writer killed before its rename, long ago
    exposed_cache._prune(cache / "exposed", keep=2, stale_s=0.0)
    assert len(_entries(cache)) == 2 and not (cache / "exposed" / ".half-written").exists()


def test_a_broken_entry_is_rebuilt(cnn_onnx, cache, caplog):
    data, sha = read_model(cnn_onnx[1])
    x, _ = make_images(8, seed=4)
    want = Embedder(data, layer="conv2", pooling="spatial", model_sha256=sha).run(x)
    (entry,) = _entries(cache)
    (entry / exposed_cache.MODEL_FILE).write_bytes(b"not a model")
    with caplog.at_level(logging.WARNING, logger="resque_airflow.runtime.exposed"):
        got = Embedder(data, layer="conv2", pooling="spatial", model_sha256=sha).run(x)
    assert "cannot load" in caplog.text
    np.testing.assert_array_equal(want[0], got[0])
    (entry,) = _entries(cache)  # written again, whole
    assert Embedder(data, layer="conv2", pooling="spatial", model_sha256=sha).run(x)[0].shape == want[0].shape


def test_off_and_unwritable_caches_change_nothing(cnn_onnx, tmp_path, monkeypatch, caplog):
    data, sha = read_model(cnn_onnx[1])
    x, _ = make_images(8, seed=5)
    monkeypatch.setenv(exposed_cache.CACHE_ENV, "off")
    want = Embedder(data, layer="conv2", model_sha256=sha).run(x)[0]
    assert exposed_cache.cache_root() is None
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(exposed_cache.CACHE_ENV, str(blocker / "cache"))  # a folder under a file: cannot exist
    with caplog.at_level(logging.WARNING, logger="resque_airflow.runtime.exposed"):
        got = Embedder(data, layer="conv2", model_sha256=sha).run(x)[0]
    assert "cannot write" in caplog.text and exposed_cache.CACHE_ENV in caplog.text
    np.testing.assert_array_equal(want, got)


def test_a_cached_gate_imports_neither_onnx_nor_scikit_learn(cnn_onnx, cache, tmp_path):
    """The point of the cache and of the numpy k-means: a scheduled gate on a known model loads only numpy and ONNX
    Runtime (docs/PERFORMANCE.md: 0.8 s and 1.5 s of imports, ~120 MB of peak memory)."""
    x, y = make_images(200, seed=1)
    np.savez(tmp_path / "ref.npz", x=x, y=y)
    x, y = make_images(100, seed=2, shift=0.3)
    np.savez(tmp_path / "new.npz", x=x, y=y)
    fingerprint_model(cnn_onnx[1], str(tmp_path / "ref.npz")).save(tmp_path / "fp")
    script = (
        "import json, sys\n"
        "from resque_airflow.core import Fingerprint\n"
        "from resque_airflow.runtime.pipeline import score_dist\n"
        f"r = score_dist({str(cnn_onnx[1])!r}, Fingerprint.load({str(tmp_path / 'fp')!r}), "
        f"{str(tmp_path / 'new.npz')!r})\n"
        "print(json.dumps({'score': r.score, 'separability': r.signals['separability'],\n"
        "                  'loaded': sorted(m for m in ('onnx', 'sklearn', 'scipy') if m in sys.modules)}))\n"
    )
    runs = [
        json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
        for _ in range(2)
    ]
    # The fingerprint (layer="auto") cached the edit under what "auto" resolved to as well, which is what the gates
    # ask for: the first gate after publishing is already warm.
    assert runs[0]["loaded"] == runs[1]["loaded"] == []
    assert runs[0]["score"] == runs[1]["score"]
    in_process = score_dist(cnn_onnx[1], Fingerprint.load(tmp_path / "fp"), str(tmp_path / "new.npz"))
    assert in_process.score == runs[1]["score"] and in_process.signals["separability"] == runs[1]["separability"]

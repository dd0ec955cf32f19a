"""Streaming readers: npz, npy, shard folders, Parquet, image folders, fsspec URLs; bounded memory."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from resque_airflow.core import ImageSpec, ResqueInputError
from resque_airflow.core.fingerprint import TensorSpec
from resque_airflow.runtime.embed import prefetch
from resque_airflow.runtime.feed import prepare as prepare_feed
from resque_airflow.runtime.readers import DataSource


def collect(src):
    xs, ys = [], []
    for b in src:
        xs.append(b.x)
        ys.append(b.y)
    return np.concatenate(xs), (None if ys[0] is None else np.concatenate(ys))


def test_npz_npy_and_shard_folder(tmp_path):
    x = np.arange(50 * 4, dtype=np.float32).reshape(50, 4)
    y = np.arange(50) % 3
    np.savez(tmp_path / "one.npz", x=x, y=y)
    np.save(tmp_path / "plain.npy", x.astype(np.float64))
    (tmp_path / "shards").mkdir()
    for i in range(3):
        np.savez(tmp_path / "shards" / f"part-{i}.npz", x=x[i * 20 : (i + 1) * 20], y=y[i * 20 : (i + 1) * 20])
    for uri, n in [(tmp_path / "one.npz", 50), (tmp_path / "shards", 50), (f"file://{tmp_path}/one.npz", 50)]:
        got_x, got_y = collect(DataSource(str(uri), batch_size=7))
        np.testing.assert_array_equal(got_x, x[:n])
        np.testing.assert_array_equal(got_y, y[:n])
    gx, gy = collect(DataSource(str(tmp_path / "plain.npy"), batch_size=16))
    # Arrays keep the file's dtype; the feed converts them to what the model input takes (runtime/feed.py).
    assert gx.dtype == np.float64 and gy is None and gx.shape == (50, 4)


def test_array_files_know_their_row_count_for_progress(tmp_path):
    """``n_hint`` from the .npy headers, so the task log says a percentage for .npz/.npy as it does for Parquet."""
    x = np.zeros((30, 4), np.float32)
    np.savez(tmp_path / "one.npz", x=x, y=np.zeros(30, np.int64))
    np.save(tmp_path / "plain.npy", x)
    (tmp_path / "shards").mkdir()
    for i in range(3):
        np.savez(tmp_path / "shards" / f"part-{i}.npz", x=x[: 5 + i])
    assert DataSource(str(tmp_path / "one.npz")).n_hint == 30
    assert DataSource(str(tmp_path / "plain.npy")).n_hint == 30
    assert DataSource(str(tmp_path / "shards")).n_hint == 5 + 6 + 7
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert DataSource(str(tmp_path / "bad.npz")).n_hint is None  # the pass reports the damage, not the count


def test_memory_filesystem_url():
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/resque-test/data.npz", "wb") as f:
        np.savez(f, x=np.ones((5, 2), np.float32), y=np.zeros(5, int))
    gx, gy = collect(DataSource("memory://resque-test/data.npz"))
    assert gx.shape == (5, 2) and gy.tolist() == [0] * 5


def test_parquet_columns_and_list_column(tmp_path):
    table = pa.table({"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0, 6.0], "label": [0, 1, 1]})
    pq.write_table(table, tmp_path / "d.parquet")
    gx, gy = collect(DataSource(str(tmp_path / "d.parquet")))
    np.testing.assert_array_equal(gx, [[1, 4], [2, 5], [3, 6]])
    assert gy.tolist() == [0, 1, 1]
    pq.write_table(pa.table({"x": [[1.0, 2.0], [3.0, 4.0]]}), tmp_path / "l.parquet")
    gx, gy = collect(DataSource(str(tmp_path / "l.parquet")))
    assert gx.shape == (2, 2) and gy is None


def test_image_folder_is_decoded_resized_and_scaled(tmp_path):
    for cls, value in (("cat", 255), ("dog", 0)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("L", (16, 16), value).save(tmp_path / cls / f"{i}.png")
    src = DataSource(
        str(tmp_path),
        batch_size=4,
        image_spec=ImageSpec(mode="L", scale=1 / 255, mean=(0.5,), std=(0.5,)),
        image_size=(8, 8),
    )
    gx, gy = collect(src)
    assert gx.shape == (6, 1, 8, 8) and src.class_names == ["cat", "dog"]
    np.testing.assert_allclose(gx[gy == 0], 1.0)
    np.testing.assert_allclose(gx[gy == 1], -1.0)
    (tmp_path / "cat" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ResqueInputError, match=r"broken\.png cannot be decoded"):
        collect(DataSource(str(tmp_path), image_size=(8, 8)))
    with pytest.raises(ResqueInputError, match=r"class folders \['dog'\]"):
        DataSource(str(tmp_path), class_names=["cat", "bird"])


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ResqueInputError, match="unknown or unavailable URL scheme 'nosuchscheme'"):
        DataSource("nosuchscheme://bucket/data.npz")
    with pytest.raises(ResqueInputError, match="does not exist"):
        DataSource(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "ints.npz", x=np.ones((3, 1, 2, 2), np.uint8))
    with pytest.raises(ResqueInputError, match="x has dtype uint8, but the model takes float32 for input 'input'"):
        x = collect(DataSource(str(tmp_path / "ints.npz")))[0]
        prepare_feed({"x": x}, [TensorSpec("input", "float32", (None, 1, 2, 2))], "t")
    np.savez(tmp_path / "nox.npz", features=np.ones((3, 2)))
    with pytest.raises(ResqueInputError, match="expected 'x'"):
        collect(DataSource(str(tmp_path / "nox.npz")))
    (tmp_path / "shards").mkdir()
    np.savez(tmp_path / "shards" / "a.npz", x=np.ones((3, 2), np.float32))
    (tmp_path / "shards" / "b.npz").write_bytes(b"garbage")
    with pytest.raises(ResqueInputError, match=r"cannot read shard .*b\.npz"):
        collect(DataSource(str(tmp_path / "shards")))


def test_prefetch_reads_ahead_a_bounded_number_of_batches():
    produced = []

    def source():
        for i in range(100):
            produced.append(i)
            yield i

    it = prefetch(source(), depth=2)
    first = next(it)
    import time

    time.sleep(0.2)  # give the reader thread time to run ahead as far as it may
    assert first == 0 and len(produced) <= 4  # one consumed, two queued, one blocked in put
    assert list(it) == list(range(1, 100))


def test_prefetch_reraises_reader_errors():
    def source():
        yield 1
        raise ResqueInputError("data: shard 2 is broken")

    it = prefetch(source())
    assert next(it) == 1
    with pytest.raises(ResqueInputError, match="shard 2"):
        next(it)


def test_image_over_the_pixel_cap_is_refused_before_decoding(tmp_path):
    """Under PIL's own limit (89 Mpx) but over ours: refused from the header, with the size and the limit."""
    (tmp_path / "0").mkdir()
    Image.new("L", (3000, 2000)).save(tmp_path / "0" / "big.png")
    with pytest.raises(ResqueInputError, match=r"declares 6 Mpx \(3000 x 2000\), more than the 4 Mpx allowed"):
        collect(
            DataSource(str(tmp_path), image_size=(8, 8), image_spec=ImageSpec(mode="L"), max_image_pixels=4_000_000)
        )
    assert collect(DataSource(str(tmp_path), image_size=(8, 8), image_spec=ImageSpec(mode="L")))[0].shape == (
        1,
        1,
        8,
        8,
    )


def test_paddle_style_minus_one_dims_are_dynamic():
    from resque_airflow.runtime.feed import model_inputs

    class Arg:
        name, type, shape = "x", "tensor(float)", [-1, 3, -1, -1]

    class Sess:
        def get_inputs(self):
            return [Arg()]

    assert model_inputs(Sess())[0].shape == (None, 3, None, None)

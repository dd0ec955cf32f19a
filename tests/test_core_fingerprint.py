"""Fingerprint save/load: round trip, newer format, damage, and model binding by sha256."""

from __future__ import annotations

import json

import numpy as np
import pytest

from resque_airflow.core import Fingerprint, FingerprintError, ImageSpec, InputSpec
from resque_airflow.core.summary import FeatureSummary


def make_fp() -> Fingerprint:
    rng = np.random.default_rng(0)
    s = FeatureSummary(3, 5, sample_size=50)
    y = rng.integers(0, 3, 100)
    s.update(rng.normal(size=(100, 5)).astype(np.float32), np.eye(3)[y], y)
    return Fingerprint(
        model_sha256="ab" * 32, layer="conv2", pooling="spatial", logits_output="logits",
        input_spec=InputSpec("input", (None, 1, 8, 8), image=ImageSpec(mode="L", scale=1 / 16)),
        summary=s, class_names=["a", "b", "c"],
    )  # fmt: skip


def test_round_trip(tmp_path):
    fp = make_fp()
    fp.save(tmp_path / "fp")
    back = Fingerprint.load(tmp_path / "fp")
    assert back.metadata() == fp.metadata()
    np.testing.assert_array_equal(back.summary.given.sums, fp.summary.given.sums)
    np.testing.assert_array_equal(back.summary.sample_x, fp.summary.sample_x)
    assert back.input_spec.image.mode == "L" and back.n_samples == 100 and back.summary.accuracy == 1.0
    assert Fingerprint.load(tmp_path / "fp" / "fingerprint.json").layer == "conv2"


def test_newer_format_is_refused(tmp_path):
    make_fp().save(tmp_path)
    meta = json.loads((tmp_path / "fingerprint.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "fingerprint.json").write_text(json.dumps(meta))
    with pytest.raises(FingerprintError, match="format version 99, newer"):
        Fingerprint.load(tmp_path)


@pytest.mark.parametrize("damage", ["json", "npz", "missing"])
def test_damaged_files_are_refused(tmp_path, damage):
    make_fp().save(tmp_path)
    if damage == "json":
        (tmp_path / "fingerprint.json").write_text("{not json")
    elif damage == "npz":
        data = bytearray((tmp_path / "fingerprint.npz").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (tmp_path / "fingerprint.npz").write_bytes(bytes(data))
    else:
        (tmp_path / "fingerprint.npz").unlink()
    with pytest.raises(FingerprintError, match=r"damaged|not found"):
        Fingerprint.load(tmp_path)


def test_npz_never_unpickles(tmp_path):
    make_fp().save(tmp_path)
    meta = json.loads((tmp_path / "fingerprint.json").read_text())
    np.savez(tmp_path / "fingerprint.npz", given_sums=np.array([object()], dtype=object))
    from resque_airflow.core.fingerprint import sha256_file

    meta["npz_sha256"] = sha256_file(tmp_path / "fingerprint.npz")
    (tmp_path / "fingerprint.json").write_text(json.dumps(meta))
    with pytest.raises(FingerprintError):
        Fingerprint.load(tmp_path)


def test_model_binding():
    fp = make_fp()
    fp.check_model("ab" * 32)
    with pytest.raises(FingerprintError, match="recompute the fingerprint"):
        fp.check_model("cd" * 32)

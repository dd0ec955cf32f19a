"""Reliability catalogue, part 5: round two (issue 15; docs/RELIABILITY.md, section "Round two").

Wrong branches taken silently, registry states that crashed the gate, leftovers after a kill and operations. Each
test failed before its fix. Credentials are in ``test_reliability_credentials.py``.
"""

from __future__ import annotations

import errno
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from test_reliability_support import mv_tags

from resque_airflow.cli import main as cli_main
from resque_airflow.errors import FingerprintError, RegistryError, ResqueInputError
from resque_airflow.registry import names
from resque_airflow.registry.client import make_client
from resque_airflow.registry.gate import GateRequest, run_gate


@pytest.fixture(scope="module")
def env(cnn_registry):
    uri, root = cnn_registry("round2", names=("cnn", "o'brien-cnn"), new=(60, 2, 0.0))
    return {"uri": uri, "root": root, "new": str(root / "new.npz")}


def gate(env, model="cnn", **kw):
    return run_gate(GateRequest(f"models:/{model}@champion", kw.pop("data", env["new"]), **kw),
                    client=make_client(env["uri"]))  # fmt: skip


# 1. Wrong branch, silently ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("folders,num_classes", [(["2", "3"], 4), (["1", "10", "2"], 12)])
def test_image_folders_are_classes_by_name_not_sorted_position(folders, num_classes):
    from resque_airflow.runtime.images import class_index

    index, _ = class_index(folders, None, num_classes, "data/")
    assert index == {f: int(f) for f in folders}


def test_external_weights_load_from_the_models_folder_and_are_hashed(cnn_onnx, tmp_path, monkeypatch):
    import onnx

    from resque_airflow.core.fingerprint import sha256_file
    from resque_airflow.runtime.model_file import read_model

    proto = onnx.load(str(cnn_onnx[1]))
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, scale in ((a, 1.0), (b, 2.0)):
        folder.mkdir()
        p = onnx.load(str(cnn_onnx[1]))
        for t in p.graph.initializer:
            arr = onnx.numpy_helper.to_array(t) * scale
            t.CopyFrom(onnx.numpy_helper.from_array(arr.astype(arr.dtype), t.name))
        onnx.save_model(p, str(folder / "model.onnx"), save_as_external_data=True, location="weights.bin",
                        size_threshold=0)  # fmt: skip
    monkeypatch.chdir(b)  # another model's weights.bin in the current directory
    data, sha = read_model(a / "model.onnx")
    assert sha != sha256_file(a / "model.onnx"), "the sha256 must cover the external weights"
    assert onnx.load_model_from_string(data).graph.initializer[0].raw_data == onnx.load(
        str(a / "model.onnx")).graph.initializer[0].raw_data  # fmt: skip
    assert read_model(b / "model.onnx")[1] != sha  # other weights, other hash
    del proto


def _damage_summary(fp_dir: Path, **change) -> None:
    import io

    from resque_airflow.core.fingerprint import sha256_bytes

    meta = json.loads((fp_dir / "fingerprint.json").read_text())
    with np.load(fp_dir / "fingerprint.npz") as z:
        arrays = {k: z[k] for k in z.files}
    if "nan" in change:
        arrays["given_sums"][0, 0] = np.nan
    meta["summary"] |= {k: v for k, v in change.items() if k != "nan"}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (fp_dir / "fingerprint.npz").write_bytes(buf.getvalue())
    meta["npz_sha256"] = sha256_bytes(buf.getvalue())
    (fp_dir / "fingerprint.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("change", [{"nan": True}, {"num_classes": 10**9}, {"replicates": 10**9}],
                         ids=["nan-class-sums", "num-classes-1e9", "replicates-1e9"])  # fmt: skip
def test_tampered_fingerprint_is_a_one_line_error(cnn_onnx, env, tmp_path, change):
    from resque_airflow.core.fingerprint import Fingerprint
    from resque_airflow.runtime.pipeline import fingerprint_model

    fp = fingerprint_model(str(cnn_onnx[1]), str(env["root"] / "ref.npz"))
    fp.save(tmp_path / "fp")
    _damage_summary(tmp_path / "fp", **change)
    with pytest.raises(FingerprintError, match=r"damaged|tampered"):
        Fingerprint.load(tmp_path / "fp")


def test_tampered_shard_summary_num_classes_is_a_one_line_error():
    from resque_airflow.core.summary import FeatureSummary

    s = FeatureSummary(3, 4)
    scalars = s.to_scalars() | {"num_classes": 10**9}
    with pytest.raises(ResqueInputError, match="tampered"):
        FeatureSummary.from_parts(scalars, s.to_arrays())


def test_worker_clock_a_year_ahead_does_not_hide_later_gates(env):
    from resque_airflow.registry.client import iso_time
    from resque_airflow.registry.tags import tag_model_version

    gate(env)
    client = make_client(env["uri"])
    future = {"score": 0.5, "decision": "rebuild", "run_id": "f" * 32, "mode": "dist",
              "time": iso_time(int((__import__("time").time() + 365 * 86400) * 1000))}  # fmt: skip
    tag_model_version(client, "cnn", "1", future)  # what a worker whose clock runs a year ahead leaves
    later = gate(env)
    tags = mv_tags(env["uri"], "cnn")
    assert json.loads(tags[names.LAST_GATE_TAG])["run_id"] == later.gate_run_id
    assert tags[names.MV_TAG_GATE_RUN] == later.gate_run_id


# 4. One-line errors ----------------------------------------------------------------------------------------------
def test_zero_d_labels_are_a_one_line_error():
    from resque_airflow.core.classsums import check_labels

    with pytest.raises(ResqueInputError, match="expected shape"):
        check_labels(np.array(3), 4, 1)


def test_unwritable_out_is_a_one_line_error(cnn_onnx, env, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")  # a file where a folder is asked for
    rc = cli_main(["fingerprint", "--model", str(cnn_onnx[1]), "--data", str(env["root"] / "ref.npz"),
                   "--out", str(target / "fp")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "cannot write to" in err, err


# 5. Registry states ----------------------------------------------------------------------------------------------
def test_soft_deleted_experiment_is_bad_input(env):
    client = make_client(env["uri"])
    exp_id = client.create_experiment("gone-exp")
    client.delete_experiment(exp_id)
    with pytest.raises(ResqueInputError, match="is deleted; restore it"):
        gate(env, experiment_name="gone-exp")


def test_empty_experiment_name_is_bad_input(env):
    with pytest.raises(ResqueInputError, match="experiment name is empty"):
        gate(env, experiment_name="")


@pytest.mark.parametrize("uri,match", [("foo://bar", "unknown scheme 'foo'"), ("file:///tmp/x", "file store")])
def test_unusable_tracking_uri_schemes_are_bad_input(uri, match):
    with pytest.raises(ResqueInputError, match=match):
        make_client(uri)


def test_mistyped_sqlite_path_creates_nothing(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/typo/mlfow.db"
    rc = cli_main(["gate", "--model-uri", "models:/cnn@champion", "--data", str(tmp_path), "--tracking-uri", uri])
    assert rc == 2 and "no MLflow database" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_apostrophe_in_model_name_gates_twice(env):
    first, second = gate(env, model="o'brien-cnn"), gate(env, model="o'brien-cnn")
    assert first.decision and second.decision


def test_full_disk_when_creating_an_experiment_is_a_registry_error(env, monkeypatch):
    from mlflow import MlflowClient

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MlflowClient, "create_experiment", full)
    with pytest.raises(RegistryError, match="No space left on device"):
        gate(env, experiment_name="new-exp-on-full-disk")


def test_missing_model_artifacts_are_a_one_line_error(env, cnn_onnx):
    import shutil

    from resque_airflow.registry.publish import publish_model

    published = publish_model(tracking_uri=env["uri"], name="emptied", model_path=cnn_onnx[1],
                              reference=str(env["root"] / "ref.npz"))  # fmt: skip
    client = make_client(env["uri"])
    src = client.get_model_version_download_uri("emptied", published.version)
    shutil.rmtree(src.removeprefix("file://"))
    with pytest.raises((ResqueInputError, RegistryError)) as err:
        gate(env, model="emptied")
    assert "\n" not in str(err.value)


# 6. Leftovers after a kill ---------------------------------------------------------------------------------------
def test_model_copy_left_by_a_killed_gate_is_swept(env):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = Path(tempfile.gettempdir()) / f"resque-gate-{dead.pid}-killed"
    (left / "model").mkdir(parents=True, exist_ok=True)
    (left / "model" / "model.onnx").write_bytes(b"x")
    gate(env)
    assert not left.exists()


# 7. Operations ---------------------------------------------------------------------------------------------------
def test_mlflow_info_lines_do_not_go_to_stderr(env, capfd):
    make_client(env["uri"])
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    assert "Creating initial" not in capfd.readouterr().err
    assert not any(type(getattr(h, "stream", None)).__name__ == "MlflowLoggingStream"
                   for h in logging.getLogger("mlflow").handlers)  # fmt: skip


def test_data_path_is_checked_before_the_model_is_downloaded(env, monkeypatch):
    import resque_airflow.registry.gate as gate_module

    def no_download(*a, **k):
        raise AssertionError("the model was downloaded before the data was checked")

    monkeypatch.setattr(gate_module, "fetch_model", no_download)
    with pytest.raises(ResqueInputError, match="does not exist"):
        gate(env, data=str(env["root"] / "missing.npz"))

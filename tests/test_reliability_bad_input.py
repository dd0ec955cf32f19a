"""Reliability catalogue, part 1: bad input (docs/RELIABILITY.md, section "Bad input").

One test per row. Each row feeds the same bad input to

- the CLI: ``resque gate`` against a real SQLite registry, and ``resque score`` on a local copy of the model folder
  where the row applies: exit code 2 (3 for what the registry does not hold, the CLI's documented contract) and a
  one-line message naming the problem;
- the operator: ``ResqueGateOperator.choose_branch`` through an Airflow ``mlflow`` connection: the task fails with
  ``ResqueBadInputError`` (no retry) carrying the same message;

and then checks the audit trail: no gate run is marked successful (FINISHED with ``resque.status=decided``), any
gate run the row opened is FAILED with ``resque.status=failed``, and no model-version tag changed.

Rows about the registry's stored files (ONNX, fingerprint) damage the stored artifacts of the registered version
in place and restore them afterwards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import flip_byte, make_images, mlflow_conn
from PIL import Image
from test_reliability_support import (
    decided_run_ids,
    drop_stale_log_handlers,
    gate_runs,
    mlp_data,
    mlp_onnx,
    mv_tags,
    operator_gate,
)

from resque_airflow.cli import main
from resque_airflow.registry import names
from resque_airflow.registry.client import make_client
from resque_airflow.registry.gate import GateRequest, run_gate
from resque_airflow.registry.publish import publish_model

CONN_ID = "reliability_bad_input"
MODELS = ("cnn", "mlp")


@pytest.fixture(scope="module")
def env(cnn_registry):
    """A SQLite registry holding ``cnn`` (images, (N, 1, 8, 8)) and ``mlp`` ((N, 6)), each gated once, and data."""
    uri, root = cnn_registry("bad-input", ref_name="cnn-ref.npz")
    xm, ym = mlp_data(300, seed=1)
    np.savez(root / "mlp-ref.npz", x=xm, y=ym)
    publish_model(
        tracking_uri=uri, name="mlp", model_path=mlp_onnx(root / "mlp.onnx"), reference=str(root / "mlp-ref.npz")
    )
    data = write_data(root)
    for model in MODELS:  # a first gate, so that "tags unchanged" compares real tags
        run_gate(GateRequest(f"models:/{model}@champion", str(data[f"{model}-good"])), client=make_client(uri))
    return {"uri": uri, "root": root, "data": data}


def write_data(root: Path) -> dict[str, Path]:
    """Every data file of the catalogue, good and bad."""
    d = root / "data"
    d.mkdir()
    x, y = make_images(20, seed=5)
    out: dict[str, Path] = {}

    def npz(name: str, **arrays) -> None:
        np.savez(d / f"{name}.npz", **arrays)
        out[name] = d / f"{name}.npz"

    npz("cnn-good", x=x, y=y)
    nan, inf = x.copy(), x.copy()
    nan[3, 0, 2, 2] = np.nan
    inf[7, 0, 1, 1] = np.inf
    npz("nan", x=nan, y=y)
    npz("inf", x=inf, y=y)
    npz("rank", x=x.reshape(20, 64), y=y)
    npz("shape", x=x.reshape(20, 1, 4, 16), y=y)
    npz("dtype", x=(x * 255).astype(np.uint8), y=y)
    npz("empty", x=x[:0], y=y[:0])
    npz("labels-outside", x=x, y=y + 7)
    npz("labels-float", x=x, y=y + 0.5)
    npz("labels-string", x=x, y=np.array([f"class{v}" for v in y]))
    npz("labels-count", x=x, y=y[:10])
    (d / "empty-folder").mkdir()
    out["empty-folder"] = d / "empty-folder"
    shards = d / "one-bad-shard"
    shards.mkdir()
    np.savez(shards / "a.npz", x=x, y=y)
    (shards / "b.npz").write_bytes(b"\x00 a shard that holds no array at all")
    np.savez(shards / "c.npz", x=x, y=y)
    out["one-bad-shard"] = shards
    truncated = d / "one-truncated-shard"
    shutil.copytree(shards, truncated)
    blob = (shards / "c.npz").read_bytes()
    (truncated / "b.npz").write_bytes(blob[: len(blob) // 2])  # an upload cut short: a zip without its directory
    out["one-truncated-shard"] = truncated
    images = d / "images"
    for cls in ("0", "1"):
        (images / cls).mkdir(parents=True)
        Image.new("L", (8, 8), 200).save(images / cls / "good.png")
    (images / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not an image")
    out["images"] = images
    xm, ym = mlp_data(30, seed=6)
    np.savez(d / "mlp-good.npz", x=xm, y=ym)
    out["mlp-good"] = d / "mlp-good.npz"
    pq.write_table(pa.table({f"f{i}": xm[:, i] for i in range(6)}), d / "no-label.parquet")
    out["parquet-no-label"] = d / "no-label.parquet"
    out["missing"] = d / "does-not-exist.npz"
    return out


# Damage to the registered version's stored folder (model.onnx + extra_files/fingerprint.*) ------------------------
def _set_fingerprint(folder: Path, **fields) -> None:
    path = folder / "extra_files" / "fingerprint.json"
    meta = json.loads(path.read_text()) | fields
    path.write_text(json.dumps(meta))


def _replace_model(folder: Path, blob: bytes) -> None:
    """Replace model.onnx and re-bind the fingerprint to it: what a registry holding a broken model looks like."""
    (folder / "model.onnx").write_bytes(blob)
    _set_fingerprint(folder, model_sha256=hashlib.sha256(blob).hexdigest())


def truncate_model(folder: Path) -> None:
    _replace_model(folder, (folder / "model.onnx").read_bytes()[:300])


def not_onnx(folder: Path) -> None:
    _replace_model(folder, b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8)


def flip_model_byte(folder: Path) -> None:
    flip_byte(folder / "model.onnx", -10)


def damage_fingerprint_json(folder: Path) -> None:
    (folder / "extra_files" / "fingerprint.json").write_text('{"format_version": 1, "model_sha')


def damage_fingerprint_npz(folder: Path) -> None:
    flip_byte(folder / "extra_files" / "fingerprint.npz", 200)


def newer_fingerprint(folder: Path) -> None:
    _set_fingerprint(folder, format_version=99)


def fingerprint_of_another_model(folder: Path) -> None:
    _set_fingerprint(folder, model_sha256=hashlib.sha256(b"another model").hexdigest())


def remove_fingerprint(folder: Path) -> None:
    shutil.rmtree(folder / "extra_files")


@dataclass(frozen=True)
class Case:
    """One row: the bad input, the message fragment expected, and the CLI's exit code."""

    message: str
    model: str = "cnn"
    data: str = "cnn-good"
    labels: str = "given"
    mode: str = "dist"
    layer: str = "auto"
    alias: str | None = "champion"
    version: str | None = None
    thresholds: tuple[float, float] | None = None
    tamper: Callable[[Path], None] | None = None
    exit_code: int = 2
    score: bool = True  # also through `resque score` on a local copy of the model folder
    model_uri: str | None = None  # the CLI's --model-uri, when it differs from what the operator builds
    operator: dict = field(default_factory=dict)  # operator arguments that differ from the CLI's
    xfail: str | None = None  # a known bug outside this catalogue's files: the reason, until it is fixed


CASES = {
    # Data
    "nan-values": Case("contains NaN or infinite values", data="nan"),
    "infinite-values": Case("contains NaN or infinite values", data="inf"),
    "wrong-rank": Case("does not fit the model input", data="rank"),
    "wrong-shape": Case("does not fit the model input", data="shape"),
    "wrong-dtype": Case("x has dtype uint8, but the model takes float32", data="dtype"),
    "empty-data": Case("holds no samples", data="empty"),
    "empty-folder": Case("holds no .npy/.npz/.parquet shards", data="empty-folder"),
    "folder-with-one-unreadable-shard": Case("cannot read shard", data="one-bad-shard"),
    "folder-with-one-truncated-shard": Case("cannot read shard", data="one-truncated-shard"),
    "image-fails-to-decode": Case("broken.png cannot be decoded", data="images"),
    "labels-outside-classes": Case("are outside the fingerprint's classes 0..3", data="labels-outside"),
    "labels-non-integer-floats": Case("expected integer class indices, got non-integer floats", data="labels-float"),
    "labels-strings": Case("expected integer class indices, got dtype <U", data="labels-string"),
    "labels-row-count": Case("x has 20 rows but y has 10", data="labels-count"),
    "parquet-without-label-column": Case("labels='given' but the data has no labels", model="mlp",
                                         data="parquet-no-label"),
    "data-missing": Case("does not exist", data="missing"),
    "data-url-unknown-scheme": Case("unknown or unavailable URL scheme 'nosuchscheme'", data="nosuchscheme"),
    # ONNX file
    "onnx-truncated": Case("is not a valid ONNX file (truncated or another format?)", tamper=truncate_model),
    "onnx-not-onnx": Case("is not a valid ONNX file", tamper=not_onnx),
    "onnx-no-tensor-of-requested-name": Case("has no tensor named 'no_such_tensor'", mode="task",
                                             layer="no_such_tensor"),
    "onnx-changed-after-fingerprint": Case("recompute the fingerprint", tamper=flip_model_byte),
    # Fingerprint
    "fingerprint-damaged-json": Case("is damaged (not valid JSON", tamper=damage_fingerprint_json),
    "fingerprint-damaged-arrays": Case("does not match the sha256 in fingerprint.json", tamper=damage_fingerprint_npz),
    "fingerprint-newer-format": Case("has format version 99, newer than", tamper=newer_fingerprint),
    "fingerprint-for-another-model": Case("fingerprint is for a model with sha256",
                                          tamper=fingerprint_of_another_model),
    "fingerprint-missing": Case("has no fingerprint", tamper=remove_fingerprint, score=False),
    # Request
    "alias-does-not-exist": Case("model 'cnn' has no alias 'nope'; it has ['champion']", alias="nope", exit_code=3,
                                 score=False),
    "version-does-not-exist": Case("model 'cnn' has no version 99", alias=None, version="99", exit_code=3,
                                   score=False),
    "model-does-not-exist": Case("no registered model named 'nope'", model="nope", exit_code=3, score=False),
    "model-uri-malformed": Case("expected models:/NAME@ALIAS or models:/NAME/VERSION", model_uri="cnn@champion",
                                operator={"model_name": "cnn/1"}, score=False),
    "thresholds-not-ordered": Case("reuse_threshold (0.5) must be below rebuild_threshold (0.1)",
                                   thresholds=(0.5, 0.1), score=False),
    "threshold-out-of-range": Case("expected a number in [0, 1], got 1.5", thresholds=(0.1, 1.5), score=False),
}  # fmt: skip


def stored_folder(uri: str, model: str) -> Path:
    """The registered version's folder in the SQLite registry's artifact store."""
    source = make_client(uri).get_model_version_download_uri(model, "1")
    return Path(urlparse(source).path)


@pytest.fixture
def damaged(env, request, tmp_path):
    """Apply the row's damage to the stored version (restored afterwards); yield a local, equally damaged copy."""
    case: Case = CASES[request.node.callspec.params["row"]]
    model = case.model if case.model in MODELS else "cnn"
    stored = stored_folder(env["uri"], model)
    backup = tmp_path / "backup"
    shutil.copytree(stored, backup)
    local = tmp_path / "local"
    shutil.copytree(stored, local)
    try:
        if case.tamper:
            case.tamper(stored)
            case.tamper(local)
        yield local
    finally:
        shutil.rmtree(stored)
        shutil.copytree(backup, stored)


def data_arg(env, case: Case) -> str:
    return "nosuchscheme://bucket/data.npz" if case.data == "nosuchscheme" else str(env["data"][case.data])


def cli(args: list[str], capsys) -> tuple[int, str]:
    drop_stale_log_handlers()
    code = main(args)
    return code, capsys.readouterr().err


ROWS = [
    pytest.param(row, marks=pytest.mark.xfail(reason=case.xfail, strict=True)) if case.xfail else row
    for row, case in CASES.items()
]


@pytest.mark.parametrize("row", ROWS)
def test_bad_input(row, env, damaged, capsys, monkeypatch):
    case = CASES[row]
    uri, data = env["uri"], data_arg(env, case)
    decided_before = decided_run_ids(uri)
    runs_before = {r.info.run_id for r in gate_runs(uri)}
    tags_before = {m: mv_tags(uri, m) for m in MODELS}

    # 1. resque gate
    model_uri = case.model_uri or (
        f"models:/{case.model}@{case.alias}" if case.alias else f"models:/{case.model}/{case.version}"
    )
    args = ["gate", "--model-uri", model_uri, "--data", data, "--tracking-uri", uri, "--labels", case.labels,
            "--mode", case.mode, "--layer", case.layer]  # fmt: skip
    if case.thresholds:
        args += ["--reuse-threshold", str(case.thresholds[0]), "--rebuild-threshold", str(case.thresholds[1])]
    code, err = cli(args, capsys)
    assert code == case.exit_code, err
    assert case.message in err and err.strip().count("\n") == 0, err

    # 2. resque score, on a local copy of the (equally damaged) model folder
    if case.score:
        model, fingerprint = str(damaged / "model.onnx"), str(damaged / "extra_files")
        if case.mode == "dist":
            args = ["score", "dist", "--model", model, "--fingerprint", fingerprint, "--labels", case.labels]
        else:
            args = ["score", "task", "--model", model, "--layer", case.layer]
        code, err = cli([*args, "--data", data], capsys)
        assert code == 2, err
        assert case.message in err and err.strip().count("\n") == 0, err

    # 3. the operator: the task fails without retry, naming the problem
    from resque_airflow.operators.gate import ResqueBadInputError

    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", mlflow_conn(uri))
    kwargs = {
        "model_name": case.model,
        "model_alias": case.alias,
        "model_version": case.version,
        "data": data,
        "mode": case.mode,
        "labels": case.labels,
        "layer": case.layer,
    } | ({"reuse_threshold": case.thresholds[0], "rebuild_threshold": case.thresholds[1]} if case.thresholds else {})
    with pytest.raises(ResqueBadInputError) as info:
        operator_gate(CONN_ID, **(kwargs | case.operator))
    assert case.message in str(info.value)

    # 4. the audit trail: nothing marked successful, what was opened is FAILED, no model-version tag changed
    assert decided_run_ids(uri) == decided_before
    for run in gate_runs(uri):
        if run.info.run_id not in runs_before:
            assert run.info.status == "FAILED" and run.data.tags[names.STATUS_TAG] == "failed", run.data.tags
            assert case.message.split("'")[0] in run.data.tags[names.ERROR_TAG]
    assert {m: mv_tags(uri, m) for m in MODELS} == tags_before


@pytest.mark.airflow
def test_bad_input_fails_the_airflow_task_without_retry(env, airflow_db, monkeypatch):
    """Through dag.test, with retries configured on the gate: bad input fails the task at once, on try 1."""
    import importlib.util

    from conftest import REPO

    uri, data = env["uri"], str(env["data"]["nan"])
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", mlflow_conn(uri))
    spec = importlib.util.spec_from_file_location("resque_gate", REPO / "dags" / "resque_gate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.dag.get_task("gate").retries = 3
    decided, tags = decided_run_ids(uri), mv_tags(uri, "cnn")
    dr = module.dag.test(run_conf={"model_name": "cnn", "data_uri": data})
    gate = next(ti for ti in dr.get_task_instances() if ti.task_id == "gate")
    assert str(gate.state) == "failed" and gate.try_number == 1
    assert {str(ti.state) for ti in dr.get_task_instances() if ti.task_id in ("reuse", "retrain", "rebuild")} == {
        "upstream_failed"
    }
    runs = [r for r in gate_runs(uri) if r.data.params.get("airflow_run_id") == dr.run_id]
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "NaN or infinite" in runs[0].data.tags[names.ERROR_TAG]
    assert decided_run_ids(uri) == decided and mv_tags(uri, "cnn") == tags

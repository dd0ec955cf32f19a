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
MODELS = ("cnn", "mlp", "pair")


@pytest.fixture(scope="module")
def env(cnn_registry):
    """A SQLite registry holding ``cnn`` (images, (N, 1, 8, 8)) and ``mlp`` ((N, 6)), each gated once, and data."""
    uri, root = cnn_registry("bad-input", ref_name="cnn-ref.npz")
    xm, ym = mlp_data(300, seed=1)
    np.savez(root / "mlp-ref.npz", x=xm, y=ym)
    publish_model(
        tracking_uri=uri, name="mlp", model_path=mlp_onnx(root / "mlp.onnx"), reference=str(root / "mlp-ref.npz")
    )
    np.savez(root / "pair-ref.npz", a=xm, b=np.round(xm).astype(np.int64), y=ym)
    publish_model(
        tracking_uri=uri, name="pair", model_path=pair_onnx(root / "pair.onnx"), reference=str(root / "pair-ref.npz")
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
    shutil.copytree(images, d / "images-good")
    out["images-good"] = d / "images-good"
    (images / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not an image")
    out["images"] = images
    xm, ym = mlp_data(30, seed=6)
    np.savez(d / "mlp-good.npz", x=xm, y=ym)
    out["mlp-good"] = d / "mlp-good.npz"
    pq.write_table(pa.table({f"f{i}": xm[:, i] for i in range(6)}), d / "no-label.parquet")
    out["parquet-no-label"] = d / "no-label.parquet"
    out["missing"] = d / "does-not-exist.npz"
    write_hostile_data(d, out, x, y, xm, ym)
    return out


def pair_onnx(path: Path) -> Path:
    """A model with two inputs of two dtypes: ``a`` (N, 6) float32 and ``b`` (N, 6) int64, summed, then an MLP."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(0, 0.5, (6, 16)).astype(np.float32), rng.normal(0, 0.5, (16, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["a", "bf"], ["ab"]),
            helper.make_node("Gemm", ["ab", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["hidden"]),
            helper.make_node("Gemm", ["hidden", "w2"], ["logits"]),
        ],
        "pair",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 6]),
         helper.make_tensor_value_info("b", TensorProto.INT64, ["batch", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [onnx.numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"))],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def forged_npy(declared: tuple[int, ...], descr: str = "<f8", data: bytes = b"\0" * 64) -> bytes:
    """A .npy header declaring ``declared`` (terabytes, say) followed by a few bytes: what a hostile file looks like."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": declared})
    return buf.getvalue() + data


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares ``width`` x ``height`` grey pixels, with one compressed row of data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
                     + chunk(b"IEND", b""))  # fmt: skip


def png_bomb(path: Path, side: int) -> None:
    """A real ``side`` x ``side`` grey PNG of zeros, written row by row (a few hundred KB on disk)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def write_hostile_data(d: Path, out: dict[str, Path], x, y, xm, ym) -> None:
    """Issue 15's hostile and odd files: forged sizes, bombs, 0-d arrays, Parquet label and column types, FIFOs."""
    import os
    import zipfile

    def npz(name: str, **arrays) -> None:
        np.savez(d / f"{name}.npz", **arrays)
        out[name] = d / f"{name}.npz"

    npz("zero-d-x", x=np.float32(1.0), y=y)
    npz("zero-d-y", x=x, y=np.int64(3))
    (d / "forged.npy").write_bytes(forged_npy((1 << 37, 8)))  # 8.8 TB declared, 300 bytes on disk
    out["forged-npy"] = d / "forged.npy"
    with zipfile.ZipFile(d / "forged-member.npz", "w") as zf:
        zf.writestr("x.npy", forged_npy((1 << 30, 1, 8, 8), "<f4"))
        zf.writestr("y.npy", forged_npy((1 << 30,), "<i8"))
    out["forged-member"] = d / "forged-member.npz"
    for name, sizes in (("png-900mpx", [(30000, 30000)]), ("png-bombs", [(12000, 12000)] * 4)):
        for k, (w, h) in enumerate(sizes):
            (d / name / str(k % 2)).mkdir(parents=True, exist_ok=True)
            if name == "png-bombs":
                png_bomb(d / name / str(k % 2) / f"{k}.png", w)
            else:
                png_header_only(d / name / str(k % 2) / f"{k}.png", w, h)
        out[name] = d / name
    npz("pair-good", a=xm, b=np.round(xm).astype(np.int64), y=ym)
    npz("pair-missing-input", a=xm[:20], y=ym[:20])
    npz("pair-float-ids", a=xm[:20], b=xm[:20], y=ym[:20])
    features = {f"f{i}": xm[:20, i] for i in range(6)}
    labels = [f"class{v}" for v in ym[:20]]
    tables = {
        "parquet-string-labels": pa.table(features | {"label": labels}),
        "parquet-dictionary-labels": pa.table(features | {"label": pa.array(labels).dictionary_encode()}),
        "parquet-null-labels": pa.table(features | {"label": pa.array([None, None, None, *ym[3:20].tolist()])}),
        "parquet-timestamp-column": pa.table({f"f{i}": xm[:20, i] for i in range(5)} | {
            "ts": pa.array(np.arange(20).astype("datetime64[us]")), "label": ym[:20]}),
    }  # fmt: skip
    for name, table in tables.items():
        pq.write_table(table, d / f"{name}.parquet")
        out[name] = d / f"{name}.parquet"
    (d / "fifo-folder").mkdir()
    np.savez(d / "fifo-folder" / "a.npz", x=x, y=y)
    os.mkfifo(d / "fifo-folder" / "b.npz")  # opening it would block until someone writes
    out["fifo-folder"] = d / "fifo-folder"
    os.mkfifo(d / "fifo.npz")
    out["fifo"] = d / "fifo.npz"


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
    # Hostile or odd files (issue 15): declared sizes checked before allocating, one-line errors, no hang
    "x-0-dimensional": Case("x is 0-dimensional (a single value)", data="zero-d-x"),
    "y-0-dimensional": Case("y is 0-dimensional (a single value)", data="zero-d-y"),
    "npy-header-declares-8-tb": Case("declares shape (137438953472, 8) of float64 (8.8 TB) but holds only 64 B",
                                     model="mlp", data="forged-npy"),
    "npz-member-declares-more-than-it-holds": Case("x declares shape (1073741824, 1, 8, 8) of float32",
                                                   data="forged-member"),
    "png-declares-900-mpx": Case("declares 900 Mpx, more than the 34 Mpx allowed", data="png-900mpx"),
    "png-bombs-decode-to-144-mpx": Case("declares 144 Mpx, more than the 34 Mpx allowed", data="png-bombs"),
    "two-input-model-missing-input": Case("the model takes inputs ['a', 'b'], but the file has no arrays ['b']",
                                          model="pair", data="pair-missing-input"),
    "int64-input-given-floats": Case("b has dtype float32, but the model takes int64 for input 'b'", model="pair",
                                     data="pair-float-ids"),
    "parquet-string-labels": Case("label column 'label' holds class names, but there are no class names",
                                  model="mlp", data="parquet-string-labels"),
    "parquet-dictionary-labels": Case("label column 'label' holds class names, but there are no class names",
                                      model="mlp", data="parquet-dictionary-labels"),
    "parquet-null-labels": Case("label column 'label' has 3 missing (null) labels", model="mlp",
                                data="parquet-null-labels"),
    "parquet-timestamp-column": Case("column 'ts' has type timestamp[us]; model input columns must be numbers",
                                     model="mlp", data="parquet-timestamp-column"),
    "fifo-in-the-data-folder": Case("is a FIFO, not a regular file", data="fifo-folder"),
    "fifo-as-the-data": Case("is a FIFO, not a regular file", data="fifo"),
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


# Outside the gate: flags of `resque fingerprint` / `resque publish` --------------------------------------------------
@pytest.mark.parametrize("command", ["fingerprint", "publish"])
def test_image_mean_of_the_wrong_length_is_one_line(env, command, tmp_path, capsys):
    root = env["root"]
    args = {
        "fingerprint": ["fingerprint", "--model", str(root / "cnn.onnx"), "--out", str(tmp_path / "fp"), "--data"],
        "publish": ["publish", "--model", str(root / "cnn.onnx"), "--name", "cnn-mean", "--tracking-uri", env["uri"],
                    "--reference"],
    }[command]  # fmt: skip
    if not (root / "cnn.onnx").exists():
        shutil.copy(stored_folder(env["uri"], "cnn") / "model.onnx", root / "cnn.onnx")
    code, err = cli([*args, str(env["data"]["images-good"]), "--image-mean", "0.5,0.5", "--provider", "cpu"], capsys)
    assert code == 2, err
    assert "image mean (--image-mean): 2 values (0.5, 0.5) for mode 'L', which has 1 channel; give 1 value" in err
    assert err.strip().count("\n") == 0, err


# Memory bombs: peak RSS of scoring them, against ordinary data of the same batch size (issue 15) ------------------
# VmHWM is this process's own peak since exec; getrusage's ru_maxrss would carry the (forked) pytest process's peak.
RSS_RUNNER = """
import sys
from resque_airflow.cli import main
code = main(sys.argv[1:])
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("RSS", hwm, code)
"""


def peak_rss_kb(args: list[str]) -> tuple[int, int, str]:
    """Peak RSS (KB) and exit code of ``resque ARGS`` in a fresh process."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", RSS_RUNNER, *args], capture_output=True, text=True, timeout=600)
    line = next(ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith("RSS "))
    _, rss, code = line.split()
    return int(rss), int(code), proc.stderr


def wide_mlp(path: Path, width: int) -> Path:
    """(N, width) -> Gemm -> Relu (N, 16) -> Gemm -> logits (N, 3): a model whose rows are wide, so that a
    compressed .npz of a few MB expands to a GB of rows."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(0, 0.05, (width, 16)).astype(np.float32), rng.normal(0, 0.5, (16, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["hidden"]),
         helper.make_node("Gemm", ["hidden", "w2"], ["logits"])],
        "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [onnx.numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"))],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def npz_bomb(path: Path, row: np.ndarray, rows: int) -> Path:
    """An .npz whose ``x`` is ``row`` repeated ``rows`` times (and labels 0, 1, 2, ...), written as a stream: a
    GB of rows in a few MB of file, without ever holding them."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as f:
            head = io.BytesIO()
            np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False,
                                                        "shape": (rows, row.size)})  # fmt: skip
            f.write(head.getvalue())
            block = np.tile(row.astype("<f4"), (256, 1)).tobytes()
            for _ in range(rows // 256):
                f.write(block)
        zf.writestr("y.npy", _npy_bytes(np.arange(rows, dtype="<i8") % 3))
    return path


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_npz_bomb_costs_one_batch_of_memory(tmp_path, capsys):
    """A 1 GB x in a ~5 MB .npz, scored with --batch-size 64: peak RSS within 1.2x of 2,048 ordinary rows."""
    width, rows = 4096, 65536
    model = wide_mlp(tmp_path / "wide.onnx", width)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", x=rng.normal(size=(300, width)).astype(np.float32), y=np.arange(300) % 3)
    np.savez(tmp_path / "ordinary.npz", x=rng.normal(size=(2048, width)).astype(np.float32), y=np.arange(2048) % 3)
    bomb = npz_bomb(tmp_path / "bomb.npz", rng.normal(size=width), rows)
    assert bomb.stat().st_size < 20e6  # about 5 MB on disk for 1 GB of float32 rows
    code, err = cli(["fingerprint", "--model", str(model), "--data", str(tmp_path / "ref.npz"), "--out",
                     str(tmp_path / "fp"), "--provider", "cpu"], capsys)  # fmt: skip
    assert code == 0, err
    score = ["score", "dist", "--model", str(model), "--fingerprint", str(tmp_path / "fp"), "--provider", "cpu",
             "--batch-size", "64", "--json", "--data"]  # fmt: skip
    ordinary, code_o, err_o = peak_rss_kb([*score, str(tmp_path / "ordinary.npz")])
    exploded, code_b, err_b = peak_rss_kb([*score, str(bomb)])
    assert code_o == 0 and code_b == 0, (err_o, err_b)
    print(f"peak RSS: ordinary {ordinary / 1024:.0f} MB, 1 GB npz bomb {exploded / 1024:.0f} MB")
    assert exploded <= 1.2 * ordinary, (ordinary, exploded)


def test_png_bombs_cost_no_memory(env, tmp_path):
    """Four PNGs of a few hundred KB declaring 144 Mpx each: refused before decoding; peak RSS within 1.2x of
    scoring four ordinary images with the same batch size."""
    folder = stored_folder(env["uri"], "cnn")
    ordinary = tmp_path / "ordinary"
    for k in range(4):
        (ordinary / str(k % 2)).mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 40 * k).save(ordinary / str(k % 2) / f"{k}.png")
    score = ["score", "dist", "--model", str(folder / "model.onnx"), "--fingerprint", str(folder / "extra_files"),
             "--provider", "cpu", "--batch-size", "64", "--data"]  # fmt: skip
    base, code_o, err_o = peak_rss_kb([*score, str(ordinary)])
    bombed, code_b, err_b = peak_rss_kb([*score, str(env["data"]["png-bombs"])])
    assert code_o == 0, err_o
    assert code_b == 2 and "declares 144 Mpx" in err_b, err_b
    print(f"peak RSS: ordinary images {base / 1024:.0f} MB, PNG bombs {bombed / 1024:.0f} MB")
    assert bombed <= 1.2 * base, (base, bombed)

"""torch export vs forward hook, the CLI's score vs torch features, and bad input through the CLI (exit 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_images

from resque_airflow.cli import main
from resque_airflow.core import ClassSums, resque_dist
from resque_airflow.runtime.embed import Embedder


def torch_features(model, x: np.ndarray) -> np.ndarray:
    """GAP of ``conv2``'s output, captured with a forward hook: the reference code's way."""
    import torch

    seen = []
    handle = model.conv2.register_forward_hook(lambda _m, _i, out: seen.append(out.mean((2, 3))))
    with torch.no_grad():
        model(torch.from_numpy(x))
    handle.remove()
    return seen[0].numpy().astype(np.float64)


def test_exposed_pooled_tensor_matches_torch_hook(cnn_onnx):
    model, path = cnn_onnx
    x, _ = make_images(37, seed=1)
    emb = Embedder(path.read_bytes(), provider="cpu")
    assert emb.exposed.layer == "conv2" and emb.exposed.pooling == "spatial"
    feats, logits = emb.run(x)
    np.testing.assert_allclose(feats, torch_features(model, x), atol=1e-4)
    assert logits.shape == (37, 4)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_score_equals_score_from_torch_features(cnn_onnx, write_npz, tmp_path, capsys):
    model, path = cnn_onnx
    xr, yr = make_images(300, seed=2)
    xs, ys = make_images(200, seed=3, shift=0.3)
    ref, new = write_npz("ref.npz", xr, yr), write_npz("new.npz", xs, ys)
    code, out, err = run_cli(
        ["fingerprint", "--model", str(path), "--data", str(ref), "--out", str(tmp_path / "fp")], capsys
    )
    assert code == 0, err
    code, out, err = run_cli(
        ["score", "dist", "--model", str(path), "--fingerprint", str(tmp_path / "fp"), "--data", str(new), "--json"],
        capsys,
    )
    assert code == 0, err
    result = json.loads(out)
    expected = resque_dist(
        ClassSums(4, 16).update(torch_features(model, xr), yr), ClassSums(4, 16).update(torch_features(model, xs), ys)
    )
    assert result["score"] == pytest.approx(expected.value, abs=1e-5)
    assert result["mode"] == "dist" and result["n_samples"] == 200 and result["provider"] == "cpu"
    assert set(result["per_class"]) == {"0", "1", "2", "3"}
    for label_source in ("predicted", "none"):
        code, out, _ = run_cli(
            ["score", "dist", "--model", str(path), "--fingerprint", str(tmp_path / "fp"), "--data", str(new), "--json",
             "--labels", label_source], capsys,
        )  # fmt: skip
        assert code == 0 and 0 <= json.loads(out)["score"] <= 1
    code, out, _ = run_cli(["score", "task", "--model", str(path), "--data", str(new), "--json"], capsys)
    assert code == 0 and json.loads(out)["mode"] == "task"


def test_cli_export_command(tmp_path, capsys):
    import torch

    from resque_airflow.cli import main as cli

    weights = tmp_path / "w.pt"
    from conftest import make_cnn

    torch.save(make_cnn().state_dict(), weights)
    code = cli(["export", "--factory", "conftest:make_cnn", "--weights", str(weights), "--input-shape", "1,1,8,8",
                "--layer", "conv2", "--out", str(tmp_path / "m.onnx"), "--json"])  # fmt: skip
    assert code == 0 and json.loads(capsys.readouterr().out)["layer"] == "conv2"


@pytest.fixture
def fp_dir(cnn_onnx, write_npz, tmp_path, capsys):
    _, path = cnn_onnx
    x, y = make_images(100, seed=4)
    ref = write_npz("ref.npz", x, y)
    assert main(["fingerprint", "--model", str(path), "--data", str(ref), "--out", str(tmp_path / "fp")]) == 0
    capsys.readouterr()
    return tmp_path / "fp"


def bad_inputs(tmp_path, write_npz, cnn_path):
    x, y = make_images(20, seed=5)
    nan = x.copy()
    nan[3, 0, 2, 2] = np.nan
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(cnn_path.read_bytes()[:200])
    return {
        "nan": (write_npz("nan.npz", nan, y), cnn_path, "NaN or infinite"),
        "shape": (write_npz("shape.npz", x.reshape(20, 1, 4, 16), y), cnn_path, "does not fit the model input"),
        "empty": (write_npz("empty.npz", x[:0], y[:0]), cnn_path, "holds no samples"),
        "labels": (write_npz("labels.npz", x, y + 7), cnn_path, "outside the fingerprint's classes"),
        "corrupt": (write_npz("ok.npz", x, y), corrupt, "fingerprint is for a model with sha256"),
    }


@pytest.mark.parametrize("case", ["nan", "shape", "empty", "labels", "corrupt"])
def test_cli_bad_input_exits_2_with_one_line(case, cnn_onnx, fp_dir, write_npz, tmp_path, capsys):
    data, model, message = bad_inputs(tmp_path, write_npz, cnn_onnx[1])[case]
    code, _, err = run_cli(
        ["score", "dist", "--model", str(model), "--fingerprint", str(fp_dir), "--data", str(data)], capsys
    )
    assert code == 2
    assert message in err and err.strip().count("\n") == 0


def test_cli_corrupt_onnx_is_named(tmp_path, write_npz, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    x, y = make_images(10, seed=0)
    code, _, err = run_cli(
        ["fingerprint", "--model", str(bad), "--data", str(write_npz("d.npz", x, y)), "--out", str(tmp_path / "f")],
        capsys,
    )
    assert code == 2 and "not a valid ONNX" in err


def test_cli_fingerprint_of_another_model(cnn_onnx, fp_dir, tmp_path, write_npz, capsys):
    import torch
    from conftest import _Net

    from resque_airflow.runtime.export import export_torch

    other = tmp_path / "other.onnx"
    export_torch(_Net.build(seed=1), torch.randn(1, 1, 8, 8), other, layer="conv2")
    x, y = make_images(10, seed=0)
    code, _, err = run_cli(
        ["score", "dist", "--model", str(other), "--fingerprint", str(fp_dir), "--data", str(write_npz("d.npz", x, y))],
        capsys,
    )
    assert code == 2 and "recompute the fingerprint" in err


def test_installed_entry_point_exit_code(tmp_path):
    # The console script sits beside the interpreter running the tests (the venv may not be on PATH).
    exe = shutil.which("resque", path=str(Path(sys.executable).parent)) or shutil.which("resque")
    assert exe, "the resque console script is not installed (pip install -e .)"
    proc = subprocess.run([exe, "score", "dist", "--model", str(tmp_path / "none.onnx"), "--fingerprint", str(tmp_path),
                           "--data", str(tmp_path)], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "not found" in proc.stderr

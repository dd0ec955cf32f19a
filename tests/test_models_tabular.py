"""Tabular models: skl2onnx pipelines on a bundled scikit-learn data set via Parquet (integer feature columns),
probabilities as the class scores (never softmaxed again), ZipMap, a sigmoid output, inputs of other dtypes, and a
tree ensemble's one-line error (issue 13, "Tabular")."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from models_support import FLOAT, digits_split, onnx_model, skl_onnx, value, write_tabular_parquet
from onnx import TensorProto, helper

from resque_airflow.cli import main
from resque_airflow.runtime.pipeline import fingerprint_model, score_dist

pytest.importorskip("skl2onnx")


@pytest.fixture(scope="module")
def tab(tmp_path_factory):
    """digits thirds as Parquet; a scaler + MLP pipeline (probabilities tensor and ZipMap), a ZipMap logistic
    regression, a random forest, all converted by skl2onnx."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    d = tmp_path_factory.mktemp("tabular")
    (xt, yt), (xr, yr), (xn, yn) = digits_split()
    write_tabular_parquet(d / "ref.parquet", xr, yr)
    write_tabular_parquet(d / "new.parquet", xn, yn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlp = make_pipeline(StandardScaler(), MLPClassifier((32,), max_iter=400, random_state=0)).fit(xt, yt)
        lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(xt, yt)
        rf = RandomForestClassifier(20, random_state=0).fit(xt, yt)
    skl_onnx(mlp, xt, d / "mlp.onnx", zipmap=False)
    skl_onnx(mlp, xt, d / "mlp-zipmap.onnx", zipmap=True)
    skl_onnx(lr, xt, d / "lr-zipmap.onnx", zipmap=True)
    skl_onnx(rf, xt, d / "forest.onnx", zipmap=False)
    return {"dir": d, "mlp": mlp, "lr": lr, "ref": (xr, yr)}


@pytest.mark.parametrize(
    ("name", "estimator", "layer", "scores"),
    [
        ("mlp", "mlp", "next_activations", "probabilities"),
        ("mlp-zipmap", "mlp", "next_activations", "out_activations_result"),  # the tensor the ZipMap reads
        ("lr-zipmap", "lr", "variable", "probabilities"),  # the scaled features the linear classifier reads
    ],
)
def test_skl2onnx_probabilities_are_the_class_scores_never_softmaxed_again(tab, name, estimator, layer, scores):
    d = tab["dir"]
    xr, yr = tab["ref"]
    fp = fingerprint_model(str(d / f"{name}.onnx"), str(d / "ref.parquet"), provider="cpu")
    assert (fp.layer, fp.pooling, fp.logits_output) == (layer, "none", scores)
    proba = tab[estimator].predict_proba(xr)
    assert fp.summary.accuracy == pytest.approx((proba.argmax(1) == yr).mean())
    # The bug: softmax over probabilities gave 0.69 where the model said 0.915.
    assert fp.summary.confidence == pytest.approx(proba.max(1).mean(), abs=1e-5)
    result = score_dist(str(d / f"{name}.onnx"), fp, str(d / "new.parquet"), provider="cpu")
    assert not result.calibration.detection.detected, result.calibration.detection


def test_clean_tabular_batch_is_reused_by_the_gate(tab, tmp_path):
    from resque_airflow.registry.client import make_client
    from resque_airflow.registry.gate import GateRequest, run_gate
    from resque_airflow.registry.publish import publish_model

    d, uri = tab["dir"], f"sqlite:///{tmp_path}/mlflow.db"
    publish_model(tracking_uri=uri, name="digits-mlp", model_path=d / "mlp-zipmap.onnx",
                  reference=str(d / "ref.parquet"), provider="cpu")  # fmt: skip
    outcome = run_gate(GateRequest("models:/digits-mlp@champion", str(d / "new.parquet"), provider="cpu"),
                       client=make_client(uri))  # fmt: skip
    assert outcome.decision == "reuse", outcome.reason


def test_tree_ensemble_is_one_line_saying_why_and_what_to_do(tab, tmp_path, capsys):
    d = tab["dir"]
    args = ["fingerprint", "--model", str(d / "forest.onnx"), "--data", str(d / "ref.parquet"), "--provider", "cpu"]
    code = main([*args, "--out", str(tmp_path / "fp")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "tree ensemble (TreeEnsembleClassifier node" in err and "name a tensor with layer=" in err
    # What the message proposes works: the probability vectors as the representation.
    assert main([*args, "--out", str(tmp_path / "fp"), "--layer", "probabilities"]) == 0


def _hidden(input_type, head, n_out: int, out_name: str = "scores"):
    """(N, 6) ``input_type`` -> Cast -> Gemm -> Relu ("hidden", (N, 8)) -> Gemm (N, n_out) -> ``head``."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(8, n_out)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Gemm", ["xf", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "w2"], ["z"]),
        *([helper.make_node(head, ["z"], [out_name])] if head else [helper.make_node("Identity", ["z"], [out_name])]),
    ]
    return onnx_model(nodes, [("w1", w1), ("w2", w2)], [value("x", input_type, ["N", 6])],
                      [value(out_name, FLOAT, ["N", n_out])])  # fmt: skip


def test_single_sigmoid_output_carries_two_classes(tmp_path):
    x = np.random.default_rng(1).normal(size=(200, 6)).astype(np.float32)
    (tmp_path / "sig.onnx").write_bytes(_hidden(FLOAT, "Sigmoid", 1))
    import onnxruntime as ort

    p = ort.InferenceSession(str(tmp_path / "sig.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y = (p[:, 0] > 0.5).astype(np.int64)
    np.savez(tmp_path / "ref.npz", x=x, y=y)
    fp = fingerprint_model(str(tmp_path / "sig.onnx"), str(tmp_path / "ref.npz"), provider="cpu")
    assert fp.num_classes == 2 and fp.summary.accuracy == 1.0
    assert fp.summary.confidence == pytest.approx(np.maximum(p, 1 - p).mean(), abs=1e-6)


@pytest.mark.parametrize(
    ("elem", "dtype"),
    [(TensorProto.FLOAT16, np.float16), (TensorProto.DOUBLE, np.float64), (TensorProto.INT64, np.int64)],
)
def test_inputs_are_fed_in_their_own_dtype(tmp_path, capsys, elem, dtype):
    rng = np.random.default_rng(2)
    x = rng.integers(-3, 4, size=(120, 6)) if dtype == np.int64 else rng.normal(size=(120, 6))
    y = rng.integers(0, 3, 120)
    (tmp_path / "m.onnx").write_bytes(_hidden(elem, None, 3))
    np.savez(tmp_path / "ref.npz", x=x.astype(dtype), y=y)
    np.savez(tmp_path / "f32.npz", x=x.astype(np.float32), y=y)
    fp_dir = tmp_path / "fp"
    assert main(["fingerprint", "--model", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "ref.npz"),
                 "--out", str(fp_dir), "--provider", "cpu"]) == 0  # fmt: skip
    code = main(["score", "dist", "--model", str(tmp_path / "m.onnx"), "--fingerprint", str(fp_dir), "--data",
                 str(tmp_path / "f32.npz"), "--provider", "cpu", "--json"])  # fmt: skip
    err = capsys.readouterr().err
    if dtype == np.int64:  # float data for integer ids is refused, naming the dtype the model really takes
        assert code == 2 and "x has dtype float32, but the model takes int64 for input 'x'" in err, err
    else:  # float32 data for a float16/float64 input is converted
        assert code == 0, err

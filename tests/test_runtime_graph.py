"""Graph surgery on models this project did not export (built with onnx.helper), and provider choice."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from resque_airflow.core import ModelError, ResqueInputError
from resque_airflow.runtime.embed import Embedder
from resque_airflow.runtime.graph import expose_layer, find_layer, load_model
from resque_airflow.runtime.session import create_session

RNG = np.random.default_rng(0)
W1, W2 = RNG.normal(size=(6, 16)).astype(np.float32), RNG.normal(size=(16, 3)).astype(np.float32)
WT, WH = RNG.normal(size=(4, 8)).astype(np.float32), RNG.normal(size=(8, 3)).astype(np.float32)


def _model(nodes, inits, inp, out, opset):
    graph = helper.make_graph(nodes, "g", [inp], [out], [numpy_helper.from_array(a, n) for n, a in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9  # onnx 1.23 writes IR 14 by default, which ONNX Runtime refuses
    return model.SerializeToString()


def mlp(opset: int = 18) -> bytes:
    """(N, 6) -> Gemm -> Relu -> Gemm -> logits (N, 3): no convolutions."""
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "w2"], ["logits"]),
    ]
    return _model(
        nodes, [("w1", W1), ("w2", W2)],
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]), opset,
    )  # fmt: skip


def token_model(opset: int) -> bytes:
    """(N, T, 4) tokens -> MatMul -> Relu (N, T, 8) -> mean over T -> MatMul -> logits (N, 3)."""
    if opset >= 18:
        reduce = helper.make_node("ReduceMean", ["tok", "axes"], ["pooled"], keepdims=0)
        inits = [("wt", WT), ("wh", WH), ("axes", np.array([1], np.int64))]
    else:
        reduce = helper.make_node("ReduceMean", ["tok"], ["pooled"], axes=[1], keepdims=0)
        inits = [("wt", WT), ("wh", WH)]
    nodes = [
        helper.make_node("MatMul", ["x", "wt"], ["t"]),
        helper.make_node("Relu", ["t"], ["tok"]),
        reduce,
        helper.make_node("MatMul", ["pooled", "wh"], ["logits"]),
    ]
    return _model(
        nodes, inits,
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 4]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]), opset,
    )  # fmt: skip


def test_auto_layer_on_mlp_is_classifier_input():
    x = RNG.normal(size=(7, 6)).astype(np.float32)
    emb = Embedder(mlp(), provider="cpu")
    assert emb.exposed.layer == "hidden" and emb.exposed.pooling == "none"
    feats, logits = emb.run(x)
    hidden = np.maximum(x @ W1, 0)
    np.testing.assert_allclose(feats, hidden, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, hidden @ W2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opset", [13, 18])
def test_token_sequence_tensor_is_mean_pooled_over_tokens(opset):
    x = RNG.normal(size=(3, 5, 4)).astype(np.float32)
    emb = Embedder(token_model(opset), layer="tok", provider="cpu")
    assert emb.exposed.pooling == "tokens"
    feats, logits = emb.run(x)
    np.testing.assert_allclose(feats, np.maximum(x @ WT, 0).mean(axis=1), rtol=1e-5, atol=1e-5)
    assert logits.shape == (3, 3)
    assert find_layer(load_model(token_model(opset))) == "pooled"  # auto: input of the final MatMul


def test_unknown_layer_and_bad_files():
    with pytest.raises(ModelError, match="no tensor named 'nope'"):
        expose_layer(load_model(mlp()), "nope")
    with pytest.raises(ModelError, match="not a valid ONNX"):
        load_model(b"this is not onnx")
    with pytest.raises(ModelError, match=r"not a valid ONNX|truncated"):
        load_model(mlp()[: len(mlp()) // 2])


def test_provider_choice_on_a_cpu_machine(caplog):
    import onnxruntime as ort

    caplog.set_level("INFO")
    s = create_session(mlp(), "auto")
    assert s.provider in ("cpu", "cuda")
    assert any("asked auto, obtained" in r.message for r in caplog.records)
    if "CUDAExecutionProvider" not in ort.get_available_providers() or s.provider == "cpu":
        with pytest.raises(ResqueInputError, match="provider='cuda'"):
            create_session(mlp(), "cuda")
    with pytest.raises(ResqueInputError, match="provider"):
        create_session(mlp(), "tpu")


def test_input_shape_is_checked():
    emb = Embedder(mlp(), provider="cpu")
    with pytest.raises(ResqueInputError, match=r"does not fit the model input 'x'"):
        emb.check_input(np.zeros((2, 5), np.float32), "t")
    with pytest.raises(ResqueInputError, match="NaN"):
        emb.check_input(np.full((2, 6), np.nan, np.float32), "t")

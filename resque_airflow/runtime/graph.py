"""ONNX graph surgery: expose one intermediate tensor as an extra output, pooled inside the graph (DESIGN.md 2.3).

Only the pooled ``(N, D)`` values leave the device; the rest of the graph is untouched, so the class scores are
exactly the original model's. Which tensor, which layout and which output carries the classes is read by
:mod:`resque_airflow.runtime.layers`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from resque_airflow.errors import ModelError
from resque_airflow.runtime.exposed import ExposedModel
from resque_airflow.runtime.layers import (
    LAYER_METADATA_KEY,
    choose_layer,
    find_layer,
    infer,
    logits_source,
    mask_input,
    probe_shapes,
    producers,
    tensor_type,
    trace_layout,
)

__all__ = ["LAYER_METADATA_KEY", "POOLINGS", "ExposedModel", "expose_layer", "find_layer", "load_model"]


POOLED_SUFFIX = "/resque_pooled"
# What a user may ask for; "auto" resolves by rank and layout to one of the recorded values below it.
POOLINGS = ("auto", "mean", "cls", "spatial", "spatial-last", "tokens", "tokens-masked", "none")
RECORDED_POOLINGS = ("spatial", "spatial-last", "tokens", "tokens-masked", "cls", "none")


def load_model(path_or_bytes: str | bytes) -> onnx.ModelProto:
    """Load an ONNX model, raising :class:`ModelError` with the file name when it is not a valid model."""
    what = "model bytes" if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    try:
        if isinstance(path_or_bytes, bytes):
            model = onnx.load_model_from_string(path_or_bytes)
        else:
            model = onnx.load(path_or_bytes)
    except FileNotFoundError as exc:
        raise ModelError(f"model: {what} not found") from exc
    except Exception as exc:  # protobuf raises DecodeError and friends; the message is what matters
        raise ModelError(f"model: {what} is not a valid ONNX file (truncated or another format?): {exc}") from exc
    if not model.graph.node or not model.graph.output:
        raise ModelError(f"model: {what} is not a valid ONNX model (no graph nodes or outputs)")
    return model


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 13


def _rank(inferred: onnx.ModelProto, original: onnx.ModelProto, name: str) -> int:
    shape, _ = tensor_type(inferred, name)
    if shape is not None:
        return len(shape)
    producer = producers(original).get(name)
    if producer is not None and producer.op_type == "Conv":
        return 4
    probed = probe_shapes(original, [name]).get(name)
    if probed is not None:
        return len(probed)
    raise ModelError(f"layer: cannot infer the rank of tensor {name!r}; export the model with shapes")


# C901 12: the pooling rules by rank and layout in the docstring are one decision table; read top to bottom.
def resolve_pooling(model: onnx.ModelProto, name: str, rank: int, pooling: str = "auto") -> tuple[str, str]:
    """``(pooling, why)`` for tensor ``name`` of rank ``rank``, as recorded in the fingerprint.

    Rules: rank 2 is used as is. Rank 3 is a token sequence ``(N, T, D)`` unless it comes from a convolution
    (``(N, C, L)``: mean over L); tokens are averaged over the real tokens when the model has an attention-mask
    input (padding changes nothing), over all T otherwise; ``pooling="cls"`` takes token 0 instead (the rule of
    BERT-style models, whose classifier reads the first token). Rank 4 is averaged over H, W: channels-first after a
    convolution, channels-last after a transpose to NHWC or a MatMul; an unknown layout is read from the static
    shape (``(N, 1, 1, C)`` or square H, W in the middle: channels-last), else channels-first.
    """
    if pooling not in POOLINGS:
        raise ModelError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
    if pooling not in ("auto", "mean"):
        return pooling, "named by the user"
    if rank == 2:
        return "none", "(N, D): used as is"
    layout = trace_layout(model, name)
    if rank == 3:
        if layout == "first" and pooling == "auto":
            return "spatial", "(N, C, L) from a convolution: mean over L"
        if mask_input(model):
            return "tokens-masked", f"(N, T, D) tokens: mean over the real tokens ({mask_input(model)!r})"
        return "tokens", "(N, T, D) tokens: mean over T (the model has no attention mask)"
    if rank == 4:
        if layout == "last":
            return "spatial-last", "(N, H, W, C) channels-last: mean over H, W"
        if layout == "first":
            return "spatial", "(N, C, H, W) from a convolution: mean over H, W"
        shape, _ = tensor_type(infer(model), name)
        dims = shape[1:] if shape else ()
        if len(dims) == 3 and all(isinstance(d, int) for d in dims):
            a, b, c = dims
            if a == b != c:  # (N, H, W, C) with H == W (or 1 x 1); (N, C, H, W) has its equal pair at the end
                return "spatial-last", f"shape {tuple(shape)} reads as (N, H, W, C): mean over H, W"
        return "spatial", "(N, C, H, W): mean over H, W"
    raise ModelError(f"layer: tensor {name!r} has rank {rank}; expected (N, D), (N, T, D), (N, C, L) or (N, C, H, W)")


def _check_pooling(pooling: str, rank: int, name: str, mask: str | None) -> None:
    ranks = {"none": (2,), "tokens": (3,), "tokens-masked": (3,), "cls": (3,), "spatial": (3, 4), "spatial-last": (4,)}
    if rank not in ranks[pooling]:
        raise ModelError(f"pooling={pooling!r} does not apply to tensor {name!r} of rank {rank}; use pooling='auto'")
    if pooling == "tokens-masked" and mask is None:
        raise ModelError("pooling='tokens-masked': the model has no attention-mask input; use pooling='tokens'")


def _const(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    return name


def _reduce(graph, op: str, x: str, out: str, axes: list[int], keepdims: int, opset: int) -> None:
    """``op`` (ReduceMean / ReduceSum) over ``axes``: an attribute before its opset moved axes to an input."""
    moved = 13 if op == "ReduceSum" else 18
    if opset >= moved:
        axes_name = _const(graph, out + "/axes", np.array(axes, np.int64))
        graph.node.append(helper.make_node(op, [x, axes_name], [out], name=out, keepdims=keepdims))
    else:
        graph.node.append(helper.make_node(op, [x], [out], name=out, axes=axes, keepdims=keepdims))


def _pool(model: onnx.ModelProto, name: str, rank: int, pooling: str, elem_type: int, mask: str | None) -> str:
    """Append the pooling nodes to ``model``'s graph; returns the ``(N, D)`` pooled tensor's name."""
    graph, opset, pooled = model.graph, _opset(model), name + POOLED_SUFFIX
    if pooling == "none":
        graph.node.append(helper.make_node("Identity", [name], [pooled], name=pooled))
    elif pooling in ("spatial", "spatial-last", "tokens"):
        axes = {"spatial": list(range(2, rank)), "spatial-last": [1, 2], "tokens": [1]}[pooling]
        _reduce(graph, "ReduceMean", name, pooled, axes, 0, opset)
    elif pooling == "cls":
        index = _const(graph, pooled + "/index", np.array(0, np.int64))
        graph.node.append(helper.make_node("Gather", [name, index], [pooled], name=pooled, axis=1))
    else:  # tokens-masked: sum(h * m) / max(sum(m), 1), the mask cast to the tensor's type
        np_type = helper.tensor_dtype_to_np_dtype(elem_type)
        m, m3, hm, s, c, c1 = (f"{pooled}/{p}" for p in ("mask", "mask3", "masked", "sum", "count", "count1"))
        graph.node.append(helper.make_node("Cast", [mask], [m], name=m, to=elem_type))
        if opset >= 13:
            axes = _const(graph, m3 + "/axes", np.array([2], np.int64))
            graph.node.append(helper.make_node("Unsqueeze", [m, axes], [m3], name=m3))
        else:
            graph.node.append(helper.make_node("Unsqueeze", [m], [m3], name=m3, axes=[2]))
        graph.node.append(helper.make_node("Mul", [name, m3], [hm], name=hm))
        _reduce(graph, "ReduceSum", hm, s, [1], 0, opset)
        _reduce(graph, "ReduceSum", m, c, [1], 1, opset)
        one = _const(graph, c1 + "/one", np.array(1, np_type))
        graph.node.append(helper.make_node("Max", [c, one], [c1], name=c1))  # a row of padding only: 0, not NaN
        graph.node.append(helper.make_node("Div", [s, c1], [pooled], name=pooled))
    return pooled


def expose_layer(model: onnx.ModelProto, layer: str = "auto", pooling: str = "auto") -> ExposedModel:
    """Return a copy of ``model`` whose outputs are the class scores and the pooled representation at ``layer``.

    ``pooling``: ``"auto"`` (see :func:`resolve_pooling`), ``"mean"`` (tokens over the real tokens), ``"cls"``, or
    a recorded value (a fingerprint's). The class scores are the first float ``(N, C)`` output, or the probability
    tensor behind a ZipMap output. Works on any ONNX model, exported by this project or not.
    """
    choice = choose_layer(model, layer)
    name = choice.name
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    inferred = infer(edited)
    rank = _rank(inferred, edited, name)
    _, elem_type = tensor_type(inferred, name)
    elem_type = elem_type or TensorProto.FLOAT
    resolved, why = resolve_pooling(edited, name, rank, pooling)
    mask = mask_input(edited)
    _check_pooling(resolved, rank, name, mask)
    # The class scores may be the representation itself (a tree ensemble's probabilities, named as the layer).
    source = logits_source(edited, exclude=name) or logits_source(edited)
    pooled = _pool(edited, name, rank, resolved, elem_type, mask if resolved == "tokens-masked" else None)
    graph = edited.graph
    originals = {o.name: o for o in graph.output}
    del graph.output[:]
    if source is not None:
        if source.name in originals:
            graph.output.append(originals[source.name])
        else:  # an intermediate tensor (the ZipMap's input)
            _, src_type = tensor_type(inferred, source.name)
            graph.output.append(helper.make_tensor_value_info(source.name, src_type or TensorProto.FLOAT, None))
    graph.output.append(helper.make_tensor_value_info(pooled, elem_type, None))
    return ExposedModel(
        model=edited,
        layer=name,
        pooled_output=pooled,
        pooling=resolved,
        logits_output=source.name if source else None,
        input_name=graph.input[0].name if graph.input else "",
        logits_kind=source.kind if source else "logits",
        layer_reason=choice.reason,
        mask_input=mask if resolved == "tokens-masked" else None,
        pooling_reason=why,
        logits_reason=source.reason if source else "",
        metadata={p.key: p.value for p in model.metadata_props},
    )

"""ONNX graph surgery: expose one intermediate tensor as an extra output, pooled inside the graph (DESIGN.md 2.3).

Only the pooled ``(N, D)`` values leave the device; the rest of the graph is untouched, so the logits are exactly the
original model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper, shape_inference

from resque_airflow.errors import ModelError

POOLED_SUFFIX = "/resque_pooled"
LAYER_METADATA_KEY = "resque.layer"  # written by export_torch: the representation tensor's name


@dataclass(frozen=True)
class ExposedModel:
    """A model with its representation exposed.

    Attributes:
        model: the edited graph; outputs are ``[logits_output?, pooled_output]``.
        layer: name of the exposed tensor in the original graph.
        pooled_output: name of the new ``(N, D)`` output.
        pooling: ``"spatial"`` (mean over H, W or L of a channels-first tensor), ``"tokens"`` (mean over T of
            (N, T, D)) or ``"none"`` ((N, D) as is).
        logits_output: the model's first original output (used for predicted labels), or None.
        input_name: the model's (first) input.
    """

    model: onnx.ModelProto
    layer: str
    pooled_output: str
    pooling: str
    logits_output: str | None
    input_name: str


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


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def find_layer(model: onnx.ModelProto, layer: str = "auto") -> str:
    """Resolve ``layer`` to a tensor name of ``model``.

    ``"auto"``: the tensor recorded by :func:`~resque_airflow.runtime.export.export_torch` in the model's metadata
    if any; else the output of the last Conv node; else the input of the final Gemm/MatMul (the classifier's input).
    Any other value must name a tensor (a node output or graph input) of the graph.
    """
    graph = model.graph
    if layer == "auto":
        hint = {p.key: p.value for p in model.metadata_props}.get(LAYER_METADATA_KEY)
        if hint:
            return hint
        convs = [n for n in graph.node if n.op_type == "Conv"]
        if convs:
            return convs[-1].output[0]
        initializers = {t.name for t in graph.initializer}
        for node in reversed(graph.node):
            if node.op_type in ("Gemm", "MatMul"):
                # The data operand is the one that is not a weight.
                data = [i for i in node.input[:2] if i not in initializers]
                if data:
                    return data[0]
        raise ModelError("layer='auto': the model has no Conv, Gemm or MatMul node; name the tensor with layer=")
    known = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    if layer not in known:
        sample = sorted(_producers(model))[-5:]
        raise ModelError(f"layer: the model has no tensor named {layer!r}; some tensor names: {sample}")
    return layer


def _tensor_rank_and_type(model: onnx.ModelProto, name: str) -> tuple[int | None, int]:
    for vi in [*model.graph.value_info, *model.graph.output, *model.graph.input]:
        if vi.name == name and vi.type.HasField("tensor_type"):
            t = vi.type.tensor_type
            rank = len(t.shape.dim) if t.HasField("shape") else None
            return rank, t.elem_type or TensorProto.FLOAT
    return None, TensorProto.FLOAT


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 13


def expose_layer(model: onnx.ModelProto, layer: str = "auto") -> ExposedModel:
    """Return a copy of ``model`` whose outputs are the logits and the pooled representation at ``layer``.

    Pooling by rank: (N, C, H, W) or (N, C, L) from a Conv -> mean over the spatial axes; (N, T, D) -> mean over T;
    (N, D) as is. Works on any ONNX model, exported by this project or not.
    """
    name = find_layer(model, layer)
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    try:
        inferred = shape_inference.infer_shapes(edited)
    except Exception:  # shape inference is best effort; the rank may then be known from the producer
        inferred = edited
    rank, elem_type = _tensor_rank_and_type(inferred, name)
    producer = _producers(edited).get(name)
    if rank is None:
        if producer is not None and producer.op_type == "Conv":
            rank = 4
        else:
            raise ModelError(f"layer: cannot infer the rank of tensor {name!r}; export the model with shapes")
    channels_first = producer is not None and producer.op_type in (
        "Conv",
        "BatchNormalization",
        "MaxPool",
        "AveragePool",
    )
    if rank == 2:
        axes, pooling = [], "none"
    elif rank >= 3 and (channels_first or rank == 4):
        axes, pooling = list(range(2, rank)), "spatial"
    elif rank == 3:
        axes, pooling = [1], "tokens"
    else:
        raise ModelError(f"layer: tensor {name!r} has rank {rank}; expected (N, D), (N, T, D) or (N, C, H, W)")

    graph = edited.graph
    pooled = name + POOLED_SUFFIX
    if not axes:
        graph.node.append(helper.make_node("Identity", [name], [pooled], name=pooled))
    elif _opset(edited) >= 18:
        axes_name = pooled + "/axes"
        graph.initializer.append(helper.make_tensor(axes_name, TensorProto.INT64, [len(axes)], axes))
        graph.node.append(helper.make_node("ReduceMean", [name, axes_name], [pooled], name=pooled, keepdims=0))
    else:
        graph.node.append(helper.make_node("ReduceMean", [name], [pooled], name=pooled, axes=axes, keepdims=0))
    originals = [o for o in graph.output if o.name != name]
    logits = originals[0].name if originals else None
    del graph.output[:]
    graph.output.extend(originals[:1])
    graph.output.append(helper.make_tensor_value_info(pooled, elem_type, None))
    return ExposedModel(
        model=edited,
        layer=name,
        pooled_output=pooled,
        pooling=pooling,
        logits_output=logits,
        input_name=graph.input[0].name if graph.input else "",
    )

"""Reading an ONNX graph: which tensor is the representation, how it is laid out, which output carries the classes.

Pure inspection (nothing here edits a graph): :mod:`resque_airflow.runtime.graph` does the surgery from what these
functions decide, and ``resque layers`` prints :func:`candidate_layers` so a user can choose.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, shape_inference

from resque_airflow.errors import ModelError

LAYER_METADATA_KEY = "resque.layer"  # written by export_torch: the representation tensor's name

# Ops through which a tensor keeps the layout of its (first non-constant) input.
_SAME_LAYOUT = frozenset((
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Gelu",
    "Erf", "Softplus", "Softsign", "Mish", "Identity", "Dropout", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Neg",
    "Abs", "Cast", "Max", "Min",
))  # fmt: skip
_CHANNELS_FIRST = frozenset((
    "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool", "BatchNormalization",
    "InstanceNormalization", "LRN", "GlobalAveragePool", "GlobalMaxPool", "Resize", "Upsample", "DepthToSpace",
    "SpaceToDepth",
))  # fmt: skip
_FEATURES_LAST = frozenset(
    ("MatMul", "Gemm", "LayerNormalization", "Softmax", "Gather", "Attention", "MultiHeadAttention")
)
_TREES = frozenset(("TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble"))
_LINEAR_ML = frozenset(("LinearClassifier", "LinearRegressor", "SVMClassifier", "SVMRegressor"))
_PASS_THROUGH = frozenset(("Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze"))
FLOAT_TYPES = frozenset((TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16))


@dataclass(frozen=True)
class LayerChoice:
    """The representation tensor and, for ``layer="auto"``, why it was chosen (one sentence for the log)."""

    name: str
    reason: str


@dataclass(frozen=True)
class LogitsSource:
    """The tensor read for predicted labels and confidence.

    ``kind``: ``"logits"`` (softmax gives the probabilities) or ``"probabilities"`` (already probabilities: never
    softmaxed again; a single column is P(class 1)). ``reason`` says how it was found.
    """

    name: str
    kind: str
    reason: str


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """The node producing each tensor name."""
    return {out: node for node in model.graph.node for out in node.output}


def infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with inferred shapes where ONNX can infer them (best effort: the model itself when it cannot)."""
    try:
        return shape_inference.infer_shapes(model)
    except Exception:  # custom domains and odd graphs: shapes are then known only where the file declares them
        return model


def tensor_type(model: onnx.ModelProto, name: str) -> tuple[tuple[int | str | None, ...] | None, int | None]:
    """``(shape, elem_type)`` of tensor ``name`` as declared or inferred; shape entries are ints, symbolic names or
    None; ``(None, None)`` when unknown."""
    for vi in [*model.graph.value_info, *model.graph.output, *model.graph.input]:
        if vi.name == name and vi.type.HasField("tensor_type"):
            t = vi.type.tensor_type
            shape = (
                tuple(
                    d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                    for d in t.shape.dim
                )
                if t.HasField("shape")
                else None
            )
            return shape, t.elem_type or None
    return None, None


def _initializers(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer} | {
        n.output[0] for n in model.graph.node if n.op_type == "Constant" and n.output
    }


def _data_inputs(node: onnx.NodeProto, constants: set[str]) -> list[str]:
    return [i for i in node.input if i and i not in constants]


def choose_layer(model: onnx.ModelProto, layer: str = "auto") -> LayerChoice:
    """Resolve ``layer`` to a tensor of ``model``, saying why for ``"auto"``.

    ``"auto"``: the tensor recorded by :func:`~resque_airflow.runtime.export.export_torch` in the model's metadata
    if any; else the output of the last Conv node; else the data input of the final Gemm/MatMul (the classifier's
    input: the last hidden layer) or of a linear ``ai.onnx.ml`` classifier. A tree ensemble has no representation:
    the error says so and what to do. Any other value must name a tensor (a node output or graph input).
    """
    graph = model.graph
    if layer != "auto":
        known = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
        if layer not in known:
            names = [c.name for c in candidate_layers(model)][-8:]
            raise ModelError(
                f"layer: the model has no tensor named {layer!r}; candidates: {names} (all with shapes: resque layers "
                "--model MODEL)"
            )
        return LayerChoice(layer, "named by the user")
    hint = {p.key: p.value for p in model.metadata_props}.get(LAYER_METADATA_KEY)
    if hint:
        return LayerChoice(hint, f"recorded in the model's metadata ({LAYER_METADATA_KEY}) at export")
    convs = [n for n in graph.node if n.op_type == "Conv"]
    if convs:
        return LayerChoice(convs[-1].output[0], f"output of the last Conv node {convs[-1].name or '(unnamed)'!r}")
    constants = _initializers(model)
    for node in reversed(graph.node):
        if node.op_type in ("Gemm", "MatMul") or node.op_type in _LINEAR_ML:
            data = _data_inputs(node, constants)[:1] if node.op_type in _LINEAR_ML else _data_inputs(node, constants)
            # A MatMul of two activations (attention scores) is not a classifier; a classifier has one weight.
            if len(data) == 1:
                what = "its features" if node.op_type in _LINEAR_ML else "the last hidden layer"
                return LayerChoice(
                    data[0], f"input of the final {node.op_type} node {node.name or '(unnamed)'!r} (the classifier's "
                    f"input: {what})",
                )  # fmt: skip
    trees = [n for n in graph.node if n.op_type in _TREES]
    if trees:
        outs = [o.name for o in graph.output]
        raise ModelError(
            f"layer='auto': the model is a tree ensemble ({trees[0].op_type} node {trees[0].name or '(unnamed)'!r}), "
            f"which has no hidden representation to compare; name a tensor with layer= (e.g. its probabilities, one "
            f"of {outs}) to compare probability vectors, or gate it on label-free signals of its probabilities"
        )
    raise ModelError(
        "layer='auto': the model has no Conv, Gemm or MatMul node; name the tensor with layer= (list them: resque "
        "layers --model MODEL)"
    )


def find_layer(model: onnx.ModelProto, layer: str = "auto") -> str:
    """The tensor name :func:`choose_layer` resolves ``layer`` to."""
    return choose_layer(model, layer).name


# C901 11: a walk back through the graph with one branch per family of layout-keeping or layout-setting ops.
def trace_layout(model: onnx.ModelProto, name: str) -> str:
    """Where the channels of tensor ``name`` are: ``"first"`` (after Conv/pooling: ``(N, C, ...)``), ``"last"``
    (after a MatMul/LayerNorm or a transpose to channels-last: ``(N, ..., C)``) or ``"unknown"``.

    Walks back through ops that keep their input's layout (activations, element-wise arithmetic, normalisation).
    """
    prods = producers(model)
    constants = _initializers(model)
    for _ in range(200):  # bounded: a malformed graph may have cycles
        node = prods.get(name)
        if node is None:
            return "unknown"
        op = node.op_type
        if op in _CHANNELS_FIRST:
            return "first"
        if op == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [])
            if perm == [0, 2, 1]:
                return "first"  # (N, T, C) -> (N, C, T): the usual way into a 1-D conv
            if perm == [0, 2, 3, 1]:
                return "last"
            if perm == [0, 3, 1, 2]:
                return "first"
            return "unknown"
        if op in _FEATURES_LAST:
            return "last"
        if op not in _SAME_LAYOUT:
            return "unknown"
        data = _data_inputs(node, constants)
        if not data:
            return "unknown"
        name = data[0]
    return "unknown"


def mask_input(model: onnx.ModelProto) -> str | None:
    """The model's attention-mask input: one named ``attention_mask``, else a rank-2 input with "mask" in its name."""
    inputs = list(model.graph.input)
    for i in inputs:
        if i.name == "attention_mask":
            return i.name
    for i in inputs:
        t = i.type.tensor_type
        if "mask" in i.name.lower() and t.HasField("shape") and len(t.shape.dim) == 2:
            return i.name
    return None


def _probability_kind(model: onnx.ModelProto, name: str) -> tuple[str, str]:
    """``(kind, why)`` for an output: are its values probabilities (Softmax, Sigmoid, a classifier's scores)?"""
    prods = producers(model)
    for _ in range(20):
        node = prods.get(name)
        if node is None or node.op_type not in _PASS_THROUGH:
            break
        name = node.input[0]
    if node is not None:
        if node.op_type in ("Softmax", "Sigmoid", "Normalizer") or node.op_type in _TREES:
            return "probabilities", f"produced by {node.op_type}"
        if node.op_type in _LINEAR_ML:
            post = next((a.s.decode() for a in node.attribute if a.name == "post_transform"), "NONE")
            return ("logits", "raw classifier scores") if post == "NONE" else ("probabilities", f"{post} scores")
    if "prob" in name.lower():
        return "probabilities", "named as probabilities"
    return "logits", "a float (N, C) output"


def logits_source(model: onnx.ModelProto, exclude: str | None = None) -> LogitsSource | None:
    """The output read for predicted labels: the first float ``(N, C)`` output (integer label outputs skipped);
    for a ZipMap output (a sequence of maps), the probability tensor the ZipMap reads. None when there is none."""
    inferred = infer(model)
    prods = producers(model)
    for out in model.graph.output:
        if out.name == exclude:
            continue
        if out.type.HasField("sequence_type") or out.type.HasField("map_type"):
            node = prods.get(out.name)
            if node is not None and node.op_type == "ZipMap":
                why = f"the probabilities behind ZipMap output {out.name!r}"
                return LogitsSource(node.input[0], "probabilities", why)
            continue
        shape, elem = tensor_type(inferred, out.name)
        if elem is not None and elem not in FLOAT_TYPES:
            continue  # predicted labels (int64) or strings: not scores
        if shape is not None and len(shape) != 2:
            continue
        kind, why = _probability_kind(model, out.name)
        return LogitsSource(out.name, kind, f"output {out.name!r} ({why})")
    return None


def _shape_text(shape: tuple | None) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


@dataclass(frozen=True)
class Candidate:
    """A tensor that can serve as the representation: name, producing op, shape as text, and whether auto picks it."""

    name: str
    op: str
    shape: str
    auto: bool


def candidate_layers(model: onnx.ModelProto) -> list[Candidate]:
    """Float tensors of rank 2 to 4 produced by Conv, pooling, normalisation, activation or fed to a
    classifier-like node, in graph order; ``auto`` marks what ``layer="auto"`` picks."""
    inferred = infer(model)
    try:
        chosen = choose_layer(model, "auto").name
    except ModelError:
        chosen = None
    constants = _initializers(model)
    wanted = _CHANNELS_FIRST | {"LayerNormalization", "Relu", "Gelu", "Tanh", "Sigmoid", "Flatten", "ReduceMean"}
    feeds = {
        d for n in model.graph.node if n.op_type in {"Gemm", "MatMul"} | _LINEAR_ML for d in _data_inputs(n, constants)
    }
    out, seen = [], set()
    for node in model.graph.node:
        for name in node.output:
            if name in seen or not (node.op_type in wanted or name in feeds or name == chosen):
                continue
            shape, elem = tensor_type(inferred, name)
            if elem is not None and elem not in FLOAT_TYPES:
                continue
            if shape is not None and not 2 <= len(shape) <= 4:
                continue
            seen.add(name)
            out.append(Candidate(name, node.op_type, _shape_text(shape), name == chosen))
    return out


def probe_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of tensors ``names`` from one ONNX Runtime run on a dummy batch of 2 rows (dynamic axes: 2 rows, 8
    elsewhere; zeros, masks of ones), for graphs ONNX's shape inference cannot follow (``ai.onnx.ml`` ops such as
    skl2onnx's Scaler). Tensors that cannot be probed are left out."""
    import numpy as np
    import onnxruntime as ort
    from onnx import helper

    if not names:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    feed = {}
    for i in probe.graph.input:
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (2 if k == 0 else 8) for k, d in enumerate(t.shape.dim)]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        feed[i.name] = (np.ones if "mask" in i.name.lower() else np.zeros)(dims, dtype)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs = sess.run(names, feed)
    except Exception:  # best effort: the caller reports the unknown rank
        return {}
    return {n: tuple(np.asarray(o).shape) for n, o in zip(names, outs, strict=True) if isinstance(o, np.ndarray)}

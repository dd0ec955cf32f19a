"""torch -> ONNX export with the representation layer as a named second output. torch is imported only here."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from resque_airflow.errors import ResqueInputError, first_line
from resque_airflow.runtime.graph import LAYER_METADATA_KEY

if TYPE_CHECKING:
    import torch  # imported at run time by the functions that export

log = logging.getLogger(__name__)

INPUT_NAME = "input"
LOGITS_NAME = "logits"


@dataclass(frozen=True)
class ExportReport:
    """Where the model went and how closely ONNX Runtime reproduces torch (max abs difference, on random inputs)."""

    path: str
    layer: str | None
    max_abs_diff_logits: float
    max_abs_diff_layer: float | None
    exporter: str


def _first(out):
    """The tensor of a module output: a Hugging Face ``ModelOutput``'s logits, a tuple's first item, or itself."""
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    return out[0] if isinstance(out, (tuple, list)) else out


def _wrapped(model, layer: str | None, names: list[str] | None):
    """``model`` called with positional inputs (by ``names`` as keywords when given), returning ``logits`` or
    ``(logits, output of layer)``, so every output gets a stable tensor name in the ONNX graph."""
    import torch

    modules = dict(model.named_modules())
    if layer is not None and layer not in modules:
        sample = [n for n in modules if n][-5:]
        raise ResqueInputError(f"layer: the torch model has no module named {layer!r}; some module names: {sample}")

    class WithLayer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *xs):
            seen = []
            handle = modules[layer].register_forward_hook(lambda _m, _i, out: seen.append(out)) if layer else None
            try:
                out = self.model(**dict(zip(names, xs, strict=True))) if names else self.model(*xs)
            finally:
                if handle is not None:
                    handle.remove()
            return (_first(out), _first(seen[-1])) if layer else _first(out)

    return WithLayer()


def import_callable(ref: str, *, what: str = "factory") -> Callable[..., Any]:
    """The callable that ``ref`` names as ``module:callable`` (a torch model factory, for instance).

    ``what`` names the argument in the error message. Raises :class:`ResqueInputError` when ``ref`` is not spelled
    ``module:callable`` or cannot be imported.

    >>> import_callable("math:sqrt")(4.0)
    2.0
    >>> import_callable("math.sqrt", what="--factory")
    Traceback (most recent call last):
    ...
    resque_airflow.errors.ResqueInputError: --factory: expected 'module:callable', got 'math.sqrt'
    """
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ResqueInputError(f"{what}: expected 'module:callable', got {ref!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ResqueInputError(f"{what}: cannot import {ref!r}: {exc}") from exc


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """The dynamo exporter logs every optimisation pass at INFO; keep task logs readable."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_torch(
    model: torch.nn.Module,
    example_input: torch.Tensor | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    layer: str | None = None,
    opset: int = 18,
    check: bool = True,
    atol: float = 1e-4,
    dynamic_axes: Mapping[str, Sequence[int]] | None = None,
) -> ExportReport:
    """Export a torch classifier to a single ONNX file with a dynamic batch axis.

    Args:
        model: a ``torch.nn.Module`` returning logits ``(N, C)`` (or a Hugging Face output with ``.logits``); put
            in eval mode here.
        example_input: a ``(N, ...)`` tensor of the model's input shape (graph input ``input``), or tensors by
            input name (``input_ids``, ``attention_mask`` ...: passed as keywords, each a graph input of that name).
        path: where to write the ``.onnx`` file (no external data file for models under 2 GB).
        layer: torch module name of the representation layer (e.g. ``"layer4.1.conv2"``); it becomes a graph
            output of the same name and is recorded in the model metadata, so ``layer="auto"`` finds it.
        check: compare ONNX Runtime with torch on inputs of two batch sizes (random for one tensor input, the
            example's rows for named inputs); raise if they differ by more than ``atol``.
        dynamic_axes: axes besides the batch axis that stay dynamic, by input name; default: the sequence axis
            (1) of rank-2 integer inputs (token ids and masks), so one export takes any text length.
    """
    import onnx
    import torch

    model = model.eval()
    named = isinstance(example_input, Mapping)
    inputs = dict(example_input) if named else {INPUT_NAME: example_input}
    names = list(inputs)
    wrapped = _wrapped(model, layer, names if named else None).eval()
    outputs = [LOGITS_NAME] + ([layer] if layer else [])
    extra = {k: list(v) for k, v in (dynamic_axes or {}).items()}
    if dynamic_axes is None:
        extra = {k: [1] for k, v in inputs.items() if v.ndim == 2 and not v.is_floating_point()}
    dims = {k: [0, *extra.get(k, [])] for k in names}
    args = tuple(inputs.values())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exporter = "dynamo"
    with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "onnxscript", "onnx_ir"):
        warnings.simplefilter("ignore")
        try:
            shared: dict[int, object] = {}  # one Dim per axis index: token ids and mask share their length
            spec = tuple(  # forward(*xs): one entry, the tuple of the inputs' specs
                {a: shared.setdefault(a, torch.export.Dim("batch" if a == 0 else f"axis{a}", min=1)) for a in dims[k]}
                for k in names
            )
            program = torch.onnx.export(
                wrapped, args, input_names=names, output_names=outputs, dynamic_shapes=(spec,), opset_version=opset,
                dynamo=True, external_data=False, verbose=False,
            )  # fmt: skip
            proto = program.model_proto
        except Exception as exc:  # the dynamo exporter still rejects some models the TorchScript one handles
            log.info("dynamo export failed (%s); using the TorchScript exporter", first_line(exc, 200))
            exporter = "torchscript"
            tmp = path.with_suffix(".tmp.onnx")
            axes = {k: {a: "batch" if a == 0 else f"axis{a}" for a in dims[k]} for k in names}
            torch.onnx.export(
                wrapped, args, str(tmp), input_names=names, output_names=outputs,
                dynamic_axes=axes | {o: {0: "batch"} for o in outputs}, opset_version=opset, dynamo=False,
            )  # fmt: skip
            proto = onnx.load(str(tmp))
            tmp.unlink()
    if layer:
        entry = proto.metadata_props.add()
        entry.key, entry.value = LAYER_METADATA_KEY, layer
    tmp = path.with_suffix(".onnx.tmp")
    tmp.write_bytes(proto.SerializeToString())
    os.replace(tmp, path)

    diff_logits, diff_layer = 0.0, None
    if check:
        diff_logits, diff_layer = _check(wrapped, path, inputs, named, layer is not None, atol)
    return ExportReport(str(path), layer, diff_logits, diff_layer, exporter)


def _check(wrapped, path: Path, inputs: dict, named: bool, has_layer: bool, atol: float) -> tuple[float, float | None]:
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    worst_logits, worst_layer = 0.0, 0.0 if has_layer else None
    first = next(iter(inputs.values()))
    for n in (1, 3):
        if named:  # token ids are not random numbers: the example's rows, repeated to n
            xs = {k: v.repeat((n // v.shape[0] + 1,) + (1,) * (v.ndim - 1))[:n] for k, v in inputs.items()}
        else:
            xs = {INPUT_NAME: torch.randn((n, *first.shape[1:]), generator=gen, dtype=first.dtype)}
        with torch.no_grad():
            ref = wrapped(*xs.values())
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = sess.run(None, {k: v.numpy() for k, v in xs.items()})
        worst_logits = max(worst_logits, float(np.max(np.abs(got[0] - ref[0].numpy()))))
        if has_layer:
            worst_layer = max(worst_layer, float(np.max(np.abs(got[1] - ref[1].numpy()))))
    worst = max(worst_logits, worst_layer or 0.0)
    if worst > atol:
        raise ResqueInputError(f"export: ONNX Runtime differs from torch by {worst:.2e} (> {atol}) on random inputs")
    return worst_logits, worst_layer

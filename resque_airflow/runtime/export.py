"""torch -> ONNX export with the representation layer as a named second output. torch is imported only here."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings
from collections.abc import Callable
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


def _wrapped(model, layer: str | None):
    import torch

    modules = dict(model.named_modules())
    if layer is not None and layer not in modules:
        sample = [n for n in modules if n][-5:]
        raise ResqueInputError(f"layer: the torch model has no module named {layer!r}; some module names: {sample}")

    class WithLayer(torch.nn.Module):
        """Returns (logits, output of ``layer``) so the layer gets a stable tensor name in the ONNX graph."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            seen = []
            handle = modules[layer].register_forward_hook(lambda _m, _i, out: seen.append(out))
            try:
                logits = self.model(x)
            finally:
                handle.remove()
            return logits, seen[-1]

    return WithLayer() if layer is not None else model


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
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    layer: str | None = None,
    opset: int = 18,
    check: bool = True,
    atol: float = 1e-4,
) -> ExportReport:
    """Export a torch classifier to a single ONNX file with a dynamic batch axis.

    Args:
        model: a ``torch.nn.Module`` returning logits ``(N, C)``; put in eval mode here.
        example_input: a ``(N, ...)`` float tensor of the model's input shape.
        path: where to write the ``.onnx`` file (no external data file for models under 2 GB).
        layer: torch module name of the representation layer (e.g. ``"layer4.1.conv2"``); it becomes a graph
            output of the same name and is recorded in the model metadata, so ``layer="auto"`` finds it.
        check: compare ONNX Runtime with torch on random inputs of two batch sizes; raise if they differ by more
            than ``atol``.
    """
    import onnx
    import torch

    model = model.eval()
    wrapped = _wrapped(model, layer).eval()
    outputs = [LOGITS_NAME] + ([layer] if layer else [])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exporter = "dynamo"
    with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "onnxscript", "onnx_ir"):
        warnings.simplefilter("ignore")
        try:
            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(
                wrapped,
                (example_input,),
                input_names=[INPUT_NAME],
                output_names=outputs,
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            proto = program.model_proto
        except Exception as exc:  # the dynamo exporter still rejects some models the TorchScript one handles
            log.info("dynamo export failed (%s); using the TorchScript exporter", first_line(exc, 200))
            exporter = "torchscript"
            tmp = path.with_suffix(".tmp.onnx")
            torch.onnx.export(
                wrapped,
                (example_input,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]},
                opset_version=opset,
                dynamo=False,
            )
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
        diff_logits, diff_layer = _check(wrapped, path, example_input, layer is not None, atol)
    return ExportReport(str(path), layer, diff_logits, diff_layer, exporter)


def _check(wrapped, path: Path, example_input, has_layer: bool, atol: float) -> tuple[float, float | None]:
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    worst_logits, worst_layer = 0.0, 0.0 if has_layer else None
    for n in (1, 3):
        x = torch.randn((n, *example_input.shape[1:]), generator=gen, dtype=example_input.dtype)
        with torch.no_grad():
            ref = wrapped(x)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = sess.run(None, {INPUT_NAME: x.numpy()})
        worst_logits = max(worst_logits, float(np.max(np.abs(got[0] - ref[0].numpy()))))
        if has_layer:
            worst_layer = max(worst_layer, float(np.max(np.abs(got[1] - ref[1].numpy()))))
    worst = max(worst_logits, worst_layer or 0.0)
    if worst > atol:
        raise ResqueInputError(f"export: ONNX Runtime differs from torch by {worst:.2e} (> {atol}) on random inputs")
    return worst_logits, worst_layer

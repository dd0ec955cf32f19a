"""What a model takes and how data is fed to it: every input in its own dtype, checked against its shape.

Arrays arrive from the readers in the dtype the file holds; :func:`prepare` converts each to the dtype the model
input declares where that is lossless in intent (float64 -> float32, int32 -> int64, 0/1 -> bool, integer tabular
features -> float) and refuses, naming the input and what it expects, where it is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from resque_airflow.core.fingerprint import TensorSpec
from resque_airflow.errors import ResqueInputError

# ONNX Runtime's type strings -> numpy dtype names.
ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32", "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}  # fmt: skip


def model_inputs(session) -> list[TensorSpec]:
    """Every input of an ``onnxruntime.InferenceSession``: name, numpy dtype name, shape (None for dynamic axes)."""
    out = []
    for i in session.get_inputs():
        if i.type not in ORT_TYPES:
            raise ResqueInputError(
                f"model: input {i.name!r} has type {i.type}, which cannot be read from data files; only numeric and "
                "bool tensor inputs are supported"
            )
        # Dynamic axes come as names, None, or (from some converters, e.g. Paddle's) -1.
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in i.shape)
        out.append(TensorSpec(i.name, ORT_TYPES[i.type], shape))
    return out


def main_input(specs: Sequence[TensorSpec]) -> TensorSpec:
    """The input whose statistics are kept and into which images are decoded: the first float input, else the
    first input (token ids)."""
    return next((s for s in specs if np.dtype(s.dtype).kind == "f"), specs[0])


def shown_shape(spec: TensorSpec) -> tuple:
    """The spec's shape as a person reads it: ``N`` for the batch axis, ``?`` for other dynamic axes."""
    return tuple("N" if i == 0 and d is None else ("?" if d is None else d) for i, d in enumerate(spec.shape))


# C901 12: one check per dtype rule of ONNX inputs (0-d, non-numeric, ints into floats, precision, range), each
# with its own message; split apart, the rules would lose the order in which they must be tried.
def _convert(a: np.ndarray, key: str, spec: TensorSpec, source: str) -> np.ndarray:
    target = np.dtype(spec.dtype)
    a = np.asarray(a)
    where = f"data: {source}: {key}"
    if a.ndim == 0:
        raise ResqueInputError(f"{where} is 0-dimensional (a single value); expected rows, shape {shown_shape(spec)}")
    kind = a.dtype.kind
    takes = f"the model takes {target} for input {spec.name!r}"
    if kind not in "biuf":
        raise ResqueInputError(f"{where} has dtype {a.dtype}, but {takes}; give numeric values")
    if target.kind == "f":
        if kind != "f" and a.ndim > 2:
            # Integer images or sequences are raw pixels/ids, not model input: scaling is the preprocessing's job.
            raise ResqueInputError(
                f"{where} has dtype {a.dtype}, but {takes}; convert the array (images as files go through the "
                "image-folder reader instead, which applies the declared preprocessing)"
            )
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.ascontiguousarray(a, dtype=target)
        if not np.isfinite(out).all():
            extra = " (or values beyond float16's range)" if target == np.float16 and kind == "f" else ""
            raise ResqueInputError(f"{where} contains NaN or infinite values{extra}; clean or drop those rows first")
        return out
    if target.kind == "b":
        if kind == "b":
            return np.ascontiguousarray(a)
        if kind in "iu" and np.isin(a, (0, 1)).all():
            return np.ascontiguousarray(a, dtype=bool)
        raise ResqueInputError(f"{where} has dtype {a.dtype}, but {takes}; give booleans or 0/1 integers")
    # integer inputs: token ids, indices
    if kind == "f":
        raise ResqueInputError(f"{where} has dtype {a.dtype}, but {takes} (ids or indices); give integer values")
    if a.size and kind in "iu":
        info = np.iinfo(target)
        lo, hi = a.min(), a.max()
        if lo < info.min or hi > info.max:
            raise ResqueInputError(f"{where} has values {lo}..{hi}, outside {target}'s range; {takes}")
    return np.ascontiguousarray(a, dtype=target)


def _check_shape(a: np.ndarray, key: str, spec: TensorSpec, source: str) -> None:
    expected = spec.shape
    if a.ndim != len(expected) or any(
        e is not None and e != got for e, got in zip(expected[1:], a.shape[1:], strict=False)
    ):
        raise ResqueInputError(
            f"data: {source}: input shape {a.shape} does not fit the model input {spec.name!r} of shape "
            f"{shown_shape(spec)}; reshape the data to the model's input"
        )


def prepare(arrays: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], source: str) -> dict[str, np.ndarray]:
    """The model feed ``{input name: (n, ...) array}`` from the arrays a reader produced, each converted to its
    input's dtype and checked against its shape.

    A single model input takes the data's single array whatever its name (``x``, a Parquet feature matrix);
    otherwise each input takes the array named after it.

    Raises:
        ResqueInputError: an input is missing, has the wrong dtype or shape, or the row counts differ; the message
            names the input and what was expected.
    """
    if len(specs) == 1 and len(arrays) == 1:
        (key, a), spec = next(iter(arrays.items())), specs[0]
        pairs = [(key, a, spec)]
    else:
        missing = [s.name for s in specs if s.name not in arrays]
        if missing:
            raise ResqueInputError(
                f"data: {source}: the model takes inputs {[s.name for s in specs]}, but the data has no "
                f"{missing} (it has {sorted(arrays)}); name the .npz arrays or Parquet columns after the model's inputs"
            )
        pairs = [(s.name, arrays[s.name], s) for s in specs]
    feed, rows = {}, None
    for key, a, spec in pairs:
        out = _convert(a, key, spec, source)
        _check_shape(out, key, spec, source)
        if rows is not None and out.shape[0] != rows:
            raise ResqueInputError(f"data: {source}: input {spec.name!r} has {out.shape[0]} rows, the others {rows}")
        rows = out.shape[0]
        feed[spec.name] = out
    return feed

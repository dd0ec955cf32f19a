"""Parquet and ``.jsonl`` rows -> model inputs and labels, ``batch_size`` rows at a time.

Columns: one per model input, named after it (lists of numbers for sequences); for a single-input model, the
feature columns instead (every column but the label's: numbers, integers included); or, with a text spec, the text
column, tokenized. Labels: the label column, integers, or class names mapped through the fingerprint's class names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import numpy as np

from resque_airflow.core.fingerprint import TensorSpec, TextSpec
from resque_airflow.errors import ResqueInputError
from resque_airflow.runtime import tokenize


def _decode(col):
    """A pyarrow column as one Array, dictionary-encoded values decoded."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def _column(col, name: str, where: str) -> np.ndarray:
    """A numeric (or nested-list numeric) column as ``(n, ...)``; other types and nulls are errors naming it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = _decode(col)
    if arr.null_count:
        raise ResqueInputError(f"data: {where}: column {name!r} has {arr.null_count} missing (null) values; fill them")
    shape = [len(arr)]
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        lengths = np.unique(pc.list_value_length(arr).to_numpy(zero_copy_only=False)) if len(arr) else np.array([0])
        if len(lengths) > 1:
            raise ResqueInputError(
                f"data: {where}: rows of column {name!r} have different lengths {lengths[:5].tolist()}; pad them to one"
            )
        shape.append(int(lengths[0]))
        arr = pc.list_flatten(arr)
        if arr.null_count:
            raise ResqueInputError(f"data: {where}: column {name!r} holds missing (null) values inside its lists")
    t = arr.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise ResqueInputError(
            f"data: {where}: column {name!r} has type {col.type}; model input columns must be numbers (or lists of "
            "numbers): drop it, convert it, or name the model's inputs as columns"
        )
    return arr.to_numpy(zero_copy_only=False).reshape(shape)


def labels_of(col, name: str, class_names: Sequence[str] | None, where: str) -> np.ndarray:
    """``(n,)`` labels: integers (or floats, checked later) as they are; class names through ``class_names``."""
    import pyarrow as pa

    arr = _decode(col)
    if arr.null_count:
        raise ResqueInputError(
            f"data: {where}: label column {name!r} has {arr.null_count} missing (null) labels; drop or label those rows"
        )
    t = arr.type
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return arr.to_numpy(zero_copy_only=False)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return map_names(arr.to_pylist(), name, class_names, where)
    raise ResqueInputError(
        f"data: {where}: label column {name!r} has type {col.type}; labels must be integer class ids or class names"
    )


def map_names(values: list, name: str, class_names: Sequence[str] | None, where: str) -> np.ndarray:
    """Class-name labels -> class ids by the fingerprint's class names."""
    if not class_names:
        raise ResqueInputError(
            f"data: {where}: label column {name!r} holds class names, but there are no class names to map them "
            "to; give --class-names when fingerprinting, or integer labels"
        )
    index = {str(c): i for i, c in enumerate(class_names)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise ResqueInputError(
            f"data: {where}: labels {unknown[:5]} in column {name!r} are not among the classes {list(class_names)}"
        )
    return np.fromiter((index[str(v)] for v in values), np.int64, len(values))


def _inputs_from_table(table, specs: Sequence[TensorSpec], label: str, text: TextSpec | None, where: str) -> dict:
    names = table.schema.names
    if text is not None:
        if text.column not in names:
            raise ResqueInputError(
                f"data: {where} has no text column {text.column!r} (columns {names}); the fingerprint tokenizes that "
                "column"
            )
        return tokenize.encode(text, table.column(text.column).to_pylist(), where)
    wanted = [s.name for s in specs]
    if wanted and all(n in names for n in wanted) and (len(wanted) > 1 or wanted[0] != label):
        out = {}
        for s in specs:
            a = _column(table.column(s.name), s.name, where)
            out[s.name] = a.reshape(a.shape[0], 1) if a.ndim == 1 and len(s.shape) == 2 else a
        return out
    if len(specs) > 1:
        missing = [n for n in wanted if n not in names]
        raise ResqueInputError(
            f"data: {where}: the model takes inputs {wanted}, but the data has no columns {missing} (it has "
            f"{names}); name the Parquet columns after the model's inputs"
        )
    features = [c for c in names if c != label]
    if not features:
        raise ResqueInputError(f"data: {where} has no feature columns besides {label!r}")
    if len(features) == 1:
        return {"x": _column(table.column(features[0]), features[0], where)}
    cols = [_column(table.column(c), c, where) for c in features]
    multi = [c for c, a in zip(features, cols, strict=True) if a.ndim > 1]
    if multi:
        raise ResqueInputError(
            f"data: {where}: list columns {multi} beside other feature columns; give one list column, or scalar "
            "feature columns, or columns named after the model's inputs"
        )
    return {"x": np.column_stack(cols)}


def iter_parquet(
    f, path: str, specs: Sequence[TensorSpec], *, label: str, text: TextSpec | None, class_names, batch_size: int
) -> Iterator[tuple[dict, np.ndarray | None]]:
    """``(inputs, labels)`` per batch of a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    has_label = label in pf.schema_arrow.names
    for i, rb in enumerate(pf.iter_batches(batch_size=batch_size)):
        table = pa.Table.from_batches([rb])
        where = f"{path} (rows from {i * batch_size})"
        y = labels_of(table.column(label), label, class_names, where) if has_label else None
        yield _inputs_from_table(table, specs, label, text, where), y


# C901 11: line parsing, label checks and batching of one streaming reader; the nested flush() shares its state.
def iter_jsonl(
    f, path: str, specs: Sequence[TensorSpec], *, label: str, text: TextSpec | None, class_names, batch_size: int
) -> Iterator[tuple[dict, np.ndarray | None]]:
    """``(inputs, labels)`` per batch of a ``.jsonl`` file: one JSON object per line, with the text field (with a
    text spec) or fields named after the model's inputs, and optionally the label field."""
    import pyarrow as pa

    rows: list[dict] = []
    start = 0

    def flush():
        ys = [r.get(label) for r in rows]
        labelled = [v is not None for v in ys]
        where = f"{path} (lines {start + 1}..{start + len(rows)})"
        if any(labelled) and not all(labelled):
            raise ResqueInputError(f"data: {where}: some lines have a {label!r} field and others do not")
        y = None
        if all(labelled):
            y = map_names(ys, label, class_names, where) if isinstance(ys[0], str) else np.asarray(ys)
        if text is not None:
            return tokenize.encode(text, [r.get(text.column) for r in rows], where), y
        table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != label} for r in rows])
        return _inputs_from_table(table, specs, label, None, where), y

    for n, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ResqueInputError(f"data: {path} line {n} is not JSON ({exc}); one JSON object per line") from exc
        if not isinstance(obj, dict):
            raise ResqueInputError(f"data: {path} line {n} is not a JSON object")
        rows.append(obj)
        if len(rows) == batch_size:
            yield flush()
            start, rows = n, []
    if rows:
        yield flush()

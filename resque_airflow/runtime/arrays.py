"""``.npy`` and ``.npz`` read as streams of rows: memory is bounded by the batch size, whatever the file declares.

A ``.npy`` header declares a shape and a dtype; ``np.load`` allocates what it declares before reading. Here the
declared size is checked against the bytes really there (the file's size, or a ``.npz`` member's uncompressed size
from the zip directory) before anything is allocated, and the data is read ``batch_size`` rows at a time, from
the decompressing stream for ``.npz`` members, so a 2 MB ``.npz`` that expands to gigabytes costs one batch.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from resque_airflow.errors import ResqueInputError

# A Fortran-ordered array cannot be read row by row; below this size it is read whole and reordered.
FORTRAN_LIMIT = 64 << 20


def human_bytes(n: float) -> str:
    """``n`` bytes as a person reads it (``"8.0 TB"``)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


class NpyStream:
    """The rows of one ``.npy`` stream: header checked on construction, data read by :meth:`read`.

    Args:
        f: a binary stream positioned at the start of the ``.npy`` data (a file, or a ``.npz`` member).
        size: the bytes the stream holds (file size, or the member's uncompressed size), for the size check.
        what: how errors name it (``"data.npz: x"``).
    """

    def __init__(self, f: BinaryIO, size: int, what: str) -> None:
        self.f, self.what = f, what
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f"unsupported .npy format version {version}")
            self.shape, self.fortran, self.dtype = read_header[version](f)
            header = f.tell()
        except ResqueInputError:
            raise
        except Exception as exc:  # a damaged header: numpy raises ValueError, zipfile BadZipFile or EOFError
            raise ResqueInputError(f"data: {what}: not a readable .npy array ({type(exc).__name__}: {exc})") from exc
        if self.dtype.hasobject:
            raise ResqueInputError(
                f"data: {what} holds Python objects (dtype {self.dtype}), which are never unpickled; save numbers or "
                "fixed-width strings"
            )
        if len(self.shape) == 0:
            raise ResqueInputError(
                f"data: {what} is 0-dimensional (a single value); expected rows, shape (N, ...) (labels: (N,))"
            )
        self.row_shape = tuple(self.shape[1:])
        self.row_bytes = math.prod(self.row_shape) * self.dtype.itemsize
        declared = self.shape[0] * self.row_bytes
        available = size - header
        if declared > available:
            raise ResqueInputError(
                f"data: {what} declares shape {tuple(self.shape)} of {self.dtype} ({human_bytes(declared)}) but holds "
                f"only {human_bytes(max(available, 0))}; the file is damaged or forged: replace it"
            )
        self.rows = int(self.shape[0])
        self.done = 0
        self._whole: np.ndarray | None = None
        if self.fortran and len(self.shape) > 1:
            if declared > FORTRAN_LIMIT:
                raise ResqueInputError(
                    f"data: {what} is stored in Fortran order ({human_bytes(declared)}), which cannot be read row by "
                    "row; save it C-ordered (np.ascontiguousarray) to stream it"
                )
            flat = self._read_bytes(declared)
            self._whole = np.frombuffer(flat, self.dtype).reshape(self.shape, order="F")

    def _read_bytes(self, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.f.readinto(view[got:])
            if not k:
                raise ResqueInputError(f"data: {self.what} ends after {got} of {n} bytes: the file is truncated")
            got += k
        return buf

    def read(self, n: int) -> np.ndarray:
        """The next ``n`` rows (fewer at the end), ``(k, *row_shape)`` in the file's dtype."""
        k = min(n, self.rows - self.done)
        if self._whole is not None:
            out = np.ascontiguousarray(self._whole[self.done : self.done + k])
        else:
            out = np.frombuffer(self._read_bytes(k * self.row_bytes), self.dtype).reshape((k, *self.row_shape))
        self.done += k
        return out


def _check_rows(streams: dict[str, NpyStream], path: str) -> int:
    rows = {k: s.rows for k, s in streams.items()}
    if len(set(rows.values())) > 1:
        if set(rows) == {"x", "y"}:
            raise ResqueInputError(f"data: {path}: x has {rows['x']} rows but y has {rows['y']}")
        raise ResqueInputError(f"data: {path}: arrays have different row counts {rows}; every array needs one row each")
    return next(iter(rows.values()))


def iter_npy(f: BinaryIO, size: int, path: str, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches ``{"x": rows}`` of a ``.npy`` stream of ``size`` bytes."""
    s = NpyStream(f, size, path)
    while s.done < s.rows:
        yield {"x": s.read(batch_size)}


def npz_members(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The arrays of an open ``.npz``: name (without ``.npy``) -> zip entry."""
    return {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}


def iter_npz(
    f: BinaryIO, path: str, wanted: list[str], labels: str | None, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batches ``{name: rows}`` of the arrays ``wanted`` (plus ``labels`` when present) of an ``.npz`` stream.

    Every member is read lazily, from its own decompressing stream, ``batch_size`` rows at a time.
    """
    with zipfile.ZipFile(f) as zf:
        members = npz_members(zf)
        names = [*wanted, *([labels] if labels and labels in members else [])]
        opened = {}
        try:
            for name in names:
                info = members[name]
                opened[name] = NpyStream(zf.open(info), info.file_size, f"{path}: {name}")
            n = _check_rows(opened, path)
            for _ in range(0, n, batch_size):
                yield {name: s.read(batch_size) for name, s in opened.items()}
        finally:
            for s in opened.values():
                s.f.close()

"""Streaming readers for incoming data: ``.npy``/``.npz``, folders of shards, Parquet, ``.jsonl``, image folders.

Every reader yields :class:`Batch` objects of at most ``batch_size`` rows, so memory is bounded by the batch size,
never by the data size nor by what a file declares (see :mod:`~resque_airflow.runtime.arrays` and
:mod:`~resque_airflow.runtime.images`). Paths may be local or any fsspec URL (``file://``, ``s3://``, ``gs://``,
``memory://`` ...). Only regular files are read: a FIFO or a device in the data is refused, never opened (opening a
FIFO blocks until someone writes to it).

Arrays come out in the dtype the file holds; :func:`~resque_airflow.runtime.feed.prepare` converts them to what
each model input takes.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import stat
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from resque_airflow.core.fingerprint import ImageSpec, TensorSpec, TextSpec
from resque_airflow.errors import ResqueInputError
from resque_airflow.runtime import arrays, images, preprocess, tables
from resque_airflow.runtime.feed import main_input

log = logging.getLogger(__name__)

ARRAY_SUFFIXES = (".npy", ".npz")
TABLE_SUFFIXES = (".parquet", ".pq", ".jsonl")
PARQUET_SUFFIXES = (".parquet", ".pq")
IMAGE_SUFFIXES = images.IMAGE_SUFFIXES
COUNT_MAX_FILES = 1000  # above this many shards the row count is not worth one extra header read each


@dataclass
class Batch:
    """One batch: the arrays for the model's inputs (``{input name: (n, ...)}``, or ``{"x": ...}`` when the data
    does not name the input), labels ``y`` (``(n,)`` or None), and where it came from."""

    inputs: dict[str, np.ndarray]
    y: np.ndarray | None
    source: str

    @property
    def x(self) -> np.ndarray:
        """The first (for single-input data, the only) array."""
        return next(iter(self.inputs.values()))

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


def _filesystem(uri: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:
        scheme = uri.split("://", 1)[0] if "://" in uri else uri
        raise ResqueInputError(
            f"data: cannot open {uri!r}: unknown or unavailable URL scheme {scheme!r} ({exc}); use a local path or an "
            "fsspec URL such as file://, s3://, gs://, memory://"
        ) from exc


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


class DataSource:
    """A streaming view of one data URI. Iterate for batches; ``n_hint`` is the row count when cheap to know.

    Args:
        inputs: the model's inputs (``.npz`` arrays and Parquet columns are matched to them by name); None: one
            unnamed input.
        image_spec: image preprocessing; None: read from the model's input (see
            :func:`~resque_airflow.runtime.preprocess.image_spec_for`).
        image_size: a fixed ``(H, W)`` when ``inputs`` is not given.
        text: tokenization of a text column / ``.jsonl`` field.
        class_names: the fingerprint's class names (labels by name); ``num_classes``: its class count, for folders
            named by class id when it has no names.
        label_column: the labels' Parquet column / ``.jsonl`` field (``.npz``: the array ``y``).
        max_image_pixels: the most pixels an image may declare.
    """

    def __init__(
        self,
        uri: str,
        *,
        batch_size: int = 256,
        image_spec: ImageSpec | None = None,
        image_size: tuple[int, int] | None = None,
        class_names: list[str] | None = None,
        label_column: str = "label",
        decode_threads: int = 4,
        inputs: Sequence[TensorSpec] | None = None,
        text: TextSpec | None = None,
        num_classes: int | None = None,
        max_image_pixels: int = images.DEFAULT_MAX_PIXELS,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ResqueInputError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.uri = str(uri)
        self.batch_size = batch_size
        self.inputs = list(inputs or [])
        self.image_spec = image_spec
        self.image_size = image_size
        self.text = text
        self.class_names = list(class_names) if class_names else None
        self.num_classes = num_classes
        self.label_column = label_column
        self.decode_threads = decode_threads
        self.max_image_pixels = max_image_pixels
        self.fs, self.path = _filesystem(self.uri)
        self._local = _is_local(self.fs)
        if not self.fs.exists(self.path):
            raise ResqueInputError(f"data: {self.uri} does not exist")
        self.kind, self.files = self._discover()
        self.n_hint: int | None = self._count()

    # Discovery -------------------------------------------------------------------------------------------------
    def _check_regular(self, path: str) -> None:
        """Refuse a FIFO, socket or device before anything opens it (a FIFO would block the gate forever)."""
        if self._local:
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                what = "a FIFO" if stat.S_ISFIFO(mode) else ("a socket" if stat.S_ISSOCK(mode) else "not a file")
                raise ResqueInputError(
                    f"data: {path} is {what}, not a regular file; only regular files are read: remove it from the data"
                )

    def _entries(self, path: str) -> tuple[list[str], list[str]]:
        entries = sorted(self.fs.ls(path, detail=True), key=lambda e: e["name"])
        dirs = [e["name"] for e in entries if e["type"] == "directory"]
        files = []
        for e in entries:
            if e["type"] == "directory" or posixpath.basename(e["name"]).startswith("."):
                continue
            if e["type"] != "file":
                self._check_regular(e["name"])  # raises for a FIFO, a socket, a device
            files.append(e["name"])
        return dirs, files

    def _discover(self) -> tuple[str, list]:
        if not self.fs.isdir(self.path):
            self._check_regular(self.path)
            return self._kind_of(self.path), [self.path]
        dirs, files = self._entries(self.path)
        suffixes = ARRAY_SUFFIXES + TABLE_SUFFIXES
        if dirs and not any(f.lower().endswith(suffixes) for f in files):
            return "images", self._image_files(dirs)
        shards = [f for f in files if f.lower().endswith(suffixes)]
        if not shards:
            raise ResqueInputError(
                f"data: {self.uri} holds no .npy/.npz/.parquet shards and no class sub-folders of images"
            )
        for f in shards:
            self._check_regular(f)
        kinds = {self._kind_of(f) for f in shards}
        if len(kinds) > 1:
            raise ResqueInputError(f"data: {self.uri} mixes shard formats {sorted(kinds)}; use one format per folder")
        return kinds.pop(), shards

    @staticmethod
    def _kind_of(path: str) -> str:
        low = path.lower()
        for suffixes, kind in (((".npy",), "npy"), ((".npz",), "npz"), (PARQUET_SUFFIXES, "parquet")):
            if low.endswith(suffixes):
                return kind
        if low.endswith(".jsonl"):
            return "jsonl"
        raise ResqueInputError(
            f"data: {path}: unsupported file type; expected .npy, .npz, .parquet, .jsonl or an image folder"
        )

    def _image_files(self, dirs: list[str]) -> list[tuple[str, int]]:
        names = [posixpath.basename(d.rstrip("/")) for d in dirs]
        index, self.class_names = images.class_index(names, self.class_names, self.num_classes, self.uri)
        out = []
        for d, name in zip(dirs, names, strict=True):
            for f in sorted(self.fs.find(d)):
                if f.lower().endswith(IMAGE_SUFFIXES):
                    self._check_regular(f)
                    out.append((f, index[name]))
        if not out:
            raise ResqueInputError(
                f"data: {self.uri} has class folders but no image files ({', '.join(IMAGE_SUFFIXES)})"
            )
        return out

    def _count(self) -> int | None:
        if self.kind == "images":
            return len(self.files)
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                return sum(pq.ParquetFile(self.fs.open(f)).metadata.num_rows for f in self.files)
            except Exception:
                return None
        if self.kind in ("npy", "npz") and len(self.files) <= COUNT_MAX_FILES:
            try:  # the .npy headers only (a few hundred bytes each): progress can then say a percentage
                return sum(self._rows(f) for f in self.files)
            except (ResqueInputError, OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
                return None  # the pass itself reports what is wrong with the file
        return None

    def _rows(self, path: str) -> int:
        """Rows of the model's first array in ``path``, from its ``.npy`` header."""
        with self._open(path) as f:
            if self.kind == "npy":
                return arrays.NpyStream(f, os.path.getsize(path) if self._local else self.fs.size(path), path).rows
            with zipfile.ZipFile(f) as zf:
                members = arrays.npz_members(zf)
                info = members[self._npz_arrays(path, sorted(members))[0]]
                with zf.open(info) as member:
                    return arrays.NpyStream(member, info.file_size, f"{path}: {info.filename}").rows

    # Iteration -------------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        if self.kind == "images":
            yield from self._iter_images()
            return
        reader = {"npy": self._iter_npy, "npz": self._iter_npz, "parquet": self._iter_table, "jsonl": self._iter_table}
        for f in self.files:
            try:
                yield from reader[self.kind](f)
            except ResqueInputError:
                raise
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:  # truncated .npz: BadZipFile
                raise ResqueInputError(f"data: cannot read shard {f}: {type(exc).__name__}: {exc}") from exc

    def _open(self, path: str):
        # fsspec's local file wrapper costs ~30 us per file in Python; a plain open() is the same bytes.
        return open(path, "rb") if self._local else self.fs.open(path, "rb")

    def _iter_npy(self, path: str) -> Iterator[Batch]:
        size = os.path.getsize(path) if self._local else self.fs.size(path)
        with self._open(path) as f:
            for chunk in arrays.iter_npy(f, size, path, self.batch_size):
                yield Batch(chunk, None, path)

    def _npz_arrays(self, path: str, members: list[str]) -> list[str]:
        """The arrays of ``path`` to read for the model's inputs (``x`` or the input's name for one input)."""
        names = [s.name for s in self.inputs]
        if len(names) > 1:
            missing = [n for n in names if n not in members]
            if missing:
                raise ResqueInputError(
                    f"data: {path}: the model takes inputs {names}, but the file has no arrays {missing} (it has "
                    f"{members}); name the .npz arrays after the model's inputs"
                )
            return names
        for candidate in ("x", *names):
            if candidate in members:
                return [candidate]
        raise ResqueInputError(f"data: {path} has arrays {members}; expected 'x' (and optionally 'y')")

    def _iter_npz(self, path: str) -> Iterator[Batch]:
        with self._open(path) as f:
            with zipfile.ZipFile(f) as zf:
                members = sorted(arrays.npz_members(zf))
            f.seek(0)
            wanted = self._npz_arrays(path, members)
            for chunk in arrays.iter_npz(f, path, wanted, "y", self.batch_size):
                y = chunk.pop("y", None)
                yield Batch(chunk, y, path)

    def _iter_table(self, path: str) -> Iterator[Batch]:
        kwargs = dict(label=self.label_column, text=self.text, class_names=self.class_names)
        with self._open(path) as f:
            if self.kind == "parquet":
                it = tables.iter_parquet(f, path, self.inputs, batch_size=self.batch_size, **kwargs)
            else:
                it = tables.iter_jsonl(
                    io.TextIOWrapper(f, encoding="utf-8"), path, self.inputs, batch_size=self.batch_size, **kwargs
                )
            for inputs, y in it:
                yield Batch(inputs, y, path)

    def _iter_images(self) -> Iterator[Batch]:
        main = main_input(self.inputs) if self.inputs else None
        spec = preprocess.image_spec_for(main, self.image_spec)
        geo = preprocess.geometry(spec, main, self.image_size)
        budget = images.PixelBudget(self.max_image_pixels)

        def decode(item: tuple[str, int]):
            return images.decode(item[0], self._open, spec, geo, budget, self.max_image_pixels)

        items = self.files
        chunks = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        name = main.name if main is not None else "x"
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="resque-decode") as pool:
            # Decode batch i+1 while batch i is consumed: at most two batches of pixels in memory.
            pending = [pool.map(decode, chunks[0])] if chunks else []
            for i, chunk in enumerate(chunks):
                decoded = list(pending.pop(0))
                if i + 1 < len(chunks):
                    pending.append(pool.map(decode, chunks[i + 1]))
                where = f"{self.uri} (images {i * self.batch_size}..{i * self.batch_size + len(chunk) - 1})"
                x = preprocess.to_tensor([p for p, _ in decoded], [o for _, o in decoded], spec, geo, where)
                y = np.fromiter((label for _, label in chunk), np.int64, len(chunk))
                yield Batch({name: x}, y, where)


def check_data_exists(uri: str) -> None:
    """Raise the error :class:`DataSource` would for a data URI of an unknown scheme or that does not exist, without
    reading anything: the gate checks this before it downloads the model."""
    fs, path = _filesystem(str(uri))
    if not fs.exists(path):
        raise ResqueInputError(f"data: {uri} does not exist")

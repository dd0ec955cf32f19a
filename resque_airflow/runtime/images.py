"""Image folders: class folders mapped to class ids by name, images decoded within a pixel budget.

Labels mean the same thing on every path: a folder is a class by its *name* (the fingerprint's class names, or,
for a fingerprint made from arrays, its integer class id), never by its sorted position.

A PNG declares its size in a few header bytes and decodes to that many pixels whatever its file size: every image's
declared size is checked against ``max_pixels`` before it is decoded, and images being decoded at the same time
share a budget of ``max_pixels``, so decoding never holds more than about one capped image's pixels.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

import numpy as np

from resque_airflow.core.fingerprint import ImageSpec
from resque_airflow.errors import ResqueInputError
from resque_airflow.runtime import preprocess

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# An 8K frame (7680 x 4320 = 33.2 Mpx) fits; PIL's own bomb check starts warning at 89 Mpx and refuses 179 Mpx.
DEFAULT_MAX_PIXELS = 1 << 25


def _is_int(name: str) -> bool:
    return name.isdigit() or (name.startswith("-") and name[1:].isdigit())


def order_class_names(names: list[str]) -> list[str]:
    """Folder names in class-id order for a new fingerprint: numerically when every name is an integer (``0, 90,
    180, 270``, not ``0, 180, 270, 90``), else as strings."""
    if names and all(_is_int(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def class_index(
    folders: list[str], class_names: list[str] | None, num_classes: int | None, uri: str
) -> tuple[dict[str, int], list[str] | None]:
    """``{folder name: class id}`` and the class names to record.

    - ``class_names`` known (the fingerprint's, or given): by name; a folder not among them is an error.
    - no names but ``num_classes`` (a fingerprint made from arrays, whose labels are ids): folders must be named by
      class id ``0..num_classes-1``.
    - neither (a new fingerprint): the folders, ordered by :func:`order_class_names`.
    """
    if class_names is not None:
        index = {str(c): i for i, c in enumerate(class_names)}
        unknown = [n for n in folders if n not in index]
        if unknown:
            raise ResqueInputError(
                f"data: class folders {unknown} in {uri} are not among the fingerprint's classes {list(class_names)}; "
                "rename or remove them"
            )
        return {n: index[n] for n in folders}, list(class_names)
    if num_classes is not None:
        bad = [n for n in folders if not _is_int(n) or not 0 <= int(n) < num_classes]
        if bad:
            raise ResqueInputError(
                f"data: class folders {bad} in {uri}: the fingerprint was made from arrays (labels 0..{num_classes - 1}"
                f", no class names), so folders must be named by class id 0..{num_classes - 1}"
            )
        return {n: int(n) for n in folders}, None
    names = order_class_names(folders)
    log.info("image folders: classes by name %s", {n: i for i, n in enumerate(names)})
    return {n: i for i, n in enumerate(names)}, names


class PixelBudget:
    """Bounds the pixels being decoded at once: :meth:`take` blocks until ``n`` more fit (one image always may)."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self.cond = threading.Condition()

    def take(self, n: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.total)
            self.used += n

    def give(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def decode(
    path: str,
    opener: Callable[[str], object],
    spec: ImageSpec,
    geo: preprocess.Geometry,
    budget: PixelBudget,
    max_pixels: int,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode, convert and resize one image: ``(pixels (h, w) or (h, w, c) uint8 mostly, (top, left) offset)``.

    Raises ResqueInputError before decoding when the image declares more than ``max_pixels``.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with opener(path) as f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:  # reads the header only
                w, h = im.size
                if w * h > max_pixels:
                    raise ResqueInputError(
                        f"data: image {path} declares {w * h / 1e6:.0f} Mpx ({w} x {h}), more than the "
                        f"{max_pixels / 1e6:.0f} Mpx allowed (max_image_pixels); shrink it or raise the limit"
                    )
                budget.take(w * h)
                try:
                    mode = "RGB" if spec.mode == "BGR" else spec.mode
                    out = im.convert(mode) if im.mode != mode else im
                    out, offset = preprocess.resize(out, spec, geo)
                    return np.asarray(out), offset
                finally:
                    budget.give(w * h)
    except ResqueInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL refuses sizes beyond its own limit inside Image.open, before we can read the size: its message has it.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.0f} Mpx" if found else "more pixels than PIL's decompression-bomb limit"
        raise ResqueInputError(
            f"data: image {path} declares {size}, more than the {max_pixels / 1e6:.0f} Mpx allowed (max_image_pixels; "
            "a decompression bomb?); shrink it or remove it"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ResqueInputError(f"data: image {path} cannot be decoded ({exc}); remove or replace it") from exc

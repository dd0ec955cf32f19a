"""Image preprocessing as declared: where the spec comes from, and pixels -> the model's input tensor.

The spec is declared once, when the model is fingerprinted or published, and stored in the fingerprint. Where it
comes from, first found wins per field: the flags given (``--image-*``), the model's ONNX metadata (key
``resque.preprocess``, a JSON object of :class:`~resque_airflow.core.fingerprint.ImageSpec` fields), a sidecar file
``<model>.preprocess.json`` beside the model, then defaults read from the model's input (1 channel: ``"L"``, else
``"RGB"``; the layout from its shape).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resque_airflow.core.fingerprint import ImageSpec, TensorSpec
from resque_airflow.errors import ResqueInputError

log = logging.getLogger(__name__)

METADATA_KEY = "resque.preprocess"
SIDECAR_SUFFIX = ".preprocess.json"


def guess_layout(shape: Sequence[int | None]) -> str:
    """``"NHWC"`` when a rank-4 input's last axis is 1 or 3 and its second is not, else ``"NCHW"``."""
    if len(shape) == 4 and shape[3] in (1, 3) and shape[1] not in (1, 3):
        return "NHWC"
    return "NCHW"


def _declared(metadata: Mapping[str, str] | None, model_path: str | Path | None) -> tuple[dict, str]:
    meta = dict(metadata or {})
    if METADATA_KEY in meta:
        try:
            return dict(json.loads(meta[METADATA_KEY])), f"the model's metadata ({METADATA_KEY})"
        except (ValueError, TypeError) as exc:
            raise ResqueInputError(f"model: metadata {METADATA_KEY} is not a JSON object ({exc})") from exc
    if model_path is not None and not isinstance(model_path, bytes):
        sidecar = Path(str(model_path) + SIDECAR_SUFFIX)
        if not sidecar.is_file():
            sidecar = Path(model_path).with_suffix(SIDECAR_SUFFIX)
        if sidecar.is_file():
            try:
                return dict(json.loads(sidecar.read_text())), str(sidecar)
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                raise ResqueInputError(f"image preprocessing: {sidecar} is not a JSON object ({exc})") from exc
    return {}, "defaults"


def image_spec_for(
    main: TensorSpec | None,
    given: ImageSpec | Mapping | None = None,
    *,
    metadata: Mapping[str, str] | None = None,
    model_path: str | Path | None = None,
) -> ImageSpec:
    """The image spec of a model: ``given`` (a full spec, or the fields given as flags) over the declared one
    (the model's ONNX ``metadata``, then a sidecar beside ``model_path``) over defaults read from ``main``, the
    model's image input."""
    if isinstance(given, ImageSpec):
        return given
    declared, where = _declared(metadata, model_path)
    fields = {f.name for f in dataclasses.fields(ImageSpec)}
    unknown = sorted(set(declared) - fields)
    if unknown:
        raise ResqueInputError(f"image preprocessing from {where}: unknown fields {unknown}; known: {sorted(fields)}")
    shape = main.shape if main is not None else ()
    layout = guess_layout(shape)
    channels = (shape[3] if layout == "NHWC" else shape[1]) if len(shape) == 4 else None
    merged = {"mode": "L" if channels == 1 else "RGB"} | declared | dict(given or {})
    for key in ("mean", "std", "size"):
        if merged.get(key) is not None:
            merged[key] = tuple(merged[key])
    spec = ImageSpec(**merged)
    if declared:
        log.info("image preprocessing from %s%s: %s", where, " and the flags given" if given else "", spec)
    return spec


@dataclass(frozen=True)
class Geometry:
    """What the model input fixes: layout, channels (None: any), and ``(H, W)`` (entries None when dynamic)."""

    layout: str
    channels: int | None
    height: int | None
    width: int | None


def geometry(spec: ImageSpec, main: TensorSpec | None, image_size: tuple[int, int] | None = None) -> Geometry:
    """The target geometry for ``spec`` on the model input ``main``; raises naming ``--image-mode`` when the
    channel counts disagree. ``image_size``: a fixed ``(H, W)`` when no model input is known (tests, tools)."""
    shape = tuple(main.shape) if main is not None else ()
    layout = spec.layout or guess_layout(shape)
    if len(shape) == 4:
        c, h, w = (shape[3], shape[1], shape[2]) if layout == "NHWC" else (shape[1], shape[2], shape[3])
    else:
        c, h, w = None, *(image_size or (None, None))
    if spec.size is not None:
        h, w = spec.size
    if c is not None and c != spec.channels:
        want = "L" if c == 1 else "RGB (or BGR)"
        raise ResqueInputError(
            f"image mode {spec.mode!r} gives {spec.channels} channel(s), but the model input {main.name!r} of shape "
            f"{shape} takes {c}; pass --image-mode {want.split()[0]} (image_spec.mode={want!r})"
        )
    return Geometry(layout, c, h, w)


def resize(im, spec: ImageSpec, geo: Geometry):
    """The PIL image ``im`` resized by ``spec.resize`` to the geometry (unchanged where the size is dynamic);
    returns ``(image, (top, left))``: where it goes in the padded ``(H, W)`` frame."""
    from PIL import Image

    w0, h0 = im.size
    h, w = geo.height, geo.width
    if spec.resize == "height":
        if h is None:
            raise ResqueInputError("image resize 'height' needs the model's fixed height or --image-size H,W")
        limit = spec.max_width or w
        if limit is None:
            raise ResqueInputError(
                "image resize 'height' on a dynamic-width model needs --image-max-width (the padded width)"
            )
        nw = max(1, min(limit, round(w0 * h / h0)))
        return im.resize((nw, h), Image.BILINEAR), (0, 0)
    if h is None or w is None:
        return im, (0, 0)
    if spec.resize == "stretch":
        return (im if (w0, h0) == (w, h) else im.resize((w, h), Image.BILINEAR)), (0, 0)
    if spec.resize == "keep-aspect":
        r = min(w / w0, h / h0)
        nw, nh = max(1, round(w0 * r)), max(1, round(h0 * r))
        return im.resize((nw, nh), Image.BILINEAR), ((h - nh) // 2, (w - nw) // 2)
    r = max(w / w0, h / h0)  # center-crop: the shorter side fits, the centre is kept
    nw, nh = max(w, round(w0 * r)), max(h, round(h0 * r))
    big = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    return big.crop((left, top, left + w, top + h)), (0, 0)


def frame_size(spec: ImageSpec, geo: Geometry, pixels: list[np.ndarray], where: str) -> tuple[int, int]:
    """``(H, W)`` of the batch tensor: the model's, the padded width for ``resize="height"``, or the images' own
    (which must then agree)."""
    if spec.resize == "height":
        return geo.height, spec.max_width or geo.width
    if geo.height is not None and geo.width is not None:
        return geo.height, geo.width
    sizes = sorted({p.shape[:2] for p in pixels})
    if len(sizes) > 1:
        raise ResqueInputError(
            f"data: {where}: images of different sizes {sizes[:3]} in one batch for a model of dynamic size; give "
            "--image-size H,W or resize the images"
        )
    return sizes[0]


def to_tensor(
    pixels: list[np.ndarray], offsets: list[tuple[int, int]], spec: ImageSpec, geo: Geometry, where: str
) -> np.ndarray:
    """Decoded ``(h, w)`` / ``(h, w, c)`` images -> the float32 batch ``(n, C, H, W)`` or ``(n, H, W, C)``:
    ``(pixel * scale - mean) / std`` per channel, each image at its offset in a frame of zeros (the padding).

    One float32 buffer is written once and normalised in place, per image, with the same float32 operations in the
    same order as a per-image computation, instead of three temporaries per image.
    """
    h, w = frame_size(spec, geo, pixels, where)
    c = spec.channels
    nhwc = geo.layout == "NHWC"
    x = np.zeros((len(pixels), h, w, c) if nhwc else (len(pixels), c, h, w), np.float32)
    shape = (1, 1, c) if nhwc else (c, 1, 1)
    mean = np.broadcast_to(np.asarray(spec.mean, np.float32).reshape(-1, 1, 1)[:, 0, 0], (c,)).reshape(shape)
    std = np.broadcast_to(np.asarray(spec.std, np.float32).reshape(-1, 1, 1)[:, 0, 0], (c,)).reshape(shape)
    scale = np.float32(spec.scale)
    for i, (p, (top, left)) in enumerate(zip(pixels, offsets, strict=True)):
        p = p[:, :, None] if p.ndim == 2 else p
        if spec.mode == "BGR":
            p = p[:, :, ::-1]
        ph, pw = min(p.shape[0], h - top), min(p.shape[1], w - left)
        if nhwc:
            region = x[i, top : top + ph, left : left + pw, :]
            np.copyto(region, p[:ph, :pw], casting="unsafe")
        else:
            region = x[i, :, top : top + ph, left : left + pw]
            np.copyto(region, p[:ph, :pw].transpose(2, 0, 1), casting="unsafe")  # HWC -> CHW while converting
        region *= scale
        region -= mean
        region /= std
    return x

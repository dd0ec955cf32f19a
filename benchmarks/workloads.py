"""What only the benchmarks (and the tests of their inputs) use: new tasks on the digits, photo tiles, synthetic images.

- Task shift (``evidence.py``): :func:`make_task` builds new labelled tasks on the digits' ``(N, 1, 8, 8)`` input
  shape: relabelings of the digits (:data:`DIGIT_TASKS`) and image patches of three photographs that ship with
  scikit-learn and matplotlib (:data:`PHOTO_TASKS`; see :func:`load_photo_tiles` for exactly what they are).
  :func:`embed` reads a torch model's representation through a forward hook, :func:`replace_head` gives it a new
  classification head.
- Quadrant images (``soak.py``, ``tests/``): :func:`quadrant_images`, a cheap 4-class ``(N, 1, 8, 8)`` workload.
- CIFAR-like images (``throughput.py``): :func:`synth_images`, written as ``.npz`` shards (:func:`write_npz_shards`)
  and as PNG files in class folders (:func:`write_png_folder`).

Nothing is downloaded. Only numpy is imported at module level: the throughput benchmark's worker processes import
this module, and their peak RSS is measured (torch, scipy and matplotlib are imported by the functions that need
them). The digits data, model and shifts stay in :mod:`resque_airflow.examples.digits`, which the demo uses too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from resque_airflow.examples.digits import DigitsSplits, Split


# --------------------------------------------------------------------------------------------------------------------
# Task shift: new labelled tasks on the digits' input shape
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A new task: ``train`` (fine-tuning), ``heldout`` (accuracy target) and ``test`` (scored by the gate)."""

    name: str
    description: str
    num_classes: int
    train: Split
    heldout: Split
    test: Split


def _relabel(fn: Callable[[np.ndarray], np.ndarray], keep: Callable[[np.ndarray], np.ndarray] | None = None):
    def build(s: Split) -> Split:
        from resque_airflow.examples.digits import Split

        mask = np.ones(len(s), bool) if keep is None else keep(s.y)
        return Split(s.x[mask], fn(s.y[mask]).astype(np.int64))

    return build


DIGIT_TASKS: dict[str, tuple[str, int, Callable[[Split], Split]]] = {
    "parity": ("digit is odd (1) or even (0)", 2, _relabel(lambda y: y % 2)),
    "ge5": ("digit >= 5 (1) or < 5 (0)", 2, _relabel(lambda y: (y >= 5).astype(np.int64))),
    "mod3": ("digit modulo 3 (3 classes)", 3, _relabel(lambda y: y % 3)),
    "pair_3_8": ("only 3s and 8s: 8 (1) vs 3 (0)", 2, _relabel(lambda y: y == 8, lambda y: np.isin(y, [3, 8]))),
    "pair_1_7": ("only 1s and 7s: 7 (1) vs 1 (0)", 2, _relabel(lambda y: y == 7, lambda y: np.isin(y, [1, 7]))),
    "pair_4_9": ("only 4s and 9s: 9 (1) vs 4 (0)", 2, _relabel(lambda y: y == 9, lambda y: np.isin(y, [4, 9]))),
}
"""Relabelings of the digits: name -> (description, number of classes, split -> relabelled split)."""

PHOTO_TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "photos_china_flower": ("8x8 patches of two photos: china.jpg (0) vs flower.jpg (1)", ("china", "flower")),
    "photos_3way": (
        "8x8 patches of three photos: china.jpg (0), flower.jpg (1), grace_hopper.jpg (2)",
        ("china", "flower", "grace_hopper"),
    ),
}
"""Tasks from another data set: name -> (description, photos used as classes, in label order)."""

TASK_NAMES: tuple[str, ...] = (*DIGIT_TASKS, *PHOTO_TASKS)
PHOTO_TILE = 24  # pixels of photo per tile side; 24 / 8 = 3x3 block averages


def load_photo_tiles(tile: int = PHOTO_TILE) -> dict[str, np.ndarray]:
    """Non-overlapping grey-scale tiles of three bundled photographs, reduced to 8x8.

    The photos are the only natural images bundled with the installed packages (no download):
    ``china.jpg`` and ``flower.jpg`` from ``sklearn.datasets.load_sample_images`` (427x640 colour photos of a
    Chinese temple and of a flower) and ``grace_hopper.jpg`` from matplotlib's sample data (a 600x512 portrait).
    Each photo is converted to grey (PIL mode ``"L"``), cut into non-overlapping ``tile`` x ``tile`` squares, and
    each square is reduced to 8x8 by block averaging and scaled to [0, 1]. The classes are therefore "which photo a
    patch comes from": a texture / brightness discrimination task unrelated to digits, not a real-world data set.

    Returns:
        photo name -> ``(n_tiles, 1, 8, 8)`` float32 in [0, 1].
    """
    from matplotlib import cbook
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if tile % 8:
        raise ValueError(f"tile: expected a multiple of 8, got {tile}")
    photos = {}
    sample = load_sample_images()
    for name, img in zip(sample.filenames, sample.images, strict=True):
        photos[Path(name).stem] = Image.fromarray(img).convert("L")
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photos["grace_hopper"] = Image.open(f).convert("L")
    out = {}
    b = tile // 8
    for name, im in photos.items():
        a = np.asarray(im, np.float32) / 255.0
        h, w = (a.shape[0] // tile) * tile, (a.shape[1] // tile) * tile
        # (rows, tile, cols, tile) -> one tile per (row, col); then 3x3 block means down to 8x8.
        tiles = a[:h, :w].reshape(h // tile, tile, w // tile, tile).transpose(0, 2, 1, 3).reshape(-1, tile, tile)
        small = tiles.reshape(-1, 8, b, 8, b).mean(axis=(2, 4))
        out[name] = small[:, None].astype(np.float32)
    return out


def make_task(name: str, splits: DigitsSplits | None = None, seed: int = 0) -> Task:
    """Build the new task ``name`` (one of :data:`TASK_NAMES`).

    Digit tasks relabel (and for pairs, subset) the ``train`` / ``heldout`` / ``test`` splits of ``splits``
    (``load_digits_splits(seed)`` when None). Photo tasks split each photo's tiles with the same fractions as the
    digits (the ``reference`` share goes unused), stratified by photo, with ``seed``.
    """
    from resque_airflow.examples.digits import SPLIT_FRACTIONS, Split, load_digits_splits, stratified_split

    if name in DIGIT_TASKS:
        desc, k, build = DIGIT_TASKS[name]
        s = splits if splits is not None else load_digits_splits(seed)
        return Task(name, desc, k, build(s.train), build(s.heldout), build(s.test))
    if name in PHOTO_TASKS:
        desc, photos = PHOTO_TASKS[name]
        tiles = load_photo_tiles()
        x = np.concatenate([tiles[p] for p in photos])
        y = np.concatenate([np.full(len(tiles[p]), i, np.int64) for i, p in enumerate(photos)])
        idx = stratified_split(y, SPLIT_FRACTIONS, seed)
        parts = {k: Split(x[i], y[i]) for k, i in idx.items()}
        return Task(name, desc, len(photos), parts["train"], parts["heldout"], parts["test"])
    raise ValueError(f"task: expected one of {TASK_NAMES}, got {name!r}")


def replace_head(model: nn.Module, num_classes: int, seed: int = 0) -> nn.Module:
    """Give ``model`` (a ``DigitsCNN``) a new, freshly initialised linear head with ``num_classes`` outputs.

    In place; returns the model. The global torch generator is left as it was.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model


def embed(
    model: nn.Module, x: np.ndarray, *, layer: str | None = None, pool: bool = True, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Representation and logits of ``x`` under ``model``, via a forward hook on ``layer``.

    Args:
        model: a torch model with a sub-module named ``layer``.
        x: ``(N, 1, 8, 8)`` float32 images.
        layer: name of the hooked sub-module; the digits' ``REPRESENTATION_LAYER`` (``"conv2"``) when None.
        pool: average the layer's ``(N, C, H, W)`` output over H, W (DESIGN.md 2.3), giving ``(N, C)``; when
            False, flatten it to ``(N, C * H * W)`` (the "flattened" RESQUE_task variant).
        batch_size: forward-pass batch size.

    Returns:
        ``(features, logits)``: ``(N, D)`` float32 and ``(N, num_classes)`` float32 numpy arrays.
    """
    import torch

    from resque_airflow.examples.digits import REPRESENTATION_LAYER

    module = dict(model.named_modules())[layer or REPRESENTATION_LAYER]
    captured: list[torch.Tensor] = []

    def hook(_mod, _inp, out):
        if out.ndim > 2:
            # Pooling by rank as in DESIGN.md 2.3: (N, C, H, W) -> mean over H, W; (N, T, D) -> mean over T.
            out = out.mean(dim=tuple(range(2, out.ndim))) if pool else out.flatten(1)
        captured.append(out)

    handle = module.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = [
                model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], np.float32)))
                for i in range(0, len(x), batch_size)
            ]
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured).numpy().astype(np.float32), torch.cat(logits).numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# Quadrant images: a cheap 4-class workload for the soak benchmark and the tests
# --------------------------------------------------------------------------------------------------------------------


def quadrant_images(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random ``(1, 8, 8)`` float32 inputs whose class (0..3) lights one quadrant; ``shift`` adds noise.

    Returns ``x`` ``(n, 1, 8, 8)`` float32 (background in [0, 0.2), the class's 4x4 quadrant 0.8 brighter, plus
    Gaussian noise of standard deviation ``shift``) and ``y`` ``(n,)`` int64.

    >>> x, y = quadrant_images(3, seed=0)
    >>> x.shape, x.dtype, y.tolist()
    ((3, 1, 8, 8), dtype('float32'), [3, 2, 2])
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.random((n, 1, 8, 8), dtype=np.float32) * 0.2
    for k in range(4):
        r, c = divmod(k, 2)
        x[y == k, :, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] += 0.8
    if shift:
        x += rng.normal(0, shift, x.shape).astype(np.float32)
    return x, y.astype(np.int64)


# --------------------------------------------------------------------------------------------------------------------
# CIFAR-like images for the throughput benchmark
# --------------------------------------------------------------------------------------------------------------------

NUM_CLASSES = 10
SHARD_ROWS = 1000  # rows per .npz shard: the reader holds one shard in memory at a time (12 MB of 32x32x3 float32)
# CIFAR-like input normalisation, applied identically to the PNG files (by the reader) and the .npz shards (here).
IMAGE_SPEC = {"mode": "RGB", "scale": 1.0 / 255.0, "mean": (0.49, 0.48, 0.45), "std": (0.25, 0.24, 0.26)}


def synth_images(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` CIFAR-like ``(32, 32, 3)`` uint8 images with labels 0..9: a class colour, a smooth random pattern and
    pixel noise; ``shift`` brightens and adds noise (the new data's distribution shift)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n)
    colours = np.random.default_rng(1234).uniform(40, 215, (NUM_CLASSES, 3))
    low = rng.normal(0, 30, (n, 4, 4, 3))
    smooth = np.repeat(np.repeat(low, 8, axis=1), 8, axis=2)  # 4x4 blocks -> 32x32
    img = colours[y][:, None, None, :] + smooth + rng.normal(0, 12 + 40 * shift, (n, 32, 32, 3)) + 25 * shift
    return np.clip(img, 0, 255).astype(np.uint8), y.astype(np.int64)


def to_input(img: np.ndarray) -> np.ndarray:
    """uint8 ``(n, H, W, 3)`` -> float32 ``(n, 3, H, W)`` exactly as the image-folder reader computes it."""
    a = img.astype(np.float32).transpose(0, 3, 1, 2)
    mean = np.asarray(IMAGE_SPEC["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(IMAGE_SPEC["std"], np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((a * np.float32(IMAGE_SPEC["scale"]) - mean) / std)


def write_npz_shards(folder: Path, n: int, seed: int, shift: float) -> None:
    """``n`` rows as ``.npz`` shards of :data:`SHARD_ROWS` rows (``x`` float32 model input, ``y`` int64)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, n, SHARD_ROWS)):
        img, y = synth_images(min(SHARD_ROWS, n - start), seed * 100_003 + i, shift)
        np.savez(folder / f"shard-{i:05d}.npz", x=to_input(img), y=y)


def write_png_folder(folder: Path, n: int, seed: int, shift: float) -> None:
    """The same images as :func:`write_npz_shards` as PNG files in class sub-folders ``00`` .. ``09``."""
    from PIL import Image

    for k in range(NUM_CLASSES):
        (folder / f"{k:02d}").mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, n, SHARD_ROWS)):
        img, y = synth_images(min(SHARD_ROWS, n - start), seed * 100_003 + i, shift)
        for j in range(img.shape[0]):
            Image.fromarray(img[j]).save(folder / f"{y[j]:02d}" / f"{start + j:07d}.png")


def load_npz_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every ``.npz`` shard of ``folder`` in name order, concatenated: ``x`` ``(N, ...)`` and ``y`` ``(N,)``."""
    xs, ys = [], []
    for f in sorted(folder.glob("*.npz")):
        with np.load(f) as z:
            xs.append(z["x"])
            ys.append(z["y"])
    return np.concatenate(xs), np.concatenate(ys)

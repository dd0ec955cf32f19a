"""Data of the Fashion-MNIST benchmark: the IDX loader, the paper's split pairing, the shifts and the new tasks.

- :func:`load_fashion`: Debian's ``dataset-fashion-mnist`` (IDX files, gzip or not) as ``(N, 1, 28, 28)`` float32
  in [0, 1] and ``(N,)`` int64. Missing files raise :class:`DataMissing` whose message says in one line how to get
  them (:data:`INSTALL_HINT`).
- :func:`paper_splits`: the RESQUE pairing. A per-class stratified subset of the official training set is cut
  50/30/20 into ``split_0``, ``split_1``, ``split_2`` (seeded); the source model trains on ``split_0 U split_2``
  (clean), retraining uses ``split_1 U split_2`` with the shift applied once, offline; accuracy is measured on a
  stratified subset of the official test set, shifted the same way.
- :data:`SHIFTS` / :func:`apply_shift`: seven shifts on [0, 1] images, each output quantised to 8 bits (as a stored
  image would be), with :data:`SEVERITIES` from mild to severe (the strongest ones are meant to be unrecoverable
  within the fine-tuning cap).
- :func:`make_tasks`: new tasks for the task-shift part: relabelings of Fashion-MNIST, scikit-learn's digits
  upsampled to 28x28, and (for a model trained on the digits) Fashion-MNIST itself.

Only numpy and scipy are used here.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = (
    "Fashion-MNIST is missing: run scripts/install-fashion-mnist.sh (apt-get update && apt-get install -y "
    "dataset-fashion-mnist), or set FASHION_MNIST_DIR to a folder holding its four IDX files"
)
CLASS_NAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
SPLIT_FRACTIONS = (0.5, 0.3, 0.2)  # split_0, split_1, split_2 of every class (the RESQUE code's SplitData)


class DataMissing(RuntimeError):
    """The Fashion-MNIST IDX files are not where they were looked for; the message says how to install them."""


@dataclass(frozen=True)
class Split:
    """Images ``x`` (``(N, 1, 28, 28)`` float32 in [0, 1]) and labels ``y`` (``(N,)`` int64)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: np.ndarray) -> Split:
        return Split(self.x[idx], self.y[idx])


# ----------------------------------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (``.gz`` or raw, detected from its first bytes) as a numpy array of its declared shape.

    Only unsigned-byte data (type code 0x08), which is what (Fashion-)MNIST uses, is supported.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} bytes")
    return data.reshape(shape)


def data_dir() -> Path:
    """Where the IDX files are looked for: ``$FASHION_MNIST_DIR`` or Debian's install folder."""
    return Path(os.environ.get("FASHION_MNIST_DIR", DEFAULT_DIR))


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataMissing(f"{INSTALL_HINT} (looked for {stem}[.gz] in {folder})")


def load_fashion(folder: str | os.PathLike | None = None) -> tuple[Split, Split]:
    """The official training (60,000) and test (10,000) sets, as :class:`Split` s."""
    folder = Path(folder) if folder is not None else data_dir()
    out = []
    for prefix in ("train", "t10k"):
        x = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
        out.append(Split((x.astype(np.float32) / 255.0)[:, None], y.astype(np.int64)))
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------------------
# The paper's pairing
# ----------------------------------------------------------------------------------------------------------------------


def stratified_take(y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` random rows of every class (sorted), or all rows of a smaller class."""
    idx = [rng.permutation(np.flatnonzero(y == k))[:per_class] for k in np.unique(y)]
    return np.sort(np.concatenate(idx))


@dataclass(frozen=True)
class PaperSplits:
    """``split_0``, ``split_1``, ``split_2`` of the training subset and the test subset (all clean)."""

    split_0: Split
    split_1: Split
    split_2: Split
    test: Split

    @property
    def source(self) -> Split:
        """What the source model trains on: ``split_0 U split_2``."""
        return _concat(self.split_0, self.split_2)

    @property
    def retrain(self) -> Split:
        """What retraining uses (before the shift): ``split_1 U split_2``."""
        return _concat(self.split_1, self.split_2)


def _concat(a: Split, b: Split) -> Split:
    return Split(np.concatenate([a.x, b.x]), np.concatenate([a.y, b.y]))


def paper_splits(train: Split, test: Split, train_per_class: int, test_per_class: int, seed: int = 0) -> PaperSplits:
    """Stratified subsets (``train_per_class`` and ``test_per_class`` images of every class), the training subset
    cut 50/30/20 per class into ``split_0, split_1, split_2``."""
    rng = np.random.default_rng(seed)
    sub = train.take(stratified_take(train.y, train_per_class, rng))
    parts: list[list[np.ndarray]] = [[], [], []]
    for k in np.unique(sub.y):
        idx = rng.permutation(np.flatnonzero(sub.y == k))
        a = round(SPLIT_FRACTIONS[0] * idx.size)
        b = a + round(SPLIT_FRACTIONS[1] * idx.size)
        for part, chunk in zip(parts, (idx[:a], idx[a:b], idx[b:]), strict=True):
            part.append(chunk)
    s0, s1, s2 = (sub.take(np.sort(np.concatenate(p))) for p in parts)
    return PaperSplits(s0, s1, s2, test.take(stratified_take(test.y, test_per_class, rng)))


# ----------------------------------------------------------------------------------------------------------------------
# Shifts: (x (N, 1, H, W) in [0, 1], severity, seed) -> shifted x, same shape, quantised to 8 bits
# ----------------------------------------------------------------------------------------------------------------------


def _quantise(x: np.ndarray) -> np.ndarray:
    return (np.round(np.clip(x, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def gaussian_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive N(0, sigma^2) noise per pixel."""
    return x + rng.normal(0.0, sigma, x.shape).astype(np.float32)


def salt_and_pepper(x: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """A fraction ``p`` of the pixels set to 0 or 1 (half each)."""
    u = rng.random(x.shape)
    out = x.copy()
    out[u < p / 2] = 0.0
    out[(u >= p / 2) & (u < p)] = 1.0
    return out


def impulse_noise(x: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Random-valued impulse noise: a fraction ``p`` of the pixels replaced by uniform values in [0, 1]."""
    hit = rng.random(x.shape) < p
    return np.where(hit, rng.random(x.shape).astype(np.float32), x)


def shot_noise(x: np.ndarray, inv_photons: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson (shot) noise: ``Poisson(x * lam) / lam`` with ``lam = 1 / inv_photons`` photons at full intensity."""
    lam = 1.0 / inv_photons
    return (rng.poisson(x.astype(np.float64) * lam) / lam).astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian filter of ``sigma`` pixels on each image (reflecting borders, as the RESQUE code)."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="reflect")


def contrast(x: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Contrast reduced by ``s`` in [0, 1): ``m + (x - m)(1 - s)`` around each image's mean ``m``."""
    m = x.mean(axis=(1, 2, 3), keepdims=True)
    return m + (x - m) * (1.0 - s)


def rotation(x: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Each image turned by an angle drawn uniformly from [-degrees, degrees] (bilinear, zero fill)."""
    from scipy.ndimage import rotate

    angles = rng.uniform(-degrees, degrees, x.shape[0])
    out = np.empty_like(x)
    for i, a in enumerate(angles):
        out[i, 0] = rotate(x[i, 0], a, reshape=False, order=1, mode="constant", cval=0.0)
    return out


SHIFTS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "salt_and_pepper": salt_and_pepper,
    "gaussian_blur": gaussian_blur,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "contrast": contrast,
    "rotation": rotation,
}
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.05, 0.1, 0.2, 0.4, 0.8),  # sigma, in units of the [0, 1] pixel range
    "salt_and_pepper": (0.03, 0.1, 0.2, 0.4, 0.7),  # fraction of pixels
    "gaussian_blur": (0.5, 1.0, 1.5, 2.5, 4.0),  # sigma, pixels
    "shot_noise": (1 / 20, 1 / 8, 1 / 3, 1.0, 3.0),  # 1 / photons at full intensity
    "impulse_noise": (0.05, 0.1, 0.2, 0.4, 0.7),  # fraction of pixels
    "contrast": (0.1, 0.25, 0.5, 0.8, 0.95),  # contrast reduction
    "rotation": (15.0, 30.0, 60.0, 120.0, 180.0),  # maximum angle, degrees
}
"""Five levels per shift type, mild to severe (chosen before any correlation was computed: see docs/EVIDENCE.md)."""


def apply_shift(x: np.ndarray, shift: str, severity: float, seed: int) -> np.ndarray:
    """``x`` shifted by ``shift`` at ``severity`` (``"none"``: unchanged), clipped to [0, 1], quantised to 8 bits."""
    if shift == "none":
        return x
    return _quantise(SHIFTS[shift](x, severity, np.random.default_rng(seed)))


# ----------------------------------------------------------------------------------------------------------------------
# Task shift
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A new task: ``train`` (fine-tuning data, also what the gate scores), ``heldout`` (accuracy target)."""

    name: str
    description: str
    num_classes: int
    train: Split
    heldout: Split


def _relabel(s: Split, mapping: dict[int, int]) -> Split:
    keep = np.isin(s.y, list(mapping))
    lut = np.full(10, -1, np.int64)
    for k, v in mapping.items():
        lut[k] = v
    return Split(s.x[keep], lut[s.y[keep]])


FASHION_TASKS: dict[str, tuple[str, dict[int, int]]] = {
    "fashion_groups4": (
        "tops (t-shirt, pullover, coat, shirt) / bottoms and dresses / shoes / bags",
        {0: 0, 2: 0, 4: 0, 6: 0, 1: 1, 3: 1, 5: 2, 7: 2, 9: 2, 8: 3},
    ),
    "fashion_upper4": ("t-shirt vs pullover vs coat vs shirt (the four classes only)", {0: 0, 2: 1, 4: 2, 6: 3}),
    "fashion_footwear3": ("sandal vs sneaker vs ankle boot (the three classes only)", {5: 0, 7: 1, 9: 2}),
    "fashion_parity": ("class id even vs odd (an arbitrary 2-way relabeling)", {k: k % 2 for k in range(10)}),
}


def load_digits_28(seed: int = 0, train_fraction: float = 0.7) -> tuple[Split, Split]:
    """scikit-learn's digits (1,797 images of 8x8, values 0..16) upsampled to 28x28 (bilinear, scaled to [0, 1]),
    cut per class into a training and a held-out part."""
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    d = load_digits()
    x8 = (d.images / 16.0).astype(np.float32)
    x = np.clip(zoom(x8, (1, 28 / 8, 28 / 8), order=1), 0.0, 1.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    tr = []
    for k in range(10):
        idx = rng.permutation(np.flatnonzero(y == k))
        tr.append(idx[: round(train_fraction * idx.size)])
    train_idx = np.sort(np.concatenate(tr))
    mask = np.zeros(y.size, bool)
    mask[train_idx] = True
    return Split(x[mask], y[mask]), Split(x[~mask], y[~mask])


def make_tasks(splits: PaperSplits, digits: tuple[Split, Split], names: tuple[str, ...]) -> list[Task]:
    """The new tasks for a model trained on Fashion-MNIST (relabelings on the retraining data ``split_1 U split_2``
    and the test subset; ``digits28``: the upsampled digits) and, named ``fashion_on_digits_model``, Fashion-MNIST's
    10 classes as the new task of a model trained on the digits."""
    tasks = []
    for name in names:
        if name in FASHION_TASKS:
            desc, mapping = FASHION_TASKS[name]
            tasks.append(
                Task(name, desc, len(set(mapping.values())), _relabel(splits.retrain, mapping),
                     _relabel(splits.test, mapping))
            )  # fmt: skip
        elif name == "digits28":
            tasks.append(Task(name, "scikit-learn digits upsampled to 28x28", 10, *digits))
        elif name == "fashion_on_digits_model":
            tasks.append(Task(name, "Fashion-MNIST (10 classes) given to a digits model", 10, splits.retrain,
                              splits.test))  # fmt: skip
        else:
            raise ValueError(f"task: unknown {name!r}")
    return tasks


def write_npz(path: str | os.PathLike, x: np.ndarray, y: np.ndarray | None = None) -> str:
    """A batch in the product's data format: ``x`` float32 ``(N, 1, 28, 28)`` (NCHW), optional ``y`` int64."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"x": np.ascontiguousarray(x, np.float32)}
    if y is not None:
        arrays["y"] = np.asarray(y, np.int64)
    np.savez(path, **arrays)
    return str(path)

"""Datasets for pretraining and evaluation: image folders with a robust RGB loader, a synthetic demo set, indices.

- ``build_pretrain_dataset``: MAE reads ``ImageFolder(<data_path>/train)``; LocalMIM/ViTFreeze point
  ``--data_path`` at the train folder itself. We accept both, plus a flat folder of images (label 0) and the
  word ``demo`` (SPEC 2.4, 5.5). Class discovery is torchvision's ``find_classes``/``make_dataset``, so labels
  equal ``torchvision.datasets.ImageFolder``'s. ``build_folder_dataset`` reads one given folder (e.g. ``val``).
- ``ImageFileDataset``: every image is converted to RGB (greyscale, CMYK, palette and RGBA files occur in
  ImageNet); a corrupt or truncated file is reported once with its path and replaced by the next readable
  sample instead of killing a multi-day run (MAE/torchvision's ``pil_loader`` raises mid-epoch).
- ``DemoDataset``: a deterministic, in-memory set of synthetic shape classes for CPU smoke runs (nanoGPT's
  shakespeare_char idea). Colours come from one distribution shared by all classes, so only shape separates
  them: a randomly initialised ViT's features (colour-dominated) score low, and the demo pretraining has
  something to learn (k-NN / linear probe of the pretrained backbone far above the random one, README).
- ``IndexedDataset``: returns the sample index as well, which exact (index-aware) k-NN gathering needs
  (DINO's ``ReturnIndexDataset``; ViTFreeze's ``run_knn.py`` lost that alignment, SPEC 7.3).
- ``few_shot_indices`` / ``few_shot_subset``: N labelled samples per class, drawn with a seed (few-shot k-NN
  banks; fine-tuning on few labels, the semi-supervised setting where pretraining pays off most).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageFile
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset

logger = logging.getLogger("vitfreeze")

__all__ = ["DEMO_SEEDS", "build_pretrain_dataset", "build_folder_dataset", "load_rgb", "ImageFileDataset",
           "DemoDataset", "IndexedDataset", "LabelledSubset", "few_shot_indices", "few_shot_subset", "CorruptImageError",
           "IMG_EXTENSIONS"]

# Everything PIL raises for unreadable data: truncated (OSError), unidentified (UnidentifiedImageError is an
# OSError), broken headers (SyntaxError / ValueError / EOFError in some plugins), decompression bombs.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class CorruptImageError(OSError):
    """An image file could not be decoded (raised with ``strict_data`` or when no readable sample is found)."""


def load_rgb(path: str) -> Image.Image:
    """Open and fully decode an image file as PIL RGB.

    ``convert`` forces a full decode, so a truncated file raises here (as long as PIL's
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False) instead of silently returning grey pixels.
    """
    with open(path, "rb") as f:
        img = Image.open(f)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # avoids PIL's "palette with transparency" warning
        return img.convert("RGB")


class ImageFileDataset(Dataset):
    """(path, label) samples read with ``load_rgb``; unreadable files are skipped deterministically.

    Args:
        samples: list of (file path, class index).
        classes: class names; ``classes[label]`` names a sample's class.
        transform: applied to the PIL RGB image.
        strict: raise ``CorruptImageError`` on the first unreadable file instead of skipping it.
        max_tries: how many consecutive samples to try before giving up.

    Attributes:
        samples, targets, classes: as in ``torchvision.datasets.ImageFolder``.
        num_skipped: unreadable reads replaced by another sample so far (per process: each DataLoader
            worker counts its own).
        bad_paths: files found unreadable so far in this process; they are skipped without re-reading.
    """

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform: Callable | None = None,
                 *, strict: bool = False, max_tries: int = 16) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.transform = transform
        self.strict = strict
        self.max_tries = max_tries
        self.num_skipped = 0
        self.bad_paths: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        tries = min(self.max_tries, len(self.samples))
        failed = []
        for attempt in range(tries):
            i = (index + attempt) % len(self.samples)
            path, label = self.samples[i]
            if path in self.bad_paths:
                failed.append(path)
                continue
            try:
                img = load_rgb(path)
            except _DECODE_ERRORS as err:
                if self.strict:
                    raise CorruptImageError(f"cannot read image {path}: {err!r}") from err
                self.bad_paths.add(path)
                logger.warning("skipping unreadable image %s (%r); trying sample %d instead", path, err,
                               (i + 1) % len(self.samples))
                failed.append(path)
                continue
            self.num_skipped += attempt
            return (self.transform(img) if self.transform is not None else img), label
        raise CorruptImageError(f"no readable image in {tries} consecutive samples from index {index}: {failed}")


def _scan_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """ImageFolder samples of ``root`` if its class sub-folders hold images, else its own image files (label 0)."""
    has_subdirs = any(entry.is_dir() for entry in os.scandir(root))
    samples: list[tuple[str, int]] = []
    classes: list[str] = []
    if has_subdirs:
        classes, class_to_idx = find_classes(root)
        for name in classes:  # per class: make_dataset raises on an empty class (allow_empty is torchvision>=0.18)
            try:
                samples += make_dataset(root, {name: class_to_idx[name]}, extensions=IMG_EXTENSIONS)
            except FileNotFoundError:
                logger.warning("class folder %s holds no images", os.path.join(root, name))
    flat = sorted(e.path for e in os.scandir(root)
                  if e.is_file() and has_file_allowed_extension(e.name, IMG_EXTENSIONS))
    if samples:
        if flat:
            logger.warning("ignoring %d image files directly in %s (class sub-folders found)", len(flat), root)
        return samples, classes
    return [(path, 0) for path in flat], [os.path.basename(os.path.normpath(root))]


def _debug_subset(samples: list[tuple[str, int]], per_class: int = 8, total: int = 64) -> list[tuple[str, int]]:
    """First ``per_class`` samples of each class, taken round-robin over classes up to ``total``, in input order."""
    rank: dict[int, int] = {}
    keyed = []
    for i, (_, label) in enumerate(samples):
        r = rank[label] = rank.get(label, -1) + 1
        if r < per_class:
            keyed.append((r, label, i))
    keep = sorted(i for _, _, i in sorted(keyed)[:total])
    return [samples[i] for i in keep]


def build_folder_dataset(root: str, transform: Callable | None, *, strict_data: bool = False,
                         debug: bool = False) -> ImageFileDataset:
    """An ``ImageFileDataset`` over exactly ``root`` (no ``train`` lookup; e.g. ``<data_path>/val`` for k-NN).

    Args:
        root: folder read as ImageFolder (sorted class sub-folders holding images) or, without such
            sub-folders, as a flat folder of images with label 0 and one class named after the folder.
            Extensions are torchvision's ``IMG_EXTENSIONS``, case-insensitive.
        transform: applied to each PIL RGB image.
        strict_data: raise on the first unreadable file instead of logging it and using the next sample.
        debug: keep a small deterministic subset (first 8 images per class, round-robin, 64 in all).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no image files were found.
    """
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data path {root!r} does not exist or is not a folder")
    samples, classes = _scan_folder(root)
    if not samples:
        raise ValueError(f"no image files found in {root!r} (in class sub-folders or directly); accepted "
                         f"extensions (case-insensitive): {', '.join(IMG_EXTENSIONS)}")
    if debug:
        samples = _debug_subset(samples)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning("PIL ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated files will load as partly grey")
    logger.info("dataset %s: %d images, %d classes%s", root, len(samples), len(classes), " (debug subset)" * debug)
    return ImageFileDataset(samples, classes, transform, strict=strict_data)


def build_pretrain_dataset(data_path: str, transform: Callable | None, *, strict_data: bool = False,
                           debug: bool = False, demo_size: int = 64) -> Dataset:
    """The pretraining dataset of (image, label) pairs.

    Args:
        data_path: ``'demo'`` for ``DemoDataset``; else a folder: ``<data_path>/train`` if it exists (MAE's
            layout), else ``data_path`` itself (LocalMIM's), read by ``build_folder_dataset``.
        transform: applied to each PIL RGB image.
        strict_data: raise on the first unreadable file instead of logging it and using the next sample.
        debug: keep a small deterministic subset (at most 8 images per class, 64 in all).
        demo_size: image side of the demo dataset in pixels. The demo images are always those of the demo
            ``train`` split (``DEMO_SEEDS``), whatever the run's ``--seed``: never the images evaluation uses.

    Raises:
        FileNotFoundError: ``data_path`` does not exist.
        ValueError: no image files were found.
    """
    if data_path == "demo":
        return DemoDataset(per_class=8 if debug else 64, size=demo_size, seed=DEMO_SEEDS["train"], transform=transform)
    root = os.path.expanduser(data_path)
    if os.path.isdir(os.path.join(root, "train")):
        root = os.path.join(root, "train")
    return build_folder_dataset(root, transform, strict_data=strict_data, debug=debug)


# --------------------------------------------------------------------------------------------------------------
# Demo dataset: one shape per class; position / scale / rotation, colours (from palettes shared by all classes) and
# pixel noise are random per sample. Per-class palettes made colour alone separate the classes, which let a
# randomly initialised ViT reach ~80 % 20-NN accuracy, as high as a pretrained one.

_SHAPES = ("disc", "square", "triangle", "ring", "cross", "stripes", "checkerboard", "gradient",
           "stripes_vertical", "stripes_diagonal")
_FG = np.array([[.90, .15, .15], [.15, .70, .20], [.20, .30, .95], [.95, .80, .10], [.85, .20, .85],
                [.10, .85, .85], [.95, .55, .10], [.60, .95, .40], [.55, .25, .10], [.95, .95, .95]])
_BG = np.array([[.15, .20, .35], [.35, .15, .30], [.30, .30, .10], [.10, .30, .30], [.20, .35, .15],
                [.40, .20, .10], [.10, .15, .20], [.25, .10, .40], [.20, .40, .40], [.05, .05, .05]])


def _shape_alpha(shape: str, u: np.ndarray, v: np.ndarray, r: np.ndarray, px: float) -> np.ndarray:
    """Soft coverage in [0, 1] of ``shape`` on rotated, centred coordinates u, v [N, S, S].

    r [N, 1, 1] is the shape's size (half-width in [-1, 1] units); px is one pixel in the same units.
    """
    rad = np.hypot(u, v)
    if shape in ("stripes", "stripes_vertical", "stripes_diagonal", "checkerboard", "gradient"):
        period = 0.25 + 0.5 * r  # r in [0.3, 0.6] -> period in [0.4, 0.55]
        if shape == "gradient":
            return np.clip(0.5 + u / 2.0, 0.0, 1.0)
        if shape == "checkerboard":
            wave = np.sin(np.pi * u / period) * np.sin(np.pi * v / period)
        else:
            w = {"stripes": v, "stripes_vertical": u, "stripes_diagonal": (u + v) / np.sqrt(2.0)}[shape]
            wave = np.sin(2.0 * np.pi * w / period)
        return 0.5 + 0.5 * np.tanh(4.0 * wave)  # soft square wave
    if shape == "disc":
        sdf = r - rad
    elif shape == "square":
        sdf = 0.85 * r - np.maximum(np.abs(u), np.abs(v))
    elif shape == "ring":
        sdf = 0.22 * r - np.abs(rad - 0.8 * r)
    elif shape == "cross":
        w = 0.3 * r
        sdf = np.maximum(np.minimum(w - np.abs(u), r - np.abs(v)), np.minimum(w - np.abs(v), r - np.abs(u)))
    elif shape == "triangle":  # equilateral, apex up: inside of three half-planes
        k = np.sqrt(3.0) / 2.0
        sdf = np.minimum.reduce([v + 0.5 * r, -k * u - 0.5 * v + 0.5 * r, k * u - 0.5 * v + 0.5 * r])
    else:
        raise ValueError(f"unknown demo shape {shape!r}")
    return np.clip(sdf / px + 0.5, 0.0, 1.0)  # ~1 pixel anti-aliased edge


def _render_class(label: int, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uint8 RGB images [n, size, size, 3] of class ``label``."""
    grid = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0  # pixel centres in [-1, 1]
    y, x = grid[None, :, None], grid[None, None, :]
    cx, cy = rng.uniform(-0.35, 0.35, (2, n, 1, 1))
    r = rng.uniform(0.3, 0.6, (n, 1, 1))
    angle = rng.uniform(-0.35, 0.35, (n, 1, 1))  # +-20 degrees keeps orientation classes apart
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    alpha = _shape_alpha(_SHAPES[label], u, v, r, px=2.0 / size)[..., None]
    # foreground and background colours: a random entry of each palette (the same palettes for every class), jittered
    fg_index, bg_index = rng.integers(0, len(_FG), n), rng.integers(0, len(_BG), n)
    fg = np.clip(_FG[fg_index][:, None, None] + rng.normal(0.0, 0.08, (n, 1, 1, 3)), 0.0, 1.0)
    bg = np.clip(_BG[bg_index][:, None, None] + rng.normal(0.0, 0.08, (n, 1, 1, 3)), 0.0, 1.0)
    img = bg * (1.0 - alpha) + fg * alpha + rng.normal(0.0, 0.06, (n, size, size, 3))
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


DEMO_SEEDS = {"train": 0, "val": 1, "test": 1}  # DemoDataset seed of each split (no separate test split)


class DemoDataset(Dataset):
    """Synthetic, deterministic image classification set generated in memory.

    Class ``c`` is a shape (disc, square, triangle, ring, cross, stripes, checkerboard, gradient, vertical and
    diagonal stripes); each sample draws its position, scale, rotation and foreground/background colours (from
    palettes shared by all classes, so colour says nothing about the class) and adds Gaussian pixel noise.
    Samples are ordered by class, like ImageFolder.

    Args:
        num_classes: number of classes, 1 to 10.
        per_class: images per class.
        size: image side in pixels.
        seed: seed of the numpy ``Generator``; the same seed gives the same bytes in every process.
        transform: applied to the PIL RGB image.

    Attributes:
        images: uint8 array [num_classes * per_class, size, size, 3].
        classes, targets: as in ``torchvision.datasets.ImageFolder``.
    """

    def __init__(self, num_classes: int = 8, per_class: int = 64, size: int = 64, seed: int = 0,
                 transform: Callable | None = None) -> None:
        if not 1 <= num_classes <= len(_SHAPES):
            raise ValueError(f"num_classes must be in [1, {len(_SHAPES)}], got {num_classes}")
        rng = np.random.default_rng(seed)
        self.images = np.concatenate([_render_class(c, per_class, size, rng) for c in range(num_classes)])
        self.classes = list(_SHAPES[:num_classes])
        self.targets = [c for c in range(num_classes) for _ in range(per_class)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index])
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


class IndexedDataset(Dataset):
    """Wraps a dataset so each item is (image, label, index); ``classes``/``targets`` pass through."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    @property
    def classes(self) -> list[str] | None:
        return getattr(self.dataset, "classes", None)

    @property
    def targets(self) -> list[int] | None:
        return getattr(self.dataset, "targets", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        img, label = self.dataset[index][:2]
        return img, label, index


class LabelledSubset(Dataset):
    """The items ``indices`` of a labelled dataset; ``classes`` are the parent's, ``targets`` the subset's."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    @property
    def classes(self) -> list[str] | None:
        return getattr(self.dataset, "classes", None)

    @property
    def targets(self) -> list[int]:
        return [self.dataset.targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]


def few_shot_indices(labels: Tensor, *, n_per_class: int, n_tries: int, seed: int = 0) -> list[Tensor]:
    """Indices of ``n_tries`` few-shot banks, each with ``n_per_class`` random samples of every class.

    Args:
        labels: [N] class indices of the full training set.
        n_per_class: samples drawn (without replacement) per class.
        n_tries: number of banks; bank t uses a generator seeded with ``seed + t`` (same on every rank).
        seed: base seed.

    Returns:
        ``n_tries`` int64 tensors of indices into ``labels`` (sorted), each of length n_per_class x classes.

    Raises:
        ValueError: a class has fewer than ``n_per_class`` samples.
    """
    labels = labels.cpu().long()
    classes = labels.unique()
    per_class = [(labels == c).nonzero().flatten() for c in classes]
    short = {int(c): len(idx) for c, idx in zip(classes, per_class) if len(idx) < n_per_class}
    if short:
        raise ValueError(f"{len(short)} class(es) have fewer than the {n_per_class} training samples per class asked "
                         f"for (class: samples {dict(list(short.items())[:8])})")
    banks = []
    for t in range(n_tries):
        gen = torch.Generator().manual_seed(seed + t)
        picks = [idx[torch.randperm(len(idx), generator=gen)[:n_per_class]] for idx in per_class]
        banks.append(torch.cat(picks).sort().values)
    return banks


def few_shot_subset(dataset: Dataset, *, n_per_class: int, seed: int) -> LabelledSubset:
    """``n_per_class`` items of every class of ``dataset`` (which has ``targets``), the same for the same seed.

    Raises:
        ValueError: the dataset has no ``targets``, or a class has fewer than ``n_per_class`` items.
    """
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError(f"{type(dataset).__name__} has no 'targets': cannot draw samples per class")
    (indices,) = few_shot_indices(torch.as_tensor(targets), n_per_class=n_per_class, n_tries=1, seed=seed)
    return LabelledSubset(dataset, indices.tolist())

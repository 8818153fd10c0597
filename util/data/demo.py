"""A synthetic demo dataset of shape classes for CPU smoke runs (nanoGPT's shakespeare_char idea).

``DemoDataset`` is deterministic and in memory. Colours come from one distribution shared by all classes, so
only shape separates them: a randomly initialised ViT's features (colour-dominated) score low, and the demo
pretraining has something to learn (k-NN / linear probe of the pretrained backbone far above the random one,
README).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["DEMO_SEEDS", "DemoDataset", "render_class"]

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


def render_class(label: int, n: int, size: int, rng: np.random.Generator, *,
                 return_alpha: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 RGB images [n, size, size, 3] of class ``label``; with ``return_alpha`` also the shape's soft
    coverage [n, size, size] in [0, 1] (the dense tasks' demo-style scenes threshold it at 0.5 for exact masks)."""
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
    img = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return (img, alpha[..., 0]) if return_alpha else img


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
        self.images = np.concatenate([render_class(c, per_class, size, rng) for c in range(num_classes)])
        self.classes = list(_SHAPES[:num_classes])
        self.targets = [c for c in range(num_classes) for _ in range(per_class)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index])
        return (self.transform(img) if self.transform is not None else img), self.targets[index]



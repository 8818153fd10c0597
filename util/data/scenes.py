"""Synthetic scenes for the dense tasks: shapes on textured backgrounds with exact masks and boxes.

Like the classification demo (``util/data/demo.py``), deterministic and download-free, so tests and the demo
recipes of segmentation and detection run anywhere. A scene has a textured background (two random colours in
stripes, checks or a gradient, plus noise) and 1..``max_objects`` shapes; the class of an object is its shape
(``SCENE_CLASSES``), its colour is drawn from one palette shared by all classes, later objects occlude earlier ones.
Masks are hard (pixel centre inside the shape), so the semantic map, the visible instance masks and the tight
boxes are exact for the rendered image.

Writers produce the two on-disk layouts the dense entry scripts read:
- ADE20K (``mmseg``'s ``ADE20KDataset``): ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png``, label 0 = background / "other" (ignored under ``reduce_zero_label``),
  label k = class k - 1.
- COCO: ``{train,val}2017/*.jpg`` and ``annotations/instances_{train,val}2017.json`` with category ids 1..K, boxes
  ``[x, y, w, h]``, ``area`` = mask pixels and uncompressed RLE segmentations (column-major run lengths, starting
  with a background run, as ``pycocotools.mask.frPyObjects`` reads them).

``style="demo"`` writes instead one object per scene drawn by the pretraining demo's own renderer
(:func:`render_demo_scene`): the scenes a demo-pretrained backbone has seen, for measuring what its pretraining
transfers to the dense tasks (``benchmarks/dense_pretrain_gain.py``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from util.data.demo import render_class

__all__ = ["SCENE_CLASSES", "render_demo_scene", "render_scene", "mask_to_rle", "rle_to_mask", "write_ade20k", "write_coco"]

SCENE_CLASSES = ("disc", "square", "triangle", "ring", "cross")
_PALETTE = np.array([[.90, .15, .15], [.15, .70, .20], [.20, .30, .95], [.95, .80, .10], [.85, .20, .85],
                     [.10, .85, .85], [.95, .55, .10], [.95, .95, .95], [.05, .05, .05], [.55, .25, .10]])
_SPLITS = {"train": ("training", "train2017", 0), "val": ("validation", "val2017", 1)}


def _inside(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean [S, S]: pixel centres (rotated, centred coordinates u, v) inside ``shape`` of size r."""
    rad = np.hypot(u, v)
    if shape == "disc":
        return rad <= r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if shape == "ring":
        return np.abs(rad - 0.75 * r) <= 0.25 * r
    if shape == "cross":
        w = 0.3 * r
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if shape == "triangle":
        k = np.sqrt(3.0) / 2.0
        return (v + 0.5 * r >= 0) & (-k * u - 0.5 * v + 0.5 * r >= 0) & (k * u - 0.5 * v + 0.5 * r >= 0)
    raise ValueError(f"unknown scene shape {shape!r}")


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Float RGB [S, S, 3] in [0, 1]: two random colours mixed by a random texture."""
    grid = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(grid, grid, indexing="ij")
    a, b = _PALETTE[rng.integers(0, len(_PALETTE), 2)] * 0.6 + rng.uniform(0.0, 0.3, (2, 3))
    angle, period = rng.uniform(0.0, np.pi), rng.uniform(0.15, 0.6)
    t = x * np.cos(angle) + y * np.sin(angle)
    kind = rng.integers(0, 3)
    if kind == 0:
        mix = 0.5 + 0.5 * np.sin(2.0 * np.pi * t / period)
    elif kind == 1:
        s = -x * np.sin(angle) + y * np.cos(angle)
        mix = (np.sin(np.pi * t / period) * np.sin(np.pi * s / period) > 0).astype(np.float64)
    else:
        mix = np.clip(0.5 + t / 2.0, 0.0, 1.0)
    return a * (1.0 - mix[..., None]) + b * mix[..., None]


def render_scene(size: int, rng: np.random.Generator, *, num_classes: int = len(SCENE_CLASSES), max_objects: int = 4,
                 min_area: int = 16, class_colours: bool = False,
                 radius: tuple[float, float] = (0.18, 0.42)) -> dict[str, Any]:
    """Render one scene.

    Args:
        size: image side in pixels.
        rng: numpy generator (the scene is a function of its state).
        num_classes: object classes used, the first ``num_classes`` of ``SCENE_CLASSES``.
        max_objects: at most this many objects (at least one).
        min_area: objects with fewer visible pixels are painted over by the background (not annotated).
        radius: range of the object size (half-width as a fraction of half the image side).
        class_colours: class k is always painted in palette colour k (jittered), so colour alone tells the class
            (an easy task that a small model learns in a few dozen CPU steps); False: colours are drawn from the
            palette shared by all classes and only the shape tells the class.

    Returns:
        ``{'image': uint8 [S, S, 3], 'semantic': uint8 [S, S] (0 background, k + 1 class k),
        'instances': [{'label': k, 'mask': bool [S, S] (visible pixels), 'box': (x0, y0, x1, y1)}]}``,
        box corners in pixel-edge coordinates (x1 = last column + 1).
    """
    if not 1 <= num_classes <= len(SCENE_CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(SCENE_CLASSES)}], got {num_classes}")
    grid = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(grid, grid, indexing="ij")
    background = _background(size, rng)
    img = background.copy()
    owner = np.full((size, size), -1, dtype=np.int64)
    objects = []
    for i in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(0, num_classes))
        r = rng.uniform(*radius)
        cx, cy = rng.uniform(-0.7, 0.7, 2)
        angle = rng.uniform(-0.4, 0.4)
        u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
        v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
        inside = _inside(SCENE_CLASSES[label], u, v, r)
        colour_index = label if class_colours else rng.integers(0, len(_PALETTE))
        colour = np.clip(_PALETTE[colour_index] + rng.normal(0.0, 0.05, 3), 0.0, 1.0)
        img[inside] = colour
        owner[inside] = i
        objects.append((label, colour))
    semantic = np.zeros((size, size), dtype=np.uint8)
    instances = []
    for i, (label, _) in enumerate(objects):
        mask = owner == i
        if mask.sum() < min_area:
            continue
        semantic[mask] = label + 1
        instances.append({"label": label, "mask": mask, "box": _tight_box(mask)})
    # small visible remnants of occluded objects become background, so that image and labels agree
    leftover = (owner >= 0) & (semantic == 0)
    if leftover.any():
        img[leftover] = background[leftover]
    img = img + rng.normal(0.0, 0.03, img.shape)
    return {"image": (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "semantic": semantic,
            "instances": instances}


def render_demo_scene(size: int, rng: np.random.Generator, label: int) -> dict[str, Any]:
    """One object of class ``label`` (``SCENE_CLASSES``: the demo's first five shapes, same indices) drawn exactly as
    the classification demo draws its images (``util/data/demo.py``: flat background and foreground colours from
    palettes shared by all classes, random position, size and rotation, pixel noise). The mask is the pixels the
    shape covers at least half (its anti-aliased coverage >= 0.5); the returned dict is :func:`render_scene`'s."""
    if not 0 <= label < len(SCENE_CLASSES):
        raise ValueError(f"label must be in [0, {len(SCENE_CLASSES)}), got {label}")
    image, alpha = render_class(label, 1, size, rng, return_alpha=True)
    mask = alpha[0] >= 0.5
    semantic = np.where(mask, label + 1, 0).astype(np.uint8)
    return {"image": image[0], "semantic": semantic,
            "instances": [{"label": label, "mask": mask, "box": _tight_box(mask)}]}


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) around a non-empty boolean mask, in pixel-edge coordinates (x1 = last column + 1)."""
    rows, cols = np.nonzero(mask)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of a boolean [H, W] mask: ``{'counts': [runs], 'size': [H, W]}``, column-major runs
    alternating background / foreground, starting with background (possibly 0)."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`mask_to_rle` (uncompressed RLE only)."""
    h, w = rle["size"]
    values = np.zeros(len(rle["counts"]), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, rle["counts"])
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {h} x {w}")
    return flat.reshape((h, w), order="F")


def _scenes(n: int, size: int, seed: int, split: str, style: str = "scenes", **kwargs: Any):
    """``(index, scene)`` of a split. ``style``: 'scenes' (:func:`render_scene` with ``kwargs``) or 'demo'
    (:func:`render_demo_scene`, classes in turn: scene i has class i mod ``num_classes``)."""
    if style not in ("scenes", "demo"):
        raise ValueError(f"style must be 'scenes' or 'demo', got {style!r}")
    rng = np.random.default_rng([seed, _SPLITS[split][2]])
    for index in range(n):
        if style == "demo":
            yield index, render_demo_scene(size, rng, index % kwargs.get("num_classes", len(SCENE_CLASSES)))
        else:
            yield index, render_scene(size, rng, **kwargs)


def write_ade20k(root: str | Path, n_train: int, n_val: int, size: int, seed: int = 0, **kwargs: Any) -> list[str]:
    """Write scenes in the ADE20K layout under ``root``; returns the class names (label k + 1 in the PNGs).

    ``kwargs`` go to :func:`render_scene` (``num_classes``, ``max_objects``), or ``style='demo'`` (``_scenes``).
    Images are JPEG (quality 95), labels
    8-bit PNG. The same ``seed`` writes the same files.
    """
    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        folder = _SPLITS[split][0]
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for index, scene in _scenes(n, size, seed, split, **kwargs):
            name = f"scene_{split}_{index:06d}"
            Image.fromarray(scene["image"]).save(root / "images" / folder / f"{name}.jpg", quality=95)
            Image.fromarray(scene["semantic"], mode="L").save(root / "annotations" / folder / f"{name}.png")
    return list(SCENE_CLASSES[:kwargs.get("num_classes", len(SCENE_CLASSES))])


def write_coco(root: str | Path, n_train: int, n_val: int, size: int, seed: int = 0, **kwargs: Any) -> list[str]:
    """Write scenes in the COCO layout under ``root``; returns the category names (ids 1..K).

    ``kwargs`` go to :func:`render_scene`, or ``style='demo'`` (``_scenes``). Every scene gets an ``images`` entry, even one without annotations.
    """
    root = Path(root)
    names = list(SCENE_CLASSES[:kwargs.get("num_classes", len(SCENE_CLASSES))])
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        folder = _SPLITS[split][1]
        (root / folder).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index, scene in _scenes(n, size, seed, split, **kwargs):
            file_name = f"{index + 1:012d}.jpg"
            Image.fromarray(scene["image"]).save(root / folder / file_name, quality=95)
            images.append({"id": index + 1, "file_name": file_name, "height": size, "width": size})
            for inst in scene["instances"]:
                x0, y0, x1, y1 = inst["box"]
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                    "category_id": inst["label"] + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                    "area": int(inst["mask"].sum()), "iscrowd": 0,
                                    "segmentation": mask_to_rle(inst["mask"])})
        data = {"images": images, "annotations": annotations,
                "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(names)]}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return names

"""Pictures of masked-image-model reconstructions, written as PNG with PIL only (no matplotlib).

One row per image: original | masked input (removed patches grey) | then two tiles per stage:
- pixel stage (MAE, He et al. 2022: [B, L, p*p*3] at scale 1; LocalMIM's pixel variant: regions of p / scale
  pixels): reconstruction with the visible patches pasted back | reconstruction alone. With ``norm_pix_loss``
  the prediction is in per-region normalized units and is mapped back with the original region's mean and
  unbiased variance (+1e-6), as MAE's demo does.
- HOG stage (LocalMIM, Wang et al. 2023; [B, h*w, 3*nbins]): target map | prediction map, where a cell's value
  is the largest bin of its per-channel histogram averaged over the colour channels (the histograms are
  L2-normalized per cell, so this measures how dominant one orientation is), shown grey, nearest-upscaled,
  each map stretched to black..white over its own range.

Each column is labelled on top (original, masked input, then per stage "HOG target" / "HOG pred" or
"recon+visible" / "recon" with the stage's scale; short forms when the tiles are narrow). Tiles are separated by
2 px white gaps; files are written atomically (``util.checkpoint.atomic_write``).

Also: the FreezeOut lr schedule (``save_schedule_png``) and a classifier's confusion matrix (``save_confusion_png``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from util.checkpoint import atomic_write
from util.data.transforms import denormalize

__all__ = ["save_reconstruction_png", "save_schedule_png", "save_confusion_png", "confusion_layout",
           "save_detection_png", "place_labels", "save_segmentation_png"]

GAP = 2  # pixels between tiles
HEADER = 24  # rows above the tiles for the column labels (two lines of PIL's default font)


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C] in MAE order (row-in-patch, col-in-patch, channel; channel fastest)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def _unpatchify(x: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """[B, L, p*p*C] -> [B, C, h*p, w*p]; inverse of ``_patchify`` for an h x w grid of patches."""
    b, _, d = x.shape
    c = d // (p * p)
    return x.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)


def _grid_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Row-major per-token values [B, h*w] -> [B, 1, height, width] by nearest upscaling of a square grid."""
    side = math.isqrt(mask.shape[1])
    if side * side != mask.shape[1]:
        raise ValueError(f"expected a square token grid, got {mask.shape[1]} tokens")
    grid = mask.reshape(-1, 1, side, side).float()
    return torch.nn.functional.interpolate(grid, size=(height, width), mode="nearest")


def _pixel_region(pred: torch.Tensor, scale: float, patch_size: int, height: int, width: int) -> int | None:
    """Region side r = p / scale if ``pred`` [B, N, C] has the pixel-target shape N = HW / r^2, C = 3 r^2."""
    r = patch_size / float(scale)
    if r != int(r) or height % int(r) or width % int(r):
        return None
    r = int(r)
    return r if pred.shape[1:] == ((height // r) * (width // r), 3 * r * r) else None


def _pixel_tiles(imgs: torch.Tensor, shown: torch.Tensor, pred: torch.Tensor, removed: torch.Tensor,
                 region: int, norm_pix_loss: bool) -> list[torch.Tensor]:
    """Reconstruction tiles in [0, 1]: visible patches pasted back, and the prediction alone.

    ``pred`` [B, N, 3 r^2] holds one r x r region per row (r = p for MAE).
    """
    _, _, height, width = imgs.shape
    if norm_pix_loss:  # back from per-region normalized units (MAE's rule, unbiased var + 1e-6)
        target = _patchify(imgs, region)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
    recon = denormalize(_unpatchify(pred, region, height // region, width // region))
    return [shown * (1 - removed) + recon * removed, recon]


def _hog_tiles(pred: torch.Tensor, target: torch.Tensor, height: int, width: int) -> list[torch.Tensor]:
    """Target and prediction maps [B, 3, H, W] in [0, 1], each contrast-stretched by its own per-image min..max.

    The prediction gets its own range, as the target does: early in training its values are a small fraction of
    the target's, and on the target's scale it would show as a black tile. A constant map is drawn black.
    """
    groups = 3 if pred.shape[2] % 3 == 0 else 1

    def cell_map(x: torch.Tensor) -> torch.Tensor:  # [B, N, C] -> [B, N]
        return x.reshape(x.shape[0], x.shape[1], groups, -1).amax(dim=-1).mean(dim=-1)

    def stretch(m: torch.Tensor) -> torch.Tensor:  # the map's range -> black..white
        low, high = m.amin(dim=1, keepdim=True), m.amax(dim=1, keepdim=True)
        return ((m - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)

    return [_grid_mask(stretch(cell_map(x)), height, width).expand(-1, 3, -1, -1) for x in (target, pred)]


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in [0, 1] -> [H, W, 3] uint8 (round half up)."""
    return (x * 255.0 + 0.5).floor().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)


def save_reconstruction_png(path: str | Path, imgs: torch.Tensor, out: dict[str, Any], patch_size: int, *,
                            norm_pix_loss: bool, max_images: int = 8, target: str | None = None) -> Path:
    """Draw originals, masked inputs and per-stage reconstructions of a masked image model into one PNG.

    Args:
        path: output file; parent folders are created.
        imgs: normalized input batch [B, 3, H, W].
        out: the model's forward output: ``'mask'`` [B, L] (1 = removed, L = (H/p)^2), ``'preds'``, ``'targets'``
            (lists of [B, N_k, C_k]), ``'scales'`` (list of floats).
        patch_size: encoder patch size p in pixels.
        norm_pix_loss: the pixel prediction is per-patch (per-region) normalized (MAE ``--norm_pix_loss``).
        max_images: draw at most this many rows.
        target: ``'pixel'``, ``'hog'`` or None. None draws a stage as pixels when its shape is the pixel target's
            (regions of r = p / scale pixels: N_k = HW / r^2, C_k = 3 r^2; MAE: r = p), else as a HOG map; pass
            the kind when the shapes are ambiguous (e.g. 16 HOG bins at scale 4 with p = 16).

    Returns:
        The written path.
    """
    n = min(max_images, imgs.shape[0])
    imgs = imgs[:n].detach().float().cpu()
    _, _, height, width = imgs.shape
    removed = _grid_mask(out["mask"][:n].detach().float().cpu(), height, width)
    original = denormalize(imgs)
    masked = original * (1 - removed) + 0.5 * removed
    columns = [original, masked]
    labels = [(("original", "orig"), ("", "")), (("masked", "mask"), ("input", "in"))]
    if target not in (None, "pixel", "hog"):
        raise ValueError(f"target must be 'pixel', 'hog' or None, got {target!r}")
    for pred, tgt, scale in zip(out["preds"], out["targets"], out["scales"]):
        pred, tgt = pred[:n].detach().float().cpu(), tgt[:n].detach().float().cpu()
        region = None if target == "hog" else _pixel_region(pred, scale, patch_size, height, width)
        if target == "pixel" and region is None:
            raise ValueError(f"stage of shape {tuple(pred.shape)} at scale {scale} is not a pixel target")
        where = (f"scale {scale:g}", f"x{scale:g}")
        if region is not None:
            columns += _pixel_tiles(imgs, original, pred, removed, region, norm_pix_loss)
            labels += [(("recon+visible", "r+v"), where), (("recon", "rec"), where)]
        else:
            columns += _hog_tiles(pred, tgt, height, width)
            labels += [(("HOG target", "tgt"), where), (("HOG pred", "pred"), where)]
    canvas = torch.full((HEADER + n * (height + GAP) - GAP, len(columns) * (width + GAP) - GAP, 3), 255,
                        dtype=torch.uint8)
    for col, tiles in enumerate(columns):
        for row in range(n):
            y, x = HEADER + row * (height + GAP), col * (width + GAP)
            canvas[y:y + height, x:x + width] = _to_uint8(tiles[row])
    return _write_png(Path(path), canvas, [(col * (width + GAP), width, text) for col, text in enumerate(labels)])


def _write_png(path: Path, canvas: torch.Tensor, labels: Sequence[tuple[int, int, Any]] = ()) -> Path:
    """Save an [H, W, 3] uint8 tensor as PNG atomically, with two-line column labels in its top ``HEADER`` rows.

    ``labels``: (x, width, ((long, short), (long, short))) per column; the long text when it fits the width.
    """
    from PIL import Image, ImageDraw  # lazy: pictures are optional at import time

    image = Image.fromarray(canvas.numpy())
    draw = ImageDraw.Draw(image)
    for x, width, lines in labels:
        for k, (long, short) in enumerate(lines):
            text = long if draw.textlength(long) <= width else short
            while text and draw.textlength(text) > width:  # narrow tiles: what fits of the short form
                text = text[:-1]
            draw.text((x + max(0, (width - draw.textlength(text)) // 2), 1 + 11 * k), text, fill="black")
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_schedule_png(path: str | Path, schedule: Any, *, steps_per_epoch: int = 1, width: int = 960,
                      height: int = 540) -> Path:
    """Plot every unit's lr against the optimizer step, with its freeze point marked (FreezeOut schedule).

    Args:
        path: PNG to write.
        schedule: a ``engine.freezeout.FreezeOutSchedule`` (anything with ``num_units``, ``total_steps``,
            ``lr(unit, step)``, ``freeze_step(unit)``); unit None is drawn as the global schedule (dashed grey).
        steps_per_epoch: to label the x axis in epochs.
        width, height: picture size in pixels.
    """
    from PIL import Image, ImageDraw

    left, right, top, bottom = 70, 190, 30, 50
    total = schedule.total_steps
    steps = sorted(set(int(round(total * i / 400)) for i in range(401)) |
                   {s for u in range(schedule.num_units) for s in (schedule.freeze_step(u) - 1,
                                                                   schedule.freeze_step(u)) if 0 <= s <= total})
    curves = [[schedule.lr(u, s) for s in steps] for u in range(schedule.num_units)]
    top_lr = max(max(c) for c in curves) or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(step: float, lr: float) -> tuple[float, float]:
        return left + plot_w * step / total, top + plot_h * (1.0 - lr / top_lr)

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):  # lr ticks on the left
        _, y = xy(0, top_lr * frac)
        draw.text((4, y - 6), f"{top_lr * frac:.2e}", fill="black")
    for epoch in epoch_ticks(total / steps_per_epoch):  # whole epochs below, each once
        x, _ = xy(epoch * steps_per_epoch, 0)
        draw.line([(x, top + plot_h), (x, top + plot_h + 4)], fill="black")
        draw.text((x - 3 * len(str(epoch)), top + plot_h + 6), str(epoch), fill="black")
    draw.text((left + plot_w // 2 - 20, height - 20), "epoch", fill="black")
    draw.text((left, 8), "FreezeOut: lr of every unit; dot = freeze point", fill="black")
    glob = [xy(s, schedule.lr(None, s)) for s in steps]
    for a, b in list(zip(glob, glob[1:]))[::2]:
        draw.line([a, b], fill=(150, 150, 150), width=1)
    n = schedule.num_units
    for unit, curve in enumerate(curves):
        hue = unit / max(1, n - 1)  # blue (first unit) -> red (last unit)
        colour = (int(230 * hue), 60, int(230 * (1 - hue)))
        draw.line([xy(s, lr) for s, lr in zip(steps, curve)], fill=colour, width=2)
        freeze = schedule.freeze_step(unit)
        if freeze < total:
            x, y = xy(freeze, 0)
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        label_y = top + unit * min(16, plot_h // max(1, n))
        draw.line([(width - right + 10, label_y + 6), (width - right + 30, label_y + 6)], fill=colour, width=3)
        when = f"ep {freeze / steps_per_epoch:.1f}" if freeze < total else "end"
        draw.text((width - right + 36, label_y), f"unit {unit}: {when}", fill="black")
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def epoch_ticks(epochs: float, max_ticks: int = 11) -> list[int]:
    """Whole-epoch tick positions from 0 to ``epochs``: every epoch when they are few, else every 2, 5, 10, 20,
    50, ... epochs, at most ``max_ticks`` of them, no value twice (a 3-epoch run reads 0 1 2 3)."""
    last = int(math.floor(epochs + 1e-9))
    step = next(s for s in (m * 10 ** e for e in range(12) for m in (1, 2, 5)) if last // s + 1 <= max_ticks)
    return list(range(0, last + 1, step))


def confusion_colours(confusion: torch.Tensor) -> torch.Tensor:
    """Cell colours of a confusion matrix: row-normalised counts from white (0) to dark blue (1).

    Args:
        confusion: counts [C, C], rows = true class, columns = predicted class.

    Returns:
        uint8 [C, C, 3]; a row without samples is white.
    """
    cm = confusion.double()
    frac = cm / cm.sum(dim=1, keepdim=True).clamp(min=1)
    white, blue = torch.tensor([255.0, 255.0, 255.0]), torch.tensor([8.0, 48.0, 107.0])
    return (white + (blue - white) * frac.unsqueeze(-1)).round().to(torch.uint8)


def confusion_layout(names: Sequence[str], *, max_side: int = 1200) -> tuple[int, int, int]:
    """(cell size, left, top) in pixels of the grid of ``save_confusion_png``: row names, whole, fill ``left``;
    column names, read bottom-up, fill the band between the 24 px title and ``top``. Names are drawn only in
    cells of 10 px or more (PIL's default font is 11 px high); otherwise ``left`` is 0 and ``top`` 24."""
    from PIL import Image, ImageDraw

    cell = max(1, min(48, max_side // max(len(names), 1)))
    if cell < 10:
        return cell, 0, 24
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength  # PIL's default font may be proportional
    name_w = int(max(measure(name) for name in names)) + 8
    return cell, name_w, 24 + name_w


def save_confusion_png(path: str | Path, confusion: torch.Tensor, class_names: Sequence[str] | None = None, *,
                       max_side: int = 1200) -> Path:
    """Draw a confusion matrix as a heat map PNG (PIL only).

    Rows are true classes, columns predicted ones; a cell's colour is its share of the row (recall on the
    diagonal, see :func:`confusion_colours`). Class names, whole, label the rows (left) and the columns (above,
    read bottom-up) when the cells are at least 10 px; counts are written into cells of 24 px or more. 1000
    ImageNet classes give a 1000 x 1000 pixel map without labels.

    Args:
        path: PNG to write.
        confusion: counts [C, C] (any integer or float dtype).
        class_names: C names (default: the class indices).
        max_side: size bound of the cell grid in pixels.

    Returns:
        ``path``.
    """
    from PIL import Image, ImageDraw

    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion matrix must be [C, C], got {tuple(confusion.shape)}")
    n = confusion.shape[0]
    names = [str(c) for c in (class_names if class_names is not None else range(n))]
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for a {n}-class confusion matrix")
    cell, left, top = confusion_layout(names, max_side=max_side)
    labelled, name_w = left > 0, left
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    title = "rows: true class, columns: predicted class (colour: share of the row; diagonal = recall)"
    colours = confusion_colours(confusion.cpu())
    grid = colours.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    image = Image.new("RGB", (max(left + n * cell + 1, int(measure(title)) + 8), top + n * cell + 1), "white")
    image.paste(Image.fromarray(grid.numpy()), (left, top))
    draw = ImageDraw.Draw(image)
    draw.text((4, 6), title, fill="black")
    if labelled:
        header = Image.new("RGB", (name_w, n * cell), "white")  # drawn sideways, then turned upright
        header_draw = ImageDraw.Draw(header)
        for i, name in enumerate(names):
            draw.text((4, top + i * cell + (cell - 10) // 2), name, fill="black")
            header_draw.text((4, i * cell + (cell - 10) // 2), name, fill="black")  # starts next to the grid
        image.paste(header.transpose(Image.Transpose.ROTATE_90), (left, 24))
    if cell >= 24:  # counts fit: up to 4 digits in a 24 px cell with PIL's default 6 px font
        cm = confusion.cpu()
        for t in range(n):
            for p in range(n):
                count = int(cm[t, p])
                dark = int(colours[t, p, 0]) < 128
                draw.text((left + p * cell + 2, top + t * cell + (cell - 10) // 2), str(count),
                          fill="white" if dark else "black")
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def place_labels(anchors: Sequence[tuple[float, float]], sizes: Sequence[tuple[int, int]], width: int,
                 height: int) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1) for text labels that do not overlap each other: label k of size ``sizes[k]`` (w, h)
    goes just above its anchor (a box's top-left corner), inside the ``width x height`` image, and moves down a
    label's height at a time (then, failing that, up from the anchor) until it overlaps no label placed before it.
    """
    placed: list[tuple[int, int, int, int]] = []

    def free(r: tuple[int, int, int, int]) -> bool:
        return all(r[2] <= q[0] or q[2] <= r[0] or r[3] <= q[1] or q[3] <= r[1] for q in placed)
    for (ax, ay), (w, h) in zip(anchors, sizes):
        x0 = int(min(max(ax, 0), max(width - w, 0)))
        first = int(min(max(ay - h, 0), max(height - h, 0)))
        tries = [first + k * h for k in range(0, height // max(h, 1) + 1)] + \
                [first - k * h for k in range(1, height // max(h, 1) + 1)]
        rect = next(((x0, y, x0 + w, y + h) for y in tries if 0 <= y <= max(height - h, 0) and
                     free((x0, y, x0 + w, y + h))), (x0, first, x0 + w, first + h))
        placed.append(rect)
    return placed


def _detection_tile(img: torch.Tensor, boxes: torch.Tensor, labels: list[str], masks: torch.Tensor | None,
                    colour: str) -> Any:
    """One image with its masks, boxes and non-overlapping labels (PIL image)."""
    from PIL import Image, ImageDraw
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
    tile = _to_uint8(img.clamp(0, 1)).permute(2, 0, 1).contiguous()  # torchvision draws on [3, H, W]
    if masks is not None and len(masks):
        tile = draw_segmentation_masks(tile, masks.bool(), alpha=0.45)
    if len(boxes):
        tile = draw_bounding_boxes(tile, boxes, colors=colour, width=2)
    image = Image.fromarray(tile.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(image)
    sizes = [(int(draw.textlength(t)) + 4, 12) for t in labels]
    for (x0, y0, x1, y1), text in zip(place_labels([(float(b[0]), float(b[1])) for b in boxes], sizes,
                                                   image.width, image.height), labels):
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
        draw.text((x0 + 2, y0 + 1), text, fill="black")
    return image


def save_detection_png(path: str | Path, images: Sequence[torch.Tensor], outputs: Sequence[dict[str, torch.Tensor]],
                       class_names: Sequence[str], *, score_thresh: float = 0.5,
                       targets: Sequence[dict[str, torch.Tensor]] | None = None) -> Path:
    """One row per image: ground truth (``targets``, green) | predictions (yellow), columns labelled on top; boxes
    with masks (torchvision's drawing utilities) and class labels placed so that they do not overlap
    (:func:`place_labels`).

    Args:
        images: [3, H, W] floats in [0, 1] (any sizes; a row is as high as its image).
        outputs: torchvision detection outputs (``boxes`` xyxy, ``labels`` 1..K, ``scores``, optional ``masks``
            [N, 1, H, W] probabilities); detections below ``score_thresh`` are not drawn.
        class_names: name of label k at index k - 1.
        targets: the ground truth (``boxes``, ``labels``, optional ``masks`` [N, H, W]); None: predictions only.
    """
    rows = []
    for k, (img, out) in enumerate(zip(images, outputs)):
        keep = out["scores"] >= score_thresh
        masks = out["masks"][keep, 0] > 0.5 if "masks" in out else None
        labels = [f"{class_names[int(c) - 1]} {float(s):.2f}" for c, s in zip(out["labels"][keep], out["scores"][keep])]
        tiles = [_detection_tile(img, out["boxes"][keep], labels, masks, "yellow")]
        if targets is not None:
            truth = targets[k]
            tiles.insert(0, _detection_tile(img, truth["boxes"], [class_names[int(c) - 1] for c in truth["labels"]],
                                            truth.get("masks"), "lime"))
        rows.append([torch.from_numpy(np.array(t)) for t in tiles])
    columns = max(len(r) for r in rows)
    col_width = [max(r[c].shape[1] for r in rows if c < len(r)) for c in range(columns)]
    height = HEADER + sum(max(t.shape[0] for t in r) for r in rows) + GAP * (len(rows) - 1)
    canvas = torch.full((height, sum(col_width) + GAP * (columns - 1), 3), 255, dtype=torch.uint8)
    y = HEADER
    for r in rows:
        x = 0
        for c, t in enumerate(r):
            canvas[y:y + t.shape[0], x:x + t.shape[1]] = t
            x += col_width[c] + GAP
        y += max(t.shape[0] for t in r) + GAP
    names = ([(("ground truth", "truth"), ("", ""))] if targets is not None else []) + \
        [((f"predictions (score >= {score_thresh:g})", "predictions"), ("", ""))]
    xs = [sum(col_width[:c]) + GAP * c for c in range(columns)]
    return _write_png(Path(path), canvas, [(xs[c], col_width[c], names[c]) for c in range(columns)])


def segmentation_palette(num_classes: int) -> torch.Tensor:
    """[num_classes, 3] uint8 colours, distinct and fixed (golden-ratio hues); the ignore label is drawn black."""
    import colorsys
    return torch.tensor([[int(255 * c) for c in colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.75, 0.95)]
                         for k in range(num_classes)], dtype=torch.uint8)


def save_segmentation_png(path: str | Path, samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *,
                          num_classes: int, ignore_index: int = 255, alpha: float = 0.6,
                          class_names: Sequence[str] | None = None, min_side: int = 192,
                          max_legend: int = 24) -> Path:
    """One row per validation image: image | ground truth over the image | prediction over the image, columns
    labelled on top (image, truth, prediction), tiles enlarged (nearest, a whole factor) to at least ``min_side``
    pixels, and below them a legend: a swatch and the name (or number) of each class present in the truth or the
    prediction, the most frequent ``max_legend`` of them.

    Args:
        samples: ``(image [3, h, w] normalised, label int64 [H, W], prediction int64 [H, W])``; the image is
            resized (nearest) to the label size; ignored pixels are left uncoloured.
        class_names: name of class k at index k (None: the class numbers).
    """
    from PIL import Image, ImageDraw
    palette = segmentation_palette(num_classes).float()
    rows, counts = [], torch.zeros(num_classes, dtype=torch.long)
    for image, label, pred in samples:
        h, w = label.shape
        scale = max(1, math.ceil(min_side / min(h, w)))
        img = torch.nn.functional.interpolate(denormalize(image[None]).clamp(0, 1), size=(h, w), mode="nearest")[0]
        base = img.permute(1, 2, 0) * 255.0
        tiles = [base]
        for mask in (label, pred):
            valid = (mask != ignore_index) & (mask >= 0) & (mask < num_classes)
            counts += torch.bincount(mask[valid].flatten(), minlength=num_classes)[:num_classes]
            colour = palette[mask.clamp(0, num_classes - 1)]
            tiles.append(torch.where(valid[..., None], (1 - alpha) * base + alpha * colour, base))
        tiles = [t.repeat_interleave(scale, 0).repeat_interleave(scale, 1) for t in tiles]
        gap = torch.full((h * scale, GAP, 3), 255.0)
        rows.append(torch.cat([t for tile in tiles for t in (tile, gap)][:-1], dim=1))
    width = max(r.shape[1] for r in rows)
    rows = [torch.cat([r, torch.full((r.shape[0], width - r.shape[1], 3), 255.0)], dim=1) for r in rows]
    grid = torch.cat([t for r in rows for t in (r, torch.full((GAP, width, 3), 255.0))][:-1], dim=0)
    present = [int(k) for k in counts.argsort(descending=True) if counts[k] > 0][:max_legend]
    names = [class_names[k] if class_names is not None and k < len(class_names) else str(k) for k in present]
    entry_w = 16 + max([len(n) * 6 + 8 for n in names] or [0])  # swatch + text (PIL's default font: ~6 px/char)
    per_line = max(1, width // max(entry_w, 1))
    legend_h = 4 + 14 * math.ceil(len(present) / per_line) if present else 0
    canvas = torch.full((HEADER + grid.shape[0] + legend_h, width, 3), 255.0)
    canvas[HEADER:HEADER + grid.shape[0]] = grid
    image = Image.fromarray((canvas + 0.5).floor().clamp(0, 255).to(torch.uint8).numpy())
    draw = ImageDraw.Draw(image)
    top = HEADER + grid.shape[0] + 4
    for i, (k, name) in enumerate(zip(present, names)):
        x, y = (i % per_line) * entry_w, top + (i // per_line) * 14
        draw.rectangle((x + 2, y, x + 12, y + 10), fill=tuple(int(c) for c in palette[k]), outline="black")
        draw.text((x + 16, y), name, fill="black")
    tile_w = (rows[0].shape[1] - 2 * GAP) // 3
    labels = [(c * (tile_w + GAP), tile_w, ((text, text), ("", ""))) for c, text in
              enumerate(("image", "truth", "prediction"))]
    return _write_png(Path(path), torch.from_numpy(np.array(image)), labels)

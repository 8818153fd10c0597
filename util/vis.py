"""Pictures of masked-image-model reconstructions, written as PNG with PIL only (no matplotlib).

One row per image: original | masked input (removed patches grey) | then two tiles per stage:
- pixel stage (MAE, He et al. 2022: [B, L, p*p*3] at scale 1; LocalMIM's pixel variant: regions of p / scale
  pixels): reconstruction with the visible patches pasted back | reconstruction alone. With ``norm_pix_loss``
  the prediction is in per-region normalized units and is mapped back with the original region's mean and
  unbiased variance (+1e-6), as MAE's demo does.
- HOG stage (LocalMIM, Wang et al. 2023; [B, h*w, 3*nbins]): target map | prediction map, where a cell's value
  is the largest bin of its per-channel histogram averaged over the colour channels (the histograms are
  L2-normalized per cell, so this measures how dominant one orientation is), shown grey, nearest-upscaled.

Tiles are separated by 2 px white gaps; files are written atomically (``util.checkpoint.atomic_write``).

Also: the FreezeOut lr schedule (``save_schedule_png``) and a classifier's confusion matrix (``save_confusion_png``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from util.checkpoint import atomic_write
from util.data.transforms import denormalize

__all__ = ["save_reconstruction_png", "save_schedule_png", "save_confusion_png", "save_detection_png"]

GAP = 2  # pixels between tiles


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
    """Target and prediction maps [B, 3, H, W] in [0, 1], both mapped by the target map's per-image min..max."""
    groups = 3 if pred.shape[2] % 3 == 0 else 1

    def cell_map(x: torch.Tensor) -> torch.Tensor:  # [B, N, C] -> [B, N]
        return x.reshape(x.shape[0], x.shape[1], groups, -1).amax(dim=-1).mean(dim=-1)

    t_map, p_map = cell_map(target), cell_map(pred)
    low, high = t_map.amin(dim=1, keepdim=True), t_map.amax(dim=1, keepdim=True)
    span = (high - low).clamp_min(1e-6)  # contrast stretch: the target's range maps to black..white
    return [_grid_mask(((m - low) / span).clamp(0, 1), height, width).expand(-1, 3, -1, -1) for m in (t_map, p_map)]


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
    if target not in (None, "pixel", "hog"):
        raise ValueError(f"target must be 'pixel', 'hog' or None, got {target!r}")
    for pred, tgt, scale in zip(out["preds"], out["targets"], out["scales"]):
        pred, tgt = pred[:n].detach().float().cpu(), tgt[:n].detach().float().cpu()
        region = None if target == "hog" else _pixel_region(pred, scale, patch_size, height, width)
        if target == "pixel" and region is None:
            raise ValueError(f"stage of shape {tuple(pred.shape)} at scale {scale} is not a pixel target")
        if region is not None:
            columns += _pixel_tiles(imgs, original, pred, removed, region, norm_pix_loss)
        else:
            columns += _hog_tiles(pred, tgt, height, width)
    canvas = torch.full((n * (height + GAP) - GAP, len(columns) * (width + GAP) - GAP, 3), 255, dtype=torch.uint8)
    for col, tiles in enumerate(columns):
        for row in range(n):
            y, x = row * (height + GAP), col * (width + GAP)
            canvas[y:y + height, x:x + width] = _to_uint8(tiles[row])
    return _write_png(Path(path), canvas)


def _write_png(path: Path, canvas: torch.Tensor) -> Path:
    """Save an [H, W, 3] uint8 tensor as PNG atomically."""
    from PIL import Image  # lazy: pictures are optional at import time

    return atomic_write(path, lambda tmp: Image.fromarray(canvas.numpy()).save(tmp, format="PNG"))


def save_schedule_png(path: str | Path, schedule: Any, *, steps_per_epoch: int = 1, width: int = 960,
                      height: int = 540) -> Path:
    """Plot every unit's lr against the optimizer step, with its freeze point marked (FreezeOut schedule).

    Args:
        path: PNG to write.
        schedule: a ``util.freezeout.FreezeOutSchedule`` (anything with ``num_units``, ``total_steps``,
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
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):  # axes ticks: lr on the left, epochs below
        _, y = xy(0, top_lr * frac)
        draw.text((4, y - 6), f"{top_lr * frac:.2e}", fill="black")
        x, _ = xy(total * frac, 0)
        draw.text((x - 12, top + plot_h + 6), f"{total * frac / steps_per_epoch:.0f}", fill="black")
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


def save_confusion_png(path: str | Path, confusion: torch.Tensor, class_names: Sequence[str] | None = None, *,
                       max_side: int = 1200) -> Path:
    """Draw a confusion matrix as a heat map PNG (PIL only).

    Rows are true classes, columns predicted ones; a cell's colour is its share of the row (recall on the
    diagonal, see :func:`confusion_colours`). Counts are written into the cells and class names on the left
    when the cells are large enough to hold them; 1000 ImageNet classes give a 1000 x 1000 pixel map.

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
    cell = max(1, min(48, max_side // max(n, 1)))
    left = 8 + 6 * min(24, max(len(name) for name in names)) if cell >= 10 else 0
    top = 24
    colours = confusion_colours(confusion.cpu())
    grid = colours.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    title = "rows: true class, columns: predicted (colour: share of the row)"
    image = Image.new("RGB", (max(left + n * cell + 1, 6 * len(title) + 8), top + n * cell + 1), "white")
    image.paste(Image.fromarray(grid.numpy()), (left, top))
    draw = ImageDraw.Draw(image)
    draw.text((4, 6), title, fill="black")
    if cell >= 10:
        for i, name in enumerate(names):
            draw.text((4, top + i * cell + (cell - 10) // 2), name[:24], fill="black")
    if cell >= 24:  # counts fit: up to 4 digits in a 24 px cell with PIL's default 6 px font
        cm = confusion.cpu()
        for t in range(n):
            for p in range(n):
                count = int(cm[t, p])
                dark = int(colours[t, p, 0]) < 128
                draw.text((left + p * cell + 2, top + t * cell + (cell - 10) // 2), str(count),
                          fill="white" if dark else "black")
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_detection_png(path: str | Path, images: Sequence[torch.Tensor], outputs: Sequence[dict[str, torch.Tensor]],
                       class_names: Sequence[str], *, score_thresh: float = 0.5) -> Path:
    """Predicted masks and boxes over images, side by side (torchvision's drawing utilities).

    Args:
        images: [3, H, W] floats in [0, 1] (any sizes; the row is as high as the highest).
        outputs: torchvision detection outputs (``boxes`` xyxy, ``labels`` 1..K, ``scores``, optional ``masks``
            [N, 1, H, W] probabilities); detections below ``score_thresh`` are not drawn.
        class_names: name of label k at index k - 1.
    """
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
    tiles = []
    for img, out in zip(images, outputs):
        tile = _to_uint8(img.clamp(0, 1)).permute(2, 0, 1).contiguous()  # torchvision draws on [3, H, W]
        keep = out["scores"] >= score_thresh
        if "masks" in out and keep.any():
            tile = draw_segmentation_masks(tile, out["masks"][keep, 0] > 0.5, alpha=0.45)
        labels = [f"{class_names[int(k) - 1]} {float(s):.2f}" for k, s in zip(out["labels"][keep], out["scores"][keep])]
        if keep.any():
            tile = draw_bounding_boxes(tile, out["boxes"][keep], labels=labels, colors="yellow", width=2)
        tiles.append(tile)
    height = max(t.shape[1] for t in tiles)
    canvas = torch.full((3, height, sum(t.shape[2] for t in tiles) + GAP * (len(tiles) - 1)), 255, dtype=torch.uint8)
    x = 0
    for t in tiles:
        canvas[:, :t.shape[1], x:x + t.shape[2]] = t
        x += t.shape[2] + GAP
    return _write_png(Path(path), canvas.permute(1, 2, 0).contiguous())


def segmentation_palette(num_classes: int) -> torch.Tensor:
    """[num_classes, 3] uint8 colours, distinct and fixed (golden-ratio hues); the ignore label is drawn black."""
    import colorsys
    return torch.tensor([[int(255 * c) for c in colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.75, 0.95)]
                         for k in range(num_classes)], dtype=torch.uint8)


def save_segmentation_png(path: str | Path, samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *,
                          num_classes: int, ignore_index: int = 255, alpha: float = 0.6) -> Path:
    """One row per validation image: image | ground truth over the image | prediction over the image.

    Args:
        samples: ``(image [3, h, w] normalised, label int64 [H, W], prediction int64 [H, W])``; the image is
            resized (nearest) to the label size; ignored pixels are left uncoloured.
    """
    palette = segmentation_palette(num_classes).float()
    rows = []
    for image, label, pred in samples:
        h, w = label.shape
        img = torch.nn.functional.interpolate(denormalize(image[None]).clamp(0, 1), size=(h, w), mode="nearest")[0]
        base = img.permute(1, 2, 0) * 255.0
        tiles = [base]
        for mask in (label, pred):
            valid = (mask != ignore_index) & (mask >= 0) & (mask < num_classes)
            colour = palette[mask.clamp(0, num_classes - 1)]
            tiles.append(torch.where(valid[..., None], (1 - alpha) * base + alpha * colour, base))
        gap = torch.full((h, GAP, 3), 255.0)
        rows.append(torch.cat([t for tile in tiles for t in (tile, gap)][:-1], dim=1))
    width = max(r.shape[1] for r in rows)
    rows = [torch.cat([r, torch.full((r.shape[0], width - r.shape[1], 3), 255.0)], dim=1) for r in rows]
    canvas = torch.cat([t for r in rows for t in (r, torch.full((GAP, width, 3), 255.0))][:-1], dim=0)
    return _write_png(Path(path), (canvas + 0.5).floor().clamp(0, 255).to(torch.uint8))

"""Fast image input: the crop is planned before decoding, then decoded at reduced scale (CPU) or on the device.

Three ways to turn an image file into a normalized training crop (``--decode``):

- ``pil`` (today's path): PIL decodes the whole file in the worker; torchvision's RandomResizedCrop + flip +
  ToTensor + Normalize make a float32 crop there, which crosses to the device.
- ``cpu``: the worker reads the file header, draws the crop box and flip (``plan_pretrain``: the same draws, from
  the same keyed generator, as the ``pil`` path, so a sample gets the same box and flip on every path), decodes
  only as much as the crop needs (libjpeg's DCT scaling through ``PIL.Image.draft`` at 1/2, 1/4 or 1/8 where the
  crop is downsampled 2x or more), resizes the box with PIL's bicubic filter and returns uint8. Normalization
  runs in the main process, on the device (``DeviceInput``): a quarter of the bytes cross the worker pipe and
  the bus, and the workers skip the float conversion.
- ``device``: the worker only reads the file bytes and draws the box and flip. ``DeviceInput`` decodes the batch
  where the model runs (``torchvision.io.decode_jpeg`` on a list of byte tensors: nvJPEG on CUDA, libjpeg-turbo
  on CPU), crops and resizes each image with antialiased bicubic interpolation (torch's kernel with a = -0.5,
  PIL's), flips and normalizes there. Files the device decoder cannot take (PNG, CMYK or truncated JPEGs, any
  other format) are decoded in the worker by PIL into RGB uint8 and cross as pixels; the rest of the batch
  still decodes on the device.

Corrupt files keep ``util.data.folder.ImageFileDataset``'s behaviour (error naming the file with
``--strict_data``, else a warning and the next readable sample): the worker-side reads go through its retry loop;
a JPEG that only the device decoder finds broken is decoded by PIL in the main process and, if that fails too,
raises ``CorruptImageError`` naming the file or (not strict) is replaced by the sample the other paths take in its
place: the next readable file, planned under the sample's key (``DeviceInput``; another image of the same batch
only where the files are not an ``ImageFileDataset``'s). A file found unreadable gives back the random draws of
its plan, so the replacing file gets the crop it gets on the ``pil`` path. 16-bit greyscale is scaled by 1/257
on every path (``util.data.folder.load_rgb``).

Tolerance against the ``pil`` path (tests/test_decode.py, tests/test_decode_hostile.py), in uint8 levels of the
crop before normalization: the same box and flip on every path. On a hostile set (16-bit and bilevel PNGs, CMYK,
greyscale, EXIF-rotated and progressive JPEGs, a truncated and a corrupt JPEG replaced by the next file) at most
1 level on the ``cpu`` and the per-image ``device`` path (the device resize rounds between its horizontal and
vertical pass, as Pillow does). At full scale the pixels differ only by the resize kernel's arithmetic (torch's
antialiased bicubic vs Pillow's fixed-point one): mean below 0.5 levels, at most 4 on downscaled photo crops
(up to 7 on upscaled crops and palette images' hard edges). The device path's batched resize on CUDA
(``roi_align``, an area filter, see ``_cut_batched``) differs more: mean below 2 levels, sharper edges up to ~30.
With DCT scaling (``cpu`` path, crop downsampled 2x or more) libjpeg's scaled IDCT replaces part of the bicubic
low-pass: a different, equally valid antialiasing filter, mean difference below 6 levels on natural images,
larger at sharp edges.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

from util.data.folder import CorruptImageError, ImageFileDataset, _DECODE_ERRORS, _wide_grey_to_rgb
from util.data.transforms import MEAN, STD

logger = logging.getLogger("vitfreeze")

__all__ = ["DECODE_MODES", "Plan", "plan_pretrain", "plan_eval", "FastInput", "Planned", "PlannedBatch",
           "collate", "crop_pil", "DeviceInput", "decode_batch", "normalize_uint8", "to_model_input", "use_fast_input",
           "build_fast_input", "device_decodable"]

DECODE_MODES = ("pil", "cpu", "device")
PRETRAIN_SCALE, PRETRAIN_RATIO = (0.2, 1.0), (3 / 4, 4 / 3)
_JPEG_EOI = b"\xff\xd9"


@dataclass(frozen=True)
class Plan:
    """Where a sample's output comes from, in source pixels: resize ``box`` (x0, y0, x1, y1) to ``out`` (h, w),
    keep the ``size`` x ``size`` window at ``offset`` (top, left), then flip horizontally if ``flip``."""
    box: tuple[int, int, int, int]
    out: tuple[int, int]
    offset: tuple[int, int]
    size: int
    flip: bool

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([*self.box, *self.out, *self.offset, self.size, int(self.flip)], dtype=torch.int64)

    @staticmethod
    def from_tensor(t: torch.Tensor) -> "Plan":
        v = [int(x) for x in t.tolist()]
        return Plan(tuple(v[0:4]), tuple(v[4:6]), tuple(v[6:8]), v[8], bool(v[9]))


def plan_pretrain(height: int, width: int, size: int) -> Plan:
    """MAE's crop: ``RandomResizedCrop(size, scale=(0.2, 1), ratio=(3/4, 4/3))`` then a flip with p = 0.5.

    Draws exactly what ``util.data.transforms.pretrain_transform`` draws, from the same generators (torch's
    default generator, which ``KeyedSamples`` seeds with the sample's key), in the same order.
    """
    i, j, h, w = T.RandomResizedCrop.get_params(torch.empty(0, height, width), list(PRETRAIN_SCALE),
                                                list(PRETRAIN_RATIO))
    flip = bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip's draw
    return Plan((j, i, j + w, i + h), (size, size), (0, 0), size, flip)


def plan_eval(height: int, width: int, size: int, crop_pct: float | None = None) -> Plan:
    """``util.data.transforms.eval_transform``: Resize(int(size / crop_pct)) of the short side, CenterCrop(size);
    the output sizes and offsets follow torchvision's integer rules."""
    if crop_pct is None:
        crop_pct = 224 / 256 if size <= 224 else 1.0
    short, long = (width, height) if width <= height else (height, width)
    new_short = int(size / crop_pct)
    new_long = int(new_short * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return Plan((0, 0, width, height), (new_h, new_w), (top, left), size, False)


@dataclass
class Planned:
    """A worker's item on the device path: ``data`` is an encoded JPEG (uint8 [n]) or decoded RGB (uint8
    [3, H, W]); ``plan`` says what to cut from it; ``path`` names the file in error messages."""
    data: torch.Tensor
    plan: Plan
    path: str = "<memory>"


@dataclass
class PlannedBatch:
    """A collated batch of ``Planned`` items (lists: the encoded sizes differ)."""
    data: list[torch.Tensor]
    plans: torch.Tensor  # [B, 10] int64, ``Plan.as_tensor`` rows
    paths: list[str]

    def pin_memory(self) -> "PlannedBatch":  # called by the DataLoader's pinning thread
        return PlannedBatch([d.pin_memory() for d in self.data], self.plans, self.paths)

    def __len__(self) -> int:
        return len(self.data)


def collate(batch: Sequence[Any]) -> Any:
    """``default_collate``, except that ``Planned`` images become one ``PlannedBatch``."""
    first = batch[0][0] if isinstance(batch[0], (tuple, list)) else batch[0]
    if not isinstance(first, Planned):
        return default_collate(batch)
    if not isinstance(batch[0], (tuple, list)):
        return _planned_batch(batch)
    rest = default_collate([tuple(item[1:]) for item in batch])
    return [_planned_batch([item[0] for item in batch]), *rest]


def _planned_batch(items: Sequence[Planned]) -> PlannedBatch:
    return PlannedBatch([p.data for p in items], torch.stack([p.plan.as_tensor() for p in items]),
                        [p.path for p in items])


def _pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL RGB [H, W, 3] -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB as ``util.data.folder.load_rgb`` makes it (16-bit greyscale scaled by 1/257, not clipped at 255)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode.startswith("I"):
        return _wide_grey_to_rgb(img)
    return img.convert("RGB")


def _dct_factor(plan: Plan) -> int:
    """Largest libjpeg DCT scale divisor (1, 2, 4, 8) that still leaves the box at least as large as its output."""
    x0, y0, x1, y1 = plan.box
    shrink = min((x1 - x0) / plan.out[1], (y1 - y0) / plan.out[0])
    return next((k for k in (8, 4, 2) if shrink >= k), 1)


def crop_pil(img: Image.Image, plan: Plan, *, draft: bool = True) -> torch.Tensor:
    """Cut ``plan`` out of a (lazily opened) PIL image on this CPU; uint8 [3, size, size].

    PIL decodes; with ``draft`` a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) when the box is
    downsampled by that much or more, and the box is mapped into the smaller image (scaled pixel i covers source
    pixels [i k, (i + 1) k)) and resized there by Pillow (bicubic; it takes the float box). At full scale the
    resize is torch's antialiased bicubic (a = -0.5, Pillow's kernel) on uint8, whose vectorized CPU kernel is
    about 5x faster than Pillow's here: decode and resize are the two costs of a worker.
    """
    k = _dct_factor(plan) if draft and img.format == "JPEG" else 1
    if k > 1:
        width, height = img.size
        img.draft(img.mode, (width // k, height // k))
        # libjpeg's scaled size is ceil(side / k); find the divisor PIL actually chose (1 if it declined)
        k = next((s for s in (8, 4, 2) if img.size == (-(-width // s), -(-height // s))), 1)
    img = _to_rgb(img)
    if k > 1:  # a float box in the scaled image: Pillow's resize takes one, torch's would need rounding
        img = img.resize((plan.out[1], plan.out[0]), Image.Resampling.BICUBIC, box=tuple(c / k for c in plan.box))
        region = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)
    else:
        x0, y0, x1, y1 = plan.box
        region = torch.from_numpy(np.array(img, dtype=np.uint8))[y0:y1, x0:x1].permute(2, 0, 1).unsqueeze(0)
        if region.shape[-2:] != plan.out:  # [1, 3, h, w] channels-last view: the vectorized uint8 kernel
            region = F.interpolate(region, size=plan.out, mode="bicubic", antialias=True, align_corners=False)
    top, left = plan.offset
    region = region[0, :, top:top + plan.size, left:left + plan.size]
    return (region.flip(-1) if plan.flip else region).contiguous()


class FastInput:
    """The worker side of the ``cpu`` and ``device`` paths, for pretraining crops or evaluation center crops.

    ``FastInput(...)(img)`` takes a PIL image (in-memory datasets: demo, CIFAR); ``load(path)`` takes a file
    (``ImageFileDataset.load``, inside its corrupt-file retry loop). Both draw the plan from the global generator
    (seeded per sample by ``KeyedSamples``) and return uint8 [3, size, size] (``cpu``) or a ``Planned`` item
    (``device``).

    Args:
        size: output side in pixels.
        mode: ``'cpu'`` or ``'device'``.
        kind: ``'pretrain'`` (random resized crop + flip) or ``'eval'`` (resize + center crop).
        crop_pct: evaluation crop fraction (``eval_transform``'s rule when None).
    """

    def __init__(self, size: int, *, mode: str, kind: str = "pretrain", crop_pct: float | None = None) -> None:
        if mode not in ("cpu", "device"):
            raise ValueError(f"FastInput mode must be 'cpu' or 'device', got {mode!r}")
        if kind not in ("pretrain", "eval"):
            raise ValueError(f"FastInput kind must be 'pretrain' or 'eval', got {kind!r}")
        self.size, self.mode, self.kind, self.crop_pct = size, mode, kind, crop_pct

    def plan(self, height: int, width: int) -> Plan:
        if self.kind == "pretrain":
            return plan_pretrain(height, width, self.size)
        return plan_eval(height, width, self.size, self.crop_pct)

    def __call__(self, img: Image.Image) -> torch.Tensor | Planned:
        plan = self.plan(img.size[1], img.size[0])
        if self.mode == "cpu":
            return crop_pil(img, plan)
        return Planned(_pil_to_uint8(_to_rgb(img)), plan)

    def load(self, path: str) -> torch.Tensor | Planned:
        """Read one file; decode errors propagate as PIL raises them (``ImageFileDataset`` reports them). The plan
        is drawn before decoding; an unreadable file gives its draws back (the generator is restored), so the
        sample that replaces it draws the crop it draws on the ``pil`` path, where nothing is drawn before the
        image has decoded."""
        state = torch.default_generator.get_state()
        try:
            return self._load(path)
        except _DECODE_ERRORS:
            torch.default_generator.set_state(state)
            raise

    def _load(self, path: str) -> torch.Tensor | Planned:
        with open(path, "rb") as f:
            data = f.read()
        img = Image.open(io.BytesIO(data))  # header only
        plan = self.plan(img.size[1], img.size[0])
        if self.mode == "cpu":
            return crop_pil(img, plan)
        if device_decodable(img, data):
            return Planned(torch.frombuffer(bytearray(data), dtype=torch.uint8), plan, path)
        return Planned(_pil_to_uint8(_to_rgb(img)), plan, path)  # PIL in the worker: PNG, CMYK, truncated, ...


def device_decodable(img: Image.Image, data: bytes) -> bool:
    """A JPEG that ``decode_jpeg(mode=RGB)`` takes: YCbCr/RGB or greyscale, ending with its EOI marker (a
    truncated file goes to PIL, which reports it as today)."""
    return img.format == "JPEG" and img.mode in ("RGB", "L") and data.rstrip(b"\x00").endswith(_JPEG_EOI)


def normalize_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> ImageNet-normalized float32, the same arithmetic as ToTensor + Normalize."""
    return _normalize(x.float())


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """Float [B, 3, H, W] holding 0..255 -> (x / 255 - mean) / std, in place."""
    mean = torch.tensor(MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.div_(255).sub_(mean).div_(std)


def _decode_one(data: torch.Tensor, path: str, device: torch.device, strict: bool) -> torch.Tensor | None:
    """One JPEG the batched decoder refused: the device decoder alone, then PIL on the host; None if unreadable."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        with Image.open(io.BytesIO(data.cpu().numpy().tobytes())) as img:
            return _pil_to_uint8(_to_rgb(img)).to(device)
    except _DECODE_ERRORS as err:
        if strict:
            raise CorruptImageError(f"cannot read image {path}: {err!r}") from err
        logger.warning("skipping unreadable image %s (%r); another image of its batch takes its place", path, err)
        return None


def _cut(img: torch.Tensor, plan: Plan) -> torch.Tensor:
    """uint8 [3, H, W] on the device -> float [3, size, size] with values rounded to 0..255 like PIL's output.

    Pillow resizes in two passes, horizontal then vertical (``ImagingResample``), and rounds and clips to uint8
    between them (torch's uint8 CPU kernel does the same); at hard edges (bilevel images) the bicubic overshoot
    clipped after the first pass changes the second pass by up to ~20 levels, so the float resize here follows
    the same two passes."""
    x0, y0, x1, y1 = plan.box
    region = img[:, y0:y1, x0:x1].unsqueeze(0).float()
    for size in ((region.shape[-2], plan.out[1]), plan.out):  # width, then height
        if region.shape[-2:] != size:
            region = F.interpolate(region, size=size, mode="bicubic", antialias=True, align_corners=False)
            region = region.round_().clamp_(0, 255)
    top, left = plan.offset
    region = region[0, :, top:top + plan.size, left:left + plan.size]
    if plan.flip:
        region = region.flip(-1)
    return region.round_().clamp_(0, 255)


def _source_box(plan: Plan) -> tuple[float, float, float, float]:
    """The region of the source image that becomes the final ``size`` x ``size`` output (after the center crop)."""
    x0, y0, x1, y1 = plan.box
    sx, sy = (x1 - x0) / plan.out[1], (y1 - y0) / plan.out[0]
    top, left = plan.offset
    return x0 + left * sx, y0 + top * sy, x0 + (left + plan.size) * sx, y0 + (top + plan.size) * sy


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor to ``device`` without a stream sync (a pageable host-to-device copy waits for the
    stream; a pinned one is queued)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _cut_batched(images: list[torch.Tensor], plans: list[Plan]) -> torch.Tensor:
    """All crops of a batch with ``torchvision.ops.roi_align`` (one call per distinct image size): each output
    pixel averages ceil(box / size)^2 bilinear samples of its bin, an area filter that antialiases downscaling.
    A few kernels per batch instead of ~6 per image (the per-image launches bound a GPU at thousands of
    images/s); the filter differs from bicubic (tests/test_decode.py states the tolerance)."""
    from torchvision.ops import roi_align

    size, device = plans[0].size, images[0].device
    out = torch.empty(len(images), 3, size, size, device=device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(i)
    for idx in groups.values():
        stacked = torch.stack([images[i] for i in idx]).float()
        boxes = torch.tensor([[j, *_source_box(plans[i])] for j, i in enumerate(idx)], dtype=torch.float32)
        out[idx] = roi_align(stacked, _to_device(boxes, device), output_size=(size, size), spatial_scale=1.0,
                             sampling_ratio=-1, aligned=True)
    flip = _to_device(torch.tensor([p.flip for p in plans]), device).view(-1, 1, 1, 1)
    return torch.where(flip, out.flip(-1), out).round_().clamp_(0, 255)


def decode_batch(batch: PlannedBatch, device: torch.device, *, strict: bool = False, resize: str = "auto",
                 replace: Callable[[int, str], Planned | None] | None = None) -> torch.Tensor:
    """Decode, crop, resize, flip and normalize a ``PlannedBatch`` on ``device``; float32 [B, 3, size, size].

    JPEG bytes are decoded together (``decode_jpeg`` on a list: one nvJPEG batch on CUDA); if the batch call
    fails, each file is retried alone, then with PIL on the host (see ``_decode_one``). ``resize``:
    ``'per_image'`` (antialiased bicubic, closest to the PIL path), ``'batched'`` (``roi_align``, a few kernels a
    batch) or ``'auto'`` (batched on CUDA, per image elsewhere). An item no decoder reads is replaced by
    ``replace(position, path)`` (the sample the other paths take in its place, see ``DeviceInput``), decoded in
    turn, or, where ``replace`` is None or returns None, by another image of the batch.
    """
    images: list[torch.Tensor | None] = [None] * len(batch)
    encoded = [i for i, d in enumerate(batch.data) if d.ndim == 1]
    if encoded:
        try:
            decoded = decode_jpeg([batch.data[i] for i in encoded], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [_decode_one(batch.data[i], batch.paths[i], device, strict) for i in encoded]
        for i, img in zip(encoded, decoded):
            images[i] = img
    for i, d in enumerate(batch.data):
        if d.ndim == 3:
            images[i] = d.to(device, non_blocking=True)
    plans = [Plan.from_tensor(row) for row in batch.plans]
    for i in [i for i, img in enumerate(images) if img is None] if replace is not None else []:
        path = batch.paths[i]
        for _ in range(16):  # ImageFileDataset's max_tries
            item = replace(i, path)
            if item is None:
                break
            images[i] = (item.data.to(device) if item.data.ndim == 3
                         else _decode_one(item.data, item.path, device, strict))
            if images[i] is not None:
                plans[i] = item.plan
                break
            path = item.path
    good = [i for i, img in enumerate(images) if img is not None]
    if not good:
        raise CorruptImageError(f"no readable image in the batch: {batch.paths}")
    images = [img if img is not None else images[good[0]] for img in images]
    if resize == "batched" or (resize == "auto" and torch.device(device).type == "cuda"):
        return _normalize(_cut_batched(images, plans))
    return _normalize(torch.stack([_cut(img, plan) for img, plan in zip(images, plans)]))


def to_model_input(images: Any, device: torch.device, *, strict: bool = False, resize: str = "auto",
                   replace: Callable[[int, str], Planned | None] | None = None) -> torch.Tensor:
    """A loader's image batch -> normalized float32 on ``device``: a ``PlannedBatch`` is decoded there (``resize``
    as in ``decode_batch``), a uint8 batch (``cpu`` path) is copied as uint8 and normalized there, a float batch
    (``pil`` path) is copied."""
    if isinstance(images, PlannedBatch):
        return decode_batch(images, device, strict=strict, resize=resize, replace=replace)
    images = images.to(device, non_blocking=True)
    return normalize_uint8(images) if images.dtype == torch.uint8 else images


class DeviceInput:
    """A loader whose first batch item arrives on the device, normalized (see ``to_model_input``).

    The next batch is taken from the workers and put on its way to the device before the current one is
    returned (one batch of prefetch: on CUDA its copy and decode are queued while the caller's step runs).
    ``sampler``, ``dataset``, ``generator`` and ``len()`` are the wrapped loader's, so ``set_loader_epoch`` and
    ``training_budget`` work unchanged.
    """

    def __init__(self, loader: DataLoader, device: torch.device, *, strict: bool = False,
                 resize: str = "auto") -> None:
        self.loader, self.device, self.strict, self.resize = loader, device, strict, resize

    def __getattr__(self, name: str) -> Any:
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def _convert(self, batch: Any) -> Any:
        labels: dict[int, int] = {}

        def replace(position: int, path: str) -> Planned | None:
            found = self._next_readable(path, int(batch[2][position])) if len(batch) > 2 else None
            if found is None:
                return None
            labels[position] = found[1]
            return found[0]

        images = to_model_input(batch[0], self.device, strict=self.strict, resize=self.resize, replace=replace)
        if not labels:
            return (images, *batch[1:])
        targets = batch[1].clone()
        for position, label in labels.items():
            targets[position] = label
        return (images, targets, *batch[2:])

    def _next_readable(self, path: str, key: int) -> tuple[Planned, int] | None:
        """What the worker would have loaded had it found ``path`` unreadable: the files after it, in the dataset's
        order, the first readable one planned under the sample's ``key`` (``util.data.loaders.keyed_rng``), so
        that it gets the crop and flip the ``pil`` and ``cpu`` paths give it. None where the files are not an
        ``ImageFileDataset``'s."""
        from util.data.loaders import keyed_rng

        base = self.loader.dataset
        while not isinstance(base, ImageFileDataset) and isinstance(getattr(base, "dataset", None), Dataset):
            base = base.dataset
        if not isinstance(base, ImageFileDataset):
            return None
        index = next((i for i, (p, _) in enumerate(base.samples) if p == path), None)
        if index is None:
            return None
        base.bad_paths.add(path)
        logger.warning("skipping unreadable image %s (the device decoder and PIL refuse it); trying sample %d "
                       "instead", path, (index + 1) % len(base))
        with keyed_rng(key):
            item, label = base[index]  # skips ``path``: a bad path of this process
        return item, int(label)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        try:
            ready = self._convert(next(it))
        except StopIteration:
            return
        for batch in it:
            following = self._convert(batch)
            yield ready
            ready = following
        yield ready

    def prepare(self, images: Sequence[Any]) -> torch.Tensor:
        """Single worker items (e.g. ``dataset[i][0]``) -> one normalized batch on the device (pictures)."""
        return to_model_input(collate(list(images)), self.device, strict=self.strict, resize=self.resize)


def use_fast_input(dataset: Dataset, fast: FastInput | None) -> Dataset:
    """Route ``dataset``'s images through ``fast``: its files (an ``ImageFileDataset``, possibly inside subset
    wrappers with a ``dataset`` attribute) are read by ``fast.load``; in-memory images go through ``fast`` as the
    transform. ``fast=None`` leaves the dataset as it is. Returns ``dataset``."""
    if fast is None:
        return dataset
    base = dataset
    while not isinstance(base, ImageFileDataset) and isinstance(getattr(base, "dataset", None), Dataset):
        base = base.dataset
    if isinstance(base, ImageFileDataset):
        base.load, base.transform = fast.load, None
    elif hasattr(base, "transform"):
        base.transform = fast
    else:
        raise ValueError(f"--decode {fast.mode}: cannot route the images of {type(base).__name__} (no transform)")
    return dataset


def use_eval_decode(decode: str, input_size: int, *datasets: Dataset) -> None:
    """``--decode cpu/device`` for evaluation: the resize + center crop of these datasets' images goes through a
    ``FastInput`` (``pil`` leaves them as they are)."""
    fast = build_fast_input(decode, input_size, kind="eval")
    for dataset in datasets:
        use_fast_input(dataset, fast)


def build_fast_input(decode: str, size: int, *, kind: str = "pretrain") -> FastInput | None:
    """``--decode``: None for ``pil`` (the transforms of ``util.data.transforms``), else a ``FastInput``."""
    if decode not in DECODE_MODES:
        raise ValueError(f"--decode must be one of {DECODE_MODES}, got {decode!r}")
    return None if decode == "pil" else FastInput(size, mode=decode, kind=kind)

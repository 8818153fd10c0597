"""The three --decode paths (pil, cpu, device) on a hostile set of files: each sample gets the same label and,
within the JPEG decoders' tolerance, the same crop; unreadable files are replaced by the same next sample (and
its crop) on every path, whatever the batch size."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from util.data.decode import FastInput, use_fast_input
from util.data.folder import build_folder_dataset
from util.data.loaders import build_train_loader, set_loader_epoch
from util.data.transforms import denormalize, pretrain_transform

CPU = torch.device("cpu")
SIZE = 32


def natural(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields with the edges of a few discs (a photo-like image)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.stack([np.sin(6 * x + rng.uniform(0, 6)) + np.cos(5 * y * rng.uniform(0.5, 2)) for _ in range(3)], -1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1, 3) * [1, 1, 0.3]
        img[(x - cx) ** 2 + (y - cy) ** 2 < r ** 2] += rng.uniform(-1.5, 1.5, 3)
    img = (img - img.min()) / (img.max() - img.min()) * 230 + 10
    return Image.fromarray(img.astype(np.uint8))


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def hostile_files(root: Path) -> dict[str, Path]:
    """48x40 files (crops of 32 px: no DCT scaling), class c0 the hostile ones, class c1 plain JPEGs; sorted names,
    so the truncated file is followed by the corrupt one, and that by the first file of c1."""
    img = natural(48, 40, seed=1)
    grey = np.asarray(img.convert("L"), dtype=np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 (no path applies it: the pixels as stored)
    good = jpeg(natural(48, 40, seed=2))
    sos = good.index(b"\xff\xda")
    files = {
        "16bit": ("a_16bit.png", png(Image.fromarray(grey * 257 + 3))),  # I;16, 0..65535
        "bilevel": ("b_bilevel.png", png(img.convert("L").convert("1"))),  # mode 1, dithered
        "cmyk": ("c_cmyk.jpg", jpeg(img.convert("CMYK"))),
        "grey": ("d_grey.jpg", jpeg(img.convert("L"))),
        "exif_rotated": ("e_exif.jpg", jpeg(natural(48, 40, seed=3), exif=exif.tobytes())),
        "progressive": ("f_progressive.jpg", jpeg(natural(48, 40, seed=4), progressive=True)),
        "truncated": ("g_truncated.jpg", good[: len(good) // 2]),
        # a start-of-image marker inside the entropy-coded data: header and end marker intact, no decoder reads it
        "corrupt_middle": ("h_corrupt.jpg", good[:sos + 60] + b"\xff\xd8\x00\x02" + good[sos + 64:]),
    }
    for i in range(4):
        files[f"plain{i}"] = (f"../c1/{i}.jpg", jpeg(natural(48, 40, seed=10 + i)))
    paths = {}
    for name, (filename, data) in files.items():
        path = (root / "c0" / filename).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths[name] = path
    return paths


def crops(root: Path, mode: str, batch_size: int) -> dict[int, tuple[torch.Tensor, int]]:
    """key -> (crop in 0..255 levels, label) for one epoch through the loader (DeviceInput on the CPU)."""
    dataset = build_folder_dataset(str(root), pretrain_transform(SIZE))
    if mode != "pil":
        use_fast_input(dataset, FastInput(SIZE, mode=mode))
    loader = build_train_loader(dataset, batch_size=batch_size, num_workers=0, pin_memory=False, rank=0,
                                world_size=1, seed=0, device=CPU)
    set_loader_epoch(loader, seed=0, epoch=0, rank=0)
    out = {}
    for imgs, labels, keys in loader:
        for img, label, key in zip(imgs, labels, keys):
            out[int(key)] = (denormalize(img) * 255, int(label))
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return root, hostile_files(root)


def key_of(root: Path, name: str, paths: dict[str, Path]) -> int:
    from util.data.loaders import sample_key
    dataset = build_folder_dataset(str(root), None)
    return sample_key(0, 0, [p for p, _ in dataset.samples].index(str(paths[name])))


# max |difference| in levels against the pil path: measured 1 on every file, clean JPEGs included (the resize's
# rounding; libjpeg-turbo through torchvision and through Pillow give the same pixels here); 1e-2 for float noise
TOLERANCE = 1.01


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("mode", ["cpu", "device"])
def test_every_path_gives_each_hostile_sample_the_pil_paths_label_and_crop(hostile, mode, batch_size):
    """Batch size 1: the corrupt file alone in its batch (on the device path the main process finds it unreadable
    and loads the next sample, as the worker does on the other paths)."""
    root, paths = hostile
    ref, ours = crops(root, "pil", batch_size), crops(root, mode, batch_size)
    assert ours.keys() == ref.keys() and len(ref) == 12
    worst = {}
    for name in paths:
        key = key_of(root, name, paths)
        (a, label_a), (b, label_b) = ours[key], ref[key]
        assert label_a == label_b, name
        worst[name] = (a - b).abs().max().item()
    assert max(worst.values()) <= TOLERANCE, worst
    for name in ("truncated", "corrupt_middle"):  # both replaced by the next readable file, c1/0.jpg
        assert ours[key_of(root, name, paths)][1] == 1
    assert ours[key_of(root, "16bit", paths)][0].mean() < 200  # scaled by 1/257, not saturated to white

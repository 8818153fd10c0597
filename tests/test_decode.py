"""util/data/decode.py: the --decode cpu/device paths against today's PIL path (util/data/transforms.py).

Same crop box and flip on every path (drawn from the sample's key before decoding); pixels within the stated
tolerance of the PIL path, in uint8 levels of the crop: full scale max 4 / mean 0.5 (resize kernel arithmetic),
DCT-scaled CPU decode mean 6; odd files (greyscale, CMYK, PNG with alpha, truncated, corrupt) as --strict_data says.
"""
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from util.data import decode
from util.data.decode import (FastInput, Planned, PlannedBatch, build_fast_input, collate, crop_pil, decode_batch,
                              plan_eval, plan_pretrain, to_model_input, use_fast_input)
from util.data.folder import CorruptImageError, build_folder_dataset
from util.data.loaders import build_train_loader, set_loader_epoch
from util.data.transforms import denormalize, eval_transform, pretrain_transform

CPU = torch.device("cpu")


def natural(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: smooth colour fields, edges of random discs, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.stack([np.sin(6 * x + rng.uniform(0, 6)) + np.cos(5 * y * rng.uniform(0.5, 2)) for _ in range(3)], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, 1, 3) * [width / max(width, height), height / max(width, height), 0.3]
        img[(x - cx) ** 2 + (y - cy) ** 2 < r ** 2] += rng.uniform(-1.5, 1.5, 3)
    img = (img - img.min()) / (img.max() - img.min()) * 230 + 10 + rng.normal(0, 3, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def write_tree(root: Path, n: int, size: tuple[int, int], classes: int = 2) -> Path:
    for i in range(n):
        path = root / f"c{i % classes}" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(natural(*size, seed=i)))
    return root


def levels(x: torch.Tensor) -> torch.Tensor:
    """Normalized float -> 0..255 levels."""
    return denormalize(x) * 255


def keyed_batches(dataset, *, batch_size: int = 8, workers: int = 0, epochs=(0,)) -> dict[tuple, torch.Tensor]:
    """(epoch, key) -> normalized crop on the CPU, through build_train_loader + DeviceInput."""
    loader = build_train_loader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=False, rank=0,
                                world_size=1, seed=0, device=CPU)
    out = {}
    for epoch in epochs:
        set_loader_epoch(loader, seed=0, epoch=epoch, rank=0)
        for imgs, _, keys in loader:
            assert imgs.dtype == torch.float32 and imgs.device == CPU
            out.update({(epoch, int(k)): img for k, img in zip(keys, imgs)})
    return out


def test_plan_draws_the_box_and_flip_of_the_pil_transform(monkeypatch):
    """The box RandomResizedCrop picks inside pretrain_transform (recorded) and the flip (seen in the pixels)."""
    img = natural(60, 45, seed=1)
    boxes = []
    real = T.RandomResizedCrop.get_params
    monkeypatch.setattr(T.RandomResizedCrop, "get_params",
                        staticmethod(lambda *a: boxes.append(real(*a)) or boxes[-1]))
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        ref = pretrain_transform(24)(img)
        torch.manual_seed(seed)
        plan = plan_pretrain(45, 60, 24)
        i, j, h, w = boxes[-1]
        assert plan.box == (j, i, j + w, i + h) and plan.out == (24, 24)
        torch.manual_seed(seed)
        ours = levels(to_model_input(crop_pil(img, plan_pretrain(45, 60, 24))[None], CPU)[0])
        assert (ours - levels(ref)).abs().max() <= 4  # flipped the other way would differ by far more
        flips.add(plan.flip)
    assert flips == {True, False}


def test_eval_plan_is_resize_then_center_crop():
    for (w, h) in [(50, 40), (40, 50), (33, 33), (200, 90)]:
        plan = plan_eval(h, w, 32)  # crop_pct 224/256 -> short side 36
        ref = eval_transform(32)(natural(w, h, seed=w))
        assert min(plan.out) == 36 and plan.box == (0, 0, w, h)
        ours = levels(to_model_input(crop_pil(natural(w, h, seed=w), plan)[None], CPU)[0])
        assert ours.shape == (3, 32, 32) and (ours - levels(ref)).abs().max() <= 4


@pytest.mark.parametrize("mode", ["cpu", "device"])
@pytest.mark.parametrize("kind", ["pretrain", "eval"])
def test_fast_paths_match_pil_path_per_key(tmp_path, mode, kind):
    """Same shape, dtype, normalization and (within the kernel tolerance) pixels as the PIL path, sample by sample,
    through KeyedSamples and the loader; 48x40 files to 32 px: no DCT scaling."""
    root = write_tree(tmp_path, 16, (48, 40))
    transform = pretrain_transform(32) if kind == "pretrain" else eval_transform(32)
    ref = keyed_batches(build_folder_dataset(str(root), transform))
    fast = FastInput(32, mode=mode, kind=kind)
    ours = keyed_batches(use_fast_input(build_folder_dataset(str(root), transform), fast))
    assert ours.keys() == ref.keys() and len(ours) == 16
    diffs = torch.stack([(levels(ours[k]) - levels(ref[k])).abs() for k in ref])
    assert diffs.max() <= 4 and diffs.mean() <= 0.5
    assert all(ours[k].shape == ref[k].shape == (3, 32, 32) for k in ref)
    other = torch.stack([(levels(ours[a]) - levels(ref[b])).abs().mean() for a, b in zip(ref, list(ref)[1:])])
    assert other.min() > 5 * diffs.mean()  # pairs of different samples are far apart: the tolerance is not vacuous


def test_batched_device_resize_keeps_box_and_flip(tmp_path):
    """The CUDA default (roi_align over the batch, an area filter): mean within 2 levels of the PIL path per sample,
    far from every other sample; the same output shape and normalization as the per-image resize."""
    paths = sorted(write_tree(tmp_path, 8, (120, 90)).rglob("*.jpg"))
    for kind, transform in (("pretrain", pretrain_transform(32)), ("eval", eval_transform(32))):
        fast, items, refs = FastInput(32, mode="device", kind=kind), [], []
        for seed, path in enumerate(paths):
            torch.manual_seed(seed)
            items.append(fast.load(str(path)))
            torch.manual_seed(seed)
            refs.append(levels(transform(Image.open(path).convert("RGB"))))
        ours = levels(decode_batch(collate(items), CPU, resize="batched"))
        assert ours.shape == (8, 3, 32, 32)
        means = torch.stack([torch.stack([(o - r).abs().mean() for r in refs]) for o in ours])  # [ours, ref]
        assert means.diagonal().max() <= 2 and (means + 100 * torch.eye(8)).min() > 2 * means.diagonal().max()


def test_device_path_workers_send_bytes_and_uint8_crosses(tmp_path):
    root = write_tree(tmp_path, 2, (48, 40))
    item = FastInput(32, mode="device").load(str(next(root.rglob("*.jpg"))))
    assert isinstance(item, Planned) and item.data.dtype == torch.uint8 and item.data.ndim == 1
    assert bytes(item.data[:2].tolist()) == b"\xff\xd8"
    cpu_item = FastInput(32, mode="cpu").load(str(next(root.rglob("*.jpg"))))
    assert cpu_item.dtype == torch.uint8 and cpu_item.shape == (3, 32, 32)


def test_dct_scaled_cpu_decode_stays_close_to_pil(tmp_path):
    """400x300 files to 32 px: the crop is downsampled >= 2x, so the CPU path decodes at 1/2..1/8 scale."""
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(natural(400, 300, seed=3)))
    fast, scaled, diffs = FastInput(32, mode="cpu"), 0, []
    for seed in range(8):
        torch.manual_seed(seed)
        ref = levels(pretrain_transform(32)(Image.open(path).convert("RGB")))
        torch.manual_seed(seed)
        scaled += decode._dct_factor(plan_pretrain(300, 400, 32)) > 1
        torch.manual_seed(seed)
        diffs.append((levels(to_model_input(fast.load(str(path))[None], CPU)[0]) - ref).abs().mean())
    assert scaled == 8 and max(diffs) <= 6


def odd_files(root: Path) -> dict[str, Path]:
    img = natural(48, 40, seed=7)
    files = {"grey": ("grey.jpg", jpeg_bytes(img.convert("L"))), "cmyk": ("cmyk.jpg", jpeg_bytes(img.convert("CMYK"))),
             "rgb": ("rgb.jpg", jpeg_bytes(img))}
    rgba = img.convert("RGBA")
    rgba.putalpha(128)
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    files["png"] = ("alpha.png", buf.getvalue())
    buf = io.BytesIO()
    img.convert("P").save(buf, "PNG", transparency=0)
    files["palette"] = ("palette.png", buf.getvalue())
    paths = {}
    for name, (filename, data) in files.items():
        paths[name] = root / "c0" / filename
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_bytes(data)
    return paths


@pytest.mark.parametrize("name, on_device", [("grey", True), ("rgb", True), ("cmyk", False), ("png", False),
                                             ("palette", False)])
def test_odd_files_become_rgb_on_the_device_path(tmp_path, name, on_device):
    path = odd_files(tmp_path)[name]
    torch.manual_seed(0)
    item = FastInput(32, mode="device").load(str(path))
    assert (item.data.ndim == 1) == on_device  # JPEG bytes for the device decoder, else PIL's RGB pixels
    out = decode_batch(collate([item]), CPU)
    torch.manual_seed(0)
    with Image.open(path) as img:
        ref = pretrain_transform(32)(img.convert("RGBA").convert("RGB") if name == "palette" else img.convert("RGB"))
    assert out.shape == (1, 3, 32, 32) and (levels(out[0]) - levels(ref)).abs().max() <= 6  # palette: hard edges


def test_truncated_and_corrupt_files_skip_or_raise_as_strict_data_says(tmp_path, caplog):
    good = jpeg_bytes(natural(48, 40, seed=9))
    (tmp_path / "c0").mkdir()
    (tmp_path / "c0" / "a_truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "c0" / "b_corrupt.jpg").write_bytes(b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9")
    (tmp_path / "c0" / "c_good.jpg").write_bytes(good)
    fast = FastInput(32, mode="device")
    lenient = use_fast_input(build_folder_dataset(str(tmp_path), None), fast)
    with caplog.at_level(logging.WARNING, logger="vitfreeze"):
        items = [lenient[i][0] for i in range(2)]
    assert all(item.path.endswith("c_good.jpg") for item in items)  # both replaced by the next readable file
    assert "a_truncated.jpg" in caplog.text and "b_corrupt.jpg" in caplog.text
    strict = use_fast_input(build_folder_dataset(str(tmp_path), None, strict_data=True), fast)
    for i, name in enumerate(["a_truncated.jpg", "b_corrupt.jpg"]):
        with pytest.raises(CorruptImageError, match=name):
            strict[i]


def test_a_file_only_the_device_decoder_refuses(caplog):
    """Bytes the worker let through but no decoder reads: CorruptImageError naming the file (strict), else a
    warning and another image of the batch in its place."""
    good = jpeg_bytes(natural(48, 40, seed=2))
    plan = plan_eval(40, 48, 32)
    items = [Planned(torch.frombuffer(bytearray(good), dtype=torch.uint8), plan, "good.jpg"),
             Planned(torch.frombuffer(bytearray(b"not an image at all"), dtype=torch.uint8), plan, "bad.jpg")]
    with pytest.raises(CorruptImageError, match="bad.jpg"):
        decode_batch(collate(items), CPU, strict=True)
    with caplog.at_level(logging.WARNING, logger="vitfreeze"):
        out = decode_batch(collate(items), CPU)
    assert "bad.jpg" in caplog.text and torch.equal(out[0], out[1])


def test_persistent_workers_follow_the_epoch(tmp_path):
    """Workers kept across epochs draw the current epoch's keys and crops: 2 workers = the main process."""
    root = write_tree(tmp_path, 16, (48, 40))
    dataset = use_fast_input(build_folder_dataset(str(root), None), FastInput(32, mode="cpu"))
    main = keyed_batches(dataset, workers=0, epochs=(0, 1))
    workers = keyed_batches(dataset, workers=2, epochs=(0, 1))
    assert main.keys() == workers.keys() and len(main) == 32
    assert all(torch.equal(main[k], workers[k]) for k in main)


def test_demo_dataset_on_the_cpu_path_equals_the_pil_path():
    """In-memory images (no file to decode): the cpu path is the PIL path's crop, normalized on the device."""
    from util.data.demo import DemoDataset
    ref = keyed_batches(DemoDataset(per_class=2, size=32, seed=0, transform=pretrain_transform(32)))
    ours = keyed_batches(use_fast_input(DemoDataset(per_class=2, size=32, seed=0, transform=None),
                                        build_fast_input("cpu", 32)))
    assert ours.keys() == ref.keys()
    assert max((levels(ours[k]) - levels(ref[k])).abs().max() for k in ref) <= 4


def test_build_fast_input_names():
    assert build_fast_input("pil", 32) is None
    with pytest.raises(ValueError, match="--decode"):
        build_fast_input("gpu", 32)
    batch = collate([(Planned(torch.zeros(3, 4, 4, dtype=torch.uint8), plan_eval(4, 4, 4, 1.0)), 1, 2)])
    assert isinstance(batch[0], PlannedBatch) and batch[1].tolist() == [1]


def test_use_fast_input_reaches_files_inside_subsets_and_prepare_matches_the_loader(tmp_path):
    from util.data.decode import DeviceInput
    from util.data.subsets import LabelledSubset
    root = write_tree(tmp_path, 8, (48, 40))
    subset = use_fast_input(LabelledSubset(build_folder_dataset(str(root), eval_transform(32)), [1, 3, 5]),
                            FastInput(32, mode="device", kind="eval"))
    assert isinstance(subset[0][0], Planned) and subset.dataset.transform is None
    loader = DeviceInput(torch.utils.data.DataLoader(subset, batch_size=3, collate_fn=collate), CPU)
    (batch, labels), = list(loader)
    assert torch.equal(loader.prepare([subset[i][0] for i in range(3)]), batch)  # pictures: same pixels
    ref = torch.stack([eval_transform(32)(Image.open(p).convert("RGB"))
                       for p, _ in (subset.dataset.samples[i] for i in subset.indices)])
    assert (levels(batch) - levels(ref)).abs().max() <= 4 and labels.tolist() == subset.targets == [0, 0, 1]

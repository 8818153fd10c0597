"""Tests for util/data/transforms.py: shapes, normalization by hand, MAE crop-scale bounds, eval resize rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from util.data.transforms import MEAN, STD, denormalize, eval_transform, pretrain_transform

# ImageNet statistics written out, independent of timm
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _random_image(w: int = 80, h: int = 60, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_mean_std_are_imagenet() -> None:
    assert MEAN == pytest.approx(IMAGENET_MEAN) and STD == pytest.approx(IMAGENET_STD)


@pytest.mark.parametrize("build", [pretrain_transform, eval_transform])
def test_output_shape_and_dtype(build) -> None:
    torch.manual_seed(0)
    x = build(32)(_random_image())
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


@pytest.mark.parametrize("build", [pretrain_transform, eval_transform])
def test_constant_image_normalized_by_hand(build) -> None:
    colour = (10, 128, 250)
    torch.manual_seed(0)
    x = build(24)(Image.new("RGB", (50, 40), colour))
    for c in range(3):
        expected = (colour[c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(x[c], torch.full_like(x[c], expected), atol=1e-5, rtol=0)


def test_pretrain_pipeline_is_mae() -> None:
    steps = pretrain_transform(224).transforms
    assert [type(t) for t in steps] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    crop = steps[0]
    assert crop.size == (224, 224) and tuple(crop.scale) == (0.2, 1.0)
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert steps[1].p == 0.5


def test_random_crop_area_within_scale_bounds() -> None:
    crop = pretrain_transform(32).transforms[0]
    img = torch.zeros(3, 100, 120)
    torch.manual_seed(0)
    fractions = []
    for _ in range(400):
        _, _, h, w = T.RandomResizedCrop.get_params(img, crop.scale, crop.ratio)
        fractions.append(h * w / (100 * 120))
    fractions = np.array(fractions)
    # integer rounding of h and w moves the area by a few percent at most
    assert fractions.min() >= 0.2 * 0.93 and fractions.max() <= 1.0
    assert fractions.min() < 0.3 and fractions.max() > 0.85  # the whole range is used


def test_flip_happens_about_half_the_time() -> None:
    flip = pretrain_transform(32).transforms[1]
    img = torch.arange(12.0).reshape(1, 3, 4)
    torch.manual_seed(0)
    flipped = sum(bool((flip(img) != img).any()) for _ in range(400))
    assert 150 < flipped < 250


@pytest.mark.parametrize("input_size,crop_pct,resize", [(224, None, 256), (160, None, 182), (384, None, 384),
                                                        (224, 0.875, 256), (224, 1.0, 224)])
def test_eval_resize_rule(input_size: int, crop_pct: float | None, resize: int) -> None:
    steps = eval_transform(input_size, crop_pct).transforms
    assert [type(t) for t in steps] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert steps[0].size == resize and steps[0].interpolation == T.InterpolationMode.BICUBIC
    assert tuple(steps[1].size) == (input_size, input_size)


def test_eval_transform_is_center_crop_of_resized_image() -> None:
    img = _random_image(100, 80)
    x = eval_transform(40, crop_pct=0.5)(img)  # short side 80 -> 80: no resize, 40 px center crop
    ref = torch.from_numpy(np.array(img)[20:60, 30:70]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(denormalize(x[None])[0], ref, atol=1e-5, rtol=0)


def test_eval_transform_rejects_bad_crop_pct() -> None:
    with pytest.raises(ValueError):
        eval_transform(224, crop_pct=1.5)


def test_denormalize_inverts_and_clamps() -> None:
    torch.manual_seed(0)
    y = torch.rand(2, 3, 5, 5)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(denormalize((y - mean) / std), y)
    assert denormalize(torch.full((1, 3, 2, 2), 100.0)).eq(1).all()
    assert denormalize(torch.full((1, 3, 2, 2), -100.0)).eq(0).all()

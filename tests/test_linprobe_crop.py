"""The linear probe's training crop is MAE's TF-style RandomResizedCrop (util/crop.py), not torchvision's."""
import math

import torch
from PIL import Image
from torchvision import transforms as T

from util.data.transforms import MAERandomResizedCrop, linprobe_transform


def mean_area(crop_cls, draws: int = 4000) -> float:
    img = Image.new("RGB", (224, 224))
    torch.manual_seed(0)
    total = 0.0
    for _ in range(draws):
        _, _, h, w = crop_cls.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        total += h * w / (224 * 224)
    return total / draws


def expected_mae_area(n: int = 400) -> float:
    """E[min(w, 224) * min(h, 224)] / 224^2 for area ~ U(0.08, 1), log-aspect ~ U(log 3/4, log 4/3), by a
    midpoint rule over the two uniforms (independent of the implementation; rounding of sides ignored)."""
    total = 0.0
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    for i in range(n):
        area = 0.08 + (1 - 0.08) * (i + 0.5) / n
        for j in range(n):
            aspect = math.exp(lo + (hi - lo) * (j + 0.5) / n)
            total += min(math.sqrt(area * aspect), 1.0) * min(math.sqrt(area / aspect), 1.0)
    return total / n**2


def test_mae_crop_area_matches_its_formula_and_is_larger_than_torchvisions():
    expected = expected_mae_area()  # 0.534 on a square image
    assert abs(mean_area(MAERandomResizedCrop) - expected) < 0.012  # measured 0.530
    # torchvision redraws until the crop fits (10 tries), which biases towards small areas: 0.481 here
    assert mean_area(T.RandomResizedCrop) < expected - 0.03


def test_one_draw_clamped_inside_the_image():
    img = Image.new("RGB", (100, 60))
    torch.manual_seed(1)
    for _ in range(500):
        top, left, h, w = MAERandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 < h <= 60 and 0 < w <= 100 and 0 <= top <= 60 - h and 0 <= left <= 100 - w


def test_linprobe_transform_output():
    x = linprobe_transform(32)(Image.new("RGB", (50, 40), (124, 116, 104)))  # the ImageNet mean colour
    assert x.shape == (3, 32, 32) and x.abs().max() < 0.02

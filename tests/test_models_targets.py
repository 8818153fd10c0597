"""Tests of models/targets.py: patch order by hand loops, norm_pix in numpy, HOG against a pure-Python reference."""
import math

import numpy as np
import pytest
import torch

from models.targets import HOGTarget, PixelTarget, normalize_patches, patchify, unpatchify


def test_patchify_order_matches_hand_loop_and_round_trips():
    imgs = torch.randn(2, 3, 8, 12)
    p = 4
    x = patchify(imgs, p)
    assert x.shape == (2, 2 * 3, p * p * 3)
    for n in range(2):
        for i in range(2):
            for j in range(3):
                for a in range(p):
                    for b in range(p):
                        for c in range(3):
                            assert x[n, i * 3 + j, (a * p + b) * 3 + c] == imgs[n, c, i * p + a, j * p + b]
    square = torch.randn(2, 3, 8, 8)
    assert torch.equal(unpatchify(patchify(square, p), p), square)
    with pytest.raises(ValueError):
        patchify(torch.zeros(1, 3, 10, 8), 4)


def test_pixel_target_norm_pix_matches_numpy():
    imgs = torch.randn(2, 3, 8, 8)
    (plain,), (normed,) = PixelTarget(sizes=(4,))(imgs), PixelTarget(sizes=(4,), norm_pix=True)(imgs)
    ref = plain.double().numpy()
    expected = (ref - ref.mean(-1, keepdims=True)) / np.sqrt(ref.var(-1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(normed.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(normalize_patches(plain), normed)
    assert [t.shape[1:] for t in PixelTarget(sizes=(2, 4, 8))(imgs)] == [(16, 12), (4, 48), (1, 192)]


def _hog_reference(img: np.ndarray, nbins: int, pool: int) -> np.ndarray:
    """Pure-Python HOG of one image [C, H, W] (LocalMIM's ``HOGLayer``): returns [cells, C * nbins]."""
    chans, height, width = img.shape
    k0 = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]

    def reflect(i: int, n: int) -> int:
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    out = np.zeros(((height // pool) * (width // pool), chans * nbins))
    for c in range(chans):
        hist = np.zeros((nbins, height, width))
        for y in range(height):
            for x in range(width):
                g0 = g1 = 0.0
                for dy in range(3):
                    for dx in range(3):
                        v = img[c, reflect(y + dy - 1, height), reflect(x + dx - 1, width)]
                        g0 += k0[dy][dx] * v
                        g1 += k0[dx][dy] * v
                theta = math.atan2(g0, g1)
                hist[math.floor(theta / math.pi * nbins) % nbins, y, x] = math.hypot(g0, g1)
        for cy in range(height // pool):
            for cx in range(width // pool):
                cell = hist[:, cy * pool:(cy + 1) * pool, cx * pool:(cx + 1) * pool].mean(axis=(1, 2))
                norm = math.sqrt((cell**2).sum())
                out[cy * (width // pool) + cx, c * nbins:(c + 1) * nbins] = cell / max(norm, 1e-12)
    return out


def test_hog_matches_pure_python_reference():
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 8, 8)
    hog = HOGTarget(nbins=9, pools=(2, 4, 8))
    targets = hog(imgs)
    for pool, t in zip((2, 4, 8), targets):
        assert t.shape == (2, (8 // pool) ** 2, 27) and t.dtype == torch.float32
        for n in range(2):
            np.testing.assert_allclose(t[n].numpy(), _hog_reference(imgs[n].double().numpy(), 9, pool), atol=2e-5)


def test_hog_step_edges_land_in_the_predicted_bin():
    hog = HOGTarget(nbins=9, pools=(8,))
    vertical = torch.zeros(1, 3, 8, 8)
    vertical[..., 4:] = 1.0  # g0 = -4 on columns 3 and 4, g1 = 0: atan2(-4, 0) = -pi/2 -> floor(-4.5) % 9 = 4
    hist = hog.histogram(vertical)
    expected = torch.zeros(1, 3, 9, 8, 8)
    expected[:, :, 4, :, 3:5] = 4.0
    assert torch.equal(hist, expected)
    one_hot = torch.zeros(27)
    one_hot[[4, 13, 22]] = 1.0
    torch.testing.assert_close(hog(vertical)[0][0, 0], one_hot)
    horizontal = vertical.transpose(2, 3).contiguous()  # g1 = -4, g0 = 0: atan2(0, -4) = pi -> 9 % 9 = bin 0
    assert torch.equal(hog.histogram(horizontal)[:, :, 0, 3:5, :], torch.full((1, 3, 2, 8), 4.0))
    assert hog.histogram(horizontal)[:, :, 1:].eq(0).all()


def test_hog_of_constant_image_is_zero():
    for target in HOGTarget(nbins=9, pools=(2, 4))(torch.full((2, 3, 8, 8), 0.7)):
        assert torch.equal(target, torch.zeros_like(target))


def test_hog_invariant_to_per_channel_affine_normalization():
    torch.manual_seed(1)
    raw = torch.rand(2, 3, 16, 16)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    normalized = (raw - mean[:, None, None]) / std[:, None, None]
    hog = HOGTarget(nbins=9, pools=(4, 8))
    for a, b in zip(hog(raw), hog(normalized)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_hog_pooled_once_equals_recomputed_per_pool_and_ignores_autocast():
    torch.manual_seed(2)
    imgs = torch.randn(2, 3, 16, 16)
    pools = (2, 4, 8, 16)
    once = HOGTarget(nbins=9, pools=pools)(imgs)
    for pool, t in zip(pools, once):
        assert torch.equal(t, HOGTarget(nbins=9, pools=(pool,))(imgs)[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = HOGTarget(nbins=9, pools=pools)(imgs)
    for a, b in zip(once, under_autocast):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def test_sobel_kernels_are_non_persistent_buffers():
    hog = HOGTarget(nbins=18)
    assert hog.state_dict() == {} and list(hog.parameters()) == []
    assert hog.sobel.shape == (2, 1, 3, 3) and hog.out_dim() == 54

"""The HOG target's two behaviours on a real image: exact fp64 Sobel sums (default) and LocalMIM's fp32 sums
(``compat``), pinned against an independent re-implementation of LocalMIM's ``HOG`` layer."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.targets import HOGTarget

IMAGENETTE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette" / "val" / "n03028079"
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def real_image() -> torch.Tensor:
    """A normalized Imagenette photo [1, 3, 224, 224] with a flat 32 x 32 block pasted at (0, 0): flat cells."""
    path = sorted(IMAGENETTE.glob("*.JPEG"))[0] if IMAGENETTE.is_dir() else None
    if path is None:
        pytest.skip("needs ../shared/data/imagenette")
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB").resize((224, 224)), dtype=np.float32) / 255.0)
    x = x.permute(2, 0, 1).clone()
    x[:, :40, :40] = 0.5  # flat beyond the first 32 x 32 cell's reach of the 3 x 3 kernel
    return ((x - MEAN[:, None, None]) / STD[:, None, None]).unsqueeze(0)


def localmim_hog(imgs: torch.Tensor, nbins: int, pool: int) -> torch.Tensor:
    """LocalMIM's ``HOG`` (models_mim.py) written out: per channel an fp32 conv of reflect-padded pixels with the
    two Sobel kernels, magnitude, atan2(k0, k1), hard bin by floor(angle / pi * nbins) mod nbins, AvgPool2d, L2
    normalize over bins. Returns [B, h*w, 3*nbins] like ``HOGTarget``."""
    k0 = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    weight = torch.cat((k0[None], k0.t()[None]), dim=0)[:, None]
    feats = []
    for c in range(imgs.shape[1]):
        x = F.pad(imgs[:, c:c + 1], (1, 1, 1, 1), mode="reflect")
        gxy = F.conv2d(x, weight)
        norm = gxy.norm(dim=1)[:, None]
        phase = torch.atan2(gxy[:, 0], gxy[:, 1])[:, None] / math.pi * nbins
        out = torch.zeros(imgs.shape[0], nbins, *imgs.shape[2:])
        out.scatter_(1, phase.floor().long() % nbins, norm)
        feats.append(F.normalize(torch.nn.AvgPool2d(pool, stride=pool)(out), p=2, dim=1))
    return torch.cat(feats, dim=1).flatten(2).transpose(1, 2)


def test_compat_reproduces_localmim_bit_for_bit():
    imgs = real_image()
    for pool in (4, 8, 16, 32):
        ours = HOGTarget(nbins=9, pools=(pool,), compat=True)(imgs)[0]
        assert torch.equal(ours, localmim_hog(imgs, 9, pool)), pool


def test_default_is_exact_and_differs_from_localmim_in_the_two_documented_ways():
    imgs = real_image()
    exact, compat = HOGTarget(nbins=9, pools=(8,))(imgs)[0], HOGTarget(nbins=9, pools=(8,), compat=True)(imgs)[0]
    # 1. Flat cells: the first 4 x 4 cells of 8 px (rows 0-3, columns 0-3 of the 28 x 28 grid) lie in the flat block.
    flat = torch.tensor([r * 28 + c for r in range(4) for c in range(4)])
    assert exact[0, flat].abs().max() == 0
    per_channel = compat[0, flat].reshape(len(flat), 3, 9).norm(dim=-1)  # [cells, channels]
    spurious = (per_channel - 1).abs() < 1e-5
    assert spurious.any(dim=1).all(), "LocalMIM's fp32 residues give a unit vector on every flat cell"
    assert (spurious | (per_channel == 0)).all()  # (a channel whose residues cancel exactly stays 0)
    # 2. Pixels whose exact horizontal response is 0: all in bin 0 by default, some in bin 8 with fp32 sums.
    hist_exact, hist_compat = HOGTarget(nbins=9).histogram(imgs), HOGTarget(nbins=9, compat=True).histogram(imgs)
    k0 = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    padded = F.pad(imgs.reshape(3, 1, 224, 224), (1, 1, 1, 1), mode="reflect").double()
    g0 = F.conv2d(padded, k0[None, None])[:, 0]  # exact in fp64 (independent of HOGTarget)
    g1 = F.conv2d(padded, k0.t()[None, None])[:, 0]
    zero_h = (g0 == 0) & (g1.abs() > 1e-3)  # a clear vertical edge, exactly no horizontal one
    assert zero_h.sum() > 100
    bins_exact = hist_exact[0].argmax(dim=1)[zero_h]
    bins_compat = hist_compat[0].argmax(dim=1)[zero_h]
    assert (bins_exact == 0).all()
    assert (bins_compat == 8).any() and set(bins_compat.unique().tolist()) <= {0, 8}
    # Elsewhere (no flat cell, no zero response) the two agree to fp32 rounding.
    rest = torch.ones(28 * 28, dtype=torch.bool)
    rest[flat] = False
    assert torch.allclose(exact[0, rest], compat[0, rest], atol=0.2)

"""Reconstruction targets: pixels (patchify, optional per-patch normalization) and multi-scale HOG.

Derived from MAE (He et al., CVPR 2022; github.com/facebookresearch/mae ``models_mae.py`` ``patchify``,
``unpatchify``, ``forward_loss``) and LocalMIM (Wang et al., CVPR 2023; huawei-noah/Efficient-Computing
``Self-supervised/LocalMIM/ViT/models_mim.py`` ``HOGLayer``, ``HOG``; ``Swin/models_mim.py`` for the per-scale
pixel target).

Differences from the references, all with identical results: the Sobel kernels are non-persistent buffers
(not frozen ``Conv2d`` weights, so they never reach a checkpoint); the per-pixel histogram is computed once per
image and average-pooled per scale (LocalMIM recomputes the full-resolution gradients once per scale); targets
are always computed in fp32 with autocast disabled (the reference ran the Sobel conv in fp16 under autocast).
The ViT-L recipe's ``--hog_bias`` quirk (a random, never-trained conv bias) is not reproduced.

One difference changes the targets: by default the 3x3 Sobel sums are taken in fp64, where small-integer multiples
of fp32 pixels add up exactly, so each gradient is the exact value of the formula. LocalMIM sums in fp32, whose
rounding residues (~1e-7 where the exact sum is 0) change its targets in two ways:
1. a flat cell (all gradients exactly 0) gets 0 here, but a spurious unit vector in LocalMIM, where the cell's
   L2-normalization blows the residues up;
2. a pixel whose horizontal (k0) response is exactly 0 always lands in bin 0 here; in LocalMIM a negative residue
   makes ``atan2`` slightly negative and puts it in bin ``nbins - 1`` (about 3 % of such pixels on ImageNet).
At random init the per-scale losses differ by 1-12 % between the two. ``compat=True`` (``--hog_compat``) sums in
fp32 exactly as LocalMIM does, giving its targets bit for bit, so that published loss curves compare like for like.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def patchify(imgs: Tensor, p: int) -> Tensor:
    """Cut images into non-overlapping p x p patches, flattened as (row-in-patch, col-in-patch, channel).

    Args:
        imgs: [B, C, H, W] with H and W divisible by p.
        p: patch side in pixels.

    Returns:
        [B, (H/p)*(W/p), p*p*C]; patches in row-major order, channel varies fastest inside a patch.
    """
    batch, chans, height, width = imgs.shape
    if height % p or width % p:
        raise ValueError(f"image {height}x{width} is not divisible into {p}x{p} patches")
    h, w = height // p, width // p
    x = imgs.reshape(batch, chans, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(batch, h * w, p * p * chans)


def unpatchify(x: Tensor, p: int, channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify` for a square grid.

    Args:
        x: [B, L, p*p*channels] with L a perfect square.
        p: patch side in pixels.
        channels: image channels C.

    Returns:
        [B, C, sqrt(L)*p, sqrt(L)*p].
    """
    batch, length, dim = x.shape
    h = math.isqrt(length)
    if h * h != length or dim != p * p * channels:
        raise ValueError(f"cannot unpatchify [{batch}, {length}, {dim}] with p={p}, channels={channels}")
    x = x.reshape(batch, h, h, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(batch, channels, h * p, h * p)


def normalize_patches(x: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE's ``norm_pix_loss`` rule: standardize each patch over its own values.

    Args:
        x: [..., N], one patch per row.
        eps: added to the variance.

    Returns:
        [..., N], ``(x - mean) / sqrt(var + eps)`` with the unbiased (N - 1) variance.
    """
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    return (x - mean) / (var + eps) ** 0.5


class PixelTarget(nn.Module):
    """Pixel regression target at one or more region sizes (MAE; LocalMIM-style pixel variant).

    A prediction at scale s of a ViT with patch p covers regions of r = p / s pixels; its target is the
    patchified image at region size r (3 * r * r values per cell), optionally normalized per region.
    """

    def __init__(self, sizes: Sequence[int] = (16,), norm_pix: bool = False) -> None:
        """
        Args:
            sizes: default region sizes r in pixels, one per prediction.
            norm_pix: standardize each region (MAE ``norm_pix_loss``).
        """
        super().__init__()
        self.sizes = tuple(int(r) for r in sizes)
        self.norm_pix = norm_pix

    @staticmethod
    def out_dim(size: int, channels: int = 3) -> int:
        """Target width of one cell of region size ``size``: ``channels * size * size``."""
        return channels * size * size

    def forward(self, imgs: Tensor, sizes: Sequence[int] | None = None) -> list[Tensor]:
        """Compute targets in fp32, without autograd and outside autocast.

        Args:
            imgs: [B, C, H, W], the (normalized) input images.
            sizes: region sizes r; None uses the constructor's sizes.

        Returns:
            One [B, (H/r)*(W/r), C*r*r] fp32 tensor per size.
        """
        sizes = self.sizes if sizes is None else sizes
        with torch.no_grad(), torch.autocast(device_type=imgs.device.type, enabled=False):
            x = imgs.float()
            out = []
            for r in sizes:
                t = patchify(x, int(r))
                out.append(normalize_patches(t) if self.norm_pix else t)
        return out


class HOGTarget(nn.Module):
    """LocalMIM's multi-scale HOG target, per colour channel, computed once and pooled per scale.

    Per channel: Sobel responses g0 (k0 = [[1,0,-1],[2,0,-2],[1,0,-1]]) and g1 (k0 transposed) with reflect
    padding; magnitude ``|g|``; angle ``atan2(g0, g1)``; hard bin ``floor(angle / pi * nbins) mod nbins``
    (unsigned orientation); average pool over ``pool x pool`` pixels; L2 normalization over the bins of each
    cell (an all-zero cell stays zero); channels concatenated as [R bins | G bins | B bins].
    """

    def __init__(self, nbins: int = 9, pools: Sequence[int] = (4, 8, 16, 32), compat: bool = False) -> None:
        """
        Args:
            nbins: orientation bins per channel.
            pools: default pool sizes in pixels (p / scale for each LocalMIM stage).
            compat: take the Sobel sums in fp32 as LocalMIM does (its targets bit for bit, residues included);
                default fp64, the exact value of the formula (module docstring).
        """
        super().__init__()
        if nbins < 1:
            raise ValueError(f"nbins must be positive, got {nbins}")
        self.nbins = nbins
        self.compat = compat
        self.pools = tuple(int(k) for k in pools)
        k0 = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        # Fixed and derivable: a non-persistent buffer, so it follows .to(device) but never enters a checkpoint.
        self.register_buffer("sobel", torch.stack([k0, k0.t()]).unsqueeze(1), persistent=False)  # [2, 1, 3, 3]

    def out_dim(self, size: int = 0, channels: int = 3) -> int:
        """Target width of one cell: ``channels * nbins`` (independent of the pool size)."""
        return channels * self.nbins

    def histogram(self, imgs: Tensor) -> Tensor:
        """Per-pixel orientation histogram (hard-binned gradient magnitude), fp32, no autograd, no autocast.

        Args:
            imgs: [B, C, H, W].

        Returns:
            [B, C, nbins, H, W]; at each pixel only the bin of its gradient angle holds the magnitude.
        """
        batch, chans, height, width = imgs.shape
        with torch.no_grad(), torch.autocast(device_type=imgs.device.type, enabled=False):
            x = F.pad(imgs.float().reshape(batch * chans, 1, height, width), (1, 1, 1, 1), mode="reflect")
            # Sobel sums in fp64: small-integer multiples of fp32 pixels add up exactly there, so a flat region
            # gives exactly 0. In fp32 (LocalMIM, compat) the conv's summation order leaves residues of ~1e-7 where
            # the sum is 0, which the cell L2-normalization blows up into a spurious unit vector.
            if self.compat:
                grad = F.conv2d(x, self.sobel.float())  # [B*C, 2, H, W]
            else:
                grad = F.conv2d(x.double(), self.sobel.double()).float()
            magnitude = grad.norm(dim=1, keepdim=True)
            angle = torch.atan2(grad[:, 0], grad[:, 1])  # first argument is the k0 response (LocalMIM's ``HOGLayer``)
            bins = torch.floor(angle / math.pi * self.nbins).long() % self.nbins  # non-negative modulo
            hist = torch.zeros(batch * chans, self.nbins, height, width, device=imgs.device)
            hist.scatter_(1, bins.unsqueeze(1), magnitude)
        return hist.reshape(batch, chans, self.nbins, height, width)

    @staticmethod
    def pool(hist: Tensor, pool: int) -> Tensor:
        """Average-pool a per-pixel histogram into cells and L2-normalize each channel's bins.

        Args:
            hist: [B, C, nbins, H, W] from :meth:`histogram`.
            pool: cell side in pixels, dividing H and W.

        Returns:
            [B, (H/pool)*(W/pool), C*nbins], cells row-major, features ordered [channel 0 bins, channel 1 bins, ...].
        """
        batch, chans, nbins, height, width = hist.shape
        if height % pool or width % pool:
            raise ValueError(f"HOG pool {pool} does not divide the image {height}x{width}")
        with torch.no_grad():
            x = F.avg_pool2d(hist.reshape(batch * chans, nbins, height, width), pool)
            x = F.normalize(x, p=2.0, dim=1)
            x = x.reshape(batch, chans * nbins, height // pool, width // pool)
        return x.flatten(2).transpose(1, 2)

    def forward(self, imgs: Tensor, pools: Sequence[int] | None = None) -> list[Tensor]:
        """HOG targets at several pool sizes from one full-resolution histogram.

        Args:
            imgs: [B, C, H, W], the (normalized) input images; the target is invariant to per-channel affine
                normalization because the kernels sum to zero and cells are L2-normalized.
            pools: pool sizes; None uses the constructor's pools.

        Returns:
            One [B, (H/pool)*(W/pool), C*nbins] fp32 tensor per pool size.
        """
        pools = self.pools if pools is None else pools
        if not pools:
            return []
        hist = self.histogram(imgs)
        return [self.pool(hist, int(k)) for k in pools]

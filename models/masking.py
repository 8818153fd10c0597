"""Random token masking and the per-scale rescaling of the mask (pure functions).

Derived from MAE (He et al., CVPR 2022; github.com/facebookresearch/mae ``models_mae.py`` ``random_masking``)
and LocalMIM (Wang et al., "Masked Image Modeling with Local Multi-Scale Reconstruction", CVPR 2023;
huawei-noah/Efficient-Computing ``Self-supervised/LocalMIM/ViT/models_mim.py`` ``recal_mask``).
"""
from __future__ import annotations

import torch
from torch import Tensor


def random_masking(x: Tensor, mask_ratio: float, generator: torch.Generator | None = None,
                   noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking by argsort of uniform noise, exactly as MAE.

    Args:
        x: tokens, [B, L, D].
        mask_ratio: fraction of tokens to remove, in [0, 1).
        generator: RNG for the noise, on ``x.device``; None draws from the global RNG.
        noise: the noise itself, [B, L] (e.g. ``models.masking.keyed_noise``); ``generator`` is then unused.

    Returns:
        ``(x_kept, mask, ids_restore)``: x_kept [B, K, D] with ``K = int(L * (1 - mask_ratio))`` (the tokens with
        the K smallest noise values, in ascending-noise order); mask [B, L] float32, 1 = removed, 0 = kept, in
        the original token order; ids_restore [B, L] long, the inverse of the shuffle (gathering the
        concatenation ``[kept, removed]`` with it restores the original order).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    batch, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, length, generator=generator, device=x.device)
    elif noise.shape != (batch, length):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(batch, length)}")
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


def check_mask_ratio(mask_ratio: float, num_patches: int, *, img_size: int, patch_size: int) -> int:
    """The number of visible patches ``int(L * (1 - mask_ratio))`` (``random_masking``'s rule), after checking that
    it leaves at least one visible and one masked patch: with none visible the encoder sees nothing, with none
    masked the loss is an average over no patch (NaN).

    Raises:
        ValueError: naming the ratio, the input and patch sizes and the resulting counts.
    """
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1 or keep >= num_patches:
        what = "no visible patch" if keep < 1 else "no masked patch"
        raise ValueError(f"--mask_ratio {mask_ratio} leaves {what} at --input_size {img_size} with patch size "
                         f"{patch_size}: {keep} of {num_patches} patches kept; choose a ratio in "
                         f"[{1 / num_patches:.4g}, {1 - 1 / num_patches:.4g}] for this grid")
    return keep


def rescale_mask(mask: Tensor, scale: float, grid: int) -> Tensor:
    """Carry the encoder-grid mask to the output grid of a prediction at ``scale`` (LocalMIM ``recal_mask``).

    scale >= 1 (an integer): nearest upsampling, each patch becomes an s x s block of cells.
    scale = 1/n (e.g. 0.5): average of each n x n block, giving fractional weights (0, .25, .5, .75, 1 for n = 2).
    Both keep the row-major order of the flattened prediction.

    Args:
        mask: [B, G*G], 1 = removed.
        scale: output cells per patch side.
        grid: G, patches per side.

    Returns:
        [B, (G*scale)**2].
    """
    batch, length = mask.shape
    if length != grid * grid:
        raise ValueError(f"mask has {length} tokens, expected grid {grid}x{grid}")
    if scale >= 1:
        if scale != int(scale):
            raise ValueError(f"upsampling scale must be an integer, got {scale}")
        s = int(scale)
        return mask.reshape(batch, grid, grid).repeat_interleave(s, 1).repeat_interleave(s, 2).reshape(batch, -1)
    inv = round(1.0 / scale) if scale > 0 else 0
    if inv < 1 or abs(1.0 / scale - inv) > 1e-9 or grid % inv:
        raise ValueError(f"downsampling scale must be 1/n with n dividing the grid {grid}, got {scale}")
    g = grid // inv
    return mask.reshape(batch, g, inv, g, inv).mean(dim=(2, 4)).reshape(batch, -1)

def keyed_noise(keys: torch.Tensor, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform masking noise [B, length] (for ``random_masking``); row i comes from a generator
    seeded with ``keys[i]`` XOR a constant, a stream of its own apart from the sample's augmentation."""
    rows = [torch.rand(length, generator=torch.Generator().manual_seed(int(k) ^ 0x5DEECE66D)) for k in keys.tolist()]
    return torch.stack(rows).to(device, non_blocking=True)

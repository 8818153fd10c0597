"""Masked image models: a ViT encoder under timm's key names with MAE or LocalMIM heads, and freezable units.

Derived from MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022;
github.com/facebookresearch/mae ``models_mae.py``), LocalMIM (Wang et al., "Masked Image Modeling with Local
Multi-Scale Reconstruction", CVPR 2023; huawei-noah/Efficient-Computing ``Self-supervised/LocalMIM/ViT/
models_mim.py``) and ViTFreeze (github.com/utkutpcgl/ViTFreeze, FreezeOut of Brock et al., 2017, applied to
LocalMIM).

Both models are one computation: encode the visible tokens, tap the encoder after some blocks ("stages"),
decode each tap to a prediction at a scale, and sum the masked MSE of each stage against its target. MAE is one
stage of scale 1 fed by the last block through the final ``norm``; LocalMIM has stages at scales (4, 2, 1, 0.5)
fed by blocks [1, 3, depth-3, depth-1] through the stage norms ``norm.K``.

Freezable units (FreezeOut), in forward order: unit 0 = patch_embed + cls_token + pos_embed, unit i = block
i-1 (with ``freeze_patch_embed=False``: the embedding never freezes and block i is unit i). A LocalMIM stage's
norm and decoder belong to the unit of the block feeding it; MAE's final norm and decoder never freeze (None).
``forward(num_frozen=k)`` runs the first k units without autograd and skips the stages they feed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor

from models.decoders import LAYER_NORM, PREDICTION_SCALES, LocalMIMDecoder, init_linear_and_norm, insert_mask_tokens
from models.masking import random_masking, rescale_mask
from models.pos_embed import get_2d_sincos_pos_embed
from models.registry import register_model
from models.targets import HOGTarget, PixelTarget

ENCODER_PREFIXES = ("patch_embed", "cls_token", "pos_embed", "blocks")


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked cells of the per-cell MSE (MAE / LocalMIM ``forward_loss``).

    Args:
        pred: [B, N, C].
        target: [B, N, C].
        mask: [B, N] cell weights, 1 = removed (fractional for downsampled masks).

    Returns:
        Scalar ``sum(mean_c((pred - target)**2) * mask) / sum(mask)`` in fp32.
    """
    return (((pred.float() - target) ** 2).mean(dim=-1) * mask).sum() / mask.sum()


def default_stage_blocks(depth: int, num_stages: int) -> list[int]:
    """Blocks feeding the LocalMIM stages: [1, 3, depth-3, depth-1] for 4 stages and depth >= 7
    (LocalMIM ``ViT/models_mim.py``; at
    depth 6 it would feed two stages from block 3), else ``num_stages`` evenly spread distinct blocks ending at
    depth-1 (depth 4 -> [0, 1, 2, 3], depth 6 -> [0, 2, 3, 5])."""
    if num_stages == 4 and depth >= 7:
        return [1, 3, depth - 3, depth - 1]
    if not 1 <= num_stages <= depth:
        raise ValueError(f"cannot place {num_stages} stages on distinct blocks of a depth-{depth} encoder; "
                         "pass stage_blocks or fewer scales")
    if num_stages == 1:
        return [depth - 1]
    return [math.floor(i * (depth - 1) / (num_stages - 1) + 0.5) for i in range(num_stages)]


class MaskedImageModel(nn.Module):
    """ViT encoder for masked image modeling with stage taps and freezable units (base of MAE and LocalMIM).

    Encoder keys match ``timm.models.vision_transformer.VisionTransformer``: ``patch_embed.proj.*``,
    ``cls_token`` [1, 1, D], ``pos_embed`` [1, 1+L, D] (fixed sin-cos, a persistent buffer), ``blocks.N.*``.
    Subclasses add the heads, set ``stage_blocks``, ``scales``, ``target_sizes`` and ``target``, implement
    :meth:`forward_stage`, :meth:`stage_unit`, :meth:`_head_unit` and :meth:`_final_norm_state`, and call
    :meth:`init_weights` at the end of their constructor.
    """

    stage_blocks: list[int]  # 0-based block feeding each stage
    scales: list[float]  # output cells per patch side of each stage
    target_sizes: list[int]  # pixels per output cell side of each stage (p / scale): HOG pool or pixel region
    target_kind: str  # 'pixel' or 'hog'
    target: nn.Module  # computes the targets: forward(imgs, sizes) -> list of [B, N_k, C_k]

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 freeze_patch_embed: bool = True,
                 freeze_cls_token: bool = True) -> None:
        """
        Args:
            img_size: input side in pixels, divisible by patch_size.
            patch_size: p.
            in_chans: image channels.
            embed_dim: D, divisible by 4 (sin-cos table).
            depth: encoder Blocks.
            num_heads: attention heads.
            mlp_ratio: MLP hidden width over D.
            freeze_patch_embed: patch_embed + cls_token form unit 0 (else they never freeze early, the
                ``--dont_freeze_pe`` mode of ViTFreeze).
            freeze_cls_token: the cls token belongs to unit 0 (our fix: ViTFreeze
                leaves it trainable after the embedding freezes). False reproduces ViTFreeze, where
                it never freezes, so backward still runs through every frozen block (``--vitfreeze_compat``).
        """
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.freeze_patch_embed = freeze_patch_embed
        self.freeze_cls_token = freeze_cls_token
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed but persistent, so MAE / timm checkpoints line up key for key.
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(embed_dim, self.grid_size).unsqueeze(0))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LAYER_NORM)
                                     for _ in range(depth)])
        self._units: dict[str, int | None] | None = None

    def init_weights(self) -> None:
        """As MAE ``models_mae.py initialize_weights``:
        Xavier on the patch-embed weight viewed [D, C*p*p], normal(0.02) for cls and mask tokens,
        Xavier Linear + zero bias, LayerNorm 1 / 0; convs and the patch-embed bias keep PyTorch defaults."""
        weight = self.patch_embed.proj.weight
        with torch.no_grad():
            nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for name, param in self.named_parameters():
            if name.split(".")[-1] == "mask_token":
                nn.init.normal_(param, std=0.02)
        self.apply(init_linear_and_norm)

    # ---- freezable units -------------------------------------------------------------------------------------

    @property
    def num_units(self) -> int:
        """Number of freezable units: 1 + depth (depth with ``freeze_patch_embed=False``)."""
        return self.depth + int(self.freeze_patch_embed)

    def block_unit(self, block: int) -> int:
        """Unit of encoder block ``block`` (0-based)."""
        return block + int(self.freeze_patch_embed)

    def unit_of(self, name: str) -> int | None:
        """Freezable unit of a parameter or state-dict entry (None: never frozen early).

        Args:
            name: a name from ``named_parameters()`` or ``state_dict()`` of this (unwrapped) module.

        Returns:
            The unit index in [0, num_units), or None.

        Raises:
            KeyError: the name is not a parameter or state-dict entry of this model.
        """
        if self._units is None:
            names = [n for n, _ in self.named_parameters()] + list(self.state_dict().keys())
            self._units = {n: self._rule_unit(n) for n in names}
        if name not in self._units:
            raise KeyError(f"{name!r} is not a parameter or state-dict entry of {type(self).__name__}")
        return self._units[name]

    def _rule_unit(self, name: str) -> int | None:
        parts = name.split(".")
        if parts[0] == "blocks":
            return self.block_unit(int(parts[1]))
        if parts[0] == "cls_token" and not self.freeze_cls_token:
            return None
        if parts[0] in ENCODER_PREFIXES:
            return 0 if self.freeze_patch_embed else None
        return self._head_unit(name)

    def _head_unit(self, name: str) -> int | None:
        raise NotImplementedError

    def stage_unit(self, stage: int) -> int | None:
        """Unit whose freezing drops stage ``stage`` (None: the stage always trains)."""
        raise NotImplementedError

    def active_stages(self, num_frozen: int) -> list[int]:
        """Indices of the stages that still train when the first ``num_frozen`` units are frozen."""
        units = [self.stage_unit(k) for k in range(len(self.stage_blocks))]
        return [k for k, unit in enumerate(units) if unit is None or unit >= num_frozen]

    # ---- forward ---------------------------------------------------------------------------------------------

    def forward_encoder(self, imgs: Tensor, mask_ratio: float = 0.75, num_frozen: int = 0,
                        generator: torch.Generator | None = None,
                        taps: Sequence[int] | None = None,
                        noise: Tensor | None = None) -> tuple[list[Tensor], Tensor, Tensor]:
        """Embed, mask, prepend cls, run blocks up to the last tap; frozen units run without autograd.

        The frozen prefix runs under ``torch.no_grad()`` only when nothing before it trains: with
        ``freeze_patch_embed=False`` the trainable patch embedding needs gradients through every block, so frozen
        blocks then run with autograd (their weights get no gradient once ``requires_grad`` is off).

        Args:
            imgs: [B, C, H, W].
            mask_ratio: fraction of patches removed.
            num_frozen: frozen prefix length in units, 0 <= num_frozen <= num_units.
            generator: masking RNG (on the images' device); the draw does not depend on num_frozen.
            taps: 0-based blocks whose outputs are returned, increasing; default the last block.
            noise: masking noise [B, L] (``models.masking.keyed_noise``) instead of a draw from ``generator``.

        Returns:
            ``(outputs, mask, ids_restore)``: outputs one [B, 1+K, D] per tap (raw block output, cls first);
            mask [B, L] (1 = removed); ids_restore [B, L].
        """
        if not 0 <= num_frozen <= self.num_units:
            raise ValueError(f"num_frozen must be in [0, {self.num_units}], got {num_frozen}")
        taps = [self.depth - 1] if taps is None else list(taps)
        grad = torch.is_grad_enabled()
        embed_frozen = self.freeze_patch_embed and num_frozen > 0
        # A frozen block can skip autograd only if nothing before it trains (patch embedding and cls token).
        prefix_no_grad = self.freeze_patch_embed and self.freeze_cls_token
        with torch.set_grad_enabled(grad and not embed_frozen):
            x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
            x, mask, ids_restore = random_masking(x, mask_ratio, generator, noise)
        with torch.set_grad_enabled(grad and not (embed_frozen and self.freeze_cls_token)):
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        outputs = []
        for i in range(max(taps) + 1 if taps else 0):
            frozen = prefix_no_grad and self.block_unit(i) < num_frozen
            with torch.set_grad_enabled(grad and not frozen):
                x = self.blocks[i](x)
            if i in taps:
                outputs.append(x)
        return outputs, mask, ids_restore

    def forward_stage(self, stage: int, x: Tensor, ids_restore: Tensor) -> Tensor:
        """Prediction of stage ``stage`` from its tapped block output [B, 1+K, D] -> [B, N_k, C_k]."""
        raise NotImplementedError

    def forward(self, imgs: Tensor, mask_ratio: float = 0.75, num_frozen: int = 0,
                generator: torch.Generator | None = None, noise: Tensor | None = None) -> dict[str, Any]:
        """Masked reconstruction loss of the stages that are not fed by frozen units.

        Args:
            imgs: [B, C, H, W], normalized images.
            mask_ratio: fraction of patches removed.
            num_frozen: the first ``num_frozen`` units run without autograd (the caller sets their eval mode and
                requires_grad); stages whose feeding unit is frozen are skipped (no decoder, target or loss).
            generator: masking RNG on the images' device (None: global RNG).
            noise: masking noise [B, L] (``models.masking.keyed_noise``) instead of a draw from ``generator``.

        Returns:
            dict with ``loss`` (scalar, sum of ``stage_losses``), ``mask`` [B, L] (1 = removed), and per active
            stage, in stage order: ``preds`` [B, N_k, C_k], ``targets`` [B, N_k, C_k] (fp32), ``masks`` [B, N_k],
            ``scales`` (float), ``stage_losses`` (scalar), ``stages`` (stage index); plus ``ids_restore`` [B, L].
        """
        stages = self.active_stages(num_frozen)
        if not stages:
            raise ValueError(f"num_frozen={num_frozen} freezes every stage of {type(self).__name__}; nothing to train")
        # Targets first: their full-resolution temporaries are freed before the encoder's activations pile up.
        targets = self.target(imgs, [self.target_sizes[k] for k in stages])
        taps = [self.stage_blocks[k] for k in stages]
        latents, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, num_frozen, generator, taps=taps,
                                                          noise=noise)
        preds = [self.forward_stage(k, x, ids_restore) for k, x in zip(stages, latents)]
        scales = [self.scales[k] for k in stages]
        masks = [rescale_mask(mask, s, self.grid_size) for s in scales]
        stage_losses = [masked_mse(p, t, m) for p, t, m in zip(preds, targets, masks)]
        return {"loss": sum(stage_losses), "mask": mask, "preds": preds, "targets": targets, "masks": masks,
                "scales": scales, "stage_losses": stage_losses, "stages": stages, "ids_restore": ids_restore}

    # ---- export ----------------------------------------------------------------------------------------------

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """Encoder weights under the keys of ``timm VisionTransformer(..., num_classes=0)`` (strict-loadable).

        Returns:
            ``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.*``, ``norm.*`` (for LocalMIM the last
            stage norm), detached.
        """
        state = self.state_dict()
        out = {k: v for k, v in state.items() if k.split(".")[0] in ENCODER_PREFIXES}
        out.update(self._final_norm_state(state))
        return out

    def _final_norm_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError


class MaskedAutoencoder(MaskedImageModel):
    """MAE: encoder + final ``norm`` + an 8-block transformer decoder predicting the pixels of every patch.

    Checkpoint keys are MAE's: encoder keys, ``norm.*``, ``decoder_embed.*``, ``mask_token``,
    ``decoder_pos_embed``, ``decoder_blocks.N.*``, ``decoder_norm.*``, ``decoder_pred.*``.
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 target: str | None = None, hog_nbins: int = 9, hog_compat: bool = False,
                 freeze_patch_embed: bool = True, freeze_cls_token: bool = True) -> None:
        """
        Args:
            img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, freeze_patch_embed: see
                :class:`MaskedImageModel`.
            decoder_embed_dim: decoder width Dd.
            decoder_depth: decoder Blocks.
            decoder_num_heads: decoder attention heads.
            norm_pix_loss: per-patch normalized pixel target.
            target: 'pixel' or None (MAE only predicts pixels; 'hog' raises ValueError).
            hog_nbins, hog_compat: ignored (accepted so one call site builds MAE and LocalMIM models).
        """
        if target not in (None, "pixel"):
            raise ValueError(f"MAE models predict pixels (target='pixel'), got target={target!r}; "
                             "use a MIM_* model for HOG targets")
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, freeze_patch_embed=freeze_patch_embed,
                         freeze_cls_token=freeze_cls_token)
        self.norm_pix_loss = norm_pix_loss
        self.norm = LAYER_NORM(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed",
                             get_2d_sincos_pos_embed(decoder_embed_dim, self.grid_size).unsqueeze(0))
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=LAYER_NORM)
            for _ in range(decoder_depth)])
        self.decoder_norm = LAYER_NORM(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        self.stage_blocks = [depth - 1]
        self.scales = [1.0]
        self.target_sizes = [patch_size]
        self.target_kind = "pixel"
        self.target = PixelTarget(sizes=self.target_sizes, norm_pix=norm_pix_loss)
        self.init_weights()

    def stage_unit(self, stage: int) -> int | None:
        return None

    def _head_unit(self, name: str) -> int | None:
        if name.split(".")[0] in ("norm", "mask_token", "decoder_embed", "decoder_pos_embed", "decoder_blocks",
                                  "decoder_norm", "decoder_pred"):
            return None
        raise KeyError(name)

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """
        Args:
            latent: normalized encoder output, [B, 1+K, D].
            ids_restore: [B, L].

        Returns:
            Pixel prediction per patch, [B, L, p*p*C].
        """
        x = insert_mask_tokens(self.decoder_embed(latent), self.mask_token, ids_restore) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_stage(self, stage: int, x: Tensor, ids_restore: Tensor) -> Tensor:
        return self.forward_decoder(self.norm(x), ids_restore)

    def _final_norm_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for k, v in state.items() if k.split(".")[0] == "norm"}


class LocalMIM(MaskedImageModel):
    """LocalMIM: no final norm; after each stage block a LayerNorm ``norm.K`` and a decoder ``decoder.K``
    predict the HOG (or pixel) target of the visible image at scale ``scales[K]``."""

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, decoder_embed_dim: int = 256, decoder_depth: int = 1,
                 decoder_num_heads: int = 8, mlp_ratio: float = 4.0, target: str | None = None, hog_nbins: int = 9,
                 hog_compat: bool = False, norm_pix_loss: bool = False,
                 scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5), stage_blocks: Sequence[int] | None = None,
                 freeze_patch_embed: bool = True, freeze_cls_token: bool = True) -> None:
        """
        Args:
            img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, freeze_patch_embed: see
                :class:`MaskedImageModel`.
            decoder_embed_dim, decoder_depth, decoder_num_heads: each stage decoder's width, Blocks, heads.
            target: 'hog' (default when None) or 'pixel' (per-region pixels, region r = p / scale; our extension
                following LocalMIM-Swin ``Swin/models_mim.py``).
            hog_nbins: orientation bins per colour channel.
            hog_compat: LocalMIM's fp32 Sobel sums, its HOG targets bit for bit (``models.targets`` docstring).
            norm_pix_loss: normalize each pixel region (pixel target only; ValueError with HOG).
            scales: output cells per patch side for each stage, from {8, 4, 2, 1, 0.5}.
            stage_blocks: 0-based blocks feeding the stages, increasing and ending at depth-1; default
                :func:`default_stage_blocks`.
        """
        target = "hog" if target is None else target
        if target not in ("hog", "pixel"):
            raise ValueError(f"LocalMIM target must be 'hog' or 'pixel', got {target!r}")
        if target == "hog" and norm_pix_loss:
            raise ValueError("norm_pix_loss applies to the pixel target only; HOG cells are L2-normalized already")
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, freeze_patch_embed=freeze_patch_embed,
                         freeze_cls_token=freeze_cls_token)
        self.scales = [float(s) for s in scales]
        blocks = default_stage_blocks(depth, len(self.scales)) if stage_blocks is None else list(stage_blocks)
        self._check_stages(blocks, target)
        self.stage_blocks = blocks
        self.target_sizes = [round(patch_size / s) for s in self.scales]
        self.target_kind = target
        if target == "hog":
            self.target = HOGTarget(nbins=hog_nbins, pools=self.target_sizes, compat=hog_compat)
        else:
            self.target = PixelTarget(sizes=self.target_sizes, norm_pix=norm_pix_loss)
        self.norm = nn.ModuleList([LAYER_NORM(embed_dim) for _ in self.scales])
        self.decoder = nn.ModuleList([
            LocalMIMDecoder(embed_dim, self.target.out_dim(r, in_chans), s, self.grid_size, decoder_embed_dim,
                            decoder_depth, decoder_num_heads, mlp_ratio)
            for s, r in zip(self.scales, self.target_sizes)])
        self.init_weights()

    def _check_stages(self, blocks: list[int], target: str) -> None:
        if len(blocks) != len(self.scales) or not blocks:
            raise ValueError(f"need one feeding block per scale, got stage_blocks={blocks}, scales={self.scales}")
        if any(b >= a for b, a in zip(blocks, blocks[1:])) or blocks[0] < 0 or blocks[-1] != self.depth - 1:
            raise ValueError(f"stage_blocks must increase strictly within [0, {self.depth - 1}] and end at "
                             f"{self.depth - 1}, got {blocks}")
        for s in self.scales:
            if s not in PREDICTION_SCALES:
                raise ValueError(f"unsupported scale {s}; supported: {PREDICTION_SCALES}")
            region = self.patch_size / s
            if region != int(region):
                raise ValueError(f"patch {self.patch_size} at scale {s} gives a {region}-pixel {target} region; "
                                 "p / scale must be an integer (e.g. ViT-H/14 cannot use scale 4: 14 / 4 = 3.5 px)")
            if s < 1 and self.grid_size % round(1 / s):
                raise ValueError(f"scale {s} needs the patch grid {self.grid_size} divisible by {round(1 / s)}")

    def stage_unit(self, stage: int) -> int | None:
        return self.block_unit(self.stage_blocks[stage])

    def _head_unit(self, name: str) -> int | None:
        parts = name.split(".")
        if parts[0] in ("norm", "decoder"):
            return self.stage_unit(int(parts[1]))
        raise KeyError(name)

    def forward_stage(self, stage: int, x: Tensor, ids_restore: Tensor) -> Tensor:
        return self.decoder[stage](self.norm[stage](x), ids_restore)

    def _final_norm_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        last = len(self.scales) - 1
        return {"norm.weight": state[f"norm.{last}.weight"], "norm.bias": state[f"norm.{last}.bias"]}


def _mae(arch: dict, overrides: dict) -> MaskedAutoencoder:
    return MaskedAutoencoder(**{**arch, **overrides})


def _localmim(arch: dict, overrides: dict) -> LocalMIM:
    return LocalMIM(**{**arch, **overrides})


@register_model
def mae_vit_tiny_patch16(**kwargs) -> MaskedAutoencoder:
    """MAE ViT-Ti/16; decoder 128-d x 4 blocks x 4 heads (our choice, not in MAE)."""
    return _mae(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                     decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4), kwargs)


@register_model
def mae_vit_small_patch16(**kwargs) -> MaskedAutoencoder:
    """MAE ViT-S/16; decoder 256-d x 8 blocks x 8 heads (our choice, not in MAE)."""
    return _mae(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                     decoder_embed_dim=256, decoder_depth=8, decoder_num_heads=8), kwargs)


@register_model
def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoder:
    """MAE ViT-B/16, decoder 512-d x 8 blocks x 16 heads ([MAE] ``mae_vit_base_patch16_dec512d8b``)."""
    return _mae(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                     decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16), kwargs)


@register_model
def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoder:
    """MAE ViT-L/16, decoder 512-d x 8 blocks x 16 heads ([MAE] ``mae_vit_large_patch16_dec512d8b``)."""
    return _mae(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                     decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16), kwargs)


@register_model
def mae_vit_huge_patch14(**kwargs) -> MaskedAutoencoder:
    """MAE ViT-H/14, decoder 512-d x 8 blocks x 16 heads ([MAE] ``mae_vit_huge_patch14_dec512d8b``)."""
    return _mae(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                     decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16), kwargs)


@register_model
def MIM_vit_tiny_patch16(**kwargs) -> LocalMIM:  # noqa: N802 (LocalMIM's model names)
    """LocalMIM ViT-Ti/16; decoders 128-d x 1 block x 4 heads (our choice, not in LocalMIM)."""
    return _localmim(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                          decoder_embed_dim=128, decoder_depth=1, decoder_num_heads=4), kwargs)


@register_model
def MIM_vit_small_patch16(**kwargs) -> LocalMIM:  # noqa: N802
    """LocalMIM ViT-S/16; decoders 256-d x 1 block x 8 heads ([LMIM] ``MIM_vit_small_patch16``)."""
    return _localmim(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                          decoder_embed_dim=256, decoder_depth=1, decoder_num_heads=8), kwargs)


@register_model
def MIM_vit_base_patch16(**kwargs) -> LocalMIM:  # noqa: N802
    """LocalMIM ViT-B/16; decoders 256-d x 1 block x 8 heads ([LMIM] ``MIM_vit_base_patch16``)."""
    return _localmim(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                          decoder_embed_dim=256, decoder_depth=1, decoder_num_heads=8), kwargs)


@register_model
def MIM_vit_large_patch16(**kwargs) -> LocalMIM:  # noqa: N802
    """LocalMIM ViT-L/16; decoders 256-d x 1 block x 8 heads ([LMIM] ``MIM_vit_large_patch16``)."""
    return _localmim(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                          decoder_embed_dim=256, decoder_depth=1, decoder_num_heads=8), kwargs)

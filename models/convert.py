"""Checkpoint key maps: MAE / LocalMIM / ViTFreeze / MoCo v3 / DINOv2 / timm -> timm ``VisionTransformer`` keys.

Pure operations on state dicts (no file I/O; ``tools/`` reads and writes files). The target layout is the one of
``timm.models.vision_transformer.VisionTransformer``: ``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*``, ``norm.*`` and, when the checkpoint has
them, ``fc_norm.*`` / ``head.*`` (the caller decides whether to keep a head).

Sources and what they derive from:
- MAE (He et al., CVPR 2022; github.com/facebookresearch/mae ``main_finetune.py``): drop ``mask_token`` and
  ``decoder_*``; the released encoder-only files are already timm keys.
- LocalMIM (Wang et al., CVPR 2023; huawei-noah/Efficient-Computing ``LocalMIM/ViT/models_mim.py``) and
  ViTFreeze (github.com/utkutpcgl/ViTFreeze): no final ``norm`` but one LayerNorm ``norm.K`` per stage; the last
  stage norm becomes ``norm`` (ViTFreeze's k-NN silently used an untrained LayerNorm instead);
  ``decoder.*`` and ``hog_enc.*`` are dropped.
- MoCo v3 (Chen et al., ICCV 2021; github.com/facebookresearch/moco-v3 ``convert_to_deit.py``): keep
  ``module.base_encoder.*`` except the projection head ``head.*``.
- DINOv2 (Oquab et al., 2023; github.com/facebookresearch/dinov2) and ViT-Adapter (Chen et al., ICLR 2023;
  github.com/czczup/ViT-Adapter ``detection/convert_14to16.py``): drop ``mask_token``; LayerScale (``ls1.gamma``,
  or ``gamma1`` in ViT-Adapter's 14->16 files) is folded into the preceding linear layer for a model without
  LayerScale (our classification ViT: exact) and kept for a model with it (the ViT-Adapter's DINOv2 models);
  register tokens (``register_tokens``, *_reg4 models) become timm's ``reg_token`` with the cls position folded
  into ``cls_token`` (timm's ``_convert_dinov2`` layout, ``no_embed_class``); SwiGLU (ViT-g) ``mlp.w12`` /
  ``mlp.w3`` become timm ``SwiGLUPacked``'s ``mlp.fc1`` / ``mlp.fc2``; the 14x14 patch kernel is resized to 16x16.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GluMlp
from torch import Tensor

from models.pos_embed import resample_pos_embed
from util.keys import describe_keys

__all__ = ["SOURCES", "TIMM_VIT_PREFIXES", "unwrap_checkpoint", "detect_source", "to_timm_vit",
           "backbone_state", "fold_layer_scale", "resize_patch_embed", "adapt_to_model", "moco_to_deit",
           "dinov2_14to16"]

logger = logging.getLogger(__name__)

SOURCES = ("vitfreeze", "mae", "localmim", "moco_v3", "dinov2", "timm")
# Top-level names of timm VisionTransformer parameters/buffers that a converted backbone may carry.
TIMM_VIT_PREFIXES = ("cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre", "blocks", "norm", "attn_pool",
                     "fc_norm", "head")

_WRAPPER_KEYS = ("model", "state_dict", "teacher")  # MAE/DeiT/ours, MoCo v3, DINO(v2) eval checkpoints
_STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DDP wrapper, torch.compile wrapper
_MOCO_PREFIX = "base_encoder."
_STAGE_NORM = re.compile(r"^norm\.(\d+)\.(weight|bias)$")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")  # DINOv2 block_chunks > 0: blocks.<chunk>.<i>.*
_SWIGLU = (".mlp.w12.", ".mlp.w3.", ".mlp.fc1_g.", ".mlp.fc1_x.")  # DINOv2 SwiGLUFFN(Fused), timm SwiGLU
_ADAPTER_GAMMA = re.compile(r"^(blocks\.\d+)\.gamma([12])$")  # ViT-Adapter's 14->16 files: blocks.N.gamma1


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The model state dict inside a checkpoint, with wrapper prefixes removed.

    Args:
        checkpoint: a loaded checkpoint: ``{'model': sd, ...}`` (MAE, LocalMIM, DeiT, ours), ``{'state_dict': sd}``
            (MoCo v3), ``{'teacher': sd}`` (DINO / DINOv2 eval checkpoints, whose ``backbone.*`` keys are kept
            and the projection heads dropped), or a plain state dict.

    Returns:
        A new dict with ``module.`` and ``_orig_mod.`` prefixes stripped (MoCo v3's ``module.base_encoder.x``
        becomes ``base_encoder.x``).

    Raises:
        ValueError: no state dict of tensors is found, or two keys collide after stripping.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    state = checkpoint
    wrapper = next((k for k in _WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
    if wrapper is not None:
        state = checkpoint[wrapper]
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not state or bad:
        raise ValueError("checkpoint holds no state dict of tensors under 'model', 'state_dict' or 'teacher' "
                         f"(top-level keys: {describe_keys(checkpoint.keys())}"
                         + (f"; non-tensor entries: {describe_keys(bad)})" if bad else ")"))
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = _strip_prefixes(key)
        if new in out:
            raise ValueError(f"checkpoint keys collide after stripping {_STRIPPED_PREFIXES}: {new!r}")
        out[new] = value
    if not any(k.startswith(("blocks.", _MOCO_PREFIX)) for k in out) and any(k.startswith("backbone.") for k in out):
        out = {k[len("backbone."):]: v for k, v in out.items() if k.startswith("backbone.")}
    return out


def detect_source(state_dict: Mapping[str, Tensor]) -> str:
    """Which kind of checkpoint a state dict comes from, judged from its keys.

    Rules, first match wins: ``(module.)base_encoder.*`` -> ``'moco_v3'``; ``decoder_embed`` / ``decoder_blocks``
    -> ``'mae'`` (pretraining checkpoint with decoder, official or ours); ``norm.0.weight``, ``decoder.*`` or
    ``hog_enc.*`` -> ``'localmim'`` (also ViTFreeze and ours); ``ls1.gamma``, ViT-Adapter's ``gamma1``,
    ``register_tokens`` or a top-level ``mask_token`` next to ``blocks`` -> ``'dinov2'``; ``blocks`` +
    ``patch_embed`` -> ``'timm'`` (also MAE's encoder-only release, DeiT, converted MoCo v3).

    Raises:
        ValueError: the keys match none of the supported layouts.
    """
    keys = [_strip_prefixes(k) for k in state_dict]
    has_blocks = any(k.startswith("blocks.") for k in keys)
    if any(k.startswith(_MOCO_PREFIX) for k in keys):
        return "moco_v3"
    if any(k.startswith(("decoder_embed.", "decoder_blocks.")) for k in keys):
        return "mae"
    if any(k == "norm.0.weight" or k.startswith(("decoder.", "hog_enc.")) for k in keys):
        return "localmim"
    if has_blocks and any(".ls1.gamma" in k or k in ("mask_token", "register_tokens") or _ADAPTER_GAMMA.match(k)
                          for k in keys):
        return "dinov2"
    if has_blocks and any(k.startswith("patch_embed.") for k in keys):
        return "timm"
    raise ValueError(f"unrecognised checkpoint layout; supported sources: {SOURCES}. Keys: {describe_keys(keys)}")


def _check_timm_keys(state_dict: Mapping[str, Tensor], source: str) -> None:
    unknown = [k for k in state_dict if k.split(".")[0] not in TIMM_VIT_PREFIXES]
    if unknown:
        raise ValueError(f"{source} checkpoint has keys with no timm VisionTransformer counterpart: "
                         f"{describe_keys(unknown)}; pass the right --source or convert them first")
    if not any(k.startswith("blocks.") for k in state_dict):
        raise ValueError(f"{source} checkpoint has no 'blocks.*' keys after conversion: {describe_keys(state_dict)}")


def _from_mae(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in sd.items() if not (k == "mask_token" or k.startswith("decoder_"))}


def _from_localmim(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    stages = sorted({int(m.group(1)) for k in sd if (m := _STAGE_NORM.match(k))})
    if not stages and "norm.weight" not in sd:
        raise ValueError("LocalMIM checkpoint has neither stage norms 'norm.K.*' nor a final 'norm.*'")
    out = {}
    for key, value in sd.items():
        if key.split(".")[0] in ("decoder", "hog_enc") or key == "mask_token":
            continue
        m = _STAGE_NORM.match(key)
        if m is None:
            out[key] = value
        elif int(m.group(1)) == stages[-1]:  # the last stage norm stands in for MAE's ``norm``
            out[f"norm.{m.group(2)}"] = value
    return out


def _from_moco(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    if not any(k.startswith(_MOCO_PREFIX) for k in sd):
        return sd  # already converted by convert_to_deit.py: {'model': base encoder without head}
    out = {}
    for key, value in sd.items():
        if key.startswith(_MOCO_PREFIX) and not key.startswith(_MOCO_PREFIX + "head"):
            out[key[len(_MOCO_PREFIX):]] = value
    return out


def fold_layer_scale(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Fold LayerScale ``blocks.N.ls{1,2}.gamma`` [D] into ``attn.proj`` / ``mlp.fc2`` of the same block.

    Exact: ``gamma * (W x + b) = (diag(gamma) W) x + gamma * b``, so the rows of the weight [D, D_in] and the
    bias [D] are scaled by gamma (computed in fp32, stored in the input dtype).

    Raises:
        ValueError: a gamma has no matching linear layer.
    """
    out = dict(state_dict)
    for key in [k for k in state_dict if re.search(r"\.ls[12]\.gamma$", k)]:
        gamma = out.pop(key).float()
        layer = key.replace(".ls1.gamma", ".attn.proj").replace(".ls2.gamma", ".mlp.fc2")
        if f"{layer}.weight" not in out:
            raise ValueError(f"LayerScale {key} has no {layer}.weight to fold into")
        weight = out[f"{layer}.weight"]
        out[f"{layer}.weight"] = (weight.float() * gamma[:, None]).to(weight.dtype)
        if f"{layer}.bias" in out:
            bias = out[f"{layer}.bias"]
            out[f"{layer}.bias"] = (bias.float() * gamma).to(bias.dtype)
    return out


def _from_dinov2(sd: dict[str, Tensor], *, keep_layer_scale: bool = False,
                 swiglu: bool = False) -> dict[str, Tensor]:
    swiglu_keys = [k for k in sd if any(s in f".{k}" for s in _SWIGLU)]
    if swiglu_keys and not (swiglu and all(".mlp.w12." in f".{k}" or ".mlp.w3." in f".{k}" for k in swiglu_keys)):
        raise ValueError("SwiGLU feed-forward (DINOv2 ViT-g/14) cannot be mapped to a GELU MLP: "
                         f"{describe_keys(swiglu_keys)}; load it into a model with a SwiGLU MLP (the ViT-Adapter's "
                         "adapter_dinov2_giant) or use DINOv2 ViT-S/B/L")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key == "mask_token":
            continue
        m = _CHUNKED_BLOCK.match(key)  # chunk modules hold global block indices: blocks.1.3.* is block 3
        key = f"blocks.{m.group(1)}.{m.group(2)}" if m else key
        m = _ADAPTER_GAMMA.match(key)  # ViT-Adapter's convert_14to16 renamed ls1.gamma -> gamma1
        key = f"{m.group(1)}.ls{m.group(2)}.gamma" if m else key
        out[key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = value
    if "register_tokens" in out:
        # DINOv2 adds pos_embed to [cls, patches], then inserts the registers after cls without a position; timm's
        # no_embed_class layout ([cls, reg, patches + pos]) is the same computation with cls' position folded in.
        pos = out.pop("pos_embed")
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out if keep_layer_scale else fold_layer_scale(out)


def to_timm_vit(checkpoint: Mapping[str, Any], *, source: str = "auto", keep_layer_scale: bool = False,
                swiglu: bool = False) -> tuple[dict[str, Tensor], str]:
    """Convert a supported checkpoint into a timm ``VisionTransformer`` state dict.

    Args:
        checkpoint: a loaded checkpoint or state dict (see :func:`unwrap_checkpoint`).
        source: one of ``SOURCES`` or ``'auto'`` (:func:`detect_source`). ``'vitfreeze'`` means a pretraining
            checkpoint of ours or of ViTFreeze: LocalMIM rules when it has stage norms ``norm.K``, else MAE's.
        keep_layer_scale: keep DINOv2's LayerScale as ``blocks.N.ls{1,2}.gamma`` (a model built with timm's
            ``init_values``) instead of folding it into ``attn.proj`` / ``mlp.fc2``.
        swiglu: map DINOv2's SwiGLU ``mlp.w12`` / ``mlp.w3`` to timm ``SwiGLUPacked`` keys instead of refusing.

    Returns:
        ``(state_dict, source)``: backbone weights under timm keys (``head.*`` / ``fc_norm.*`` kept when the
        checkpoint has them, e.g. timm or DeiT files) and the source used. ``pos_embed`` and the patch kernel keep
        their checkpoint shapes; :func:`adapt_to_model` fits them to a model.

    Raises:
        ValueError: unknown source, unrecognised layout, SwiGLU (DINOv2 ViT-g) without ``swiglu``, or keys left
            with no timm counterpart.
    """
    if source != "auto" and source not in SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r}; choose 'auto' or one of {SOURCES}")
    sd = unwrap_checkpoint(checkpoint)
    if source == "auto":
        source = detect_source(sd)
    kind = source
    if source == "vitfreeze":
        kind = "localmim" if any(_STAGE_NORM.match(k) for k in sd) else "mae"
    convert = {"mae": _from_mae, "localmim": _from_localmim, "moco_v3": _from_moco, "timm": dict,
               "dinov2": partial(_from_dinov2, keep_layer_scale=keep_layer_scale, swiglu=swiglu)}[kind]
    out = convert(sd)
    _check_timm_keys(out, source)
    return out, source


def resize_patch_embed(weight: Tensor, new_patch: int) -> Tensor:
    """Resize a patch-embedding kernel by bilinear interpolation (ViT-Adapter's
    ``detection/convert_14to16.py``).

    No rescaling: a 16x16 kernel sums over 256 pixels instead of 196, so responses to smooth inputs grow by about
    (16/14)^2, which ViT-Adapter accepts (fine-tuning adapts).

    Args:
        weight: [D, C, p, p].
        new_patch: p'.

    Returns:
        [D, C, p', p'] in the input dtype (interpolated in fp32, align_corners False); the input when p' == p.
    """
    if weight.ndim != 4 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"patch kernel must be [D, C, p, p], got {tuple(weight.shape)}")
    if weight.shape[-1] == new_patch:
        return weight
    resized = F.interpolate(weight.float(), size=(new_patch, new_patch), mode="bilinear", align_corners=False)
    return resized.to(weight.dtype)


def adapt_to_model(state_dict: Mapping[str, Tensor], *, patch_size: int, grid_size: int,
                   num_prefix_tokens: int = 1) -> dict[str, Tensor]:
    """Fit the patch kernel and position embedding of a timm-keyed state dict to a model's patch and grid size.

    Args:
        state_dict: timm keys (from :func:`to_timm_vit`).
        patch_size: the model's p; ``patch_embed.proj.weight`` [D, C, q, q] is resized bilinearly if q != p.
        grid_size: the model's patches per side; ``pos_embed`` [1, T + G*G, D] is resampled bicubically to it
            (MAE's ``util/pos_embed.py interpolate_pos_embed``), e.g. DINOv2's 37x37 grid -> 14x14 for 224/16.
        num_prefix_tokens: T, rows of ``pos_embed`` that are not on the grid (1 for a cls token).

    Returns:
        A new dict; other entries are shared with the input.
    """
    out = dict(state_dict)
    if "patch_embed.proj.weight" in out:
        kernel = out["patch_embed.proj.weight"]
        if kernel.ndim != 4 or not kernel.numel():
            raise ValueError(f"checkpoint key 'patch_embed.proj.weight' has shape {tuple(kernel.shape)}: a patch kernel "
                             f"is [D, C, p, p] with no empty dimension (a damaged or foreign checkpoint)")
        out["patch_embed.proj.weight"] = resize_patch_embed(kernel, patch_size)
    if "pos_embed" in out:
        pos = out["pos_embed"]
        if pos.ndim == 2:  # some checkpoints store [T + G*G, D]
            pos = pos.unsqueeze(0)
        if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] <= num_prefix_tokens or not pos.shape[2]:
            raise ValueError(f"checkpoint key 'pos_embed' has shape {tuple(out['pos_embed'].shape)}: a position "
                             f"embedding is [1, tokens, D] or [tokens, D] (a damaged or foreign checkpoint)")
        out["pos_embed"] = resample_pos_embed(pos, grid_size, num_prefix_tokens).to(pos.dtype)
    return out


def backbone_state(checkpoint: Mapping[str, Any], model: nn.Module, *,
                   source: str = "auto") -> tuple[dict[str, Tensor], str]:
    """A checkpoint of any supported layout as a state dict for ``model`` (a timm ``VisionTransformer``):
    timm keys (:func:`to_timm_vit`), no classifier head (fine-tuning starts a fresh one, features have none),
    patch kernel and position grid fitted to the model (:func:`adapt_to_model`). LayerScale is kept when the model
    has it and folded otherwise; SwiGLU is mapped when the model's MLP is timm's ``GluMlp``. Returns
    (state dict, source).

    Raises:
        ValueError: the checkpoint has register tokens the model lacks (or a different number), or SwiGLU for a
            GELU model. Block parameters the model does not have are refused at load
            (``models.backbone.load_pretrained``, the one loading policy).
    """
    own = model.state_dict()
    keep = any(re.search(r"\.ls[12]\.gamma$", k) for k in own)
    swiglu = isinstance(getattr(model.blocks[0], "mlp", None), GluMlp)
    state, source = to_timm_vit(checkpoint, source=source, keep_layer_scale=keep, swiglu=swiglu)
    if source == "dinov2":
        logger.info("DINOv2 checkpoint: LayerScale %s", "kept as parameters (the model has LayerScale)" if keep
                    else "folded into attn.proj / mlp.fc2 (exact; the model has no LayerScale)")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    regs = state["reg_token"].shape[1] if "reg_token" in state else 0
    model_regs = getattr(model, "num_reg_tokens", 0)
    if regs != model_regs:
        raise ValueError(f"the checkpoint has {regs} register tokens and the model {model_regs}: build the model with "
                         f"reg_tokens={regs} (e.g. the ViT-Adapter's adapter_dinov2_*_reg4); dropping or inventing "
                         "register tokens changes the features")
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    return adapt_to_model(state, patch_size=model.patch_embed.patch_size[0], grid_size=model.patch_embed.grid_size[0],
                          num_prefix_tokens=prefix), source


def moco_to_deit(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Tensor]]:
    """MoCo v3's ``convert_to_deit.py``: base encoder without its projection head, as ``{'model': sd}``.

    Args:
        checkpoint: MoCo v3 checkpoint ``{'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*',
            'module.predictor.*'}, ...}`` (a bare state dict with the same keys is accepted too).

    Returns:
        ``{'model': sd}`` with the ``module.base_encoder.`` prefix removed and ``head.*`` dropped.

    Raises:
        ValueError: no ``module.base_encoder.*`` key is present.
    """
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a MoCo v3 checkpoint dict, got {type(checkpoint).__name__}")
    prefix = "module.base_encoder."
    model = {k[len(prefix):]: v for k, v in state.items()
             if k.startswith(prefix) and not k.startswith(prefix + "head")}
    if not model:
        raise ValueError(f"no 'module.base_encoder.*' keys: not a MoCo v3 pretraining checkpoint "
                         f"(keys: {describe_keys(state.keys())})")
    return {"model": model}


def dinov2_14to16(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """ViT-Adapter's ``detection/convert_14to16.py``, for ViT-Adapter's backbone (not our ViT).

    Resizes ``patch_embed.proj.weight`` [D, 3, 14, 14] -> [D, 3, 16, 16] (bilinear, align_corners False, no
    rescale), drops every key containing ``mask_token``, renames ``ls1.gamma`` -> ``gamma1`` and ``ls2.gamma`` ->
    ``gamma2``; ``pos_embed`` and everything else are untouched. :func:`to_timm_vit` / :func:`backbone_state`
    read the result (``gamma1`` / ``gamma2`` are DINOv2's LayerScale: folded or kept, never ignored).

    Raises:
        ValueError: no ``patch_embed.proj.weight``.
    """
    if "patch_embed.proj.weight" not in state_dict:
        raise ValueError("not a DINOv2 state dict: no 'patch_embed.proj.weight' "
                         f"(keys: {describe_keys(state_dict.keys())})")
    out = {}
    for key, value in state_dict.items():
        if "mask_token" in key:
            continue
        if key == "patch_embed.proj.weight":
            value = resize_patch_embed(value, 16)
        out[key.replace("ls1.gamma", "gamma1").replace("ls2.gamma", "gamma2")] = value
    return out

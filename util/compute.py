"""The compute path on a GPU: ``torch.compile`` of the model, fused AdamW, and the attention check.

TF32 is switched on by ``util.runtime.set_backend_flags`` and bf16 autocast is the CUDA default
(``util.runtime.resolve_amp``); this file holds the rest of the GPU compute path.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

logger = logging.getLogger("vitfreeze")

__all__ = ["compile_model", "adamw_kwargs", "non_sdpa_attention"]


def compile_model(model: nn.Module, *, num_units: int, backend: str = "inductor") -> nn.Module:
    """Compile ``model``'s forward in place (``nn.Module.compile``: state-dict keys keep their names, so
    checkpoints and the ``Freezer`` see the same module).

    FreezeOut changes the graph at each freeze event (``num_frozen`` is a Python int, frozen units switch to eval
    mode and stop requiring grad), so dynamo recompiles once per event: at most ``num_units`` + 1 graphs. The
    recompile limit is raised to fit them; the default (8) would silently fall back to eager after 8 events.
    """
    import torch._dynamo.config as dynamo_config  # the documented knob for the recompile limit

    limit = num_units + 2
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6; older name kept as an alias
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))
            break
    model.compile(backend=backend)
    logger.info("torch.compile (backend %s); up to %d recompiles, one per FreezeOut event", backend, limit)
    return model


def adamw_kwargs(device: torch.device) -> dict[str, bool]:
    """``fused=True`` on CUDA (one kernel for all parameters; the same update up to rounding), else nothing."""
    return {"fused": True} if device.type == "cuda" else {}


def non_sdpa_attention(model: nn.Module) -> list[str]:
    """Names of attention modules that would not use ``F.scaled_dot_product_attention``: timm ``Attention``
    with ``fused_attn`` off (``TIMM_FUSED_ATTN=0``, or an old torch), and any other module with an attention-like
    name holding a ``qkv`` projection but no ``fused_attn`` flag. Empty means every attention takes SDPA."""
    bad = []
    for name, module in model.named_modules():
        if hasattr(module, "fused_attn"):
            if not module.fused_attn:
                bad.append(name)
        elif hasattr(module, "qkv") and "attn" in name.rsplit(".", 1)[-1].lower():
            bad.append(name)
    return bad

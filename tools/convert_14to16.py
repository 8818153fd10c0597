"""Resize a DINOv2 patch-14 checkpoint to patch 16 in ViT-Adapter's format: writes ``<name>_14to16.pth`` beside it.

Same command as ViT-Adapter's ``detection/convert_14to16.py`` (Chen et al., "Vision Transformer Adapter for Dense
Predictions", ICLR 2023; github.com/czczup/ViT-Adapter ``detection/convert_14to16.py``)::

    python tools/convert_14to16.py dinov2_vitl14_pretrain.pth   # -> dinov2_vitl14_pretrain_14to16.pth

The result keeps LayerScale as ``gamma1`` / ``gamma2`` as ViT-Adapter's file does. Both our loaders read it: the
ViT-Adapter's DINOv2 models (``models/adapter.py``, ``load_backbone``) keep LayerScale as parameters, and
classification fine-tuning (``--finetune``, a ViT without LayerScale) folds it exactly into ``attn.proj`` /
``mlp.fc2``; register tokens (*_reg4) and SwiGLU (ViT-g) pass through unchanged and are handled at load time. Differences from ViT-Adapter's script: a wrapped checkpoint
(``model`` / ``teacher`` / ``module.`` prefixes) is unwrapped first, the output name is derived from the file stem
(the original's ``str.replace('.pth', ...)`` overwrites its input when the name has no ``.pth``), the write is
atomic, a kernel that is not 14x14 is refused, and errors are one line with exit status 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.convert import dinov2_14to16, unwrap_checkpoint  # noqa: E402
from util.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402


def output_path(path: str | Path) -> Path:
    """``dir/name.pth`` -> ``dir/name_14to16.pth`` (any suffix is replaced by ``_14to16.pth``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}_14to16.pth")


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the exit status (0 ok, 1 user error)."""
    parser = argparse.ArgumentParser(description="Resize a DINOv2 patch-14 checkpoint to patch 16 (ViT-Adapter)")
    parser.add_argument("filename", help="DINOv2 state dict (.pth)")
    args = parser.parse_args(argv)
    try:
        state = unwrap_checkpoint(load_checkpoint(args.filename))
        kernel = state.get("patch_embed.proj.weight")
        if kernel is not None and tuple(kernel.shape[-2:]) != (14, 14):
            raise ValueError(f"{args.filename} has a {kernel.shape[-2]}x{kernel.shape[-1]} patch kernel, not 14x14: "
                             "this tool resizes DINOv2 patch-14 checkpoints only (is it converted already?)")
        converted = dinov2_14to16(state)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = save_checkpoint(output_path(args.filename), converted)
    print(f"wrote {out}: patch kernel {tuple(converted['patch_embed.proj.weight'].shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export any supported checkpoint (ours, MAE, LocalMIM, ViTFreeze, MoCo v3, DINOv2, timm) as a timm ViT state dict.

Keys are those of ``timm.models.vision_transformer.VisionTransformer`` (``models/convert.py`` ``to_timm_vit``:
decoders dropped, LocalMIM's last stage norm as ``norm``, LayerScale folded). ``.safetensors`` outputs are written
with ``safetensors.torch.save_file`` (timm's own format; safetensors is a timm dependency), ``.pth`` / ``.pt``
outputs as ``{'model': state_dict}``; both atomically and with the umask's permissions. The image size of the
position table (``img_size``, which ``timm.create_model`` needs when it is not 224) goes into the safetensors
metadata and the log. Example::

    python tools/export_timm.py --input output/checkpoint-last.pth --output vit_b16_localmim.safetensors
    model = timm.create_model('vit_base_patch16_224', num_classes=0)
    timm.models.load_checkpoint(model, 'vit_b16_localmim.safetensors')

Position embedding and patch kernel keep their checkpoint shapes (adapt them to a model with
``models.convert.adapt_to_model`` or timm's ``dynamic_img_size``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.convert import SOURCES, to_timm_vit  # noqa: E402
from models.registry import image_size_of  # noqa: E402
from util.checkpoint import atomic_write, load_checkpoint, save_checkpoint  # noqa: E402


def save_safetensors(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``state_dict`` to ``path`` in safetensors format atomically (temp file in the same folder, rename).

    Raises:
        ImportError: the ``safetensors`` package is not installed.
    """
    try:
        from safetensors.torch import save_file
    except ImportError as err:
        raise ImportError("writing .safetensors needs the 'safetensors' package (pip install safetensors), "
                          "or choose a .pth output") from err
    # safetensors refuses tensors that share storage or are views: store independent contiguous copies.
    tensors = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def main(argv: list[str] | None = None) -> int:
    """Run the export; returns the exit status (0 ok, 1 user error)."""
    parser = argparse.ArgumentParser(description="Export a checkpoint as a timm VisionTransformer state dict")
    parser.add_argument("--input", required=True, metavar="PATH", help="checkpoint to convert")
    parser.add_argument("--output", required=True, metavar="PATH", help="output .safetensors (or .pth / .pt)")
    parser.add_argument("--source", default="auto", choices=("auto",) + SOURCES,
                        help="checkpoint kind (default: detected from the keys)")
    parser.add_argument("--no_head", action="store_true", help="drop head.* and fc_norm.* if present")
    args = parser.parse_args(argv)
    suffix = Path(args.output).suffix
    if suffix not in (".safetensors", ".pth", ".pt"):
        print(f"error: output {args.output} must end in .safetensors, .pth or .pt", file=sys.stderr)
        return 1
    try:
        state_dict, source = to_timm_vit(load_checkpoint(args.input), source=args.source)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.no_head:
        state_dict = {k: v for k, v in state_dict.items() if k.split(".")[0] not in ("head", "fc_norm")}
    img_size = image_size_of(state_dict)  # timm builds 224-px position tables unless told img_size
    if suffix == ".safetensors":
        out = save_safetensors(args.output, state_dict, {"format": "pt", "source": source,
                                                          **({"img_size": str(img_size)} if img_size else {})})
    else:
        out = save_checkpoint(args.output, {"model": state_dict})
    print(f"wrote {out}: {len(state_dict)} tensors in timm VisionTransformer keys (source: {source})")
    if img_size and img_size != 224:
        print(f"position table for img_size {img_size}: load it into timm.create_model(..., img_size={img_size})"
              + (" (img_size is in the file's metadata)" if suffix == ".safetensors" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

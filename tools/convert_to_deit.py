"""Convert a MoCo v3 pretraining checkpoint to DeiT / timm keys: ``{'model': base encoder without head}``.

Same command as MoCo v3's ``convert_to_deit.py`` (Chen et al., "An Empirical Study of Training Self-Supervised
Vision Transformers", ICCV 2021; github.com/facebookresearch/moco-v3 ``convert_to_deit.py``)::

    python tools/convert_to_deit.py --input checkpoint_0299.pth.tar --output vit-b-300ep.pth

The output loads with ``--finetune`` (``head.*`` / ``fc_norm.*`` missing as expected). Differences from MoCo's
script: the input is read with ``weights_only=True``, the output is written atomically, and a missing input or a
non-MoCo checkpoint gives a one-line error and exit status 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.convert import moco_to_deit  # noqa: E402
from util.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the exit status (0 ok, 1 user error)."""
    parser = argparse.ArgumentParser(description="Convert MoCo v3 pre-trained model to DeiT")
    parser.add_argument("--input", required=True, metavar="PATH", help="MoCo v3 pretraining checkpoint")
    parser.add_argument("--output", required=True, metavar="PATH", help="output checkpoint in DeiT format")
    args = parser.parse_args(argv)
    try:
        converted = moco_to_deit(load_checkpoint(args.input))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    save_checkpoint(args.output, converted)
    print(f"wrote {args.output}: {len(converted['model'])} tensors of the base encoder (head dropped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command-line arguments shared by the entry scripts, and YAML recipes layered under them.

Flag names follow the official MAE (github.com/facebookresearch/mae ``main_pretrain.py``) and LocalMIM
(``run_pretrain.py``) scripts so that their commands paste unchanged. A recipe (``--config FILE.yaml``) is a
delta over the parser defaults: its keys are flag names, unknown keys are an error, and the command line
always wins over the file (timm's two-stage parse, plus the unknown-key check timm lacks).
"""
from __future__ import annotations

import argparse
import difflib
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml


# ----------------------------------------------------------------------------------------------------------- types
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def open_fraction(text: str) -> float:
    """A float strictly between 0 and 1 (e.g. a mask ratio)."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value


# ---------------------------------------------------------------------------------------------------------- groups
def add_config_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("recipe")
    group.add_argument("--config", default=None, help="YAML recipe whose keys are flag names (CLI overrides it)")
    group.add_argument("--dry_run", action="store_true", help="print the resolved configuration and exit")


def add_model_args(parser: argparse.ArgumentParser, *, default_model: str) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model, type=str, help="registered model name")
    group.add_argument("--input_size", default=224, type=positive_int, help="image size in pixels")


def add_mim_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("masked image modeling")
    group.add_argument("--mask_ratio", default=0.75, type=open_fraction, help="fraction of patches removed")
    group.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalized pixel targets (MAE)")
    group.add_argument("--hog_nbins", default=9, type=positive_int, help="HOG orientation bins per channel")
    group.add_argument("--target", default=None, choices=["hog", "pixel"],
                       help="LocalMIM target (default: hog for MIM_* models, pixel for mae_*)")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default="demo", type=str,
                       help="ImageFolder root (uses <root>/train if present), a flat image folder, or 'demo'")
    group.add_argument("--num_workers", default=4, type=non_negative_int)
    group.add_argument("--pin_mem", action="store_true", default=True)
    group.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    group.add_argument("--strict_data", action="store_true", help="a corrupt image is fatal instead of skipped")
    group.add_argument("--debug", action="store_true", help="small data subset for a quick end-to-end check")


def add_optim_args(parser: argparse.ArgumentParser, *, blr: float, weight_decay: float, epochs: int,
                   warmup_epochs: int, batch_size: int, min_lr: float = 0.0) -> None:
    group = parser.add_argument_group("optimization")
    group.add_argument("--batch_size", default=batch_size, type=positive_int, help="per-process batch size")
    group.add_argument("--epochs", default=epochs, type=positive_int)
    group.add_argument("--warmup_epochs", default=warmup_epochs, type=non_negative_int)
    group.add_argument("--accum_iter", default=1, type=positive_int, help="micro-batches per optimizer step")
    group.add_argument("--blr", default=blr, type=positive_float, help="lr = blr * effective batch / 256")
    group.add_argument("--lr", default=None, type=positive_float, help="absolute lr (overrides --blr)")
    group.add_argument("--min_lr", default=min_lr, type=non_negative_float, help="floor of the cosine schedule")
    group.add_argument("--weight_decay", default=weight_decay, type=non_negative_float)
    group.add_argument("--clip_grad", default=None, type=positive_float, help="clip the gradient 2-norm")
    group.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                       help="mixed precision; auto = bf16 (or fp16) on CUDA, none (fp32) on CPU")
    group.add_argument("--max_skipped_steps", default=10, type=non_negative_int,
                       help="optimizer steps with a non-finite loss skipped before the run stops")


def add_dist_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed")
    group.add_argument("--world_size", default=1, type=positive_int, help="number of processes (set by torchrun)")
    group.add_argument("--local_rank", "--local-rank", default=-1, type=int, help="set by torch.distributed.launch")
    group.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def add_output_args(parser: argparse.ArgumentParser, *, save_every: int) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--output_dir", default="./output_dir", help="checkpoints, log.txt, pictures")
    group.add_argument("--log_dir", default=None, help="TensorBoard folder (default: <output_dir>/tensorboard)")
    group.add_argument("--resume", default="", help="checkpoint to resume from")
    group.add_argument("--auto_resume", action="store_true", help="resume from the latest checkpoint in output_dir")
    group.add_argument("--start_epoch", default=0, type=non_negative_int, help="first epoch (resume overrides)")
    group.add_argument("--save_every", default=save_every, type=positive_int, help="keep checkpoint-<epoch>.pth")
    group.add_argument("--vis_every", default=0, type=non_negative_int, help="picture every N epochs (0: off)")
    group.add_argument("--print_freq", default=20, type=positive_int, help="log every N optimizer steps")
    group.add_argument("--seed", default=0, type=int)


# ----------------------------------------------------------------------------------------------------------- parse
def _nearest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _convert(action: argparse.Action, key: str, value: Any) -> Any:
    """Run a YAML value through the same validation the command line gets."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if value is None:
        return None
    convert: Callable[[str], Any] = action.type or str
    items = value if isinstance(value, list) else [value]
    if action.nargs in (None, "?") and isinstance(value, list):
        raise ValueError(f"config key '{key}' takes one value, got a list")
    try:
        converted = [convert(str(item)) for item in items]
    except (argparse.ArgumentTypeError, ValueError) as err:
        raise ValueError(f"config key '{key}': {err}") from None
    if action.choices is not None:
        for item in converted:
            if item not in action.choices:
                raise ValueError(f"config key '{key}': {item!r} is not one of {list(action.choices)}")
    return converted if isinstance(value, list) else converted[0]


def load_config(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML recipe and validate it against ``parser``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a key is not a flag of this script (the message names the nearest valid ones) or a
            value fails the flag's validation.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as handle:
        raw = yaml.safe_load(handle) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {path} must be a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    # the dest of store_false flags (pin_mem <- --no_pin_mem) and the flag itself are both fine as keys
    resolved: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in actions:
            raise ValueError(f"unknown key '{key}' in {path}{_nearest(key, sorted(actions))}")
        resolved[key] = _convert(actions[key], key, value)
    return resolved


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Two-stage parse: ``--config`` sets defaults, the command line overrides them.

    Errors in the recipe are reported like command-line errors (usage + message, exit status 2).
    """
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        try:
            parser.set_defaults(**load_config(pre.config, parser))
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
    return parser.parse_args(argv)


def dump_args(args: argparse.Namespace) -> str:
    """Resolved arguments as YAML (the form a recipe takes), for the run record and ``--dry_run``."""
    return yaml.safe_dump(vars(args), sort_keys=True)

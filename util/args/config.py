"""YAML recipes and foreign spellings: a recipe's keys are validated against the script's parser, and DeiT's
command-line flags (MoCo v3's transfer commands run DeiT's ``main.py``) are mapped to ours or refused in one line.

A recipe (``--config FILE.yaml``) is a delta over the parser defaults: its keys are flag names, unknown keys are an
error, and every value goes through the same validation as on the command line (timm's two-stage parse, plus the
unknown-key check timm lacks).
"""
from __future__ import annotations

import argparse
import difflib
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from util.distributed import env_rank_and_world


def first_process() -> bool:
    """Rank 0 of a torchrun job, or a plain single process: parse-time notes are said once, not once per rank."""
    return (env_rank_and_world() or (0, 1))[0] == 0


def warn_once(message: str, *values: Any) -> None:
    """A parse-time warning, logged by the first process only."""
    if first_process():
        logging.getLogger("vitfreeze").warning(message, *values)


# ---------------------------------------------------------------------------------------------------------- recipes
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
        ValueError: the file is not valid YAML, a key is not a flag of this script (the message names the nearest
            valid ones) or a value fails the flag's validation.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path) as handle:
            raw = yaml.safe_load(handle) or {}
    except yaml.YAMLError as err:  # one line with the place instead of a traceback
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"config {path} is not valid YAML ({where}{problem}); fix it: one `flag_name: value` "
                         "per line") from None
    except UnicodeDecodeError:
        raise ValueError(f"config {path} is not a text file; pass a YAML recipe (e.g. configs/pretrain/demo.yaml)") \
            from None
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


def dump_args(args: argparse.Namespace) -> str:
    """Resolved arguments as YAML (the form a recipe takes), for the run record and ``--dry_run``."""
    return yaml.safe_dump(vars(args), sort_keys=True)


# ---------------------------------------------------------------------------------------------------- DeiT commands
# DeiT's flags (MoCo v3's transfer commands run DeiT's main.py) that have no counterpart here: one line says what to
# use instead. Hyphenated spellings of our own flags (--batch-size, --data-set, --drop-path, ...) need no entry.
FOREIGN_FLAGS = {
    "--model_ema": "no EMA of the weights here; drop the flag",
    "--model_ema_decay": "no EMA of the weights here; drop the flag",
    "--model_ema_force_cpu": "no EMA of the weights here; drop the flag",
    "--repeated_aug": "repeated augmentation is not implemented; drop the flag (--no-repeated-aug is the behaviour)",
    "--opt": "the optimizer is fixed (AdamW for fine-tuning, LARS for the linear probe); drop the flag",
    "--opt_eps": "the optimizer is fixed (AdamW, eps 1e-8); drop the flag",
    "--opt_betas": "the optimizer is fixed (AdamW betas 0.9, 0.999 for fine-tuning); drop the flag",
    "--momentum": "the optimizer is fixed (AdamW); drop the flag",
    "--sched": "the schedule is fixed: linear warmup (--warmup_epochs) then cosine to --min_lr",
    "--lr_noise": "the schedule is fixed: linear warmup then cosine; drop the flag",
    "--warmup_lr": "warmup starts at 0 (MAE's rule); drop the flag",
    "--decay_epochs": "the schedule is cosine over --epochs; drop the flag",
    "--cooldown_epochs": "the schedule is cosine over --epochs; drop the flag",
    "--patience_epochs": "the schedule is cosine over --epochs; drop the flag",
    "--decay_rate": "the schedule is cosine over --epochs; drop the flag",
    "--train_interpolation": "training crops use bicubic interpolation (timm's default); drop the flag",
    "--resplit": "RandomErasing splitting is not supported; drop the flag",
    "--drop": "no dropout besides --drop_path; drop the flag",
    "--teacher_model": "no distillation here; drop the flag",
    "--teacher_path": "no distillation here; drop the flag",
    "--distillation_type": "no distillation here; drop the flag",
    "--distillation_alpha": "no distillation here; drop the flag",
    "--distillation_tau": "no distillation here; drop the flag",
    "--inat_category": "iNaturalist uses the species labels; choose --data_set inat18 or inat19",
}
# DeiT flags whose behaviour is already ours, accepted and dropped: (values the flag takes, what is said, if anything)
IGNORED_FLAGS = {"--no_repeated_aug": (0, ""), "--no_model_ema": (0, ""),
                 "--eval_freq": (1, "evaluation runs after every epoch here (MoCo's --eval-freq only saved time)")}


# Spellings only DeiT's main.py uses: a command with one of them is a DeiT command (MoCo v3's transfer commands).
DEIT_SPELLINGS = {"--batch-size", "--weight-decay", "--warmup-epochs", "--data-set", "--data-path", "--drop-path",
                  "--eval-freq", "--no-repeated-aug", "--min-lr", "--input-size", "--clip-grad", "--no-pin-mem"}


def flag_of(token: str) -> str | None:
    """``--name`` of a long option token (``--name=value`` too), else None."""
    return token.split("=", 1)[0] if token.startswith("--") and len(token) > 2 else None


def deit_lr(argv: list[str]) -> list[str]:
    """DeiT scales ``--lr`` by the total batch / 512; here ``--lr`` is the actual lr and ``--blr`` is scaled by
    batch / 256, so DeiT's ``--lr X`` is ``--blr X/2`` (MoCo v3: 3e-4 x 1024 / 512 = 6e-4 = 1.5e-4 x 1024 / 256)."""
    out, i = [], 0
    while i < len(argv):
        flag = flag_of(argv[i])
        if flag == "--lr":
            inline = "=" in argv[i]
            text = argv[i].split("=", 1)[1] if inline else (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                blr = f"{float(text) / 2:g}"
            except ValueError:  # let the parser report the bad value
                out.append(argv[i])
                i += 1
                continue
            warn_once("DeiT-style command: DeiT's --lr %s (scaled by total batch / 512) is --blr %s here", text, blr)
            out += ["--blr", blr]
            i += 1 if inline else 2
            continue
        out.append(argv[i])
        i += 1
    return out

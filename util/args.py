"""Command-line arguments shared by the entry scripts, and YAML recipes layered under them.

Flag names follow the official MAE (github.com/facebookresearch/mae ``main_pretrain.py``) and LocalMIM
(``run_pretrain.py``) scripts so that their commands paste unchanged. A recipe (``--config FILE.yaml``) is a
delta over the parser defaults: its keys are flag names, unknown keys are an error, and the command line
always wins over the file (timm's two-stage parse, plus the unknown-key check timm lacks).
"""
from __future__ import annotations

import argparse
import difflib
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from util.distributed import env_rank_and_world
from util.runtime import (available_cores,  # loader workers beyond the cores only compete
                          command_line_error, quiet_on_other_ranks)


def _first_process() -> bool:
    """Rank 0 of a torchrun job, or a plain single process: parse-time notes are said once, not once per rank."""
    return (env_rank_and_world() or (0, 1))[0] == 0


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


def closed_fraction(text: str) -> float:
    """A float in [0, 1] (e.g. a probability)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def open_fraction(text: str) -> float:
    """A float strictly between 0 and 1 (e.g. a mask ratio)."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value


def half_open_fraction(text: str) -> float:
    """A float in (0, 1] (e.g. FreezeOut's t_0, where 1 means no early freezing)."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
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
    group.add_argument("--hog_compat", action="store_true",
                       help="LocalMIM's fp32 Sobel sums: its HOG targets bit for bit (default: exact fp64 sums; "
                            "flat cells 0 instead of a spurious unit vector, see README)")
    group.add_argument("--target", default=None, choices=["hog", "pixel"],
                       help="LocalMIM target (default: hog for MIM_* models, pixel for mae_*)")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default=None, type=str,
                       help="ImageFolder root (uses <root>/train if present), a flat image folder, or 'demo' "
                            "(synthetic shapes); required")
    group.add_argument("--num_workers", default=min(4, available_cores()), type=non_negative_int,
                       help="data loader processes (default: 4, at most the cores)")
    group.add_argument("--pin_mem", action="store_true", default=True)
    group.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    group.add_argument("--strict_data", action="store_true", help="a corrupt image is fatal instead of skipped")
    group.add_argument("--debug", action="store_true", help="small data subset for a quick end-to-end check")


def add_decode_args(parser: argparse.ArgumentParser, *, what: str) -> None:
    """``--decode``: where images are decoded and cropped (``util.data.decode``)."""
    parser.add_argument_group("input pipeline").add_argument(
        "--decode", default="cpu", choices=["pil", "cpu", "device"],
        help=f"{what}: 'pil' = PIL decode + torchvision transforms to float32 in the workers (the old path); "
             "'cpu' = workers decode only what the crop needs (JPEG DCT scaling) and send uint8, normalized on "
             "the device; 'device' = workers send file bytes, the batch is decoded, cropped and normalized on the "
             "device (nvJPEG on CUDA). Same crop box and flip on every path")


def add_compute_args(parser: argparse.ArgumentParser) -> None:
    """``--compile``: torch.compile of the model (recompiles once per FreezeOut event)."""
    group = parser.add_argument_group("compute")
    group.add_argument("--compile", action="store_true", help="torch.compile the model (in place; keys unchanged)")
    group.add_argument("--compile_backend", default="inductor",
                       help="torch.compile backend (inductor; aot_eager traces without generating code)")


def add_optim_args(parser: argparse.ArgumentParser, *, blr: float, weight_decay: float, epochs: int,
                   warmup_epochs: int, batch_size: int, min_lr: float = 0.0) -> None:
    group = parser.add_argument_group("optimization")
    group.add_argument("--batch_size", default=batch_size, type=positive_int, help="per-process batch size")
    group.add_argument("--epochs", default=epochs, type=positive_int)
    group.add_argument("--warmup_epochs", default=warmup_epochs, type=non_negative_int)
    group.add_argument("--accum_iter", default=None, type=positive_int,
                       help="micro-batches per optimizer step (default: 1, or derived from --eff_batch_size)")
    group.add_argument("--eff_batch_size", default=None, type=positive_int,
                       help="effective batch (batch_size x accum_iter x world size) to keep whatever the number "
                            "of GPUs: accum_iter is derived from it")
    group.add_argument("--blr", default=blr, type=positive_float, help="lr = blr * effective batch / 256")
    group.add_argument("--lr", default=None, type=positive_float, help="absolute lr (overrides --blr)")
    group.add_argument("--min_lr", default=min_lr, type=non_negative_float, help="floor of the cosine schedule")
    group.add_argument("--weight_decay", default=weight_decay, type=non_negative_float)
    group.add_argument("--clip_grad", default=None, type=positive_float, help="clip the gradient 2-norm")
    group.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                       help="mixed precision; auto = bf16 (or fp16) on CUDA, none (fp32) on CPU")
    group.add_argument("--max_skipped_steps", default=10, type=non_negative_int,
                       help="optimizer steps with a non-finite loss skipped before the run stops")


def add_freezeout_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("FreezeOut (progressive layer freezing)")
    group.add_argument("--freezeout", action="store_true", help="freeze leading units on per-unit cosine schedules")
    group.add_argument("--how_scale", default="cubic", choices=["linear", "squared", "cubic"],
                       help="t_i = scale(t_0 + (1 - t_0) i / N)")
    group.add_argument("--t_0", default=0.8, type=half_open_fraction,
                       help="freeze fraction of unit 0 before scaling (cubic 0.8; linear users pass 0.5)")
    group.add_argument("--not_scale_lr", action="store_true", help="peak lr of every unit is lr, not lr / t_i")
    group.add_argument("--non_layerwise_lr", action="store_true",
                       help="every unit follows the global schedule and is only cut at its freeze point")
    group.add_argument("--all_stages", action="store_true", help="LocalMIM: a decoder after every block (ViT-B)")
    group.add_argument("--dont_freeze_pe", action="store_true", help="the patch embedding never freezes")
    group.add_argument("--vitfreeze_compat", action="store_true",
                       help="reproduce the reference ViTFreeze: trainable cls token, lr jump at the end of warmup")


def add_dist_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed")
    group.add_argument("--world_size", default=1, type=positive_int, help="number of processes (set by torchrun)")
    group.add_argument("--local_rank", "--local-rank", default=-1, type=int, help="set by torch.distributed.launch")
    group.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--threads", default=None, type=positive_int,
                       help="intra-op CPU threads per process (default: chosen from the model size, cores and "
                            "loader workers, or OMP_NUM_THREADS; logged at start)")


def add_output_args(parser: argparse.ArgumentParser, *, save_every: int) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--output_dir", default="./output_dir", help="checkpoints, log.txt, pictures")
    group.add_argument("--log_dir", default=None, help="TensorBoard folder (default: <output_dir>/tensorboard)")
    group.add_argument("--resume", default="", help="checkpoint to resume from")
    group.add_argument("--auto_resume", action="store_true", help="resume from the latest checkpoint in output_dir")
    group.add_argument("--overwrite", action="store_true",
                       help="start afresh in an output_dir that already holds checkpoints, replacing them")
    group.add_argument("--start_epoch", default=0, type=non_negative_int, help="first epoch (resume overrides)")
    group.add_argument("--save_every", default=save_every, type=positive_int, help="keep checkpoint-<epoch>.pth")
    group.add_argument("--save_every_steps", default=0, type=non_negative_int,
                       help="also write checkpoint-last.pth every N optimizer steps inside an epoch (0: off)")
    group.add_argument("--vis_every", default=save_every, type=non_negative_int,  # on by default, as checkpoints
                       help="picture every N epochs (0: off)")
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
        ValueError: the file is not valid YAML, a key is not a flag of this script (the message names the nearest valid ones) or a
            value fails the flag's validation.
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


# FreezeOut's own flags: giving any of them (command line or recipe) turns FreezeOut on. The seeds' ViTFreeze
# commands pass --how_scale/--t_0 and never --freezeout (the reference code freezes whenever it runs).
FREEZEOUT_FLAGS = ("how_scale", "t_0", "all_stages", "dont_freeze_pe", "not_scale_lr", "non_layerwise_lr")

# DeiT's flags (MoCo v3's transfer seed runs DeiT's main.py) that have no counterpart here: one line says what to
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


def _flag_of(token: str) -> str | None:
    """``--name`` of a long option token (``--name=value`` too), else None."""
    return token.split("=", 1)[0] if token.startswith("--") and len(token) > 2 else None


def normalize_argv(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` in this parser's spelling: hyphenated flags (DeiT's ``--batch-size``, ``--data-set``) become ours
    (``--batch_size``), DeiT's no-op flags are dropped, and an option of no meaning here, or an unknown one, stops
    with one line that names it and says what to use instead (or the nearest flags).

    Raises:
        SystemExit: through ``parser.error`` (exit status 2), for a foreign or unknown flag.
    """
    options = {opt for action in parser._actions for opt in action.option_strings}
    out: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token, flag = tokens[i], _flag_of(tokens[i])
        i += 1
        if flag is None or flag in options:
            out.append(token)
            continue
        spelled = "--" + flag[2:].replace("-", "_")
        if spelled in options:
            out.append(spelled + token[len(flag):])
        elif spelled in IGNORED_FLAGS:
            takes, note = IGNORED_FLAGS[spelled]
            i += takes if "=" not in token else 0
            if note and _first_process():
                logging.getLogger("vitfreeze").warning("%s ignored: %s", flag, note)
        elif spelled in FOREIGN_FLAGS:
            parser.error(f"{flag} has no meaning here: {FOREIGN_FLAGS[spelled]}")
        else:
            names = sorted(o for o in options if o.startswith("--"))
            close = difflib.get_close_matches(spelled, names, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (--help lists the flags)"
            parser.error(f"unrecognized argument {flag}{hint}")
    if "--blr" in options and any(_flag_of(t) in DEIT_SPELLINGS for t in tokens):
        out = _deit_lr(out)
    return out


# Spellings only DeiT's main.py uses: a command with one of them is a DeiT command (MoCo v3's transfer seed).
DEIT_SPELLINGS = {"--batch-size", "--weight-decay", "--warmup-epochs", "--data-set", "--data-path", "--drop-path",
                  "--eval-freq", "--no-repeated-aug", "--min-lr", "--input-size", "--clip-grad", "--no-pin-mem"}


def _deit_lr(argv: list[str]) -> list[str]:
    """DeiT scales ``--lr`` by the total batch / 512; here ``--lr`` is the actual lr and ``--blr`` is scaled by
    batch / 256, so DeiT's ``--lr X`` is ``--blr X/2`` (MoCo v3: 3e-4 x 1024 / 512 = 6e-4 = 1.5e-4 x 1024 / 256)."""
    out, i = [], 0
    while i < len(argv):
        flag = _flag_of(argv[i])
        if flag == "--lr":
            inline = "=" in argv[i]
            text = argv[i].split("=", 1)[1] if inline else (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                blr = f"{float(text) / 2:g}"
            except ValueError:  # let the parser report the bad value
                out.append(argv[i])
                i += 1
                continue
            if _first_process():
                logging.getLogger("vitfreeze").warning(
                    "DeiT-style command: DeiT's --lr %s (scaled by total batch / 512) is --blr %s here", text, blr)
            out += ["--blr", blr]
            i += 1 if inline else 2
            continue
        out.append(argv[i])
        i += 1
    return out


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the options that ``argv`` (already normalised) gives explicitly."""
    by_flag = {opt: action.dest for action in parser._actions for opt in action.option_strings}
    return {by_flag[flag] for token in argv if (flag := _flag_of(token)) in by_flag}


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Two-stage parse: ``--config`` sets defaults, the command line overrides them.

    Flags are first brought to this parser's spelling (:func:`normalize_argv`). Errors in the recipe are reported
    in one line without the usage block (exit status 2, as argparse's). Any FreezeOut flag given explicitly (on the
    command line or in the recipe, whatever its value) turns ``--freezeout`` on, with one line that says so.
    """
    argv = normalize_argv(quiet_on_other_ranks(parser), sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    recipe: dict[str, Any] = {}
    if pre.config:
        try:
            recipe = load_config(pre.config, parser)
        except (FileNotFoundError, ValueError) as err:
            command_line_error(str(err))
        parser.set_defaults(**recipe)
    args = parser.parse_args(argv)
    given = explicit_dests(parser, argv)
    if hasattr(args, "freezeout"):
        imply_freezeout(args, parser, given, recipe)
    check_schedule(args, parser, given, recipe)
    return args


def _origin(dest: str, given: set[str], recipe: dict[str, Any]) -> str:
    return "" if dest in given else " (from the recipe)" if dest in recipe else " (the default)"


def check_schedule(args: argparse.Namespace, parser: argparse.ArgumentParser, given: set[str],
                   recipe: dict[str, Any]) -> None:
    """The warmup must fit in the run: ``--warmup_epochs`` at most ``--epochs``, said in the flags' words."""
    if not hasattr(args, "warmup_epochs") or args.warmup_epochs <= args.epochs:
        return
    command_line_error(f"--warmup_epochs {args.warmup_epochs}{_origin('warmup_epochs', given, recipe)} is larger than "
                 f"--epochs {args.epochs}{_origin('epochs', given, recipe)}: the lr would still be warming up when "
                 f"the run ends; pass --warmup_epochs {args.epochs} or less (0: no warmup)")


# data sets whose files torchvision can fetch (``--download``); 'demo' is generated in memory
_DOWNLOADABLE = ("cifar10", "cifar100", "flowers", "pets")
DEMO_RECIPE = "configs/pretrain/demo.yaml"


def run_problems(args: argparse.Namespace, *, models: Sequence[str] = (), check_files: bool = True) -> list[str]:
    """What would stop the run, found before anything starts: no data given, a model name that is not registered
    (``models``), and (``check_files``) a data path, split file or checkpoint that does not exist.

    Returns:
        One message per problem, in the flags' words (empty: nothing found).
    """
    problems = []
    data_set = getattr(args, "data_set", None)
    needs_data = hasattr(args, "data_path") and data_set != "demo" and not getattr(args, "load_features", "")
    if needs_data and not args.data_path:
        problems.append(f"no training data: pass --data_path DIR (an ImageFolder root or a folder of images) or "
                        f"--data_path demo (synthetic shapes); to try everything end to end: "
                        f"python main_pretrain.py --config {DEMO_RECIPE}" if data_set is None else
                        f"--data_path is required for --data_set {data_set} (or use --data_set demo)")
    if models and args.model not in models:  # always: a run must not scan its data first
        close = difflib.get_close_matches(args.model, list(models), n=3, cutoff=0.5)
        problems.append(f"--model {args.model} is not a registered model of this script"
                        f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}; choose one of "
                        f"{', '.join(models)}")
    if not check_files:
        return problems
    downloading = data_set in _DOWNLOADABLE and getattr(args, "download", False)
    if getattr(args, "data_path", "") not in ("", "demo", None) and data_set != "demo" and not downloading \
            and not Path(args.data_path).expanduser().exists():
        problems.append(f"--data_path {args.data_path} does not exist")
    split_file = getattr(args, "split_file", None)
    if split_file and not Path(split_file).exists() and not (Path(args.data_path or ".") / split_file).exists():
        problems.append(f"--split_file {split_file} does not exist (neither as given nor under --data_path)")
    for flag in ("finetune", "resume", "load_features"):
        path = getattr(args, flag, "")
        if path and not Path(path).expanduser().exists():
            problems.append(f"--{flag} {path} does not exist")
    return problems


def imply_freezeout(args: argparse.Namespace, parser: argparse.ArgumentParser, given: set[str],
                    recipe: dict[str, Any]) -> None:
    """Turn ``args.freezeout`` on when a FreezeOut flag was given explicitly on the command line or in the recipe.

    A recipe that says ``freezeout: false`` next to FreezeOut keys contradicts itself: an error.
    """
    named = [f"--{d}" for d in FREEZEOUT_FLAGS if d in given or d in recipe]
    if not named or args.freezeout:
        return
    if recipe.get("freezeout") is False and "freezeout" not in given:
        command_line_error(f"the recipe says freezeout: false but gives FreezeOut setting(s) {', '.join(named)}")
    args.freezeout = True
    if _first_process():
        logging.getLogger("vitfreeze").warning(
            "FreezeOut on: %s given (any FreezeOut flag turns it on, as in the ViTFreeze commands)", ", ".join(named))


def resolve_accum_iter(args: argparse.Namespace, world_size: int) -> int:
    """Set and return ``args.accum_iter``: as given, derived from ``args.eff_batch_size``, or 1.

    A recipe states its effective batch (``eff_batch_size``) once; the micro-batches per optimizer step then
    follow from the per-process batch and the number of processes, so the same recipe trains the same way on
    1, 8 or 64 GPUs. Calling it again with the same world size changes nothing.

    Raises:
        ValueError: the effective batch is not a multiple of ``batch_size x world_size``, or an explicit
            ``accum_iter`` gives another effective batch.
    """
    eff, per_step = args.eff_batch_size, args.batch_size * world_size
    if eff is None:
        args.accum_iter = args.accum_iter or 1
        return args.accum_iter
    if eff % per_step:
        sizes = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if eff % (args.batch_size * n) == 0]
        raise ValueError(f"effective batch {eff} is not a multiple of batch_size {args.batch_size} x {world_size} "
                         f"processes = {per_step}: run on {' / '.join(map(str, sizes)) or 'no power-of-2 number of'} "
                         f"processes, or change --batch_size or --eff_batch_size")
    derived = eff // per_step
    if args.accum_iter is not None and args.accum_iter != derived:
        needed, rest = divmod(eff, args.batch_size * args.accum_iter)  # processes that give eff with these flags
        if not rest and needed % world_size == 0 and needed > world_size:  # a command written for more nodes
            nodes = needed // world_size
            raise ValueError(f"effective batch {eff} with --batch_size {args.batch_size} --accum_iter "
                             f"{args.accum_iter} needs {needed} processes, this job has {world_size}: run on "
                             f"{nodes} x as many nodes (NNODES={nodes} ./run.sh ... for {world_size}-GPU nodes), "
                             f"or pass --accum_iter {derived} here")
        raise ValueError(f"--accum_iter {args.accum_iter} gives an effective batch of "
                         f"{args.accum_iter * per_step} (batch_size {args.batch_size} x {world_size} processes), "
                         f"not --eff_batch_size {eff}; pass only one of the two")
    args.accum_iter = derived
    return derived


def dump_args(args: argparse.Namespace) -> str:
    """Resolved arguments as YAML (the form a recipe takes), for the run record and ``--dry_run``."""
    return yaml.safe_dump(vars(args), sort_keys=True)


# ------------------------------------------------------------------------------------ evaluation (probe, k-NN)
def add_labelled_data_args(parser: argparse.ArgumentParser) -> None:
    """Labelled train/val data for linear probing and k-NN (MAE's ``--data_path`` + ``--nb_classes``)."""
    from util.data.transfer import DATASETS  # util -> util; the names live with the builders
    group = parser.add_argument_group("data")
    group.add_argument("--data_set", default="folder", choices=list(DATASETS),
                       help="'folder': <data_path>/train and <data_path>/val (ImageFolder); 'demo': built-in set")
    group.add_argument("--data_path", default="", type=str, help="dataset root")
    group.add_argument("--nb_classes", default=None, type=positive_int,
                       help="number of classes (default: from the dataset; an error if they differ)")
    group.add_argument("--num_workers", default=min(10, available_cores()), type=non_negative_int,
                       help="data loader processes (default: 10, at most the cores)")
    group.add_argument("--pin_mem", action="store_true", default=True)
    group.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    group.add_argument("--dist_eval", action="store_true",
                       help="accepted for MAE compatibility; evaluation is always sharded exactly over processes")


def add_backbone_args(parser: argparse.ArgumentParser, *, weights_aliases: Sequence[str] = ()) -> None:
    """A frozen classification backbone (``models/vit.py``) and the checkpoint it loads."""
    group = parser.add_argument_group("backbone")
    group.add_argument("--finetune", *weights_aliases, dest="finetune", default="",
                       help="pretrained checkpoint (ours, MAE, LocalMIM/ViTFreeze, MoCo v3, DINOv2, timm); "
                            "empty: random initialisation (a baseline)")
    group.add_argument("--checkpoint_source", default="auto",
                       choices=["auto", "vitfreeze", "mae", "localmim", "moco_v3", "dinov2", "timm"],
                       help="layout of --finetune (auto: detected from its keys)")
    group.add_argument("--global_pool", action="store_true", default=False,
                       help="feature = mean of patch tokens -> fc_norm (the default of fine-tuning, as MAE's)")
    group.add_argument("--cls_token", action="store_false", dest="global_pool",
                       help="feature = cls token after the final norm (the default of the linear probe and k-NN, "
                            "as MAE's probe)")


def add_linprobe_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("linear probe")
    group.add_argument("--cache_features", action="store_true",
                       help="embed train/val once without augmentation, then train the head(s) on the features")
    group.add_argument("--lr_grid", default=None, type=positive_float, nargs="+",
                       help="one head per absolute lr, trained side by side (needs --cache_features)")


def add_knn_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("k-NN")
    group.add_argument("--nb_knn", default=[10, 20, 100, 200], type=positive_int, nargs="+",
                       help="numbers of nearest neighbours, all evaluated in one pass")
    group.add_argument("--temperature", default=0.07, type=positive_float, help="vote weight exp(sim / T)")
    group.add_argument("--n_per_class", default=0, type=non_negative_int,
                       help="few-shot: bank of N training images per class (0: the whole training set)")
    group.add_argument("--n_tries", default=1, type=positive_int, help="few-shot banks drawn (mean and std)")
    group.add_argument("--save_features", "--dump_features", dest="save_features", default="",
                       help="folder to write the extracted features to (DINO's file names)")
    group.add_argument("--load_features", default="", help="folder to read features from instead of extracting")
    group.add_argument("--fp16_bank", action="store_true", help="keep the training bank in fp16 (half the memory)")
    group.add_argument("--knn_chunk_size", default=256, type=positive_int,
                       help="test rows per similarity block (memory: chunk x bank size)")


def add_extraction_args(parser: argparse.ArgumentParser) -> None:
    """Batch size and precision of a forward-only pass (k-NN feature extraction)."""
    group = parser.add_argument_group("feature extraction")
    group.add_argument("--batch_size", "--batch_size_per_gpu", dest="batch_size", default=128, type=positive_int,
                       help="images per process and forward")
    group.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                       help="autocast for the forward; auto = bf16 (or fp16) on CUDA, none (fp32) on CPU")


def add_eval_output_args(parser: argparse.ArgumentParser) -> None:
    """Output folder and seed of an evaluation that trains nothing."""
    group = parser.add_argument_group("output")
    group.add_argument("--output_dir", default="./output_dir", help="results, log.txt, args.yaml")
    group.add_argument("--overwrite", action="store_true",
                       help="write into an output_dir that holds a training run's checkpoints (its args.yaml too)")
    group.add_argument("--log_dir", default=None, help="TensorBoard folder for the results (default: none)")
    group.add_argument("--seed", default=0, type=int, help="seed of the few-shot draws")


# ----------------------------------------------------------------------------------------------------- fine-tuning
def add_finetune_args(parser: argparse.ArgumentParser) -> None:
    """MAE ``main_finetune.py``'s model, augmentation and mixup flags (SPEC 5.1, 5.4, 5.5) and ``--eval``."""
    group = parser.add_argument_group("fine-tuning")
    group.add_argument("--layer_decay", default=0.75, type=positive_float,
                       help="layer-wise lr decay: lr_scale = layer_decay ** (depth + 1 - layer id); 1 disables it")
    group.add_argument("--drop_path", default=0.1, type=closed_fraction, help="stochastic depth rate (last block)")
    group.add_argument("--head_init_std", default=2e-5, type=positive_float,
                       help="trunc_normal std of the new head (MAE 2e-5; dBOT 0.01)")
    group.add_argument("--eval", action="store_true",
                       help="only evaluate the --resume checkpoint (or --auto_resume's) on the val (and test) split")
    aug = parser.add_argument_group("augmentation and regularisation")
    aug.add_argument("--smoothing", default=0.1, type=closed_fraction, help="label smoothing")
    aug.add_argument("--aa", default="rand-m9-mstd0.5-inc1", type=str,
                     help="timm auto-augment policy (MAE: rand-m9-mstd0.5-inc1); 'none' disables it")
    aug.add_argument("--color_jitter", default=None, type=non_negative_float,
                     help="colour jitter factor, used only when --aa is none (timm's rule)")
    aug.add_argument("--reprob", default=0.25, type=closed_fraction, help="RandomErasing probability")
    aug.add_argument("--remode", default="pixel", choices=["pixel", "rand", "const"], help="RandomErasing fill")
    aug.add_argument("--recount", default=1, type=positive_int, help="RandomErasing boxes per image")
    aug.add_argument("--mixup", default=0.0, type=non_negative_float, help="mixup alpha (0: off)")
    aug.add_argument("--cutmix", default=0.0, type=non_negative_float, help="cutmix alpha (0: off)")
    aug.add_argument("--cutmix_minmax", default=None, type=closed_fraction, nargs=2,
                     help="cutmix box-size ratio bounds (overrides --cutmix alpha)")
    aug.add_argument("--mixup_prob", default=1.0, type=closed_fraction, help="chance a batch is mixed at all")
    aug.add_argument("--mixup_switch_prob", default=0.5, type=closed_fraction,
                     help="chance of cutmix instead of mixup when both are on")
    aug.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"],
                     help="one mixing per batch, per pair or per element")


def add_transfer_data_args(parser: argparse.ArgumentParser) -> None:
    """Cross-validation folds from a CSV (medical protocols, SPEC 10.2), opt-in downloads, few-label training."""
    group = parser.add_argument_group("transfer data")
    group.add_argument("--split_file", default=None,
                       help="CSV with columns file,label,fold (file relative to --data_path), or HyperKvasir's "
                            "official_splits/2_fold_split.csv as it is; needs --data_set folder")
    group.add_argument("--fold", default=None, type=int, nargs="+",
                       help="held-out fold(s) of --split_file, one run each (mean and std reported over several); "
                            "default: every fold in the file")
    group.add_argument("--download", action="store_true",
                       help="fetch CIFAR / Flowers / Pets with torchvision when missing (never done otherwise)")
    group.add_argument("--train_per_class", default=0, type=non_negative_int,
                       help="train on N labelled images per class, drawn with --seed (few labels; 0: all of them)")


# ------------------------------------------------------------------------------- detection / instance segmentation
def add_detection_args(parser: argparse.ArgumentParser) -> None:
    """Mask R-CNN / Cascade Mask R-CNN on the ViT pyramid (``main_detect.py``): model, data, schedule."""
    group = parser.add_argument_group("detection")
    group.add_argument("--detector", default="mask_rcnn", choices=["mask_rcnn", "cascade_mask_rcnn"],
                       help="models.detectors.DETECTORS")
    group.add_argument("--finetune", default="",
                       help="pretrained ViT checkpoint (ours, MAE, LocalMIM/ViTFreeze, MoCo v3, DINOv2, timm) for the "
                            "pyramid's encoder; empty: random initialisation (a baseline)")
    group.add_argument("--checkpoint_source", default="auto",
                       choices=["auto", "vitfreeze", "mae", "localmim", "moco_v3", "dinov2", "timm"],
                       help="layout of --finetune (auto: detected from its keys)")
    group.add_argument("--drop_path", default=0.1, type=closed_fraction, help="stochastic depth of the ViT")
    group.add_argument("--layer_decay", default=0.75, type=positive_float,
                       help="layer-wise lr decay over the ViT blocks (1 disables it); RPN/RoI heads get scale 1")
    group.add_argument("--lr_steps", default=[8, 11], type=positive_int, nargs="+",
                       help="epochs after which the lr is multiplied by 0.1 (mmdet's lr_config.step)")
    group.add_argument("--warmup_iters", default=500, type=non_negative_int,
                       help="linear warmup from 0.001 x lr over this many optimizer steps (mmdet)")
    group.add_argument("--anchor_sizes", default=[32, 64, 128, 256, 512], type=positive_int, nargs=5,
                       help="RPN anchor size of each level (strides 4, 8, 16, 32, 64)")
    group.add_argument("--out_channels", default=256, type=positive_int, help="channels of the feature pyramid")
    group.add_argument("--rois_per_image", default=512, type=positive_int,
                       help="RoIs sampled per image (and cascade stage) to train the box head")
    group.add_argument("--proposals_per_image", default=2000, type=positive_int,
                       help="RPN proposals per image after NMS in training (half of it at test time)")
    group.add_argument("--box_fc", default=1024, type=positive_int, help="width of the box head's FC layer")
    group.add_argument("--window_size", default=0, type=non_negative_int,
                       help="window attention in the ViT blocks outside --global_blocks (ViTDet: 14); 0: global")
    group.add_argument("--global_blocks", default=[2, 5, 8, 11], type=int, nargs="*",
                       help="blocks that keep global attention under --window_size")
    group.add_argument("--grad_checkpointing", action="store_true", help="recompute ViT blocks in backward")
    group.add_argument("--scale_range", default=[0.1, 2.0], type=positive_float, nargs=2,
                       help="large-scale jitter: random resize range around --input_size (ViTDet 0.1 2.0)")
    group.add_argument("--max_dets", default=100, type=positive_int, help="detections per image (COCO: 100)")
    group.add_argument("--eval", action="store_true", help="only evaluate --resume (or --auto_resume's) checkpoint")
    group.add_argument("--eval_every", default=1, type=positive_int, help="evaluate every N epochs (and the last)")
    group.add_argument("--deterministic", action="store_true",
                       help="deterministic cuDNN kernels (mmdet's --deterministic); slower")
    data = parser.add_argument_group("data")
    data.add_argument("--data_path", default="scenes",
                      help="COCO root (annotations/instances_{train,val}2017.json, {train,val}2017/), or 'scenes': "
                           "synthetic scenes written into <output_dir>/scenes")
    data.add_argument("--scene_images", default=[64, 16], type=positive_int, nargs=2,
                      help="train / val images of the synthetic scenes (their side is --input_size)")
    data.add_argument("--num_workers", default=4, type=non_negative_int)
    data.add_argument("--pin_mem", action="store_true", default=True)
    data.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")

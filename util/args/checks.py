"""Checks and derived values once the arguments are parsed: what would stop the run (before anything starts),
the warmup within the run, FreezeOut implied by its own flags, and the gradient accumulation of an effective
batch."""
from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any, Sequence

from util.args.config import warn_once
from util.runtime import command_line_error

# FreezeOut's own flags: giving any of them (command line or recipe) turns FreezeOut on. The published ViTFreeze
# commands pass --how_scale/--t_0 and never --freezeout (the reference code freezes whenever it runs).
FREEZEOUT_FLAGS = ("how_scale", "t_0", "all_stages", "dont_freeze_pe", "not_scale_lr", "non_layerwise_lr")


def _origin(dest: str, given: set[str], recipe: dict[str, Any]) -> str:
    return "" if dest in given else " (from the recipe)" if dest in recipe else " (the default)"


def check_schedule(args: argparse.Namespace, parser: argparse.ArgumentParser, given: set[str],
                   recipe: dict[str, Any]) -> None:
    """The warmup must fit in the run: ``--warmup_epochs`` at most ``--epochs``, said in the flags' words."""
    if not hasattr(args, "warmup_epochs") or args.warmup_epochs <= args.epochs:
        return
    command_line_error(f"--warmup_epochs {args.warmup_epochs}{_origin('warmup_epochs', given, recipe)} is larger "
                       f"than --epochs {args.epochs}{_origin('epochs', given, recipe)}: the lr would still be warming "
                       f"up when the run ends; pass --warmup_epochs {args.epochs} or less (0: no warmup)")


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
    if getattr(args, "data_path", "") not in ("", "demo", "scenes", None) and data_set != "demo" and not downloading \
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
    warn_once("FreezeOut on: %s given (any FreezeOut flag turns it on, as in the ViTFreeze commands)", ", ".join(named))


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

"""``--dry_run``: the run's own start, without training and without writing anything.

A dry run parses and checks the flags, then builds what the run builds (the datasets' indexes and class counts,
the model on the meta device, the ``--finetune`` / ``--resume`` checkpoint loaded against it, the optimizer and the
schedule) and stops where training would start, with one ``dry run OK: ...`` line. Whatever would stop the run
stops the dry run with the same one-line error, because it is the same code: a missing ``train/`` folder,
``--nb_classes`` that the data does not have, a checkpoint whose shapes do not fit ``--model``, an empty dataset.

What differs from a run, and only here:
- no process group is joined (``torchrun``'s ``RANK`` / ``WORLD_SIZE`` still size the shards and the batch), so a
  dry run of an 8-process command runs as one process;
- tensors are created on the meta device (``torch.set_default_device``): a ViT-H costs no memory and no init time,
  and loading a checkpoint into it checks every key and shape without copying;
- the output folder is neither created nor locked, and no file is written (synthetic demo data goes to a temporary
  folder that is removed at the end).

``--dry_run config`` is the cheaper check: the resolved flags (YAML) and the paths' existence, nothing built.
"""
from __future__ import annotations

import argparse
import functools
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch

logger = logging.getLogger("vitfreeze")
META = torch.device("meta")


class DryRunPassed(Exception):
    """Raised where training would start: everything the run builds was built. ``facts`` say what."""

    def __init__(self, facts: dict[str, Any]) -> None:
        self.facts = facts
        super().__init__(self.line)

    @property
    def line(self) -> str:
        return "dry run OK: " + "; ".join(f"{k}: {v}" if not isinstance(v, bool) else k for k, v in self.facts.items())


class _Facts(logging.Handler):
    """Keeps the log lines that carry a ``preflight`` attribute (``logger.info(..., extra={'preflight': 'data'})``):
    the dataset and checkpoint lines that the final line repeats."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: dict[str, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        kind = getattr(record, "preflight", None)
        if kind:
            self.lines.setdefault(kind, []).append(record.getMessage())


_state: dict[str, Any] = {}  # the dry run in progress (one per process): facts handler, scratch folder


def active(args: argparse.Namespace | None = None) -> bool:
    """Whether this process is in a ``--dry_run`` pre-flight (``args``: the run's flags, when at hand)."""
    return bool(getattr(args, "dry_run", None)) if args is not None else bool(_state)


def begin(args: argparse.Namespace) -> None:
    """Enter the pre-flight (``util.runtime.setup_run``): meta-device tensors, fact collection."""
    facts = _Facts()
    logging.getLogger("vitfreeze").addHandler(facts)
    _state.update(facts=facts, default_device=torch.get_default_device())
    torch.set_default_device(META)
    # loading a checkpoint into a meta model copies nothing, which is the point: the keys and shapes are checked
    warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")


def end() -> None:
    """Leave the pre-flight: the default device back, the scratch folder removed."""
    if not _state:
        return
    torch.set_default_device(_state["default_device"])
    logging.getLogger("vitfreeze").removeHandler(_state["facts"])
    if "scratch" in _state:
        shutil.rmtree(_state["scratch"], ignore_errors=True)
    _state.clear()


def scratch_dir(output_dir: str | Path) -> Path:
    """Where a run writes synthetic data it generates (``--data_path demo``): ``output_dir``, or during a dry run a
    temporary folder removed at its end."""
    if not _state:
        return Path(output_dir)
    if "scratch" not in _state:
        _state["scratch"] = tempfile.mkdtemp(prefix="vitfreeze-dry-run-")
    return Path(_state["scratch"])


def passed(args: argparse.Namespace, model: torch.nn.Module | None = None, *, trained: bool = False,
           **facts: Any) -> NoReturn:
    """Stop the pre-flight where training (or evaluation) would start.

    Args:
        model: what the run trains or evaluates (its parameter count is reported).
        trained: ``model`` is what the optimizer updates (a linear probe's heads), said as such.
        facts: the run's essentials (steps, lr, effective batch, ...), in the order they are said.
    """
    said = _state["facts"].lines if _state else {}
    line: dict[str, Any] = {}
    if said.get("data"):
        line["data"] = " | ".join(text.removeprefix("dataset ") for text in said["data"])
    if getattr(args, "model", None):
        params = sum(p.numel() for p in model.parameters()) if model is not None else None
        line["model"] = args.model + (f" ({params / 1e6:.2f}M parameters{' trained' * trained})"
                                      if params is not None else "")
    if said.get("checkpoint"):
        line["checkpoint"] = " | ".join(text.removeprefix("loaded ") for text in said["checkpoint"])
    line.update({k: v for k, v in facts.items() if v is not None})
    raise DryRunPassed(line)


def entry_point(main: Callable[..., dict]) -> Callable[..., dict]:
    """Decorates an entry script's ``main(argv)``: a dry run that passed returns its facts (and logs the
    ``dry run OK`` line on rank 0); the pre-flight's state is undone however ``main`` ends."""

    @functools.wraps(main)
    def run(argv=None) -> dict:
        try:
            return main(argv)
        except DryRunPassed as done:
            logger.info("%s", done.line)
            return done.facts
        finally:
            end()

    return run

"""Checkpoints as plain data: atomic writes, ``weights_only`` loads, exact reports of what does not match.

Layout follows MAE's ``save_model`` (``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``) so MAE-style
fine-tuning code loads our files, with ``args`` stored as a dict rather than a pickled ``Namespace``
(MAE pickles it, which forces ``weights_only=False``). Writes go to a temporary file in the same folder
followed by ``os.replace``, so a crash never leaves a half-written file where the last good one was.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

logger = logging.getLogger("vitfreeze")

LAST_NAME = "checkpoint-last.pth"
_EPOCH_RE = re.compile(r"checkpoint-(\d+)\.pth$")


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Create or replace ``path`` atomically: ``write(tmp)`` fills a temp file in the same folder, which is
    fsynced and renamed over ``path``. On any error the temp file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would survive the rename; honour the umask instead
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``); else set and restore."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename)."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint without executing code from it.

    Only tensors and plain Python values are unpickled; ``argparse.Namespace`` is allow-listed so that
    official MAE / LocalMIM checkpoints (which pickle their args) still load.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a loadable checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is a folder: pass a file in it (e.g. {path / LAST_NAME})")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError... for bad files
        raise ValueError(unreadable_reason(path, err)) from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict")
    return checkpoint


def unreadable_reason(path: Path, err: BaseException, what: str = "checkpoint") -> str:
    """One line that says what ``path`` is instead of a ``what`` (a torch.save file) and what to do, for
    ``torch.load``'s ``err`` (an empty file gives ``EOFError``, a text file ``KeyError``/``IndexError``: riddles)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(256)
    detail = f"{type(err).__name__}: {str(err).strip().splitlines()[0].split('. ')[0] if str(err).strip() else '-'}"
    start = f"cannot load {what} {path}"
    fix = "pass a .pth file written by torch.save (this project, MAE, LocalMIM, DINOv2, timm)"
    if size == 0:
        other = "an earlier checkpoint-<epoch>.pth" if what == "checkpoint" else f"write the {what} again"
        return (f"{start}: the file is empty (0 bytes), its write never finished or it was truncated; use another "
                f"({other}) or copy it again")
    if head.startswith(b"version https://git-lfs"):
        return f"{start}: a Git LFS pointer, not the file itself; run `git lfs pull` to fetch it"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as bad:  # a character cut at the 256-byte boundary is still text
        text = head[:bad.start].decode("utf-8") if bad.start >= len(head) - 3 else None
    if text is not None and all(c.isprintable() or c.isspace() for c in text):
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        return f"{start}: a text file ({size} bytes, starts {first!r}), not a {what}; {fix}"
    if isinstance(err, pickle.UnpicklingError) and head.startswith((b"PK", b"\x80")):
        # weights_only refused an object, so no code from the file ran; torch's own advice (weights_only=False)
        # would run it, so only the line naming the object is kept
        what = next((line for line in str(err).splitlines() if "GLOBAL" in line), detail)
        return f"{start}: it holds Python objects that a weights-only load refuses ({what.strip()}); {fix}"
    if head.startswith(b"PK"):
        return f"{start}: a damaged or truncated PyTorch file ({size} bytes; {detail}); copy it again or use another"
    return f"{start}: not a file written by torch.save ({size} bytes; {detail}); {fix}"


def find_latest(output_dir: str | Path) -> Path | None:
    """``checkpoint-last.pth`` if present, else the ``checkpoint-<epoch>.pth`` with the highest epoch."""
    output_dir = Path(output_dir)
    if (output_dir / LAST_NAME).is_file():
        return output_dir / LAST_NAME
    numbered = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*.pth") if (m := _EPOCH_RE.search(p.name))]
    return max(numbered)[1] if numbered else None


def state_dict_mismatch(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between ``model``'s state dict and ``state_dict`` (empty if they match)."""
    own = model.state_dict()
    problems = []
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
    for key in sorted(set(own) & set(state_dict)):
        if tuple(own[key].shape) != tuple(state_dict[key].shape):
            problems.append(f"shape of {key}: checkpoint {tuple(state_dict[key].shape)}, "
                            f"model {tuple(own[key].shape)}")
    return problems


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Strict load that says exactly which keys or shapes differ.

    Raises:
        ValueError: keys are missing or unexpected, or shapes differ.
    """
    problems = state_dict_mismatch(model, state_dict)
    if problems:
        raise ValueError(f"{source} does not match the model:\n  " + "\n  ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def resume_training(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, *, sync: Callable[[int], Any], steps_per_epoch: int,
                    required: tuple[str, ...] = ("model", "optimizer", "epoch"), hint: str = "") -> dict[str, Any]:
    """Continue a run from one of its own checkpoints: weights, FreezeOut state, optimizer and loss scaler.

    The optimizer's parameter groups depend on the step (FreezeOut drops frozen units), so ``sync`` (a
    ``Freezer.sync``) first rebuilds them as they were after the checkpoint's last update, then the state loads.

    Returns:
        The checkpoint (``epoch`` = last finished epoch, ``skipped_steps``, and whatever else the run saved).

    Raises:
        ValueError: keys in ``required`` are missing (``hint`` says what to do instead), the weights do not
            match the model, or the optimizer state does not match this run's parameter groups.
    """
    checkpoint = load_checkpoint(path)
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint of this script (no {missing}; keys: "
                         f"{sorted(checkpoint)[:8]}){'; ' + hint if hint else ''}")
    load_model_state(model, checkpoint["model"], source=f"checkpoint {path}")
    sync((checkpoint["epoch"] + 1) * steps_per_epoch - 1)
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"optimizer state in {path} does not match this run: {err}") from err
    if "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    logger.info("resumed from %s (epoch %d done)", path, checkpoint["epoch"])
    return checkpoint


def _short(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")

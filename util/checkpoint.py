"""Checkpoints as plain data: atomic writes, ``weights_only`` loads, exact reports of what does not match.

Layout follows MAE's ``save_model`` (``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``) so MAE-style
fine-tuning code loads our files, with ``args`` stored as a dict rather than a pickled ``Namespace``
(MAE pickles it, which forces ``weights_only=False``). Writes go to a temporary file in the same folder
followed by ``os.replace``, so a crash never leaves a half-written file where the last good one was.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from util.keys import describe_keys, describe_problems, key_problems, shortlist

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
        os.chmod(tmp, 0o666 & ~current_umask())  # again: a writer that replaces the file (safetensors) made it 0600
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
    candidates = resume_candidates(output_dir)
    return candidates[0] if candidates else None


def resume_candidates(output_dir: str | Path) -> list[Path]:
    """``checkpoint-last.pth`` (if present), then the numbered checkpoints, newest epoch first."""
    output_dir = Path(output_dir)
    numbered = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*.pth") if (m := _EPOCH_RE.search(p.name))]
    last = [output_dir / LAST_NAME] if (output_dir / LAST_NAME).is_file() else []
    return last + [p for _, p in sorted(numbered, reverse=True)]


def load_latest(output_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint of a run folder (``--auto_resume``) and its contents, or None.

    ``checkpoint-last.pth`` comes first; when it cannot be read (a disk error, a truncated copy) the newest
    readable ``checkpoint-<epoch>.pth`` is used instead, and a warning says so.
    """
    for path in resume_candidates(output_dir):
        try:
            checkpoint = load_checkpoint(path)
        except ValueError as err:
            logger.warning("--auto_resume: cannot read %s (%s); trying the next newest checkpoint", path, err)
            continue
        if path.name != LAST_NAME and (Path(output_dir) / LAST_NAME).is_file():
            logger.warning("--auto_resume: falling back to %s because %s is unreadable", path, LAST_NAME)
        return path, checkpoint
    return None


def state_dict_mismatch(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between ``model``'s state dict and ``state_dict`` (empty if they match;
    ``util.keys.key_problems``)."""
    return key_problems(state_dict, model.state_dict())


MismatchDescriber = Callable[[dict, dict, list], str]


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str = "checkpoint",
                     describe: MismatchDescriber = describe_problems) -> None:
    """Strict load that says in one line which keys or shapes differ (``describe(state_dict, model_state,
    problems)`` words it; entry points pass ``models.registry.checkpoint_vs_model``).

    Raises:
        ValueError: keys are missing or unexpected, or shapes differ.
    """
    problems = state_dict_mismatch(model, state_dict)
    if problems:
        raise ValueError(f"{source} does not match the model: {describe(state_dict, model.state_dict(), problems)}")
    model.load_state_dict(state_dict, strict=True)


def resume_training(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, *, sync: Callable[[int], Any], steps_per_epoch: int,
                    required: tuple[str, ...] = ("model", "optimizer", "epoch"), hint: str = "",
                    checkpoint: dict[str, Any] | None = None,
                    describe: MismatchDescriber = describe_problems) -> dict[str, Any]:
    """Continue a run from one of its own checkpoints: weights, FreezeOut state, optimizer and loss scaler.

    The optimizer's parameter groups depend on the step (FreezeOut drops frozen units), so ``sync`` (a
    ``Freezer.sync``) first rebuilds them as they were after the checkpoint's last update, then the state loads.

    Args:
        checkpoint: the contents of ``path`` when already loaded (``load_latest``).

    Returns:
        The checkpoint (``epoch`` = last finished epoch, ``skipped_steps``, ``position`` when saved inside an
        epoch, and whatever else the run saved).

    Raises:
        ValueError: keys in ``required`` are missing (``hint`` says what to do instead), the weights do not
            match the model, or the optimizer state does not match this run's parameter groups.
    """
    checkpoint = load_checkpoint(path) if checkpoint is None else checkpoint
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint of this script (no {missing}; keys: "
                         f"{describe_keys(checkpoint)}){'; ' + hint if hint else ''}")
    load_model_state(model, checkpoint["model"], source=f"checkpoint {path}", describe=describe)
    # the optimizer groups as they were at the last update done (a mid-epoch checkpoint stores its step)
    sync(max(checkpoint.get("step", (checkpoint["epoch"] + 1) * steps_per_epoch) - 1, 0))
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"optimizer state in {path} does not match this run: {err}") from err
    if "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    where = (f"epoch {checkpoint['epoch']} done, {checkpoint['position']['update']} updates into epoch "
             f"{checkpoint['position']['epoch']}" if "position" in checkpoint else f"epoch {checkpoint['epoch']} done")
    logger.info("resumed from %s (%s)", path, where, extra={"preflight": "checkpoint"})
    return checkpoint



# ------------------------------------------------------------------------------------------------- epoch-end helper
class NonFiniteError(RuntimeError):
    """Training turned non-finite beyond what may be skipped; the run stops without writing a checkpoint."""


class NonFiniteStateError(NonFiniteError):
    """The weights or the optimizer state hold NaN or infinity: no checkpoint is written over a good one."""


def non_finite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """Names (``model.blocks.0.attn.qkv.weight``, ``optimizer.state.3.exp_avg``) of the floating tensors in
    ``tree`` (nested dicts / lists) that hold a NaN or an infinity. One host read per device."""
    found: list[tuple[str, torch.Tensor]] = []

    def walk(node: Any, name: str) -> None:
        if isinstance(node, torch.Tensor):
            if node.is_floating_point() or node.is_complex():
                found.append((name, node))
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{name}.{key}" if name else str(key))
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{name}.{i}" if name else str(i))

    walk(tree, prefix)
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in found:
        by_device.setdefault(tensor.device, []).append((name, tensor))
    bad = []
    for items in by_device.values():
        finite = torch.stack([torch.isfinite(t).all() for _, t in items]).tolist()
        bad += [name for (name, _), ok in zip(items, finite) if not ok]
    return bad


def non_finite_numbers(tree: Any, prefix: str = "") -> list[str]:
    """Names of the Python floats in ``tree`` (nested dicts / lists, e.g. a checkpoint's ``metrics``) that are NaN
    or infinite; tensors are left to :func:`non_finite_tensors`."""
    if isinstance(tree, float):
        return [] if math.isfinite(tree) else [prefix]
    if isinstance(tree, dict):
        return [n for k, v in tree.items() for n in non_finite_numbers(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(tree, (list, tuple)):
        return [n for i, v in enumerate(tree) for n in non_finite_numbers(v, f"{prefix}.{i}" if prefix else str(i))]
    return []


def capture_rng() -> dict[str, Any]:
    """This process's random state (torch CPU and current CUDA device, NumPy, Python) as plain data."""
    import random

    import numpy as np
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype("int64")), pos, has_gauss,
                                                       cached], "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    import random

    import numpy as np
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *, epoch: int,
                   step: int, skipped: int, args: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The state dict every training script saves: MAE's keys (``model``, ``optimizer``, ``epoch``, ``scaler``,
    ``args`` as a dict) plus ``step`` (updates done), ``skipped_steps`` and the script's own ``extra`` keys
    (``best``, ``classes``, ``lrs``, ``metrics``, ...). ``epoch`` is the last finished epoch."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "step": step, "skipped_steps": skipped, "args": args, **extra}


class RunCheckpoints:
    """Epoch-end writes and resume, one implementation for pretraining, fine-tuning and linear probing.

    Save rules: ``checkpoint-last.pth`` after every epoch (and inside one, see :meth:`save_position`);
    ``checkpoint-<epoch>.pth`` every ``save_every`` epochs and after the last; ``checkpoint-best.pth`` when the
    script says the epoch is its best (classification). A checkpoint is never written with non-finite weights
    or optimizer state (:class:`NonFiniteStateError`, the earlier files stay as they were).

    Crash safety: ``checkpoint-last.pth`` is what ``--auto_resume`` continues from, so it is written last, after
    the numbered and best checkpoints, the epoch's pictures and its ``log.txt`` line. A crash anywhere in between
    leaves the previous ``checkpoint-last.pth``: the resumed run trains that epoch again (bit-identically) and
    rewrites every output; :meth:`resume` first drops ``log.txt`` lines of epochs after the checkpoint so that no
    epoch is logged twice. Stale temporary files of a killed writer are removed at start.

    Calls are collective (every rank calls them, only ``enabled`` writes): all ranks raise together on a
    non-finite state, and mid-epoch checkpoints gather every rank's random state.

    Args:
        output_dir: the run folder.
        epochs: epochs of the run (the last one always gets a numbered checkpoint).
        save_every: numbered checkpoint every this many epochs.
        enabled: write files (rank 0).
        log_epoch: appends one JSON line to ``log.txt`` (``MetricWriter.log_epoch``).
    """

    def __init__(self, output_dir: str | Path, *, epochs: int, save_every: int, enabled: bool = True,
                 log_epoch: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.output_dir, self.epochs, self.save_every = Path(output_dir), epochs, save_every
        self.enabled, self.log_epoch = enabled, log_epoch
        if enabled:
            from util.outputs import clean_temp_files  # checkpoints', pictures' and logs' temp files alike
            clean_temp_files(self.output_dir)

    def __enter__(self) -> RunCheckpoints:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        """A :class:`NonFiniteError` from the loop leaves the folder as it was: say which checkpoint is good."""
        if isinstance(exc, NonFiniteError) and not isinstance(exc, NonFiniteStateError):
            raise type(exc)(f"{exc} {self._last_good()}") from exc

    def _last_good(self) -> str:
        latest = find_latest(self.output_dir)
        return (f"The last good checkpoint, {latest}, is left as it was; resume from it with a lower --blr/--lr, "
                f"--clip_grad or --amp bf16." if latest else "No checkpoint was written.")

    # -------------------------------------------------------------------------------------------------- resume
    def resume(self, resume: str | Path | None, *, auto: bool, model: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, sync: Callable[[int], Any], steps_per_epoch: int,
               required: tuple[str, ...] = ("model", "optimizer", "epoch"), hint: str = "",
               describe: MismatchDescriber = describe_problems) -> dict[str, Any] | None:
        """``--resume PATH`` or ``--auto_resume`` (newest readable checkpoint of the folder) through
        :func:`resume_training`; None when there is nothing to resume. Drops later epochs' ``log.txt`` lines."""
        checkpoint = None
        if not resume and auto:
            found = load_latest(self.output_dir)
            if found is None:
                logger.info("--auto_resume: no checkpoint in %s, starting from scratch", self.output_dir)
            else:
                resume, checkpoint = found
        if not resume:
            if self.enabled:  # a fresh start (or a run killed before its first checkpoint): its epochs start again
                self._trim_log(-1)
            return None
        checkpoint = resume_training(resume, model, optimizer, scaler, sync=sync, steps_per_epoch=steps_per_epoch,
                                     required=required, hint=hint, checkpoint=checkpoint, describe=describe)
        if self.enabled:
            self._trim_log(int(checkpoint["epoch"]))
        return checkpoint

    def _trim_log(self, last_epoch: int) -> None:
        """Keep only the ``log.txt`` lines of epochs up to ``last_epoch`` (the resumed run writes the others)."""
        path = self.output_dir / "log.txt"
        if not path.is_file():
            return
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                epoch = json.loads(line).get("epoch")
            except (json.JSONDecodeError, AttributeError):
                dropped += 1  # a line cut short by a crash
                continue
            if isinstance(epoch, int) and epoch > last_epoch:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            logger.info("log.txt: dropped %d line(s) after epoch %d; the resumed run writes them again", dropped,
                        last_epoch)
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))

    # ---------------------------------------------------------------------------------------------------- save
    def check_finite(self, state: dict[str, Any], where: str) -> None:
        """Raise :class:`NonFiniteStateError` when ``state``'s weights or optimizer state are not finite."""
        bad = non_finite_tensors({"model": state["model"], "optimizer": state.get("optimizer", {})})
        if bad:
            raise NonFiniteStateError(
                f"{where}: {len(bad)} tensor(s) of the weights or optimizer state are NaN or infinite "
                f"({shortlist(bad, 4)}); nothing is saved. {self._last_good()}")
        # weights can blow up to huge finite values (--lr 1e30) whose outputs overflow: the validation metrics
        # the epoch is judged by are then NaN, and such an epoch is neither saved nor ever the best
        bad = non_finite_numbers({key: state[key] for key in ("metrics", "best") if key in state})
        if bad:
            largest = max((float(v.detach().abs().max()) for v in state["model"].values()
                           if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()), default=0.0)
            raise NonFiniteStateError(
                f"{where}: the validation metric(s) {shortlist(bad, 4)} are NaN or infinite: the run has blown up "
                f"(largest weight magnitude {largest:.3g}); nothing is saved. {self._last_good()}")

    def end_epoch(self, epoch: int, state: dict[str, Any], *, log: dict[str, Any], is_best: bool = False,
                  extra_outputs: Callable[[], Any] | None = None) -> None:
        """Every output of a finished epoch, ``checkpoint-last.pth`` last (see the class docstring).

        Args:
            epoch: the epoch just finished (``state['epoch']``).
            state: from :func:`training_state`.
            log: the epoch's ``log.txt`` line.
            is_best: also write ``checkpoint-best.pth``.
            extra_outputs: writes the epoch's other files (pictures) before ``checkpoint-last.pth``.
        """
        self.check_finite(state, f"epoch {epoch}")
        if not self.enabled:
            return
        if (epoch + 1) % self.save_every == 0 or epoch + 1 == self.epochs:
            save_checkpoint(self.output_dir / f"checkpoint-{epoch}.pth", state)
        if is_best:
            save_checkpoint(self.output_dir / "checkpoint-best.pth", state)
        if extra_outputs is not None:
            extra_outputs()
        if self.log_epoch is not None:
            self.log_epoch(log)
        save_checkpoint(self.output_dir / LAST_NAME, state)

    def save_position(self, state: dict[str, Any], position: dict[str, Any]) -> Path:
        """``checkpoint-last.pth`` inside an epoch (``--save_every_steps``, preemption): ``state`` of the last
        finished epoch's keys plus ``position`` (an ``EpochProgress.state_dict()``) and every rank's random state,
        from which ``engine.train.resume_position`` continues the epoch exactly."""
        from util.distributed import all_gather_object
        rngs = all_gather_object(capture_rng())
        path = self.output_dir / LAST_NAME
        self.check_finite(state, f"epoch {position['epoch']}, update {position['update']}")
        if self.enabled:
            save_checkpoint(path, {**state, "position": position, "rng_per_rank": rngs})
            logger.info("saved %s at step %d (update %d of epoch %d)", path, state["step"], position["update"],
                        position["epoch"])
        return path


def restore_position_rng(checkpoint: dict[str, Any], rank: int, world_size: int) -> None:
    """Put this rank's random state back as it was when a mid-epoch checkpoint was saved."""
    rngs = checkpoint.get("rng_per_rank") or []
    if len(rngs) == world_size:
        restore_rng(rngs[rank])
    else:
        logger.warning("mid-epoch checkpoint from %d process(es), this run has %d: per-rank random state (drop "
                       "path, mixup) not restored; samples, crops and masks are still the same", len(rngs), world_size)

"""Run setup: seeds, backend flags, output folder (created, locked for the run) and the record of what ran.

Every run writes, into its output folder, the exact command line, the resolved arguments (``args.yaml``,
loadable as a recipe), git commit and dirty flag, library versions and devices (``run_info.json``),
as DINOv2 and modded-nanogpt do at start.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np
import torch

from util.distributed import DistInfo, init_distributed, resolve_device
from util.keys import shortlist
from util.logging import format_eta, setup_logging
from util.outputs import disk_full_message, replace_link, write_text
import yaml

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

logger = logging.getLogger("vitfreeze")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp``: ``auto`` = bf16 on CUDA (fp16 where bf16 is missing), None (fp32) on CPU."""
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return AMP_DTYPES[name]


def setup_run(args: argparse.Namespace) -> DistInfo:
    """The start of every run: join the process group (``--dist_url``, ``--local_rank``, ``--device``), lock
    ``--output_dir`` on rank 0 (:func:`lock_output_dir`), log to the console and, on rank 0, to
    ``<output_dir>/cli_logs.txt``, refuse a fresh start over another run's checkpoints unless ``--overwrite``,
    and set the backend flags. Seeding stays with the scripts, which differ in what must match across ranks.

    Raises:
        ValueError: the output folder is a file, not writable, locked by a live run, or holds checkpoints of a
            run this one would silently replace.
    """
    global _run_folder
    if getattr(args, "dry_run", None):
        return start_dry_run(args)
    info = init_distributed(dist_url=args.dist_url, local_rank=args.local_rank, device=args.device)
    if info.is_main:  # before the first log line goes into the folder: a second run must not append to ours
        _run_folder = Path(args.output_dir)
        lock_output_dir(args.output_dir)
    setup_logging(args.output_dir if info.is_main else None, info.rank)
    if info.is_main:
        refuse_fresh_run_over_checkpoints(args)
    set_backend_flags()
    choose_threads(args, info)
    return info


def start_dry_run(args: argparse.Namespace) -> DistInfo:
    """``setup_run`` of a ``--dry_run`` pre-flight (``util.preflight``): this process's place in the job from
    torchrun's variables without joining a process group, the meta device, console logging only, and the checks
    of the output folder that need no write (a file in its place; another run's checkpoints)."""
    from util import preflight
    from util.distributed import env_rank_and_world
    from util.launch import planned_world_size

    rank, world = (env_rank_and_world() or (0, 1))[0], planned_world_size(args)  # a job to submit: its size
    setup_logging(None, rank)
    refuse_file_as_output_dir(Path(args.output_dir))
    refuse_fresh_run_over_checkpoints(args)
    try:
        resolve_device(getattr(args, "device", "auto"), 0)
    except ValueError as err:  # a pre-flight on a login node checks a GPU job: the device is the run's concern
        logger.warning("%s (the run needs one; this dry run goes on without)", err)
    preflight.begin(args)
    return DistInfo(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    device=preflight.META)


# ------------------------------------------------------------------------------------------------ run-folder lock
LOCK_NAME = ".run.lock"
_held_lock: tuple[Path, int] | None = None  # (folder, fd) of the lock this process holds: one run at a time


def lock_output_dir(output_dir: str | Path) -> Path:
    """Create ``output_dir`` and lock it for the life of this process's run (rank 0 only).

    The lock is ``fcntl.flock`` on ``<output_dir>/.run.lock``, which holds the pid and host of its owner; the
    kernel drops it when the process ends (also on ``kill -9``), so a dead run never blocks the folder. A process
    that locks another folder (tests run several ``main`` calls) first releases its previous one; locking the
    folder it already holds is a no-op, and so is a folder held by an ancestor process (a test or notebook that
    ran in the folder in-process, then started this process there: it waits for us, so its run is over). On a
    file system without ``flock`` support (some NFS setups) the run goes on with a warning.

    Returns:
        The folder.

    Raises:
        ValueError: ``output_dir`` is a file or cannot be created or written, or another live run holds it.
    """
    global _held_lock
    path = Path(output_dir)
    refuse_file_as_output_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path)
        raise ValueError(f"--output_dir {path} cannot be created: {blocker} is a file, not a folder; choose "
                         "another --output_dir") from None
    except OSError as err:
        raise ValueError(f"--output_dir {path} cannot be created ({err.strerror}); choose a writable folder or fix "
                         "its permissions") from None
    if _held_lock is not None and _held_lock[0] == path.resolve():
        return path
    release_output_lock()
    try:
        replace_link(path / LOCK_NAME)  # a link would lock (and truncate) a file outside the folder
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as err:  # EACCES, EROFS
        raise ValueError(f"--output_dir {path} is not writable ({err.strerror}); choose a writable folder or fix "
                         "its permissions") from None
    if fcntl is None:
        logger.warning("no fcntl on this platform: %s is not locked against a second run", path)
        os.close(fd)
        return path
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that has not written its pid yet"
        os.close(fd)
        owner = int(holder.split()[1]) if holder.startswith("pid ") and holder.split()[1].isdigit() else None
        if owner is not None and owner in _ancestors():
            # the process that started this one (a test, a notebook) ran in this folder in-process before: its
            # run is over, since it is waiting for this one; a third run is still stopped by its lock
            logger.info("%s is locked by pid %d, which started this process: going on", path, owner)
            return path
        raise ValueError(f"--output_dir {path} is in use by another run ({holder}); wait for it to end, stop it, or "
                         "choose another --output_dir") from None
    except OSError as err:  # ENOLCK / EOPNOTSUPP: the file system does not lock
        logger.warning("cannot lock %s (%s): a second run into this folder will not be detected", path, err.strerror)
        os.close(fd)
        return path
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {platform.node()}, since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _held_lock = (path.resolve(), fd)
    return path


def _ancestors() -> set[int]:
    """Pids of this process's parent, its parent, ... (Linux ``/proc``; elsewhere the parent only)."""
    pids, pid = set(), os.getppid()
    while pid > 1 and pid not in pids and len(pids) < 64:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as handle:  # "pid (comm) state ppid ...", comm may hold spaces
                pid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def release_output_lock() -> None:
    """Release this process's run-folder lock, if any (the kernel also does it when the process ends)."""
    global _held_lock
    if _held_lock is not None:
        os.close(_held_lock[1])  # closing the only descriptor drops the flock
        _held_lock = None


def refuse_file_as_output_dir(path: Path) -> None:
    """ValueError when ``--output_dir`` names a file (the run's lock and the dry run's check)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output_dir {path} is a file, not a folder: choose another --output_dir")


def refuse_fresh_run_over_checkpoints(args: argparse.Namespace) -> None:
    """:func:`refuse_fresh_over_checkpoints` for the run ``args`` describe (fresh unless ``--resume`` /
    ``--auto_resume``; ``--overwrite``), the run's and the dry run's check alike."""
    refuse_fresh_over_checkpoints(args.output_dir, fresh=not (getattr(args, "resume", "") or
                                  getattr(args, "auto_resume", False)), overwrite=getattr(args, "overwrite", False))


def refuse_fresh_over_checkpoints(output_dir: str | Path, *, fresh: bool, overwrite: bool) -> None:
    """A fresh run (no ``--resume`` / ``--auto_resume``) must not silently replace another run's checkpoints.

    Raises:
        ValueError: ``output_dir`` (or one of its ``fold_*`` folders) holds ``checkpoint-*.pth`` files and
            neither ``fresh`` is False nor ``overwrite`` is set.
    """
    path = Path(output_dir)
    found = sorted(path.glob("checkpoint-*.pth")) + sorted(path.glob("fold_*/checkpoint-*.pth"))
    if not fresh or not found:
        return
    names = shortlist((p.relative_to(path) for p in found), 4)
    if not overwrite:
        raise ValueError(f"--output_dir {path} already holds checkpoints ({names}): add --auto_resume to continue "
                         "that run, --resume CKPT to start from one, --overwrite to replace them, or choose another "
                         "--output_dir")
    logger.warning("--overwrite: this run replaces the checkpoints in %s (%s)", path, names)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def choose_threads(args: argparse.Namespace, info: DistInfo) -> int:
    """Set and log torch's intra-op CPU thread count: ``--threads`` if given, else ``OMP_NUM_THREADS`` if set, else
    a choice from the work: 1 for tiny models (ViT-Ti, or inputs of 64 px or less, which gain nothing from
    threads and lose much when the cores are shared: the demo epoch took 122 s with the default against 9.6 s
    with one thread on a loaded 2-core machine), otherwise the cores of this process's share left after its
    loader workers (cores // processes // (workers + 1)). On CUDA only an explicit ``--threads`` changes anything.
    """
    requested = getattr(args, "threads", None)
    workers = getattr(args, "num_workers", 0) or 0
    share = max(1, available_cores() // max(1, info.world_size))
    if requested:
        threads, why = requested, "--threads"
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads, why = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    elif info.device.type == "cuda":
        return torch.get_num_threads()
    elif "tiny" in str(getattr(args, "model", "")) or getattr(args, "input_size", 224) <= 64:
        threads, why = 1, "tiny model"
    else:
        threads, why = max(1, share // (workers + 1)), f"{share} core(s) per process, {workers} loader worker(s)"
    torch.set_num_threads(threads)
    logging.getLogger("vitfreeze").info("CPU threads: %d per process (%s; --threads N overrides)", threads, why)
    return threads


def set_backend_flags() -> None:
    """TF32 matmuls/convs on Ampere+ (MAE-scale runs are bandwidth bound; accuracy unaffected in practice)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def git_state(root: Path | None = None) -> dict[str, Any]:
    """Commit sha and dirty flag of the source tree, or nulls outside a git checkout."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip())
        return {"git_sha": sha, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def run_record(argv: list[str] | None = None) -> dict[str, Any]:
    """Provenance of this process: command line, versions, devices, git state."""
    import timm
    import torchvision
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "command": " ".join([sys.executable, *(sys.argv if argv is None else [sys.argv[0], *argv])]),
        **git_state(),
        "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
        "numpy": np.__version__,
        "host": platform.node(),
        "devices": devices or ["cpu"],
    }


def write_run_record(output_dir: str | Path, resolved_args: dict[str, Any], derived: dict[str, Any],
                     argv: list[str] | None = None) -> dict[str, Any]:
    """Write ``args.yaml`` (resolved arguments) and ``run_info.json`` (provenance + derived values)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text(output_dir / "args.yaml", yaml.safe_dump(resolved_args, sort_keys=True))
    record = {**run_record(argv), "derived": derived}
    write_text(output_dir / "run_info.json", json.dumps(record, indent=2) + "\n")
    return record


_run_folder: Path | None = None  # --output_dir of this process's run (rank 0), for the end-of-run summary


def log_run_summary(seconds: float, result: Any) -> None:
    """The last lines of a run: wall-clock time, the headline metrics of ``main()``'s result (``best_*`` keys first,
    else every number it returned, at most 8) and where the outputs are (rank 0 only)."""
    if _run_folder is None:
        return
    numbers = {k: v for k, v in (result or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    best = {k: v for k, v in numbers.items() if k.startswith("best")} or numbers
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in list(best.items())[:8])
    names = sorted(p.name for p in _run_folder.iterdir() if not p.name.startswith(".")) if _run_folder.is_dir() else []
    log = logging.getLogger("vitfreeze")
    log.info("run finished in %.1f s (%s)%s", seconds, format_eta(seconds), f"; {shown}" if shown else "")
    log.info("outputs in %s: %s", _run_folder, ", ".join(names) if names else "(none)")


def process_rank() -> int:
    """This process's rank: the process group's when it is up, else torchrun's ``RANK`` (0 for a plain process)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    text = os.environ.get("RANK", "0")
    return int(text) if text.isdigit() else 0


class CommandLineError(Exception):
    """A command that cannot run, found after the command line was parsed (a missing file, a value that does not
    fit the job): one line, exit status 2, no usage block."""


def command_line_error(message: str) -> NoReturn:
    """``parser.error`` without the usage block, said once per job: print ``error: message`` on rank 0 (the other
    ranks of a torchrun job exit silently with the same status), then exit with status 2 (argparse's)."""
    if process_rank() == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def quiet_on_other_ranks(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse's own errors (an unknown flag, a bad value) said once per torchrun job: on ranks other than 0 the
    parser exits with the same status (2) without printing its usage and message."""
    if process_rank() != 0:
        parser.print_usage = lambda file=None: None  # type: ignore[method-assign]
        parser.exit = lambda status=0, message=None: sys.exit(status)  # type: ignore[method-assign]
    return parser


def run_cli(main: Callable[[], Any], *errors: type[BaseException]) -> None:
    """Run an entry script's ``main()``: a user error (bad path, bad value, ``errors``) becomes one log line and
    exit status 1 instead of a traceback (:class:`CommandLineError`: status 2); the process group is always torn
    down. Under torchrun rank 0 says it; the other ranks exit with the same status and log it at debug level."""
    from util.distributed import cleanup

    from util.checkpoint import NonFiniteError
    from util.data.folder import CorruptImageError

    def say(error: BaseException, message: str) -> NoReturn:  # once per job: rank 0 logs it, the others at debug
        level = logging.ERROR if process_rank() == 0 else logging.DEBUG
        logging.getLogger("vitfreeze").log(level, "%s: %s", type(error).__name__, message)
        sys.exit(1)

    started = time.time()
    try:
        result = main()
        log_run_summary(time.time() - started, result)
    except CommandLineError as error:
        if process_rank() == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (FileNotFoundError, ValueError, CorruptImageError, NonFiniteError, *errors) as error:
        message = str(error)
        if message.startswith("Caught ") and "Original Traceback" in message:  # re-raised from a loader worker
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        say(error, message)
    except (OSError, RuntimeError) as error:  # a full disk, said in one line; anything else stays a traceback
        message = disk_full_message(error, _run_folder or "the output folder")
        if message is None:
            raise
        say(error, message)
    finally:
        cleanup()

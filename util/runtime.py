"""Run setup: seeds, backend flags, output folder and the record of what ran.

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
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from util.distributed import DistInfo, init_distributed
from util.logging import setup_logging
import yaml


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
    """The start of every run: join the process group (``--dist_url``, ``--local_rank``, ``--device``), log to
    the console and, on rank 0, to ``<output_dir>/cli_logs.txt``, and set the backend flags. Seeding stays with
    the scripts, which differ in what must match across ranks."""
    info = init_distributed(dist_url=args.dist_url, local_rank=args.local_rank, device=args.device)
    setup_logging(args.output_dir if info.is_main else None, info.rank)
    set_backend_flags()
    choose_threads(args, info)
    return info


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
    (output_dir / "args.yaml").write_text(yaml.safe_dump(resolved_args, sort_keys=True))
    record = {**run_record(argv), "derived": derived}
    (output_dir / "run_info.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_cli(main: Callable[[], Any], *errors: type[BaseException]) -> None:
    """Run an entry script's ``main()``: a user error (bad path, bad value, ``errors``) becomes one log line and
    exit status 1 instead of a traceback; the process group is always torn down."""
    from util.distributed import cleanup

    try:
        main()
    except (FileNotFoundError, ValueError, *errors) as error:
        logging.getLogger("vitfreeze").error("%s: %s", type(error).__name__, error)
        sys.exit(1)
    finally:
        cleanup()

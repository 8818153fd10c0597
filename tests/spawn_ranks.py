"""Helpers for the tests that run several gloo processes on this CPU (imported by test modules; the child processes
find this module through the ``sys.path`` that multiprocessing hands down)."""
from __future__ import annotations

import os
import socket
from typing import Callable, Sequence

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Children are forked from one server process that imported these once per session ("forkserver"), instead of
# each starting a fresh interpreter that imports torch and the scripts again (seconds of CPU per rank). The server
# has run no torch work, so forking it is safe; each child still gets the caller's sys.path and working directory
# (multiprocessing's preparation data) and, below, its environment.
PRELOAD = ["torch", "torchvision", "timm", "main_pretrain", "main_finetune", "main_knn", "main_linprobe",
           "main_detect", "main_segment", "spawn_ranks"]


def _entry(rank: int, world: int, port: int, environ: dict, fn: Callable, args: Sequence) -> None:
    os.environ.clear()
    os.environ.update(environ)  # the caller's environment now, not the server's at its start
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from util.distributed import cleanup
    try:
        fn(rank, *args)
        import torch.distributed as dist
        if dist.is_initialized():  # every rank done before any tears down: gloo can abort a peer that is closing
            dist.barrier()
    finally:
        cleanup()


def spawn(fn: Callable, *args, world: int = 2) -> None:
    """Run ``fn(rank, *args)`` in ``world`` processes with torchrun's environment (env://, gloo on CPU);
    ``fn`` must be importable (module level). Raises if any process fails."""
    mp.set_forkserver_preload(PRELOAD)  # read when the server starts (the first call of a session)
    mp.start_processes(_entry, args=(world, free_port(), dict(os.environ), fn, args), nprocs=world, join=True,
                       start_method="forkserver")


def main_of(module: str, argv: Sequence[str]) -> Callable[[int], None]:
    """``fn`` for ``spawn`` that runs ``<module>.main(argv)`` on every rank."""
    import functools
    return functools.partial(_run_main, module, list(argv))


def _run_main(module: str, argv: list[str], rank: int) -> None:
    import importlib
    importlib.import_module(module).main(argv)

"""Helpers for the tests that run several gloo processes on this CPU (imported by test modules; spawned
children find this module through the ``sys.path`` that multiprocessing's spawn hands down)."""
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


def _entry(rank: int, world: int, port: int, fn: Callable, args: Sequence) -> None:
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
    """Run ``fn(rank, *args)`` in ``world`` fresh processes with torchrun's environment (env://, gloo on CPU);
    ``fn`` must be importable (module level). Raises if any process fails."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True, start_method="spawn")


def main_of(module: str, argv: Sequence[str]) -> Callable[[int], None]:
    """``fn`` for ``spawn`` that runs ``<module>.main(argv)`` on every rank."""
    import functools
    return functools.partial(_run_main, module, list(argv))


def _run_main(module: str, argv: list[str], rank: int) -> None:
    import importlib
    importlib.import_module(module).main(argv)

"""CPU threads per process: chosen from the cores, the loader workers and the processes, logged; OMP_NUM_THREADS
and --threads respected; CUDA runs keep torch's own; the default loader workers capped to the cores."""
from __future__ import annotations

import logging

import pytest

import main_knn
import main_pretrain
from util.args import parse_args


@pytest.fixture
def keep_threads():
    import torch
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("argv, env, cores, world, expected", [
    (["--model", "MIM_vit_tiny_patch16"], None, 8, 1, 1),                    # tiny: one thread
    (["--model", "MIM_vit_base_patch16", "--input_size", "64"], None, 8, 1, 1),   # tiny inputs too
    (["--model", "MIM_vit_base_patch16", "--num_workers", "3"], None, 8, 1, 2),   # 8 // (3 + 1)
    (["--model", "MIM_vit_base_patch16", "--num_workers", "0"], None, 8, 2, 4),   # 8 cores / 2 processes
    (["--model", "MIM_vit_base_patch16", "--num_workers", "4"], None, 2, 1, 1),   # never 0
    (["--model", "MIM_vit_tiny_patch16"], "3", 8, 1, 3),                      # OMP_NUM_THREADS is respected
    (["--model", "MIM_vit_tiny_patch16", "--threads", "2"], "3", 8, 1, 2),    # --threads wins
])
def test_cpu_threads_are_chosen_and_logged(argv, env, cores, world, expected, monkeypatch, caplog, keep_threads):
    import torch
    import util.runtime as runtime
    from util.distributed import DistInfo

    monkeypatch.setattr(runtime, "available_cores", lambda: cores)
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    args = parse_args(main_pretrain.build_parser(), ["--data_path", "demo", "--warmup_epochs", "0", *argv])
    with caplog.at_level(logging.INFO, logger="vitfreeze"):
        assert runtime.choose_threads(args, DistInfo(world_size=world)) == expected
    assert torch.get_num_threads() == expected
    assert any(r.getMessage().startswith(f"CPU threads: {expected} per process") for r in caplog.records)


def test_cuda_keeps_torch_threads_unless_asked(monkeypatch, keep_threads):
    import torch
    from util.distributed import DistInfo
    from util.runtime import choose_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    args = parse_args(main_pretrain.build_parser(), ["--data_path", "demo", "--model", "MIM_vit_tiny_patch16"])
    assert choose_threads(args, DistInfo(device=torch.device("cuda", 0))) == 2


def test_default_loader_workers_are_capped_to_the_cores(monkeypatch):
    from util.args import groups  # the default is read where the flag is defined

    monkeypatch.setattr(groups, "available_cores", lambda: 2)
    assert main_knn.build_parser().get_default("num_workers") == 2  # 10 workers on 2 cores: DataLoader warns
    assert main_pretrain.build_parser().get_default("num_workers") == 2
    monkeypatch.setattr(groups, "available_cores", lambda: 64)
    assert main_knn.build_parser().get_default("num_workers") == 10


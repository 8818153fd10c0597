"""Shared fixtures: one intra-op thread, a small demo dataset for end-to-end runs of the evaluation scripts, and the
demo pretraining run once per session."""
import contextlib
import os
from pathlib import Path

import pytest
import torch

import util.data.transfer
import main_pretrain
from util.data.demo import DemoDataset


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): the cores this process may run on (its affinity mask: a container's or
    taskset's share, not the host's count), at most 4; each worker imports torch and holds its own fixtures."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow (minutes each)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (end-to-end checks of measured claims that take minutes) run only with --runslow."""
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def torch_threads(count: int):
    """``count`` intra-op threads inside the block, the previous number after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models run several times faster so on a shared, loaded CPU."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """``one_thread`` for a whole module, its module-scoped fixtures included (``pytest.mark.usefixtures``)."""
    with torch_threads(1):
        yield


@pytest.fixture
def small_demo(monkeypatch, one_thread):
    """``--data_set demo`` with 16 images per class (128 per split) at 32 px, so a k-NN or probe run takes seconds."""
    def build(name, root, split, transform, **options):
        assert name == "demo"
        return DemoDataset(per_class=16, size=32, seed=0 if split == "train" else 1, transform=transform)
    monkeypatch.setattr(util.data.transfer, "build_dataset", build)


@pytest.fixture(scope="session")
def make_demo_folder(tmp_path_factory):
    """``make_demo_folder(train, val)``: the demo classes as an ImageFolder tree of 32 x 32 PNGs, ``train`` images
    per class in ``train/`` (seed 0) and ``val`` in ``val/`` (seed 1), in a new folder."""
    def build(train: int, val: int) -> Path:
        root = tmp_path_factory.mktemp("demo_folder")
        for split, seed, per_class in (("train", 0, train), ("val", 1, val)):
            data = DemoDataset(per_class=per_class, size=32, seed=seed)
            for i in range(len(data)):
                img, label = data[i]
                folder = root / split / data.classes[label]
                folder.mkdir(parents=True, exist_ok=True)
                img.save(folder / f"{i:03d}.png")
        return root
    return build


# ---- tiny command lines of the end-to-end tests; argparse keeps a flag's last value, so a test's own flags after
# these override them
def tiny_pretrain(*extra: str, model: str = "mae_vit_tiny_patch16") -> list[str]:
    """main_pretrain on the demo subset (--debug: 64 images, batch 16: 4 updates an epoch) at 32 px, no workers."""
    return ["--model", model, "--input_size", "32", "--batch_size", "16", "--num_workers", "0", "--data_path", "demo",
            "--debug", *extra]


def tiny_finetune(data, out, *extra: str) -> list[str]:
    """main_finetune of ViT-Ti/16 at 32 px on the ImageFolder tree ``data`` (``make_demo_folder``), no workers."""
    return ["--model", "vit_tiny_patch16", "--data_path", str(data), "--input_size", "32", "--num_workers", "0",
            "--output_dir", str(out), *extra]


def tiny_demo_eval(*extra: str) -> list[str]:
    """main_knn / main_linprobe of ViT-Ti/16 at 32 px on ``--data_set demo`` (``small_demo``), no workers."""
    return ["--data_set", "demo", "--model", "vit_tiny_patch16", "--input_size", "32", "--num_workers", "0", *extra]


@pytest.fixture(scope="module")
def ft_folder(make_demo_folder) -> Path:
    """Fine-tuning data of tests/script_runs.py: 4 train and 2 val demo images per class (32 and 16)."""
    return make_demo_folder(4, 2)


@pytest.fixture(scope="module")
def seg_scenes(tmp_path_factory) -> Path:
    """Segmentation data of tests/script_runs.py: 16 train and 2 val synthetic ADE20K scenes of 64 px."""
    from util.data.scenes import write_ade20k
    root = tmp_path_factory.mktemp("seg_scenes")
    write_ade20k(root, 16, 2, 64, seed=0, class_colours=True)
    return root


@pytest.fixture
def script_data(request, monkeypatch):
    """``script_data(script)``: the data of a tests/script_runs.py script (its fixture; linear probing reads the
    small demo set, ``small_demo``), in the repository root, where the configs/ paths of its argv resolve."""
    def get(script):
        monkeypatch.chdir(Path(__file__).resolve().parent.parent)
        if script.name == "main_linprobe":
            request.getfixturevalue("small_demo")
        return request.getfixturevalue(script.data) if script.data else ""
    return get


@pytest.fixture(scope="session")
def demo_pretraining(tmp_path_factory) -> tuple[Path, dict]:
    """The demo pretraining recipe, unchanged (configs/pretrain/demo.yaml, seed 0, ~45 s on one thread), run once and
    shared by the tests that compare it with a random backbone. Returns (checkpoint-last.pth, main()'s result)."""
    out = tmp_path_factory.mktemp("demo_pretraining")
    recipe = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "demo.yaml"
    with torch_threads(1):
        result = main_pretrain.main(["--config", str(recipe), "--vis_every", "0", "--output_dir", str(out)])
    return out / "checkpoint-last.pth", result


@pytest.fixture(autouse=True)
def _detach_run_log_files():
    """An in-process run leaves its ``cli_logs.txt`` handler on the ``vitfreeze`` logger (the next run replaces it);
    pytest deletes a passing test's folder, so a later test's first log line would reopen a file in a folder that no
    longer exists. Each test starts and ends without one."""
    yield
    import logging
    logger = logging.getLogger("vitfreeze")
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(handler)
        handler.close()


SESSION_DIRS = ("demo_pretraining",)  # folders of session-scoped fixtures: they outlive every module


@pytest.fixture(scope="module", autouse=True)
def _remove_module_folders(tmp_path_factory):
    """Folders that a module's fixtures made (``tmp_path_factory.mktemp``: pretrained checkpoints, unbroken reference
    runs) are removed when the module ends, so the suite's temporary folder holds one module's files at a time;
    each test's own ``tmp_path`` goes by the retention policy (removed when it passes)."""
    import shutil
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    for path in set(base.iterdir()) - before:
        keep = path.name.startswith(("test_", *SESSION_DIRS)) or path.is_symlink()  # tests' own: by retention
        if path.is_dir() and not keep:
            shutil.rmtree(path, ignore_errors=True)

"""run.sh: task table, argument mapping and refusals (dry runs only: nothing trains)."""
import os
import runpy
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def mirror_checkout(folder: Path) -> Path:
    """The checkout seen through symlinks in ``folder``: run.sh works from its own folder (``cd $(dirname $0)``), so
    its ``output/`` lands there instead of in the real checkout."""
    mirror = folder / "checkout"
    mirror.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("output", ".git"):
            (mirror / entry.name).symlink_to(entry)
    return mirror


def runner(checkout: Path):
    def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(checkout / "run.sh"), *args], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **(env or {})})
    return run


@pytest.fixture
def checkout(tmp_path) -> Path:
    return mirror_checkout(tmp_path)


@pytest.fixture
def run_sh(checkout):
    return runner(checkout)


@pytest.fixture
def job():
    return f"test_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def run_sh_replayed(checkout, tmp_path, monkeypatch, capsys):
    """run.sh with stand-in ``python`` / ``torchrun`` executables that record the commands it starts, each command
    then run in this process (``runpy``, as its ``__main__``; the scripts are imported already, so no interpreter
    start-up and no torch import per command). Returns what ``run_sh`` returns, with each command's output placed
    after run.sh's ``[run.sh] <command>`` line, as a real run prints it. For the commands of a ``--dry_run`` chain,
    which run.sh starts without its own pre-flight."""
    log, bin_dir = tmp_path / "calls", tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "torchrun"):
        (bin_dir / name).write_text(f'#!/bin/sh\n{{ printf "%s\\0" "{name}" "$@"; printf "\\n\\0"; }} >> {log}\n')
        (bin_dir / name).chmod(0o755)

    def replay(call: list[str]) -> str:
        world = 1
        if call[0] == "torchrun":
            world = int(next(a for a in call if a.startswith("--nproc_per_node=")).split("=")[1])
            call = ["python", *call[next(i for i, a in enumerate(call) if a.endswith(".py")):]]
        if world > 1:
            monkeypatch.setenv("RANK", "0")
            monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setattr(sys, "argv", call[1:])
        with monkeypatch.context() as m:
            m.chdir(checkout)  # the recipes' paths are relative to run.sh's folder
            try:
                runpy.run_path(str(checkout / call[1]), run_name="__main__")
            except SystemExit as exc:
                assert not exc.code, capsys.readouterr().err
        for key in ("RANK", "WORLD_SIZE"):
            monkeypatch.delenv(key, raising=False)
        return capsys.readouterr().out

    def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        res = runner(checkout)(*args, env={"PATH": f"{bin_dir}:{os.environ['PATH']}", **(env or {})})
        calls = [c.split("\0")[:-1] for c in log.read_text().split("\n\0") if c.strip("\0")] if log.exists() else []
        log.unlink(missing_ok=True)
        outputs, lines = iter([replay(c) for c in calls]), []
        for line in res.stdout.splitlines(keepends=True):
            lines.append(line)
            if line.startswith("[run.sh] ") and (" main_" in line or " run_" in line):
                lines.append(next(outputs))
        return subprocess.CompletedProcess(res.args, res.returncode, "".join(lines), res.stderr)
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    return run


def test_help_lists_tasks(run_sh):
    res = run_sh("--help")
    assert res.returncode == 0
    for task in ("pretrain_demo", "pretrain_localmim_vit_base_freezeout_cubic_t0.8_100e", "imagenet_finetune",
                 "linprobe", "knn", "cifar10_cls", "hyperkvasir_cls"):
        assert task in res.stdout


def test_refusals(run_sh, checkout, job):
    for args, msg in [((job, "nope", "base", "0"), "unknown task 'nope'"),
                      ((job, "pretrain_demo+ade20kv_seg", "base", "0"), "not supported yet"),
                      ((job, "pretrain_demo", "base"), "expected JOB_NAME TASK MODEL NGPUS"),
                      ((job, "pretrain_demo", "base", "two"), "NGPUS must be a number")]:
        res = run_sh(*args)
        assert res.returncode == 2 and msg in res.stderr, (args, res.stderr)
    assert not (checkout / "output" / job).exists()  # nothing started


def test_pretrain_dry_run_maps_arguments(run_sh_replayed, job):
    res = run_sh_replayed(job, "pretrain_demo", "small", "0", "epochs=3", "--dry_run=config")
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout[res.stdout.index("\n") + 1:])  # first line echoes the command
    assert resolved["model"] == "MIM_vit_small_patch16"  # the demo recipe is LocalMIM
    assert resolved["epochs"] == 3  # the key=value override wins over the recipe's 10
    assert resolved["output_dir"] == f"output/{job}/pretrain_demo" and resolved["auto_resume"] is True
    assert resolved["input_size"] == 64  # from the recipe


def test_checkpoint_goes_to_finetune_for_transfer_tasks(run_sh_replayed, job, tmp_path):
    (tmp_path / "ckpt.pth").write_bytes(b"")  # --dry_run checks that it exists
    res = run_sh_replayed(job, "linprobe", "vit_tiny_patch16", "0", str(tmp_path / "ckpt.pth"), f"data_path={tmp_path}",
                          "--dry_run=config")
    assert res.returncode == 0, res.stderr
    assert f"--finetune {tmp_path / 'ckpt.pth'}" in res.stdout.splitlines()[0]


def test_a_missing_dataset_is_caught_before_anything_starts(run_sh, checkout, job, tmp_path):
    res = run_sh(job, "imagenet_finetune", "base", "8", f"data_path={tmp_path / 'imagenet'}")
    assert res.returncode == 2 and f"--data_path {tmp_path / 'imagenet'} does not exist" in res.stderr
    assert "usage:" not in res.stderr and not (checkout / "output" / job).exists()


def test_a_chain_is_checked_before_anything_starts(run_sh, checkout, job):
    """3 GPUs cannot keep the LocalMIM recipe's effective batch 2048 (256 per GPU): refused up front, even though
    the first task of the chain (the demo) would run."""
    res = run_sh(job, "pretrain_demo+pretrain_localmim_vit_base_100e", "base", "3")
    assert res.returncode == 2
    assert "effective batch 2048 is not a multiple of batch_size 256 x 3 processes" in res.stderr
    assert "task 'pretrain_localmim_vit_base_100e' does not resolve on 3 process(es)" in res.stderr
    assert "usage:" not in res.stderr  # the one line that matters, not argparse's usage block
    assert not (checkout / "output" / job).exists()


@pytest.fixture(scope="module")
def knn_dry_run(tmp_path_factory):
    """One ``run.sh JOB knn vit_tiny_patch16 0 --data_set demo --dry_run=config`` in a mirror of the checkout, shared
    by the tests of what it writes: (checkout, job, result)."""
    mirror, job = mirror_checkout(tmp_path_factory.mktemp("knn_dry_run")), f"test_{uuid.uuid4().hex[:8]}"
    return mirror, job, runner(mirror)(job, "knn", "vit_tiny_patch16", "0", "--data_set", "demo",
                                       "--dry_run=config")


def test_each_task_is_recorded(knn_dry_run):
    checkout, job, res = knn_dry_run
    assert res.returncode == 0, res.stderr
    (record,) = (checkout / "output" / job / "knn" / "records").iterdir()
    command = (record / "command.txt").read_text()
    assert "command: python main_knn.py --config configs/knn/imagenet_vit_base.yaml" in command
    assert "exit status: 0" in command and "git: " in command
    assert yaml.safe_load((record / "output.log").read_text())["data_set"] == "demo"  # what it printed


def test_record_sh_keeps_command_output_and_exit_status(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "record.sh"), "GREETING=hello world", "sh", "-c",
                          "echo $GREETING; echo oops >&2; exit 3"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 3 and "hello world" in res.stdout
    (record,) = (tmp_path / "records").iterdir()
    assert (record / "output.log").read_text().split() == ["hello", "world", "oops"]  # stdout and stderr
    command = (record / "command.txt").read_text()
    assert "command: GREETING=hello\\ world sh -c" in command and "exit status: 3" in command
    assert "git: none" in command  # tmp_path is not a git checkout


@pytest.mark.parametrize("extra, env", [(["launcher=slurm", "--partition", "p"], {}), ([], {"NNODES": "2"})])
def test_slurm_goes_through_submitit_not_torchrun(run_sh_replayed, job, extra, env, tmp_path):
    res = run_sh_replayed(job, "imagenet_finetune", "base", "4", *extra, "--data_path", str(tmp_path),
                          "--dry_run=config", env=env)
    assert res.returncode == 0, res.stderr
    command = res.stdout.splitlines()[0]
    assert command.startswith("[run.sh] python main_finetune.py") and "torchrun" not in command
    resolved = yaml.safe_load(res.stdout[res.stdout.index("\n") + 1:])
    nodes = int(env.get("NNODES", 1))
    assert (resolved["launcher"], resolved["nodes"], resolved["ngpus"]) == ("slurm", nodes, 4)
    assert resolved["accum_iter"] == 1024 // (32 * 4 * nodes)  # the recipe's effective batch on nodes x 4 GPUs


def test_nothing_is_written_into_the_real_checkout(knn_dry_run):
    checkout, job, res = knn_dry_run
    assert res.returncode == 0, res.stderr
    assert (checkout / "output" / job / "knn" / "records").is_dir() and not (ROOT / "output" / job).exists()


def test_dbot_detection_seed_maps_mm_overrides(run_sh_replayed, job, tmp_path):
    """dBOT's COCO command as written (dBOT's downstream README), on CPU: the mm-style keys become our flags."""
    ckpt = tmp_path / "dbot_base_pre" / "checkpoint-1600.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")  # --dry_run checks that it exists
    res = run_sh_replayed(job, "cascade_coco_det", "vit_base", "0", str(ckpt), f"data_path={tmp_path}",
                          "data.samples_per_gpu=2", "lr_config.step=8,11", "runner.max_epochs=12",
                          "optimizer.paramwise_cfg.layer_decay_rate=0.75", "--dry_run=config")
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout[res.stdout.index("\n") + 1:])
    assert resolved["model"] == "vit_base_patch16" and resolved["detector"] == "cascade_mask_rcnn"
    assert (resolved["batch_size"], resolved["lr_steps"], resolved["epochs"], resolved["layer_decay"]) == \
        (2, [8, 11], 12, 0.75)
    assert resolved["finetune"] == str(ckpt)
    assert resolved["accum_iter"] == 8  # effective batch 16 = 2 x 8 GPUs, kept on one process


def test_segmentation_style_overrides_and_model_forms(run_sh_replayed, job, tmp_path):
    res = run_sh_replayed(job, "mask_rcnn_coco_det", "large", "0", "optimizer_config.use_fp16=True",
                          "optimizer.lr=3e-5", "model.backbone.drop_path_rate=0.2", "--deterministic",
                          f"data_path={tmp_path}", "--dry_run=config")
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout[res.stdout.index("\n") + 1:])
    assert resolved["model"] == "vit_large_patch16" and resolved["amp"] == "fp16"
    assert resolved["lr"] == 3e-5 and resolved["drop_path"] == 0.2 and resolved["deterministic"] is True


def test_unknown_mm_override_is_an_error_naming_it(run_sh, checkout, job):
    res = run_sh(job, "cascade_coco_det", "base", "0", "optimizer.momentum=0.9")
    assert res.returncode == 2 and "unknown override 'optimizer.momentum'" in res.stderr
    assert not (checkout / "output" / job).exists()


@pytest.mark.parametrize("model, lr, decay, arch", [("large", "3e-5", "0.95", "vit_large_patch16")])  # (base: same path)
def test_dbot_segmentation_seed_as_written(run_sh_replayed, job, tmp_path, model, lr, decay, arch):
    """dBOT's ADE20K commands (dBOT's downstream README) as written, paths aside: the mm-style keys become main_segment's flags."""
    ckpt = tmp_path / f"dbot_{model}_pre" / "checkpoint-1600.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")  # --dry_run checks that it exists
    # NGPUS 0 instead of dBOT's 8: plain python instead of eight torchrun processes on this CPU
    res = run_sh_replayed(job, "ade20k_seg", model, "0", str(ckpt), "optimizer_config.use_fp16=True",
                          f"optimizer.lr={lr}",
                          f"optimizer.paramwise_cfg.layer_decay_rate={decay}", "model.backbone.drop_path_rate=0.2",
                          "--deterministic", f"data_path={tmp_path}", "--dry_run=config")
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout[res.stdout.index("\n") + 1:])
    assert (resolved["model"], resolved["amp"], resolved["lr"], resolved["layer_decay"], resolved["drop_path"]) == \
        (arch, "fp16", float(lr), float(decay), 0.2)
    assert resolved["deterministic"] is True and resolved["finetune"] == str(ckpt)

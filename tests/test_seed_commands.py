"""The users' own commands (tests/seed_commands.py) run as written: each through its script's ``--dry_run`` (the
resolved configuration checked), the FreezeOut ones through one real training step, dBOT's through ``run.sh``, the
conversion tools on tiny fake checkpoints. Only data and checkpoint paths are replaced (by a tiny folder in tmp_path)
and, for the real steps, sizes shrunk by flags appended at the end. Detection and segmentation commands are left to
their own tests.
"""
from __future__ import annotations

import logging
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from seed_commands import (DBOT, FREEZEOUT_COMMANDS, MAE_MEDICAL, MOCO_V3, MOCO_V3_CONVERT, VIT_ADAPTER_CONVERT,
                           VITFREEZE)
from test_official_split import hyperkvasir_tree

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_OF = {"main.py": "main_finetune.py"}  # DeiT's trainer in MoCo v3's seed: our fine-tuning script takes it
PATH_FLAGS = {"--data_path": "data", "--data-path": "data", "--finetune": "ckpt", "--resume": "ckpt",
              "--output_dir": "out", "--log_dir": "out", "--job_dir": "out"}
TINY_STEP = ["--model", "MIM_vit_tiny_patch16", "--input_size", "32", "--batch_size", "8", "--accum_iter", "1",
             "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--print_freq", "1"]


def shell_words(text: str) -> list[str]:
    """A seed command as the shell would split it, its continuations (``\\``, Windows ``^``) joined; a line that lost
    its ``\\`` is joined too (what its author meant). ``[placeholders with spaces]`` become one word."""
    text = re.sub(r"[\\^][ \t]*\n", " ", text).replace("\n", " ")
    text = re.sub(r"\[([^\]]*)\]", lambda m: "PLACEHOLDER_" + re.sub(r"\W", "_", m.group(1)), text)
    return shlex.split(text)


@pytest.fixture
def places(tmp_path):
    """A tiny ImageFolder (train/val, two classes) and an existing checkpoint file, for the seeds' paths."""
    data = tmp_path / "data"
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            for i in range(4):
                (data / split / cls).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (60 * c + 10 * i, 80, 200 - 40 * c)).save(data / split / cls / f"{i}.png")
    ckpt = tmp_path / "pretrained.pth"
    ckpt.write_bytes(b"")  # the dry run checks that it exists; nothing loads it
    return {"data": str(data), "ckpt": str(ckpt), "out": str(tmp_path / "out")}


def entry_point(words: list[str], places: dict) -> tuple[str, list[str], int]:
    """(script, its arguments with the data/checkpoint/output paths replaced, processes) of a seed command line:
    ``bash record.sh VAR=... python -m torch.distributed.launch --nproc_per_node=N [--use_env] script.py args``."""
    i, nproc, legacy = 0, 1, False
    while words[i] in ("bash", "record.sh") or re.fullmatch(r"[A-Z_]+=\S*", words[i]):
        i += 1
    assert words[i] in ("python", "python3"), words
    i += 1 + (words[i + 1] == "-u")
    if words[i] == "-m":
        assert words[i + 1] == "torch.distributed.launch"
        legacy, i = True, i + 2
        while not words[i].endswith(".py"):
            if words[i].startswith("--nproc_per_node"):
                nproc = int(words[i].split("=")[1])
            legacy &= words[i] != "--use_env"
            i += 1
    script, args = SCRIPT_OF.get(words[i], words[i]), words[i + 1:]
    for k, word in enumerate(args[:-1]):
        if word in PATH_FLAGS:
            args[k + 1] = places[PATH_FLAGS[word]]
    # torch.distributed.launch without --use_env passes --local-rank (torch >= 2: hyphenated) to each process
    return script, (["--local-rank=0"] if legacy else []) + args, nproc


def run_script(script: str, argv: list[str], monkeypatch, capsys, *, world: int) -> str:
    """Run ``script`` as ``python script argv`` does (its ``__main__``), as rank 0 of ``world`` processes."""
    if world > 1:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
    else:
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exc:
        assert not exc.code, capsys.readouterr().err
    return capsys.readouterr().out


def resolved(out: str) -> dict:
    return yaml.safe_load("\n".join(line for line in out.splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", line)))


def seed_id(command: str) -> str:
    return next(w for w in shell_words(command) if w.endswith(".py"))[:-3]


@pytest.mark.parametrize("command", VITFREEZE + MOCO_V3 + MAE_MEDICAL, ids=seed_id)
def test_seed_command_dry_runs(command, places, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # relative output folders stay in tmp_path
    script, argv, nproc = entry_point(shell_words(command), places)
    config = resolved(run_script(script, [*argv, "--dry_run=config"], monkeypatch, capsys, world=nproc))
    assert config["data_path"] == places["data"]
    assert config["freezeout"] is ("--how_scale" in command) if "freezeout" in config else True
    if "--all_stages" in command:
        assert config["all_stages"] and config["not_scale_lr"] and config["non_layerwise_lr"]
    if "main.py" in command:  # DeiT's lr rule: 3e-4 x 1024 / 512 = blr 1.5e-4 x 1024 / 256
        assert config["blr"] == pytest.approx(1.5e-4) and config["lr"] is None and config["pin_mem"] is False
    if "submitit_finetune" in command:
        assert (config["launcher"], config["nodes"], config["ngpus"]) == ("slurm", 4, 8)
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


@pytest.mark.parametrize("command", FREEZEOUT_COMMANDS,
                         ids=lambda c: re.sub(r"\W+", "_", c.split("--how_scale ")[1]).strip("_"))
def test_freezeout_seed_command_takes_a_real_step(command, places, monkeypatch, capsys, tmp_path, caplog):
    """The ViTFreeze commands never pass --freezeout: their FreezeOut flags must turn it on (one step, tiny model)."""
    monkeypatch.chdir(tmp_path)
    script, argv, _ = entry_point(shell_words(command), places)
    argv = [a for a in argv if not a.startswith("--local-rank")]  # one process here
    with caplog.at_level(logging.INFO, logger="vitfreeze"):
        run_script(script, [*argv, *TINY_STEP], monkeypatch, capsys, world=1)
    out = Path(places["out"])
    recorded = yaml.safe_load((out / "args.yaml").read_text())
    assert recorded["freezeout"] is True and recorded["t_0"] == float(command.split("--t_0 ")[1].split()[0])
    assert (out / "freezeout_schedule.png").exists() and (out / "checkpoint-last.pth").exists()
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("FreezeOut on: --how_scale, --t_0") for m in messages)


def test_dbot_commands_through_run_sh(places, tmp_path, monkeypatch, capsys):
    """run.sh maps the dBOT commands (MODEL vit_base / vit_huge_patch14, a checkpoint, extras) onto our scripts; the
    commands it would start are recorded by stand-in python/torchrun executables, then dry-run here."""
    log = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "torchrun"):
        stub = bin_dir / name
        record = f'{{ printf "%s\\0" "{name}" "${{WORLD_SIZE:-}}" "$@"; printf "\\n\\0"; }} >> {log}'
        stub.write_text(f"#!/bin/sh\n{record}\n")
        stub.chmod(0o755)
    repo = tmp_path / "repo"  # run.sh writes output/JOB/ beside itself: a copy keeps the checkout clean
    repo.mkdir()
    for name in ("run.sh", "record.sh"):
        shutil.copy2(ROOT / name, repo / name)
    shutil.copytree(ROOT / "configs", repo / "configs")
    for command, nodes in DBOT:
        words = shell_words(command)
        words = [places["ckpt"] if w.endswith(".pth") else w for w in words]
        words = [places["data"] if w == "./data/imagenet" else w for w in words]
        if "--data_path" not in words:  # the transfer chain names no data: dBOT's run.sh had them built in
            words.append(f"data_path={places['data']}")
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "NNODES": str(nodes)}
        res = subprocess.run(["bash", str(repo / "run.sh"), *words[1:]], capture_output=True, text=True, timeout=120,
                             env=env)
        assert res.returncode == 0, res.stderr
    monkeypatch.chdir(repo)  # the recipes' paths are relative to run.sh's folder
    calls = [c.split("\0")[:-1] for c in log.read_text().split("\n\0") if c.strip("\0")]
    checks = [c for c in calls if c[-1] == "--dry_run"]  # run.sh resolves every task before starting any
    assert len(checks) == 4 + 6
    configs = [resolved(run_script(script, [*argv[:-1], "--dry_run=config"], monkeypatch, capsys, world=int(world)))
               for name, world, script, *argv in checks]  # the flags as resolved (the stand-in data has 2 classes)
    assert [c["model"] for c in configs] == ["vit_base_patch16", "vit_large_patch16"] + ["vit_huge_patch14"] * 2 + \
        ["vit_base_patch16"] * 6  # MODEL vit_base completed from the transfer recipes
    assert [c["data_set"] for c in configs[4:]] == ["cifar10", "cifar100", "cars", "flowers", "inat18", "inat19"]
    assert [c["accum_iter"] for c in configs[:4]] == [1, 1, 2, 4]  # 1024 = batch x accum x 32 GPUs, as dBOT says
    assert all(c["finetune"] == places["ckpt"] for c in configs) and configs[3]["input_size"] == 448
    started = [c for c in calls if c[0] == "torchrun"]  # the transfer chain on one 8-GPU node
    assert len(started) == 6 and all(c[2] == "--nproc_per_node=8" for c in started)
    slurm = [c for c in calls if c[0] == "python" and c[-1] != "--dry_run"]  # ImageNet on 4 nodes: submitit
    assert len(slurm) == 4 and all(c[c.index("--launcher") + 1] == "slurm" and c[c.index("--nodes") + 1] == "4"
                                   for c in slurm)



def test_conversion_commands_run_from_the_root(tmp_path, monkeypatch, capsys):
    """MoCo v3's convert_to_deit.py and ViT-Adapter's convert_14to16.py, as typed, on tiny fake checkpoints."""
    import torch
    from test_convert import fake_dinov2, fake_moco

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrained").mkdir()
    for command in VIT_ADAPTER_CONVERT:
        src = tmp_path / shell_words(command)[2]
        torch.save(fake_dinov2(), src)
        run_script("convert_14to16.py", shell_words(command)[2:], monkeypatch, capsys, world=1)
        out = src.with_name(src.stem + "_14to16.pth")
        assert torch.load(out, weights_only=True)["patch_embed.proj.weight"].shape[-2:] == (16, 16)
    words = shell_words(MOCO_V3_CONVERT)
    moco, base = fake_moco()
    src = Path(words[3])
    src.parent.mkdir(parents=True)
    torch.save(moco, src)
    run_script("convert_to_deit.py", words[2:], monkeypatch, capsys, world=1)
    converted = torch.load(words[5], weights_only=True)["model"]
    assert converted.keys() == base.keys() and all(torch.equal(converted[k], base[k]) for k in base)





def test_hyperkvasir_script_finds_the_official_split(tmp_path, monkeypatch, capsys):
    """MAE's HyperKvasir command names no split: the dataset's own official split next to it is used."""
    split = hyperkvasir_tree(tmp_path)
    command = MAE_MEDICAL[1].replace("${DATA_PATH}", str(tmp_path / "labeled-images"))
    script, argv, _ = entry_point(shell_words(command), {"data": str(tmp_path / "labeled-images"),
                                                         "ckpt": str(split), "out": str(tmp_path / "out")})
    config = resolved(run_script(script, [*argv, "--dry_run=config"], monkeypatch, capsys, world=1))
    assert config["split_file"] == str(split) and config["nb_classes"] == 23
    elsewhere = tmp_path / "a" / "b" / "c"  # no official split within two parents
    elsewhere.mkdir(parents=True)
    argv = [str(elsewhere) if a == str(tmp_path / "labeled-images") else a for a in argv]
    assert resolved(run_script(script, [*argv, "--dry_run=config"], monkeypatch, capsys, world=1))["split_file"] is None

"""FreezeOut through main_pretrain: same path as the baseline at t_0 = 1, the schedule in the log, 2-process DDP
(resume mid-freezing: tests/test_resume_equivalence.py)."""
import json
from pathlib import Path

import torch

import main_pretrain
from util.checkpoint import load_checkpoint
from spawn_ranks import main_of, spawn
from conftest import tiny_pretrain

# demo --debug: 64 images, batch 16 -> 4 steps/epoch, 16 steps; linear t_0 0.5: units freeze from step 10 on
BASE = tiny_pretrain("--epochs", "4", "--warmup_epochs", "1", "--blr", "1e-2", "--seed", "3", "--save_every", "1",
                     "--print_freq", "1", model="MIM_vit_tiny_patch16")
FREEZE = ["--freezeout", "--how_scale", "linear", "--t_0", "0.5"]


def final_model(out: Path) -> dict:
    return load_checkpoint(out / "checkpoint-last.pth")["model"]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_t0_one_matches_baseline_step_for_step(tmp_path):
    short = [*BASE, "--epochs", "2"]  # 8 updates, warmup and decay included
    main_pretrain.main([*short, "--output_dir", str(tmp_path / "plain")])
    main_pretrain.main([*short, "--freezeout", "--t_0", "1", "--output_dir", str(tmp_path / "t1")])
    assert_same(final_model(tmp_path / "plain"), final_model(tmp_path / "t1"))


def test_freezing_run_logs_schedule_and_keeps_keys(tmp_path):
    out = tmp_path / "fo"
    main_pretrain.main([*BASE, *FREEZE, "--output_dir", str(out)])
    logged = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [e["num_frozen"] for e in logged] == [0, 0, 3, 11]  # unit i freezes at step ceil(10 + i / 2); last update is step 15
    assert (out / "freezeout_schedule.png").stat().st_size > 0
    assert "FreezeOut: blocks.0 (unit 1) frozen at step" in (out / "cli_logs.txt").read_text()
    first, last = load_checkpoint(out / "checkpoint-0.pth")["model"], final_model(out)
    assert first.keys() == last.keys()
    epoch2 = load_checkpoint(out / "checkpoint-2.pth")["model"]
    # units 0..2 froze in epoch 2: bit-identical afterwards; patch embedding and blocks.0/1 with their stages
    for key in ("patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight",
                "norm.0.weight", "decoder.0.embed.weight"):
        assert torch.equal(epoch2[key], last[key]), key
    assert not torch.equal(epoch2["blocks.11.attn.qkv.weight"], last["blocks.11.attn.qkv.weight"])


def test_two_process_ddp_passes_freeze_events(tmp_path):
    out = tmp_path / "ddp"
    argv = [*BASE, *FREEZE, "--batch_size", "8", "--output_dir", str(out)]  # 2 x 8 = the same 16 per step
    spawn(main_of("main_pretrain", argv))
    logged = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [e["num_frozen"] for e in logged] == [0, 0, 3, 11]
    epoch2, last = load_checkpoint(out / "checkpoint-2.pth")["model"], final_model(out)
    assert torch.equal(epoch2["blocks.1.mlp.fc2.weight"], last["blocks.1.mlp.fc2.weight"])
    assert not torch.equal(epoch2["blocks.11.attn.qkv.weight"], last["blocks.11.attn.qkv.weight"])
    assert all(torch.isfinite(v).all() for v in last.values() if v.is_floating_point())

"""benchmarks/gpu_check.py --smoke runs every part on this CPU (so the GPU command is known to work before GPU
time is spent on it), and its analytic FreezeOut saving follows the schedule."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_check  # noqa: E402
from engine.freezeout import FreezeOutSchedule  # noqa: E402


@pytest.mark.slow
def test_smoke_runs_every_part(tmp_path):
    rows = gpu_check.main(["--smoke", "--data", str(tmp_path / "no_imagenette")])  # demo images instead
    by_part = {}
    for row in rows:
        by_part.setdefault(row["part"], []).append(row)
    assert set(by_part) == {"setup", "step", "input", "e2e", "memory", "knn", "done"} and rows[-1]["failed"] == []
    steps = by_part["step"]
    assert [(r["model"], r["compile"]) for r in steps] == [("mae_vit_tiny_patch16", False),
                                                           ("mae_vit_tiny_patch16", True),
                                                           ("MIM_vit_tiny_patch16", False),
                                                           ("MIM_vit_tiny_patch16", True)]
    assert all(r["images_per_s"] > 0 and r["non_sdpa_attention"] == [] and r["mfu"] is None for r in steps)
    assert [r["decode"] for r in by_part["input"]] == ["pil", "cpu", "device"]
    assert all(r["images_per_s"] > 0 and r["images"] == 16 for r in by_part["input"])
    e2e = by_part["e2e"][0]
    assert e2e["baseline_s"] > 0 and e2e["freezeout_s"] > 0 and 0 < e2e["analytic_saving"] < 1
    memory = by_part["memory"][0]
    assert memory["saved_activation_mib_k0"] > memory["saved_activation_mib_k6"] > memory["saved_activation_mib_k12"]
    assert 0 <= by_part["knn"][0]["knn20_top1"] <= 100


def test_analytic_saving_by_hand():
    """2 units, 10 steps an epoch, 2 epochs, linear t_0 0.5: unit 0 freezes at the schedule's step for 0.5, unit 1
    at the end; over epoch 1 (steps 10..19) a step costs 4 with 0 frozen and 1 with unit 0 frozen."""
    prefix = [{"gflop": 4.0}, {"gflop": 1.0}]
    schedule = FreezeOutSchedule(num_units=2, total_steps=20, base_lr=1.0, warmup_steps=10, t_0=0.5,
                                 how_scale="linear")
    s0 = min(max(schedule.freeze_step(0), 10), 20)
    expected = 1 - ((s0 - 10) * 4.0 + (20 - s0) * 1.0) / (10 * 4.0)
    saving = gpu_check.analytic_saving(prefix, epochs=2, steps_per_epoch=10, t_0=0.5, how_scale="linear")
    assert math.isclose(saving, expected) and 0 < saving < 0.75
    assert gpu_check.analytic_saving([{"gflop": 2.0}] * 2, epochs=2, steps_per_epoch=10, t_0=0.5,
                                     how_scale="linear") == pytest.approx(0.0)

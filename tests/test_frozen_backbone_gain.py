"""benchmarks/frozen_backbone_gain.py: the detector trains with its ViT frozen, from demo-pretrained or random
features (the measured numbers are in the README; the slow test checks the measured claim end to end)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import main_detect
from util.args import parse_args

REPO = Path(__file__).resolve().parent.parent


def load_benchmark():
    spec = importlib.util.spec_from_file_location("frozen_backbone_gain", REPO / "benchmarks/frozen_backbone_gain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_the_vit_is_frozen_and_one_training_step_leaves_it_unchanged(tmp_path):
    bench = load_benchmark()
    args = parse_args(main_detect.build_parser(), [
        "--config", "configs/detect/demo.yaml", "--output_dir", str(tmp_path), "--input_size", "64",
        "--anchor_sizes", "4", "8", "16", "32", "64", "--rois_per_image", "16", "--proposals_per_image", "50"])
    torch.manual_seed(0)
    model = bench.frozen_vit_model(main_detect.build_model)(args, 3, finetune=None).train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"backbone.vit.{n}" for n, _ in model.backbone.vit.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}
    target["masks"][0, 4:30, 4:40] = 1
    sum(model([torch.rand(3, 64, 64)], [target]).values()).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert not changed & frozen and any(n.startswith("backbone.outputs") for n in changed)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured (README): the demo recipe's 10-epoch features lose to random ones "
                   "with the ViT frozen (box AP 1.8 vs 2.9 at seed 0); an XPASS means the pretraining now transfers")
def test_pretrained_frozen_features_beat_random_ones(tmp_path):
    """Pretrained features beat random ones in both seeds, end to end (about 10 minutes on one thread under load;
    ``pytest --runslow``)."""
    records = load_benchmark().main(["--pairs", "0:0", "0:1", "--out", str(tmp_path)])
    assert records[-1]["wins"] == 2, records

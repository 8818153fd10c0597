"""Demo-style dense scenes (the pretraining data's own renderer) and benchmarks/dense_pretrain_gain.py.

The benchmark measures whether the demo pretraining helps the dense tasks at the same budget; these tests check
that its scenes are the pretraining's images with exact labels, and that it pairs the two arms honestly (same data
and seed, the checkpoint loaded in one arm only, the gain and summary computed from the arms). The measured gains
themselves are in the README (benchmarks are not timed or asserted in tests).
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import models
from util.data.demo import DemoDataset
from util.data.scenes import SCENE_CLASSES, render_demo_scene, rle_to_mask, write_ade20k, write_coco

REPO = Path(__file__).resolve().parent.parent


def load_benchmark():
    spec = importlib.util.spec_from_file_location("dense_pretrain_gain", REPO / "benchmarks/dense_pretrain_gain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("label", range(len(SCENE_CLASSES)))
def test_a_demo_scene_is_the_pretraining_image_with_its_exact_mask(label):
    size, seed = 64, 7
    scene = render_demo_scene(size, np.random.default_rng(seed), label)
    # the demo dataset draws class `label` first from a fresh generator when it has one image per class and
    # `label` is class 0; build that case by rendering class `label` alone through the dataset's renderer
    from util.data.demo import render_class
    image, alpha = render_class(label, 1, size, np.random.default_rng(seed), return_alpha=True)
    np.testing.assert_array_equal(scene["image"], image[0])
    if label == 0:  # and class 0 is exactly DemoDataset's first image (one image per class, same seed)
        np.testing.assert_array_equal(scene["image"], DemoDataset(num_classes=1, per_class=1, size=size,
                                                                  seed=seed).images[0])
    mask = scene["instances"][0]["mask"]
    np.testing.assert_array_equal(mask, alpha[0] >= 0.5)
    np.testing.assert_array_equal(scene["semantic"], np.where(mask, label + 1, 0))
    rows, cols = np.nonzero(mask)
    assert scene["instances"][0]["box"] == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    assert scene["instances"][0]["label"] == label and 0 < mask.mean() < 1


def test_demo_scenes_in_both_layouts_cycle_the_classes_and_round_trip(tmp_path):
    names = write_ade20k(tmp_path / "ade", 6, 3, 32, style="demo", num_classes=3)
    assert names == ["disc", "square", "triangle"]
    for index in range(6):
        label = np.asarray(Image.open(tmp_path / "ade" / f"annotations/training/scene_train_{index:06d}.png"))
        assert set(np.unique(label)) == {0, index % 3 + 1}
    write_coco(tmp_path / "coco", 6, 3, 32, style="demo", num_classes=3)
    data = json.loads((tmp_path / "coco" / "annotations" / "instances_train2017.json").read_text())
    assert [a["category_id"] for a in data["annotations"]] == [1, 2, 3, 1, 2, 3]  # one object per scene
    for ann in data["annotations"]:
        mask = rle_to_mask(ann["segmentation"])
        rows, cols = np.nonzero(mask)
        assert ann["area"] == mask.sum()
        assert ann["bbox"] == [cols.min(), rows.min(), cols.max() + 1 - cols.min(), rows.max() + 1 - rows.min()]
    with pytest.raises(ValueError, match="style"):
        write_ade20k(tmp_path / "bad", 1, 1, 32, style="photos")


def test_the_benchmark_pairs_the_arms_and_reports_their_difference(tmp_path, one_thread):
    bench = load_benchmark()
    # a "pretrained" checkpoint: a tiny ViT whose weights differ from any random init (all ones scaled)
    vit = models.create_model("vit_tiny_patch16", img_size=64, num_classes=0)
    torch.save({"model": {k: torch.full_like(v, 0.01) for k, v in vit.state_dict().items()}},
               tmp_path / "ckpt.pth")
    records = bench.main(["--task", "segment", "--pairs", "0:0", "0:1", "--checkpoint", str(tmp_path / "ckpt.pth"),
                          "--per_class", "1", "--val_per_class", "1", "--out", str(tmp_path / "out"), "--",
                          "--batch_size", "5", "--max_iters", "2", "--warmup_iters", "0"])
    pairs, summary = records[:2], records[2]
    # the benchmark quiets the scripts' INFO lines while it runs, and gives the process back as it was
    assert logging.root.manager.disable == logging.NOTSET and torch.get_num_threads() == 1
    for record, seed in zip(pairs, (0, 1)):
        assert record["seed"] == seed
        assert record["gain_mIoU"] == pytest.approx(record["pretrained_mIoU"] - record["random_mIoU"], abs=0.011)
        run = tmp_path / "out" / f"segment_0_{seed}"
        pretrained = yaml.safe_load((run / "pretrained" / "args.yaml").read_text())
        random = yaml.safe_load((run / "random" / "args.yaml").read_text())
        assert pretrained["finetune"] == str(tmp_path / "ckpt.pth") and not random.get("finetune")
        same = ("data_path", "seed", "max_iters", "lr", "layer_decay", "batch_size")
        assert {k: pretrained[k] for k in same} == {k: random[k] for k in same}
        assert not list(run.glob("*/checkpoint-*.pth")) and (run / "random" / "log.txt").is_file()  # metrics kept
    gains = [r["gain_mIoU"] for r in pairs]
    assert summary == {"record": "summary", "task": "segment", "metric": "mIoU", "pairs": 2,
                       "mean_gain": round(sum(gains) / 2, 2), "min_gain": min(gains),
                       "wins": sum(g > 0 for g in gains)}


@pytest.mark.slow
def test_a_longer_demo_pretraining_helps_segmentation_at_the_same_budget(tmp_path, one_thread):
    """The measured claim of the README, end to end (about 8 minutes on one thread; ``pytest --runslow``): the demo
    pretraining run for 100 epochs instead of 10 (pretraining seed 1) beats random initialisation at the same
    segmentation budget (training seed 1; measured +5.4 mIoU, 23.2 against 17.8)."""
    records = load_benchmark().main(["--task", "segment", "--pairs", "1:1", "--pretrain_epochs", "100",
                                     "--out", str(tmp_path)])
    assert records[0]["gain_mIoU"] > 2.5, records[0]

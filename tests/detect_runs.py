"""Helper of the detection tests (imported by test modules, like spawn_ranks.py): a short ``main_detect`` run and
the untrained model it starts from, on the same synthetic COCO scenes."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

import main_detect
from engine.detect import evaluate_detection
from util.args import parse_args
from util.data.coco import CocoInstances, collate_detection
from util.data.scenes import write_coco


def untrained_and_trained(tmp_path: Path, argv: Sequence[str]) -> tuple[dict, dict]:
    """Write 40 train / 12 val one-object scenes of 128 px to ``tmp_path / 'coco'``, then return the metrics of the
    model ``main_detect`` builds from ``argv`` before training (drawn with the seed ``main()`` uses) and of
    ``main_detect.main(argv)`` after it. ``argv`` gets ``--data_path`` and ``--output_dir`` here."""
    root = tmp_path / "coco"
    write_coco(root, 40, 12, 128, seed=0, num_classes=1, max_objects=1)
    argv = [*argv, "--data_path", str(root), "--output_dir", str(tmp_path / "run")]
    args = parse_args(main_detect.build_parser(), argv)
    val = CocoInstances(root, "val")
    torch.manual_seed(args.seed)  # the same initialisation main() draws
    untrained = evaluate_detection(main_detect.build_model(args, 1, finetune=None),
                                   torch.utils.data.DataLoader(val, batch_size=2, collate_fn=collate_detection),
                                   device=torch.device("cpu"), gt=val.gt, category_ids=val.category_ids)
    return untrained, main_detect.main(argv)

"""What the demo pretraining transfers to the dense tasks: pretrained vs random initialisation, same budget.

For each (pretraining seed, training seed) pair the script pretrains the demo recipe once per pretraining seed
(``configs/pretrain/demo.yaml``, ``--pretrain_epochs`` epochs, cached under ``--out``) and trains each task twice
with the same data, seed and schedule, once from that checkpoint (``--finetune``) and once from random weights:

- ``segment``: ``main_segment`` (UperNet, tiny ViT, 64 px) on ``--per_class`` labelled demo-style scenes per class
  (``util/data/scenes.py`` ``style='demo'``: one shape per scene drawn by the pretraining data's own renderer, only
  the shape tells the class), 150 iterations, lr 3e-4, no layer decay; metric mIoU (and mAcc) on 200 val scenes.
- ``detect``: ``main_detect`` (Mask R-CNN, tiny ViT, 64 px, anchors 8-128) on the same kind of scenes in the COCO
  layout, the detection demo's schedule (10 epochs, lr 1e-3); metric box AP (and mask AP) on 200 val scenes.

Prints one JSON line per pair and task (both arms' metrics and the gain, pretrained minus random) and one summary
line per task (mean and smallest gain, wins). One thread per run by default (tiny models run fastest so); about
45 s per segmentation arm and 40 s per detection arm on a CPU core. Example:
``python benchmarks/dense_pretrain_gain.py --pairs 0:0 1:1 2:2 --out /tmp/dense_gain``.
Measured results and what they mean: README, "Does the demo pretraining help the dense tasks?".
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import main_detect  # noqa: E402
import main_pretrain  # noqa: E402
import main_segment  # noqa: E402
from util.data.scenes import write_ade20k, write_coco  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLASSES, SIZE = 5, 64
METRICS = {"segment": ("mIoU", "mAcc"), "detect": ("bbox_AP", "segm_AP")}


def pretrain(out: Path, seed: int, epochs: int) -> Path:
    """The demo pretraining recipe with ``seed`` and ``epochs`` (reused when its checkpoint exists)."""
    folder = out / f"pretrain_seed{seed}_e{epochs}"
    checkpoint = folder / "checkpoint-last.pth"
    if not checkpoint.exists():
        main_pretrain.main(["--config", str(REPO / "configs/pretrain/demo.yaml"), "--seed", str(seed), "--epochs",
                            str(epochs), "--save_every", str(epochs), "--vis_every", "0", "--print_freq", "1000",
                            "--output_dir", str(folder), "--overwrite"])
    return checkpoint


def scenes(out: Path, task: str, per_class: int, val_per_class: int) -> Path:
    """Demo-style scenes in the task's layout (written once): ``per_class`` training, ``val_per_class`` val scenes
    per class."""
    root = out / f"scenes_{task}_{per_class}_{val_per_class}"
    if not (root / "done").exists():
        write = write_ade20k if task == "segment" else write_coco
        write(root, CLASSES * per_class, CLASSES * val_per_class, SIZE, seed=0, style="demo", num_classes=CLASSES)
        (root / "done").write_text("")
    return root


def arm_args(task: str, data: Path, out: Path, seed: int, extra: list[str]) -> list[str]:
    common = ["--data_path", str(data), "--input_size", str(SIZE), "--seed", str(seed), "--num_workers", "0",
              "--print_freq", "1000", "--output_dir", str(out), "--overwrite"]
    if task == "segment":
        return ["--model", "vit_tiny_patch16", "--nb_classes", str(CLASSES), "--batch_size", "16", "--max_iters",
                "150", "--warmup_iters", "15", "--lr", "3e-4", "--layer_decay", "1.0", "--drop_path", "0.1",
                "--channels", "64", "--aux_channels", "32", "--eval_interval", "1000000", "--vis_images", "0",
                "--save_every", "1000000", *common, *extra]
    return ["--config", str(REPO / "configs/detect/demo.yaml"), "--anchor_sizes", "8", "16", "32", "64", "128",
            "--epochs", "10", "--lr_steps", "8", "--eval_every", "10", "--vis_every", "0", "--save_every", "1000",
            *common, *extra]


def run_pair(task: str, data: Path, out: Path, checkpoint: Path, seed: int, extra: list[str], *,
             keep_checkpoints: bool = False) -> dict[str, float]:
    """Both arms of one pair; returns their metrics (``pretrained_<m>``, ``random_<m>``). Each arm's checkpoints
    (80 MB apiece for the ViT-Ti UperNet) are removed once its metrics are in, unless ``keep_checkpoints``."""
    script = main_segment if task == "segment" else main_detect
    record = {}
    for arm, more in (("pretrained", ["--finetune", str(checkpoint)]), ("random", [])):
        result = script.main(arm_args(task, data, out / arm, seed, extra + more))
        record.update({f"{arm}_{m}": round(float(result[m]), 2) for m in METRICS[task]})
        for path in [] if keep_checkpoints else (out / arm).glob("checkpoint-*.pth"):
            path.unlink()
    return record


def add_pair_args(parser: argparse.ArgumentParser, *, pairs: list[str]) -> None:
    """The flags of a pretrained-against-random comparison (this script's and ``frozen_backbone_gain.py``'s)."""
    parser.add_argument("--pairs", nargs="+", default=pairs,
                        help="PRETRAIN_SEED:TRAIN_SEED pairs (the demo pretraining seed, the task's --seed)")
    parser.add_argument("--pretrain_epochs", type=int, default=10, help="demo pretraining epochs (the recipe: 10)")
    parser.add_argument("--checkpoint", default=None,
                        help="use this pretrained checkpoint for every pair instead of pretraining")
    parser.add_argument("--per_class", type=int, default=8, help="labelled training scenes per class")
    parser.add_argument("--val_per_class", type=int, default=40, help="validation scenes per class")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="work folder (pretraining runs, scenes, task runs)")
    parser.add_argument("--keep_checkpoints", action="store_true",
                        help="keep each task run's checkpoints (removed once its metrics are in, by default)")
    parser.add_argument("extra", nargs="*", help="more flags for both arms of every task run, after --")


def run_quietly(run: Callable[[argparse.Namespace], list[dict]], args: argparse.Namespace) -> list[dict]:
    """``run(args)`` on ``args.threads`` threads without the scripts' INFO lines (warnings and errors still show),
    leaving the caller's process as it was (tests call ``main()``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    try:
        return run(args)
    finally:
        logging.disable(logging.NOTSET)
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", nargs="+", default=["segment", "detect"], choices=["segment", "detect"])
    add_pair_args(parser, pairs=["0:0", "1:1", "2:2"])
    return run_quietly(run, parser.parse_args(argv))


def run(args: argparse.Namespace) -> list[dict]:
    out, records = Path(args.out), []
    for task in args.task:
        data = scenes(out, task, args.per_class, args.val_per_class)
        gains = []
        for pair in args.pairs:
            pretrain_seed, seed = (int(x) for x in pair.split(":"))
            checkpoint = (Path(args.checkpoint) if args.checkpoint
                          else pretrain(out, pretrain_seed, args.pretrain_epochs))
            metrics = run_pair(task, data, out / f"{task}_{pair.replace(':', '_')}", checkpoint, seed, args.extra,
                               keep_checkpoints=args.keep_checkpoints)
            main_metric = METRICS[task][0]
            gain = round(metrics[f"pretrained_{main_metric}"] - metrics[f"random_{main_metric}"], 2)
            gains.append(gain)
            record = {"record": "pair", "task": task, "pretrain_seed": pretrain_seed, "seed": seed,
                      "pretrain_epochs": None if args.checkpoint else args.pretrain_epochs,
                      "per_class": args.per_class, "val_per_class": args.val_per_class, **metrics,
                      f"gain_{main_metric}": gain}
            records.append(record)
            print(json.dumps(record), flush=True)
        summary = {"record": "summary", "task": task, "metric": METRICS[task][0], "pairs": len(gains),
                   "mean_gain": round(statistics.fmean(gains), 2), "min_gain": min(gains),
                   "wins": sum(g > 0 for g in gains)}
        records.append(summary)
        print(json.dumps(summary), flush=True)
    return records


if __name__ == "__main__":
    main()

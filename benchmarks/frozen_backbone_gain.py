"""Frozen-backbone detection: do the demo pretraining's features beat random features?

The ViT of ``main_detect``'s pyramid is frozen (``requires_grad`` off: no update, no weight decay) and only the
simple feature pyramid, the RPN and the RoI heads train, once on the demo-pretrained ViT (``--finetune``) and once
on a randomly initialised one, same data, seed and schedule (``benchmarks/dense_pretrain_gain.py``'s detection arm:
demo-style scenes, 5 classes, the detection demo's Mask R-CNN at 64 px, i.e. the pretraining's own 4 x 4 grid).
With the backbone frozen the comparison measures the features themselves, not how well fine-tuning recovers from
an initialisation (linear probing's question, asked of a detector).

Prints one JSON line per (pretraining seed, training seed) pair with both arms' box / mask AP and the gain
(pretrained minus random), and a summary line. Example:
``python benchmarks/frozen_backbone_gain.py --pairs 0:0 0:1 --out /tmp/frozen_gain``.
Measured results: README, "Does the demo pretraining help the dense tasks?".
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import main_detect  # noqa: E402
from benchmarks.dense_pretrain_gain import add_pair_args, arm_args, pretrain, run_quietly, scenes  # noqa: E402

METRICS = ("bbox_AP", "segm_AP")


def frozen_vit_model(build):
    """``main_detect.build_model`` with the backbone's ViT frozen (the pyramid neck and the heads still train)."""
    def wrapped(*args, **kwargs):
        model = build(*args, **kwargs)
        for p in model.backbone.vit.parameters():
            p.requires_grad_(False)
        return model
    return wrapped


def run_arm(data: Path, out: Path, seed: int, checkpoint: Path | None, extra: list[str]) -> dict[str, float]:
    more = ["--finetune", str(checkpoint)] if checkpoint else []
    with mock.patch.object(main_detect, "build_model", frozen_vit_model(main_detect.build_model)):
        result = main_detect.main(arm_args("detect", data, out, seed, extra + more))
    return {m: round(float(result[m]), 2) for m in METRICS}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_args(parser, pairs=["0:0", "0:1"])
    return run_quietly(run, parser.parse_args(argv))


def run(args: argparse.Namespace) -> list[dict]:
    out, records, gains = Path(args.out), [], []
    data = scenes(out, "detect", args.per_class, args.val_per_class)
    for pair in args.pairs:
        pretrain_seed, seed = (int(x) for x in pair.split(":"))
        checkpoint = Path(args.checkpoint) if args.checkpoint else pretrain(out, pretrain_seed, args.pretrain_epochs)
        folder = out / f"frozen_{pair.replace(':', '_')}"
        record = {"record": "pair", "pretrain_seed": pretrain_seed, "seed": seed,
                  "pretrain_epochs": None if args.checkpoint else args.pretrain_epochs}
        for arm, ckpt in (("pretrained", checkpoint), ("random", None)):
            record.update({f"{arm}_{m}": v for m, v in run_arm(data, folder / arm, seed, ckpt, args.extra).items()})
        record["gain_bbox_AP"] = round(record["pretrained_bbox_AP"] - record["random_bbox_AP"], 2)
        gains.append(record["gain_bbox_AP"])
        records.append(record)
        print(json.dumps(record), flush=True)
    summary = {"record": "summary", "metric": "bbox_AP", "pairs": len(gains), "mean_gain": round(statistics.fmean(gains), 2),
               "min_gain": min(gains), "wins": sum(g > 0 for g in gains)}
    records.append(summary)
    print(json.dumps(summary), flush=True)
    return records


if __name__ == "__main__":
    main()

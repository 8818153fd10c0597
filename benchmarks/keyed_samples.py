"""Cost of per-sample keyed randomness (util/data/loaders.py) next to the work it rides on.

Three JSON lines:
- ``keying``: microseconds ``KeyedSamples`` adds to an item that does no work (the pure cost, little noise).
- ``item``: seconds per sample of a real pretraining item (JPEG decode + RandomResizedCrop + flip + normalize
  on Imagenette) read plainly and through ``KeyedSamples`` (hash of (seed, epoch, index), RNG fork and reseed),
  interleaved in rounds so machine noise hits both alike; ``overhead`` = keyed / plain - 1.
- ``mask``: seconds for ``keyed_noise`` of one batch next to ``torch.rand`` of the same shape (the unkeyed draw).
Example: ``python benchmarks/keyed_samples.py --data_path ../shared/data/imagenette/train --items 200``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from util.data.folder import build_pretrain_dataset  # noqa: E402
from models.masking import keyed_noise  # noqa: E402
from util.data.loaders import KeyedSamples  # noqa: E402
from util.data.transforms import pretrain_transform  # noqa: E402


def per_item(dataset, indices) -> float:
    start = time.perf_counter()
    for i in indices:
        dataset[i]
    return (time.perf_counter() - start) / len(indices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data_path", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"
                                                   / "imagenette" / "train"))
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--items", type=int, default=200, help="samples per round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_patches", type=int, default=196)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker's setting

    class Nothing:
        def __len__(self) -> int:
            return 10**6

        def __getitem__(self, index: int) -> tuple[int, int]:
            return index, 0

    nothing = KeyedSamples(Nothing(), seed=0)
    print(json.dumps({"bench": "keying", "items": 5000,
                      "us_per_item": 1e6 * statistics.median(per_item(nothing, range(5000)) for _ in range(3))}))

    plain = build_pretrain_dataset(args.data_path, pretrain_transform(args.input_size))
    keyed = KeyedSamples(plain, seed=0)
    step = max(1, len(plain) // args.items)
    indices = list(range(0, len(plain), step))[:args.items]
    per_item(plain, indices[:10])  # page cache and imports
    times = {"plain": [], "keyed": []}
    for _ in range(args.rounds):
        times["plain"].append(per_item(plain, indices))
        times["keyed"].append(per_item(keyed, indices))
    plain_s, keyed_s = statistics.median(times["plain"]), statistics.median(times["keyed"])
    print(json.dumps({"bench": "item", "images": len(indices), "rounds": args.rounds, "input_size": args.input_size,
                      "plain_s_per_item": plain_s, "keyed_s_per_item": keyed_s,
                      "overhead": keyed_s / plain_s - 1}))

    keys = torch.randint(0, 2**62, (args.batch_size,))
    rand_t, keyed_t = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        torch.rand(args.batch_size, args.num_patches)
        rand_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        keyed_noise(keys, args.num_patches)
        keyed_t.append(time.perf_counter() - start)
    print(json.dumps({"bench": "mask", "batch_size": args.batch_size, "num_patches": args.num_patches,
                      "rand_s": statistics.median(rand_t), "keyed_noise_s": statistics.median(keyed_t)}))


if __name__ == "__main__":
    main()

"""How much cheaper FreezeOut makes pretraining: analytic (FLOPs) vs measured (wall clock) saving.

For every frozen-prefix length k = 0..N the script measures one training step (forward, backward, AdamW update
of the parameters that still train, exactly as the Freezer leaves them):
- FLOPs, counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, forward + backward);
- wall-clock seconds per step of the real loop, ``engine.train.train_one_epoch`` with ``engine.pretrain.mim_step``
  (median of ``--steps`` timed steps after ``--warmup`` untimed ones, with ``cuda.synchronize()`` before each clock
  read on GPU);
- bytes of activations saved for backward (``saved_tensors_hooks``), device-independent; and peak CUDA memory.
Each is integrated over the schedule (the fraction of steps spent at each k for ``--epochs`` / ``--warmup_epochs``
/ ``--how_scale`` / ``--t_0``), giving analytic saving = 1 - sum_k w_k F(k) / F(0), measured saving =
1 - sum_k w_k T(k) / T(0), and their ratio. ``--demo_run E`` also trains E epochs on the demo data with and
without FreezeOut through ``main_pretrain`` and compares the real saving with the one predicted from T(k).

Prints JSON lines: one per k (``"record": "prefix"``), one summary (``"record": "summary"``), and one for the demo
run. Example (CPU, tiny): ``python benchmarks/freezeout_saving.py --model MIM_vit_tiny_patch16 --batch_size 32
--input_size 224``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import models  # noqa: E402
from engine.pretrain import mim_step  # noqa: E402
from engine.train import EpochProgress, LoopConfig, train_one_epoch  # noqa: E402
from engine.freezeout import FreezeOutSchedule, set_train_mode  # noqa: E402
from util.param_groups import param_groups  # noqa: E402
from util.runtime import AMP_DTYPES as AMP  # noqa: E402


def prefix_fractions(schedule: FreezeOutSchedule, start: int = 0) -> list[float]:
    """Fraction of the optimizer steps in [start, total) spent with exactly k units frozen, k = 0..N+1."""
    edges = [start] + [min(max(schedule.freeze_step(u), start), schedule.total_steps)
                       for u in range(schedule.num_units)]
    edges.append(schedule.total_steps)
    span = schedule.total_steps - start
    return [(edges[k + 1] - edges[k]) / span for k in range(schedule.num_units + 1)]


class Bench:
    """One model and batch, re-configured for each frozen-prefix length k."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.device = args, torch.device(args.device)
        torch.manual_seed(0)
        self.model = models.create_model(args.model, img_size=args.input_size).to(self.device)
        self.imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=self.device)
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self.dtype = AMP[args.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.config = LoopConfig(steps_per_epoch=1, amp_dtype=self.dtype, device=self.device, print_freq=10**9)

    def configure(self, k: int) -> torch.optim.Optimizer:
        for name, param in self.model.named_parameters():
            unit = self.model.unit_of(name)
            param.requires_grad_(unit is None or unit >= k)
            param.grad = None
        set_train_mode(self.model, k, self.model.unit_of)
        return torch.optim.AdamW(param_groups(self.model, weight_decay=0.05, unit_of=self.model.unit_of), lr=1e-4,
                                 betas=(0.9, 0.95))

    def step(self, opt: torch.optim.Optimizer, k: int) -> None:
        """One update of the real training loop (``engine.train.train_one_epoch``, as ``main_pretrain`` runs it)."""
        def step_fn(batch, step: int) -> dict:
            return mim_step(self.model, batch, step, mask_ratio=0.75, device=self.device, num_frozen=k)

        train_one_epoch(step_fn, [(self.imgs, None)], opt, self.scaler, self.config, EpochProgress(0, 0),
                        before_update=lambda step: None)

    def measure(self, k: int) -> dict:
        opt = self.configure(k)
        with FlopCounterMode(display=False) as counter:
            self.step(opt, k)
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.step(opt, k)
        for _ in range(self.args.warmup):
            self.step(opt, k)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(self.args.steps):
            self.sync()
            tic = time.perf_counter()
            self.step(opt, k)
            self.sync()
            times.append(time.perf_counter() - tic)
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else None
        return {"k": k, "gflop": counter.get_total_flops() / 1e9, "s_per_step": statistics.median(times),
                "saved_activation_mib": saved[0] / 2**20, "peak_cuda_mib": peak}


def demo_run(args: argparse.Namespace, epochs: int, rows: list[dict]) -> dict:
    """Short real runs with and without FreezeOut on the demo data; compares summed epoch times (training steps
    only) with the saving predicted by integrating the per-k step times over that run's own schedule. Epoch 0 is
    left out of both sums (one-time warm-up costs; nothing freezes that early)."""
    import main_pretrain
    from util.data.demo import DemoDataset

    warmup = max(1, round(epochs * args.warmup_epochs / args.epochs))
    common = ["--model", args.model, "--input_size", str(args.input_size), "--batch_size", str(args.batch_size),
              "--data_path", "demo", "--epochs", str(epochs), "--warmup_epochs", str(warmup), "--num_workers", "0",
              "--print_freq", "1000", "--amp", args.amp, "--save_every", str(epochs), "--device", args.device]
    totals = {}
    for name, extra in (("baseline", []), ("freezeout", ["--freezeout", "--how_scale", args.how_scale,
                                                         "--t_0", str(args.t_0)])):
        with tempfile.TemporaryDirectory() as out:
            main_pretrain.main([*common, *extra, "--output_dir", out])
            lines = (Path(out) / "log.txt").read_text().splitlines()
            totals[name] = sum(json.loads(line)["train_epoch_time_s"] for line in lines[1:])
    steps_per_epoch = len(DemoDataset()) // args.batch_size
    schedule = FreezeOutSchedule(num_units=len(rows), total_steps=epochs * steps_per_epoch, base_lr=1.0,
                                 warmup_steps=warmup * steps_per_epoch, t_0=args.t_0, how_scale=args.how_scale)
    weights = prefix_fractions(schedule, start=steps_per_epoch)
    predicted = 1 - sum(w * r["s_per_step"] for w, r in zip(weights, rows)) / rows[0]["s_per_step"]
    return {"record": "demo_run", "epochs": epochs, "warmup_epochs": warmup, "steps_per_epoch": steps_per_epoch,
            "baseline_s": totals["baseline"], "freezeout_s": totals["freezeout"],
            "saving": 1 - totals["freezeout"] / totals["baseline"], "predicted_saving": predicted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="MIM_vit_base_patch16")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--how_scale", default="cubic", choices=["linear", "squared", "cubic"])
    parser.add_argument("--t_0", type=float, default=0.8)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--warmup_epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per prefix length")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per prefix length")
    parser.add_argument("--amp", default="none", choices=list(AMP))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--demo_run", type=int, default=0, metavar="EPOCHS",
                        help="also train this many epochs on the demo data with and without FreezeOut")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    n_units = bench.model.num_units
    schedule = FreezeOutSchedule(num_units=n_units, total_steps=args.epochs * 1000, base_lr=1.0,
                                 warmup_steps=args.warmup_epochs * 1000, t_0=args.t_0, how_scale=args.how_scale)
    weights = prefix_fractions(schedule)
    rows = []
    for k in range(n_units):  # k = N would freeze every stage: never reached within a run
        row = {"record": "prefix", **bench.measure(k), "fraction_of_run": weights[k]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def saving(key: str) -> float:
        return 1 - sum(w * r[key] for w, r in zip(weights, rows)) / rows[0][key]

    analytic, measured = saving("gflop"), saving("s_per_step")
    summary = {"record": "summary", "model": args.model, "batch_size": args.batch_size, "input_size": args.input_size,
               "how_scale": args.how_scale, "t_0": args.t_0, "epochs": args.epochs,
               "warmup_epochs": args.warmup_epochs, "amp": args.amp, "device": str(bench.device),
               "device_name": torch.cuda.get_device_name() if bench.device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads(), "analytic_saving": analytic, "measured_saving": measured,
               "measured_over_analytic": measured / analytic if analytic else None,
               "activation_memory_saving": saving("saved_activation_mib"),
               "activation_mib_k0": rows[0]["saved_activation_mib"],
               "activation_mib_k_last": rows[-1]["saved_activation_mib"]}
    print(json.dumps(summary), flush=True)
    if args.demo_run:
        print(json.dumps(demo_run(args, args.demo_run, rows)), flush=True)


if __name__ == "__main__":
    main()

"""One command that checks the GPU compute path and prints JSON lines (one GPU, no network, ~8 minutes).

Parts (``--parts``, default all; each can be rerun alone):
1. ``step``: pretraining step images/s and MFU of ``mae_vit_base_patch16`` and ``MIM_vit_base_patch16`` (batch
   256, bf16, 224 px), eager and ``torch.compile``d, timed through the real loop (``engine.train.train_one_epoch``
   with ``engine.pretrain.mim_step``) on a batch already on the device. FLOPs per step from ``FlopCounterMode``
   (forward + backward); MFU = FLOP/s over the bf16 dense peak of ``PEAK_TFLOPS`` (null for other devices).
2. ``input``: images/s of the pretraining input: loader workers on every core (``--decode pil`` and ``cpu``) and
   the device path (``--decode device``), over 500x375 quality-90 JPEGs made from Imagenette
   (``benchmarks/input_pipeline.make_test_set``).
3. ``e2e``: a short LocalMIM ViT-B run on Imagenette through ``main_pretrain`` (``--decode device``), with and
   without FreezeOut (linear, t_0 0.5: every unit freezes within the run); the measured wall-clock saving of the
   training epochs after the first (one-time warm-up) against the analytic saving of that schedule (FLOPs per
   frozen-prefix length, ``benchmarks/freezeout_saving.py``), and the run's images/s against part 1's.
4. ``memory``: peak CUDA memory of a training step with 0, half and all-but-one units frozen.
5. ``knn``: MAE ViT-S/16 at 128 px, 200 epochs on Imagenette train, then weighted 20-NN on val (``main_knn``);
   LightlySSL's MAE reference: 45.4% after 200 epochs at 128 px (a different ViT).

``--smoke`` shrinks everything (tiny models, 32 px, a few steps, the built-in demo data for parts 3 and 5, the
``aot_eager`` compile backend) so that the whole command runs on a CPU in a minute or two
(``tests/test_gpu_check.py``). Example: ``python benchmarks/gpu_check.py --parts step input``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import models  # noqa: E402
from engine.pretrain import mim_step  # noqa: E402
from engine.train import EpochProgress, LoopConfig, train_one_epoch  # noqa: E402
from util.compute import adamw_kwargs, compile_model, non_sdpa_attention  # noqa: E402
from engine.freezeout import FreezeOutSchedule  # noqa: E402
from util.param_groups import param_groups  # noqa: E402
from util.runtime import set_backend_flags  # noqa: E402

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # bf16 dense tensor-core peaks
PARTS = ("step", "input", "e2e", "memory", "knn")
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenette"
SMOKE_ARCH = {"mae_vit_tiny_patch16": dict(depth=2, embed_dim=32, num_heads=2, decoder_embed_dim=32,
                                           decoder_depth=1, decoder_num_heads=2),
              "MIM_vit_tiny_patch16": dict(depth=4, embed_dim=32, num_heads=2, decoder_embed_dim=32,
                                           decoder_num_heads=2)}


def emit(row: dict[str, Any], rows: list[dict]) -> None:
    print(json.dumps(row), flush=True)
    rows.append(row)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ------------------------------------------------------------------------------------------------ 1. step
def time_steps(model: torch.nn.Module, imgs: torch.Tensor, *, steps: int, warmup: int, amp: torch.dtype | None,
               device: torch.device) -> float:
    """Seconds per optimizer step of the real loop on one resident batch (after ``warmup`` untimed steps)."""
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.05, unit_of=model.unit_of), lr=1e-4,
                            betas=(0.9, 0.95), **adamw_kwargs(device))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    keys = torch.arange(len(imgs))
    batch = (imgs, torch.zeros(len(imgs), dtype=torch.long), keys)
    step_fn = partial(mim_step, model, mask_ratio=0.75, device=device)

    def run(num_steps: int, first_step: int) -> None:
        config = LoopConfig(steps_per_epoch=num_steps, amp_dtype=amp, device=device, print_freq=10**9)
        train_one_epoch(step_fn, [batch] * num_steps, opt, scaler, config, EpochProgress(0, first_step),
                        before_update=lambda s: None)
    run(warmup, 0)
    sync(device)
    tic = time.perf_counter()
    run(steps, warmup)
    sync(device)
    return (time.perf_counter() - tic) / steps


def step_flops(model: torch.nn.Module, imgs: torch.Tensor, amp: torch.dtype | None, device: torch.device) -> int:
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = model(imgs, mask_ratio=0.75)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def part_step(cfg: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    for name in cfg.step_models:
        for compiled in (False, True):
            torch.manual_seed(0)
            model = models.create_model(name, img_size=cfg.input_size, **cfg.arch.get(name, {})).to(device)
            imgs = torch.randn(cfg.step_batch, 3, cfg.input_size, cfg.input_size, device=device)
            flops = step_flops(model, imgs, cfg.amp, device)
            if compiled:
                compile_model(model, num_units=model.num_units, backend=cfg.compile_backend)
            s = time_steps(model, imgs, steps=cfg.steps, warmup=cfg.warmup + 2 * compiled, amp=cfg.amp,
                           device=device)
            peak = peak_flops(device)
            emit({"part": "step", "model": name, "compile": compiled, "batch_size": cfg.step_batch,
                  "input_size": cfg.input_size, "amp": str(cfg.amp), "device": device_name(device),
                  "images_per_s": round(cfg.step_batch / s, 1), "s_per_step": round(s, 5),
                  "gflop_per_image": round(flops / cfg.step_batch / 1e9, 2),
                  "mfu": round(flops / s / peak, 4) if peak else None,
                  "non_sdpa_attention": non_sdpa_attention(model)}, rows)
            del model
            torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------- 2. input
def part_input(cfg: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    from input_pipeline import make_test_set
    from util.data.decode import build_fast_input, use_fast_input
    from util.data.folder import build_folder_dataset
    from util.data.loaders import build_train_loader, set_loader_epoch
    from util.data.transforms import pretrain_transform

    with tempfile.TemporaryDirectory(prefix="gpu_check_input_") as tmp:
        make_test_set(cfg.image_source(tmp), Path(tmp) / "set", num_images=cfg.input_images, width=500, height=375,
                      quality=90)
        for decode in ("pil", "cpu", "device"):
            dataset = use_fast_input(build_folder_dataset(str(Path(tmp) / "set"), pretrain_transform(cfg.input_size)),
                                     build_fast_input(decode, cfg.input_size))
            loader = build_train_loader(dataset, batch_size=cfg.input_batch, num_workers=cfg.workers, pin_memory=True,
                                        rank=0, world_size=1, seed=0, device=device)
            for epoch in range(2):  # epoch 0 starts the workers and warms the caches; epoch 1 is timed
                set_loader_epoch(loader, seed=0, epoch=epoch, rank=0)
                sync(device)
                tic, n = time.perf_counter(), 0
                for imgs, _, _ in loader:
                    n += len(imgs)
                sync(device)
                elapsed = time.perf_counter() - tic
            emit({"part": "input", "decode": decode, "workers": cfg.workers, "images": n, "device": device_name(device),
                  "images_per_s": round(n / elapsed, 1),
                  "images_per_s_per_worker": round(n / elapsed / max(cfg.workers, 1), 1)}, rows)
            del loader


# ------------------------------------------------------------------------------------------ 3. e2e, 4. memory
def prefix_rows(cfg: argparse.Namespace, device: torch.device, ks: list[int] | None = None) -> list[dict]:
    """FLOPs, step time and peak memory per frozen-prefix length k (``freezeout_saving.Bench``)."""
    from freezeout_saving import Bench
    bench_args = argparse.Namespace(model=cfg.e2e_model, input_size=cfg.input_size, batch_size=cfg.batch_size,
                                    amp={None: "none", torch.bfloat16: "bf16"}[cfg.amp], device=str(device),
                                    warmup=1, steps=1)
    bench = Bench(bench_args)
    ks = range(bench.model.num_units) if ks is None else ks
    out = [bench.measure(k) for k in ks]
    del bench
    return out


def pretrain_run(cfg: argparse.Namespace, out: Path, extra: list[str]) -> tuple[float, int]:
    """Seconds of the training epochs after the first, and the number of images they saw."""
    import main_pretrain
    argv = ["--model", cfg.e2e_model, "--input_size", str(cfg.input_size), "--batch_size", str(cfg.batch_size),
            "--data_path", cfg.e2e_data, "--epochs", str(cfg.e2e_epochs), "--warmup_epochs", "1",
            "--num_workers", str(cfg.workers), "--decode", cfg.decode, "--print_freq", "1000",
            "--save_every", "1000", "--output_dir", str(out), *cfg.debug_flag, *extra]
    main_pretrain.main(argv)
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    steps = json.loads((out / "run_info.json").read_text())["derived"]["steps_per_epoch"]
    return sum(e["train_epoch_time_s"] for e in lines[1:]), steps * cfg.batch_size * (len(lines) - 1)


def analytic_saving(prefix: list[dict], *, epochs: int, steps_per_epoch: int, t_0: float, how_scale: str) -> float:
    """1 - FLOPs of the FreezeOut run / FLOPs of the baseline over epochs 1.. (epoch 0 is left out of the
    measured times too); ``prefix[k]['gflop']`` is one step's cost with k units frozen."""
    from freezeout_saving import prefix_fractions
    schedule = FreezeOutSchedule(num_units=len(prefix), total_steps=epochs * steps_per_epoch, base_lr=1.0,
                                 warmup_steps=steps_per_epoch, t_0=t_0, how_scale=how_scale)
    weights = prefix_fractions(schedule, start=steps_per_epoch)
    return 1 - sum(w * r["gflop"] for w, r in zip(weights, prefix)) / prefix[0]["gflop"]


def part_e2e(cfg: argparse.Namespace, device: torch.device, rows: list[dict]) -> list[dict]:
    prefix = prefix_rows(cfg, device)
    with tempfile.TemporaryDirectory(prefix="gpu_check_e2e_") as tmp:
        base_s, images = pretrain_run(cfg, Path(tmp) / "base", [])
        fo_s, _ = pretrain_run(cfg, Path(tmp) / "fo", ["--freezeout", "--how_scale", "linear", "--t_0", "0.5"])
        steps = json.loads((Path(tmp) / "fo" / "run_info.json").read_text())["derived"]["steps_per_epoch"]
    analytic = analytic_saving(prefix, epochs=cfg.e2e_epochs, steps_per_epoch=steps, t_0=0.5, how_scale="linear")
    measured = 1 - fo_s / base_s
    model_only = next((r["images_per_s"] for r in rows if r["part"] == "step" and r.get("model") == cfg.e2e_model
                       and not r.get("compile")), None)
    emit({"part": "e2e", "model": cfg.e2e_model, "data": cfg.e2e_data, "decode": cfg.decode,
          "epochs": cfg.e2e_epochs, "steps_per_epoch": steps, "baseline_s": round(base_s, 3),
          "freezeout_s": round(fo_s, 3), "images_per_s": round(images / base_s, 1),
          "model_only_images_per_s": model_only,
          "data_over_model_only": round(images / base_s / model_only, 3) if model_only else None,
          "measured_saving": round(measured, 4), "analytic_saving": round(analytic, 4),
          "measured_over_analytic": round(measured / analytic, 3) if analytic else None}, rows)
    return prefix


def part_memory(cfg: argparse.Namespace, device: torch.device, rows: list[dict], prefix: list[dict] | None) -> None:
    n = models.create_model(cfg.e2e_model, img_size=cfg.input_size).num_units
    ks = [0, n // 2, n - 1]
    by_k = {r["k"]: r for r in prefix} if prefix else {r["k"]: r for r in prefix_rows(cfg, device, ks)}
    emit({"part": "memory", "model": cfg.e2e_model, "batch_size": cfg.batch_size, "device": device_name(device),
          **{f"peak_mib_k{k}": by_k[k]["peak_cuda_mib"] for k in ks},
          **{f"saved_activation_mib_k{k}": round(by_k[k]["saved_activation_mib"], 1) for k in ks}}, rows)


# -------------------------------------------------------------------------------------------------- 5. knn
def part_knn(cfg: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    import main_knn
    import main_pretrain
    with tempfile.TemporaryDirectory(prefix="gpu_check_knn_") as tmp:
        tic = time.perf_counter()
        main_pretrain.main(["--model", cfg.knn_model, "--input_size", str(cfg.knn_size), "--batch_size",
                            str(cfg.batch_size), "--data_path", cfg.e2e_data, "--epochs", str(cfg.knn_epochs),
                            "--warmup_epochs", str(max(1, cfg.knn_epochs // 20)), "--blr", "1.5e-4",
                            "--norm_pix_loss", "--num_workers", str(cfg.workers), "--decode", cfg.decode,
                            "--print_freq", "1000", "--save_every", "100000", "--output_dir", tmp,
                            *cfg.debug_flag])
        pretrain_s = time.perf_counter() - tic
        result = main_knn.main(["--model", cfg.knn_model.replace("mae_", ""), "--finetune",
                                str(Path(tmp) / "checkpoint-last.pth"), "--input_size", str(cfg.knn_size),
                                "--data_set", cfg.knn_data_set, "--data_path", cfg.knn_data_path, "--nb_knn", "20",
                                "--batch_size", "256", "--num_workers", str(cfg.workers), "--decode", cfg.decode,
                                "--output_dir", str(Path(tmp) / "knn")])
        total_s = time.perf_counter() - tic
    emit({"part": "knn", "model": cfg.knn_model, "input_size": cfg.knn_size, "epochs": cfg.knn_epochs,
          "pretrain_s": round(pretrain_s, 1), "total_s": round(total_s, 1), "knn20_top1": result["knn20_top1"],
          "reference_knn_top1": 45.4, "reference": "LightlySSL MAE, Imagenette 128 px, 200 epochs"}, rows)


# --------------------------------------------------------------------------------------------------- main
def build_config(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--smoke", action="store_true", help="tiny everything, CPU-friendly (a minute or two)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="Imagenette root (train/ and val/)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: all cores)")
    parser.add_argument("--compile_backend", default=None, help="default inductor (aot_eager with --smoke)")
    cfg = parser.parse_args(argv)
    smoke = cfg.smoke
    cfg.workers = cfg.workers if cfg.workers is not None else (0 if smoke else max(1, (os.cpu_count() or 2) - 1))
    cfg.compile_backend = cfg.compile_backend or ("aot_eager" if smoke else "inductor")
    cfg.amp = torch.bfloat16 if torch.device(cfg.device).type == "cuda" else None
    cfg.step_models = ["mae_vit_tiny_patch16", "MIM_vit_tiny_patch16"] if smoke else ["mae_vit_base_patch16",
                                                                                      "MIM_vit_base_patch16"]
    cfg.arch = SMOKE_ARCH if smoke else {}
    # smoke: the demo --debug set has 64 images, so batch 16 gives 4 steps an epoch in parts 3 and 5
    cfg.batch_size, cfg.step_batch, cfg.input_size = (16, 4, 32) if smoke else (256, 256, 224)
    cfg.steps, cfg.warmup = (2, 1) if smoke else (10, 2)
    cfg.input_images, cfg.input_batch = (16, 8) if smoke else (2048, 256)
    cfg.e2e_model = "MIM_vit_tiny_patch16" if smoke else "MIM_vit_base_patch16"
    cfg.e2e_data = "demo" if smoke else cfg.data
    cfg.e2e_epochs = 2 if smoke else 4
    cfg.debug_flag = ["--debug"] if smoke else []
    cfg.decode = "device"
    cfg.knn_model, cfg.knn_size = ("mae_vit_tiny_patch16", 32) if smoke else ("mae_vit_small_patch16", 128)
    cfg.knn_epochs = 1 if smoke else 200
    cfg.knn_data_set, cfg.knn_data_path = ("demo", "") if smoke else ("folder", cfg.data)
    cfg.image_source = partial(image_source, cfg)
    return cfg


def image_source(cfg: argparse.Namespace, tmp: str) -> Path:
    """Imagenette's train folder, or (smoke runs without it) demo images written as files."""
    train = Path(cfg.data) / "train"
    if train.is_dir():
        return train
    from util.data.demo import DemoDataset
    root = Path(tmp) / "demo_source"
    for i, (img, label) in enumerate(DemoDataset(per_class=2, size=64, seed=0)):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        img.save(root / f"c{label}" / f"{i}.png")
    return root


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = build_config(argv)
    device = torch.device(cfg.device)
    set_backend_flags()  # TF32 on, as every entry script does
    rows: list[dict] = []
    emit({"part": "setup", "device": device_name(device), "smoke": cfg.smoke, "torch": torch.__version__,
          "cpu_count": os.cpu_count(), "workers": cfg.workers, "peak_tflops": (peak_flops(device) or 0) / 1e12 or None,
          "parts": cfg.parts}, rows)
    prefix, failed = None, []
    started = time.perf_counter()
    for part in cfg.parts:  # a failing part is reported and the others still run (GPU time is scarce)
        tic = time.perf_counter()
        try:
            if part == "step":
                part_step(cfg, device, rows)
            elif part == "input":
                part_input(cfg, device, rows)
            elif part == "e2e":
                prefix = part_e2e(cfg, device, rows)
            elif part == "memory":
                part_memory(cfg, device, rows, prefix)
            elif part == "knn":
                part_knn(cfg, device, rows)
        except Exception as err:  # noqa: BLE001 - reported as a JSON line, re-raised at the end
            failed.append(part)
            emit({"part": part, "error": f"{type(err).__name__}: {err}"[:2000]}, rows)
            traceback.print_exc()
        rows[-1]["part_s"] = round(time.perf_counter() - tic, 1)
    emit({"part": "done", "total_s": round(time.perf_counter() - started, 1), "failed": failed}, rows)
    if failed:
        raise SystemExit(f"gpu_check: parts failed: {failed}")
    return rows


if __name__ == "__main__":
    main()

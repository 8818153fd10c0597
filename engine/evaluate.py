"""Exact (distributed) evaluation of a classifier: loss, top-1/top-5, macro P/R/F1, MCC; per-split reports.

MAE's ``engine_finetune.evaluate`` with ``--dist_eval`` shards the validation set with a ``DistributedSampler``
that pads by repeating samples, so with N % world != 0 some images count twice (MAE's ``--dist_eval``). Here each rank
evaluates a shard WITHOUT padding (``eval_shard``: strided, the last shards one shorter) and the per-rank sums
(confusion matrix, top-k hits, loss sum) are all-reduced as integers / float64: the result equals one process's.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from util.distributed import all_reduce_sum
from util.outputs import write_text
from engine.metrics import classification_metrics, confusion_matrix, per_class_table, topk_correct

logger = logging.getLogger("vitfreeze")


def eval_shard(dataset: Dataset, *, rank: int, world_size: int) -> Dataset:
    """This rank's samples ``rank, rank + world, ...`` of ``dataset`` (no padding, no duplicates)."""
    if world_size == 1:
        return dataset
    return Subset(dataset, range(rank, len(dataset), world_size))


@torch.inference_mode()
def evaluate_heads(model: nn.Module, loader: Iterable, *, device: torch.device, num_classes: int,
                   amp_dtype: torch.dtype | None = None, ks: Sequence[int] = (1, 5)) -> list[dict[str, float]]:
    """Evaluate a model that returns the logits of H heads at once (e.g. a grid of linear probes).

    Args:
        model: maps inputs [B, ...] to logits [H, B, C] (or [B, C], treated as H = 1); put in eval mode here
            and left in it.
        loader: this rank's shard; yields ``(inputs, targets, ...)`` batches.
        device: where the model runs.
        num_classes: C.
        amp_dtype: autocast dtype (None: full precision).
        ks: top-k accuracies to report (k capped at C).

    Returns:
        One dict per head: ``loss`` (mean cross-entropy), ``acc1``/``acc5`` (percent, one key per k),
        ``acc``, ``precision``, ``recall``, ``f1``, ``mcc`` (percent, see ``engine.metrics``), ``num_samples``,
        and ``confusion`` (int64 [C, C], rows = truth).
    """
    model.eval()
    confusion = hits = loss_sum = None
    for batch in loader:
        inputs = batch[0].to(device, non_blocking=True)
        targets = batch[1].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(inputs)
        logits = (logits.unsqueeze(0) if logits.ndim == 2 else logits).float()
        if confusion is None:
            heads = logits.shape[0]
            confusion = torch.zeros(heads, num_classes, num_classes, dtype=torch.int64, device=device)
            hits = torch.zeros(heads, len(ks), dtype=torch.int64, device=device)
            loss_sum = torch.zeros(heads, dtype=torch.float64, device=device)
        for h, head_logits in enumerate(logits):
            confusion[h] += confusion_matrix(head_logits.argmax(dim=1), targets, num_classes)
            hits[h] += torch.stack(list(topk_correct(head_logits, targets, ks).values()))
            loss_sum[h] += F.cross_entropy(head_logits, targets, reduction="sum").double()
    if confusion is None:  # an empty shard still joins the all-reduce with zeros
        heads = _num_heads(model)
        confusion = torch.zeros(heads, num_classes, num_classes, dtype=torch.int64, device=device)
        hits = torch.zeros(heads, len(ks), dtype=torch.int64, device=device)
        loss_sum = torch.zeros(heads, dtype=torch.float64, device=device)
    confusion, hits, loss_sum = all_reduce_sum(confusion), all_reduce_sum(hits), all_reduce_sum(loss_sum)
    results = []
    for h in range(confusion.shape[0]):
        total = max(int(confusion[h].sum()), 1)
        metrics = {"loss": float(loss_sum[h]) / total}
        metrics.update({f"acc{k}": 100.0 * int(hits[h, i]) / total for i, k in enumerate(ks)})
        metrics.update(classification_metrics(confusion[h].cpu()))
        metrics["confusion"] = confusion[h].cpu()
        results.append(metrics)
    return results


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, *, device: torch.device, num_classes: int,
             amp_dtype: torch.dtype | None = None, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Evaluate a classifier (logits [B, C]) exactly over all ranks; see :func:`evaluate_heads` for the keys."""
    results = evaluate_heads(model, loader, device=device, num_classes=num_classes, amp_dtype=amp_dtype, ks=ks)
    if len(results) != 1:
        raise ValueError(f"the model returned {len(results)} heads; use evaluate_heads")
    return results[0]


def _num_heads(model: nn.Module) -> int:
    """Head count of a model that saw no batch on this rank (its ``heads`` attribute, else 1)."""
    heads = getattr(model, "heads", None)
    return len(heads) if heads is not None else 1


def evaluate_and_report(model: nn.Module, loaders: dict[str, DataLoader], *, names: list[str], device: torch.device,
                        amp_dtype: torch.dtype | None, output_dir: Path | None, best: dict | None = None
                        ) -> dict[str, float]:
    """Evaluate on every split and write ``per_class_<split>.txt`` and ``confusion_<split>.png`` (rank 0).

    ``best`` (from training) supplies the validation confusion matrix, so only the other splits are evaluated.
    Returns the ``val`` metrics under their names and the others as ``<split>_<name>``.
    """
    from util.vis import save_confusion_png  # lazy: pictures are optional
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, float] = {}
    for split, loader in loaders.items():
        if split == "val" and best is not None and "confusion" in best:
            metrics, confusion = {}, best["confusion"]
        else:
            metrics = evaluate(model, loader, device=device, num_classes=len(names), amp_dtype=amp_dtype)
            confusion = metrics.pop("confusion")
            logger.info("%s: %s", split, "  ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k != "num_samples"))
        out.update(metrics if split == "val" else {f"{split}_{k}": v for k, v in metrics.items()})
        if output_dir is not None:
            table = per_class_table(confusion, names)
            logger.info("%s per-class results:\n%s", split, table)
            write_text(output_dir / f"per_class_{split}.txt", table + "\n")
            save_confusion_png(output_dir / f"confusion_{split}.png", confusion, names)
    return out

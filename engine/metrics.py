"""Classification metrics from a confusion matrix: accuracy, macro precision / recall / F1, multi-class MCC, top-k.

Everything but top-k is a function of the confusion matrix, which is a sum over samples, so a distributed
evaluation all-reduces one [C, C] integer tensor and gets exactly the single-process numbers
(exact distributed evaluation, unlike MAE's per-rank averaged ``--dist_eval``).

Conventions (those of scikit-learn's ``precision_recall_fscore_support(average='macro')`` and
``matthews_corrcoef``, which is not a dependency here): a class enters the macro averages when it occurs among
the targets or the predictions; a 0/0 ratio counts as 0; the multi-class MCC is Gorodkin's R_K as in the
MAE-on-GastroVision / HyperKvasir fine-tuning report,
``MCC = (c * s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))`` with s samples, c correct,
p_k / t_k predicted / true counts of class k, and 0 when the denominator is 0. All values are percentages
(MCC x 100 as well, as that report gives it).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor


def confusion_matrix(preds: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Counts of (true class, predicted class) pairs.

    Args:
        preds: predicted class indices [N].
        targets: true class indices [N].
        num_classes: C.

    Returns:
        int64 [C, C]; entry [t, p] counts samples of class t predicted as p (rows: truth).
    """
    preds, targets = preds.reshape(-1).long(), targets.reshape(-1).long()
    if preds.shape != targets.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and targets {tuple(targets.shape)} differ in length")
    if targets.numel() and (min(preds.min(), targets.min()) < 0 or max(preds.max(), targets.max()) >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes})")
    flat = torch.bincount(targets * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, Tensor]:
    """Number of samples whose target is among the k highest logits, for each k (k capped at C).

    Args:
        logits: [N, C].
        targets: [N] class indices.
        ks: the k values.

    Returns:
        ``{k: int64 scalar tensor}`` on the logits' device (no host sync).
    """
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [N, kmax], highest first
    hits = top.eq(targets.reshape(-1, 1))
    return {k: hits[:, :min(k, kmax)].any(dim=1).sum() for k in ks}


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def per_class_stats(confusion: Tensor) -> dict[str, Tensor]:
    """Per-class precision, recall, F1 (fractions in [0, 1], 0/0 -> 0) and support from a [C, C] matrix.

    Returns:
        dict of float64 [C] tensors ``precision``, ``recall``, ``f1``, and int64 [C] ``support`` (true count),
        ``predicted`` (predicted count), plus bool [C] ``present`` (class among targets or predictions).
    """
    cm = confusion.double()
    tp = cm.diagonal()
    predicted, support = cm.sum(0), cm.sum(1)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.long(),
            "predicted": predicted.long(), "present": (support + predicted) > 0}


def mcc(confusion: Tensor) -> float:
    """Multi-class Matthews correlation coefficient (Gorodkin's R_K) in [-1, 1]; 0 if undefined."""
    cm = confusion.double()
    s, c = cm.sum(), cm.diagonal().sum()
    p, t = cm.sum(0), cm.sum(1)
    den = math.sqrt(float(s * s - (p * p).sum()) * float(s * s - (t * t).sum()))
    return float(c * s - (p * t).sum()) / den if den > 0 else 0.0


def classification_metrics(confusion: Tensor) -> dict[str, float]:
    """Accuracy, macro precision / recall / F1 and MCC, all in percent, plus the sample count.

    Args:
        confusion: [C, C] counts, rows = truth, columns = prediction.

    Returns:
        ``{'acc', 'precision', 'recall', 'f1', 'mcc', 'num_samples'}``; macro means over the classes present
        among targets or predictions.
    """
    stats = per_class_stats(confusion)
    present = stats["present"]
    total = int(confusion.sum())

    def macro(name: str) -> float:
        return 100.0 * float(stats[name][present].mean()) if bool(present.any()) else 0.0

    return {"acc": 100.0 * float(confusion.diagonal().sum()) / max(total, 1), "precision": macro("precision"),
            "recall": macro("recall"), "f1": macro("f1"), "mcc": 100.0 * mcc(confusion), "num_samples": total}


def per_class_table(confusion: Tensor, class_names: Sequence[str] | None = None) -> str:
    """A fixed-width text table: class, precision, recall, F1 (percent), support, one line per class."""
    stats = per_class_stats(confusion)
    names = list(class_names) if class_names is not None else [str(i) for i in range(confusion.shape[0])]
    width = max(5, *(len(n) for n in names))
    lines = [f"{'class':<{width}}  {'prec':>6}  {'recall':>6}  {'f1':>6}  {'support':>7}"]
    for i, name in enumerate(names):
        lines.append(f"{name:<{width}}  {100 * stats['precision'][i]:6.2f}  {100 * stats['recall'][i]:6.2f}  "
                     f"{100 * stats['f1'][i]:6.2f}  {int(stats['support'][i]):7d}")
    return "\n".join(lines)


def mean_and_std(results: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and population std (``<key>_std``) over runs (folds, seeds) of every numeric value they all share,
    as MAE reports seeds and the MAE-on-HyperKvasir report folds."""
    keys = [k for k in results[0] if all(isinstance(r.get(k), (int, float)) for r in results)]
    summary = {}
    for key in keys:
        values = torch.tensor([float(r[key]) for r in results], dtype=torch.float64)
        summary[key], summary[f"{key}_std"] = float(values.mean()), float(values.std(unbiased=False))
    return summary


# ------------------------------------------------------------------------------------------ semantic segmentation
def segmentation_confusion(preds: Tensor, targets: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Pixel confusion matrix [C, C] (rows: truth) over the pixels whose target is not ``ignore_index``.

    Runs on the tensors' device (one ``bincount``); summing it over images and processes is exact.

    Raises:
        ValueError: a target outside [0, C) that is not ``ignore_index`` (e.g. a label map with more classes than
            ``--nb_classes``), or a prediction outside [0, C).
    """
    preds, targets = preds.reshape(-1).long(), targets.reshape(-1).long()
    if preds.shape != targets.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and targets {tuple(targets.shape)} differ in size")
    keep = targets != ignore_index
    preds, targets = preds[keep], targets[keep]
    if targets.numel():
        bad = targets[(targets < 0) | (targets >= num_classes)]
        if bad.numel():
            raise ValueError(f"label map has class ids {sorted(set(bad.unique().tolist()))[:10]} outside "
                             f"[0, {num_classes}) (nb_classes {num_classes}, ignore index {ignore_index})")
        if int(preds.min()) < 0 or int(preds.max()) >= num_classes:
            raise ValueError(f"predicted class ids must lie in [0, {num_classes})")
    return torch.bincount(targets * num_classes + preds, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def segmentation_metrics(confusion: Tensor) -> dict[str, Any]:
    """mmsegmentation's ``eval_metrics`` from a pixel confusion matrix (rows: truth, columns: prediction).

    Per class: IoU = TP / (TP + FP + FN), Acc = TP / (TP + FN); NaN where the denominator is 0 (IoU: class neither
    in the labels nor predicted; Acc: class not in the labels), and the means ignore NaN (mmseg's ``nanmean``).

    Returns:
        ``{'mIoU', 'mAcc', 'aAcc'}`` in percent (NaN only if no class qualifies; aAcc 0 without pixels), plus
        ``'IoU'`` and ``'Acc'``: lists of per-class percentages (NaN for the undefined classes).
    """
    cm = confusion.double()
    tp, label, pred = cm.diagonal(), cm.sum(1), cm.sum(0)
    union = label + pred - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(label > 0, tp / label.clamp(min=1), nan)
    total = float(cm.sum())
    return {"mIoU": 100.0 * float(iou.nanmean()), "mAcc": 100.0 * float(acc.nanmean()),
            "aAcc": 100.0 * float(tp.sum()) / total if total else 0.0,
            "IoU": [100.0 * float(v) for v in iou], "Acc": [100.0 * float(v) for v in acc]}


def segmentation_table(metrics: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """Per-class IoU / Acc table (mmseg's layout), from :func:`segmentation_metrics`; undefined values as nan."""
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(metrics["IoU"]))]
    width = max(5, *(len(n) for n in names))
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    lines += [f"{name:<{width}}  {iou:6.2f}  {acc:6.2f}" for name, iou, acc in zip(names, metrics["IoU"],
                                                                                    metrics["Acc"])]
    return "\n".join(lines)

"""engine/evaluate.py: metrics against direct computations, several heads, unpadded shards (the 2-process
run equal to one process is in test_knn.py, which spawns once for extraction, k-NN and evaluation)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from engine.evaluate import eval_shard, evaluate, evaluate_heads
from engine.metrics import classification_metrics, confusion_matrix

CPU = torch.device("cpu")


def toy(n=29, classes=6):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 10, generator=g), torch.randint(0, classes, (n,), generator=g)
    torch.manual_seed(0)
    return TensorDataset(x, y), nn.Linear(10, classes)


def test_evaluate_matches_direct_computation():
    data, model = toy()
    got = evaluate(model, DataLoader(data, batch_size=4), device=CPU, num_classes=6)
    x, y = data.tensors
    with torch.no_grad():
        logits = model(x)
    ranks = (logits > logits.gather(1, y[:, None])).sum(1)  # 0 = the target has the highest logit
    assert got["acc1"] == pytest.approx(100 * (ranks < 1).float().mean().item())
    assert got["acc5"] == pytest.approx(100 * (ranks < 5).float().mean().item())
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert torch.equal(got["confusion"], confusion_matrix(logits.argmax(1), y, 6))
    assert got["acc"] == pytest.approx(got["acc1"]) and got["num_samples"] == 29
    reference = classification_metrics(confusion_matrix(logits.argmax(1), y, 6))
    assert {k: got[k] for k in reference} == pytest.approx(reference)
    assert not model.training


class TwoHeads(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.heads = nn.ModuleList([a, b])

    def forward(self, x):
        return torch.stack([h(x) for h in self.heads])


def test_heads_are_evaluated_separately():
    data, a = toy()
    _, b = toy()
    nn.init.zeros_(b.weight)
    loader = DataLoader(data, batch_size=8)
    both = evaluate_heads(TwoHeads(a, b), loader, device=CPU, num_classes=6)
    assert len(both) == 2
    assert both[0]["acc1"] == evaluate(a, loader, device=CPU, num_classes=6)["acc1"]
    assert both[1]["acc1"] == evaluate(b, loader, device=CPU, num_classes=6)["acc1"]
    with pytest.raises(ValueError, match="evaluate_heads"):
        evaluate(TwoHeads(a, b), loader, device=CPU, num_classes=6)


def test_eval_shard_has_no_duplicates():
    shards = [list(eval_shard(list(range(10)), rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10)) and [len(s) for s in shards] == [4, 3, 3]
    padded = [list(DistributedSampler(range(10), num_replicas=3, rank=r, shuffle=False)) for r in range(3)]
    assert len(sum(padded, [])) == 12  # what MAE's --dist_eval does: two samples counted twice

"""engine/knn.py: weighted k-NN against a brute-force NumPy DINO vote, chunking, index-aware extraction, and a
2-process gloo run (extraction, k-NN, engine/evaluate.py) equal to one process."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import main_knn
from engine.evaluate import eval_shard, evaluate
from engine.knn import extract_features, knn_classify
from util.data.subsets import few_shot_indices, IndexedDataset
from spawn_ranks import spawn
from conftest import tiny_demo_eval


def clustered(n, dim, classes, seed, spread=1.0):
    """Random features around one random centre per class (so k-NN is neither trivial nor at chance)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.randint(0, classes, (n,), generator=g)
    feats = centres[labels] + spread * torch.randn(n, dim, generator=g)
    return F.normalize(feats, dim=1), labels


def numpy_knn(train, train_labels, test, test_labels, k, temperature, classes):
    """DINO's eval_knn vote, one test row at a time, in float64 (ties broken by lower index)."""
    train, test = train.double().numpy(), test.double().numpy()
    top1 = top5 = 0
    for x, y in zip(test, test_labels.numpy()):
        sim = train @ x
        nearest = np.argsort(-sim, kind="stable")[:k]
        scores = np.bincount(train_labels.numpy()[nearest], weights=np.exp(sim[nearest] / temperature),
                             minlength=classes)
        ranked = np.argsort(-scores, kind="stable")
        top1 += ranked[0] == y
        top5 += y in ranked[:min(5, k)]
    return 100 * top1 / len(test), 100 * top5 / len(test)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_knn_matches_brute_force_numpy(temperature):
    train, train_labels = clustered(300, 16, 7, seed=0)
    test, test_labels = clustered(90, 16, 7, seed=1)
    ks = (1, 3, 10, 20, 100)
    got = knn_classify(train, train_labels, test, test_labels, ks=ks, temperature=temperature, num_classes=7,
                       chunk_size=32)
    for k in ks:
        assert got[k] == pytest.approx(numpy_knn(train, train_labels, test, test_labels, k, temperature, 7)), k
    accs = [got[k][0] for k in ks]
    assert 100 / 7 + 10 < max(accs) < 100  # the data is neither at chance nor trivial, so votes matter


def test_chunked_equals_unchunked_and_fp16_bank_is_close():
    train, train_labels = clustered(257, 8, 5, seed=2)
    test, test_labels = clustered(61, 8, 5, seed=3)
    full = knn_classify(train, train_labels, test, test_labels, ks=(10, 20, 200), num_classes=5, chunk_size=61)
    for chunk in (1, 7, 1000):
        assert knn_classify(train, train_labels, test, test_labels, ks=(200, 20, 10), num_classes=5,
                            chunk_size=chunk) == full
    half = knn_classify(train.half(), train_labels, test, test_labels, ks=(10, 20, 200), num_classes=5)
    for k in full:  # fp16 similarities may reorder near-equal neighbours: at most a sample or two changes
        assert abs(half[k][0] - full[k][0]) <= 2 * 100 / 61


def test_top5_uses_min_5_k_and_classes():
    # one training sample per class, k = 1: top-5 is top-1 (DINO narrows to min(5, k) predictions)
    train = torch.eye(4)
    test = F.normalize(torch.tensor([[1.0, 0.9, 0, 0], [0, 0, 0.2, 1.0]]), dim=1)
    res = knn_classify(train, torch.arange(4), test, torch.tensor([1, 3]), ks=(1, 4), num_classes=4)
    assert res[1] == (50.0, 50.0)
    assert res[4] == (50.0, 100.0)  # with k = 4 every class votes; top-5 capped at 4 classes


def test_input_validation():
    train, labels = clustered(10, 4, 2, seed=0)
    with pytest.raises(ValueError, match="bank size"):
        knn_classify(train, labels, train, labels, ks=(11,), num_classes=2)
    with pytest.raises(ValueError, match="L2-normalised"):
        knn_classify(train * 2, labels, train, labels, ks=(3,), num_classes=2)


def test_few_shot_banks():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    banks = few_shot_indices(labels, n_per_class=2, n_tries=4, seed=0)
    assert len(banks) == 4
    for bank in banks:
        assert torch.bincount(labels[bank], minlength=3).tolist() == [2, 2, 2] and len(set(bank.tolist())) == 6
    assert len({tuple(b.tolist()) for b in banks}) > 1  # tries differ
    again = few_shot_indices(labels, n_per_class=2, n_tries=4, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(banks, again))
    with pytest.raises(ValueError, match="fewer than"):
        few_shot_indices(labels, n_per_class=4, n_tries=1)


def toy_data(n=23):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def toy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 6))


def test_extract_features_is_index_aware():
    data, model = toy_data(), toy_model()
    shuffled = DataLoader(IndexedDataset(data), batch_size=5, shuffle=True,
                          generator=torch.Generator().manual_seed(1))
    feats, labels = extract_features(model, shuffled, torch.device("cpu"))
    with torch.no_grad():
        expected = model(data.tensors[0])
    assert torch.allclose(feats, expected, atol=1e-6) and torch.equal(labels, data.tensors[1])
    half = DataLoader(torch.utils.data.Subset(IndexedDataset(data), range(0, 23, 2)), batch_size=4)
    with pytest.raises(ValueError, match="not embedded"):
        extract_features(model, half, torch.device("cpu"), num_samples=23)


def _worker(rank, out_path):
    from util.distributed import init_distributed
    info = init_distributed(device="cpu")
    world = info.world_size
    data, model = toy_data(), toy_model()
    shard = eval_shard(IndexedDataset(data), rank=info.rank, world_size=info.world_size)  # 12 / 11 samples
    feats, labels = extract_features(model, DataLoader(shard, batch_size=5), info.device, num_samples=len(data))
    feats = F.normalize(feats, dim=1)
    res = knn_classify(feats[:15], labels[:15], feats[15:], labels[15:], ks=(1, 3, 5), num_classes=3, chunk_size=3)
    loader = DataLoader(eval_shard(data, rank=rank, world_size=world), batch_size=5)  # 12 / 11 samples, short last
    metrics = evaluate(model, loader, device=info.device, num_classes=6)
    torch.save({"feats": feats, "labels": labels, "res": res, "metrics": metrics}, f"{out_path}.{rank}")


def test_two_processes_equal_one_on_an_uneven_split(tmp_path):
    """Extraction, k-NN and evaluation with 2 gloo processes on 23 samples (shards of 12 and 11)."""
    spawn(_worker, str(tmp_path / "out"))
    data, model = toy_data(), toy_model()
    feats, labels = extract_features(model, DataLoader(IndexedDataset(data), batch_size=23), torch.device("cpu"))
    feats = F.normalize(feats, dim=1)
    single = knn_classify(feats[:15], labels[:15], feats[15:], labels[15:], ks=(1, 3, 5), num_classes=3,
                          chunk_size=8)
    metrics = evaluate(model, DataLoader(data, batch_size=7), device=torch.device("cpu"), num_classes=6)
    for rank in range(2):  # every rank holds the single-process results
        run = torch.load(tmp_path / f"out.{rank}", weights_only=False)
        assert torch.allclose(run["feats"], feats, atol=1e-6) and torch.equal(run["labels"], labels)
        assert run["res"] == single
        assert torch.equal(run["metrics"].pop("confusion"), metrics["confusion"])
        assert run["metrics"].pop("loss") == pytest.approx(metrics["loss"], rel=1e-6)
        assert run["metrics"] == {k: v for k, v in metrics.items() if k not in ("loss", "confusion")}


KNN = tiny_demo_eval("--batch_size", "64", "--nb_knn", "5", "20")


def test_main_knn_saved_features_give_the_same_results(small_demo, tmp_path):
    fresh = main_knn.main([*KNN, "--save_features", str(tmp_path / "feats"), "--output_dir", str(tmp_path / "a")])
    assert sorted(p.name for p in (tmp_path / "feats").iterdir()) == sorted(main_knn.FEATURE_FILES)
    assert torch.load(tmp_path / "feats" / "trainfeat.pth", weights_only=True).shape == (128, 192)
    loaded = main_knn.main([*KNN, "--load_features", str(tmp_path / "feats"), "--output_dir", str(tmp_path / "b")])
    assert loaded == fresh and set(fresh) == {"knn5_top1", "knn5_top5", "knn20_top1", "knn20_top5"}
    assert json.loads((tmp_path / "a" / "knn_results.json").read_text())["knn20_top1"] == fresh["knn20_top1"]
    half = main_knn.main([*KNN, "--load_features", str(tmp_path / "feats"), "--fp16_bank", "--output_dir",
                          str(tmp_path / "c")])
    assert abs(half["knn20_top1"] - fresh["knn20_top1"]) <= 2 * 100 / 128


def test_main_knn_few_shot_reports_mean_and_std(small_demo, tmp_path):
    feats = tmp_path / "feats"
    main_knn.main([*KNN, "--save_features", str(feats), "--output_dir", str(tmp_path / "a")])
    shots = main_knn.main([*KNN, "--load_features", str(feats), "--n_per_class", "2", "--n_tries", "3",
                           "--output_dir", str(tmp_path / "b")])
    assert set(shots) == {"knn5_top1", "knn5_top5", "knn5_top1_std", "knn5_top5_std"}  # k=20 > 16-image banks
    train = F.normalize(torch.load(feats / "trainfeat.pth", weights_only=True), dim=1)
    labels = torch.load(feats / "trainlabels.pth", weights_only=True)
    test = F.normalize(torch.load(feats / "testfeat.pth", weights_only=True), dim=1)
    test_labels = torch.load(feats / "testlabels.pth", weights_only=True)
    tries = [knn_classify(train[b], labels[b], test, test_labels, ks=(5,), num_classes=8)[5][0]
             for b in few_shot_indices(labels, n_per_class=2, n_tries=3, seed=0)]
    assert shots["knn5_top1"] == pytest.approx(np.mean(tries))
    assert shots["knn5_top1_std"] == pytest.approx(np.std(tries))


def test_main_knn_checks_nb_classes_against_the_data(small_demo, tmp_path):
    with pytest.raises(ValueError, match=r"--nb_classes 5 does not match the data: demo .* has 8 classes"):
        main_knn.main([*KNN, "--nb_classes", "5", "--output_dir", str(tmp_path / "o")])


def _feature_folder(path, **replace):
    """DINO's four feature files (10 train, 6 test, 4 dims), with some replaced by raw bytes or other objects."""
    path.mkdir()
    tensors = dict(zip(main_knn.FEATURE_FILES, (torch.randn(10, 4), torch.arange(10) % 3, torch.randn(6, 4),
                                                 torch.arange(6) % 3)))
    for name, value in {**tensors, **replace}.items():
        if isinstance(value, bytes):
            (path / name).write_bytes(value)
        elif value is not None:
            torch.save(value, path / name)
    return path


@pytest.mark.parametrize("replace, expected", [
    ({"trainfeat.pth": None}, "has no trainfeat.pth"),
    ({"testfeat.pth": b""}, "empty (0 bytes)"),
    ({"trainlabels.pth": b"0 1 2 0 1 2\n"}, "a text file"),
    ({"trainfeat.pth": {"feats": torch.zeros(10, 4)}}, "holds a dict, not a tensor"),
    ({"testfeat.pth": torch.randn(6, 5)}, "train features have 4 dims, test 5"),
    ({"trainlabels.pth": torch.arange(9)}, "train features (10, 4) and labels (9,) do not fit"),
    ({"testlabels.pth": torch.zeros(6)}, "test labels are torch.float32, not class indices"),
])
def test_load_features_says_what_is_wrong_with_which_file(tmp_path, replace, expected):
    folder = _feature_folder(tmp_path / "feats", **replace)
    with pytest.raises((ValueError, FileNotFoundError)) as exc:
        main_knn.load_features(folder, torch.device("cpu"))
    message = str(exc.value)
    assert expected in message and str(folder) in message and "\n" not in message, message
    good = _feature_folder(tmp_path / "good")
    loaded = main_knn.load_features(good, torch.device("cpu"))
    assert [tuple(t.shape) for t in loaded] == [(10, 4), (10,), (6, 4), (6,)]


def test_main_knn_load_features_from_a_bad_folder_is_a_value_error(tmp_path):
    folder = _feature_folder(tmp_path / "feats", **{"testfeat.pth": b"oops"})
    with pytest.raises(ValueError, match="testfeat.pth: a text file"):
        main_knn.main([*KNN, "--load_features", str(folder), "--output_dir", str(tmp_path / "out")])

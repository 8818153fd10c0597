"""run.sh chains: each task its own data (TASK:key=value), a pretraining's checkpoint handed to the tasks after it,
and a command written for more nodes refused with the NNODES that fits."""
import json
import os
import subprocess

import pytest
import yaml

from test_run_sh import checkout, job, run_sh, run_sh_replayed  # noqa: F401 (fixtures)


def resolved_tasks(stdout: str) -> dict[str, dict]:
    """The dry run's resolved arguments per task: each task's '[run.sh] <command>' line, then its YAML."""
    tasks, current, lines = {}, None, []
    for line in [*stdout.splitlines(), "[run.sh] end"]:
        if line.startswith("[run.sh] ") and (" main_" in line or line == "[run.sh] end"):
            if current:
                data = yaml.safe_load("\n".join(lines))
                tasks[data["output_dir"].rsplit("/", 1)[1]] = data
            current, lines = line, []
        elif current and not line.startswith("[run.sh]"):
            lines.append(line)
    return tasks


def test_each_task_of_a_chain_gets_its_own_data_path(run_sh_replayed, job, tmp_path):
    """dBOT's transfer chain passes no --data_path; TASK:data_path=... gives each data set its folder."""
    ckpt = tmp_path / "checkpoint-1600.pth"
    ckpt.write_bytes(b"")
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cars").mkdir()
    res = run_sh_replayed(job, "cifar10_cls+cars_cls", "vit_base", "0", str(ckpt),
                          f"cifar10_cls:data_path={tmp_path}/cifar10",
                          f"cars_cls:data_path={tmp_path}/cars", "cars_cls:epochs=7", "--dry_run=config")
    assert res.returncode == 0, res.stderr
    tasks = resolved_tasks(res.stdout)
    assert tasks["cifar10_cls"]["data_path"] == f"{tmp_path}/cifar10" and tasks["cifar10_cls"]["data_set"] == "cifar10"
    assert tasks["cars_cls"]["data_path"] == f"{tmp_path}/cars" and tasks["cars_cls"]["epochs"] == 7
    assert tasks["cifar10_cls"]["epochs"] != 7  # the override is the task's own
    assert tasks["cifar10_cls"]["finetune"] == tasks["cars_cls"]["finetune"] == str(ckpt)


def test_a_probe_after_pretraining_uses_the_pretrainings_checkpoint(run_sh_replayed, job):
    res = run_sh_replayed(job, "pretrain_demo+linprobe", "tiny", "0", "linprobe:data_set=demo", "--dry_run=config")
    assert res.returncode == 0, res.stderr
    wanted = f"output/{job}/pretrain_demo/checkpoint-last.pth"
    assert f"[run.sh] linprobe: --finetune {wanted} once the chain's pretraining has written it" in res.stdout
    tasks = resolved_tasks(res.stdout)
    assert tasks["pretrain_demo"]["data_path"] == "demo" and tasks["linprobe"]["data_set"] == "demo"


def test_an_explicit_finetune_wins_over_the_chain(run_sh_replayed, job, tmp_path):
    (tmp_path / "mine.pth").write_bytes(b"")
    res = run_sh_replayed(job, "pretrain_demo+linprobe", "tiny", "0", "linprobe:data_set=demo",
                          f"linprobe:finetune={tmp_path}/mine.pth", "--dry_run=config")
    assert res.returncode == 0, res.stderr
    assert resolved_tasks(res.stdout)["linprobe"]["finetune"] == f"{tmp_path}/mine.pth"
    assert "once the chain's pretraining" not in res.stdout


@pytest.mark.parametrize("task, flags, nodes, accum", [  # dBOT's ViT-H/14 fine-tuning commands, 224 and 448
    ("imagenet_finetune", ["--batch_size", "16", "--accum_iter", "2"], 4, 8),
    ("imagenet_finetune", ["--input_size", "448", "--batch_size", "8", "--accum_iter", "4", "--epochs", "10",
                           "--warmup_epochs", "2"], 4, 16),
])
def test_a_command_for_four_nodes_on_one_says_the_nnodes_that_fits(run_sh, checkout, job, tmp_path, task, flags,
                                                                   nodes, accum):
    res = run_sh(job, task, "vit_huge_patch14", "8", *flags, "--data_path", str(tmp_path))
    assert res.returncode == 2
    # 1024 = batch x accum x processes: 16 x 2 x 32 and 8 x 4 x 32 -> 4 nodes of 8 GPUs, or accum 1024 / (b x 8)
    assert f"NNODES={nodes} ./run.sh" in res.stderr and f"--accum_iter {accum} here" in res.stderr
    assert "pass only one of the two" not in res.stderr
    assert not (checkout / "output" / job).exists()


@pytest.mark.parametrize("args, words", [
    (("knn", "tiny", "0", "nope:data_path=x"), "'nope' is not a task"),
    (("knn", "tiny", "0", "linprobe:data_path=x"), "overrides a task that is not in the chain 'knn'"),
])
def test_a_task_override_for_no_task_of_the_chain_is_refused(run_sh, checkout, job, args, words):
    res = run_sh(job, *args)
    assert res.returncode == 2 and words in res.stderr
    assert not (checkout / "output" / job).exists()


@pytest.mark.slow
def test_a_pretrain_then_probe_chain_runs_end_to_end(checkout, job):
    """One real chain on the demo data (a minute or more on a loaded CPU): the probe loads the checkpoint the
    pretraining wrote."""
    res = subprocess.run(["bash", str(checkout / "run.sh"), job, "pretrain_demo+linprobe", "tiny", "0",
                          "pretrain_demo:epochs=1", "pretrain_demo:--debug", "linprobe:data_set=demo",
                          "linprobe:epochs=1", "linprobe:warmup_epochs=0", "linprobe:batch_size=64",
                          "linprobe:eff_batch_size=64", "linprobe:input_size=64"],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert (checkout / "output" / job / "pretrain_demo" / "checkpoint-last.pth").is_file()
    command = next((checkout / "output" / job / "linprobe" / "records").iterdir()) / "command.txt"
    assert f"--finetune output/{job}/pretrain_demo/checkpoint-last.pth" in command.read_text()
    log = (checkout / "output" / job / "linprobe" / "cli_logs.txt").read_text()
    assert f"output/{job}/pretrain_demo/checkpoint-last.pth" in log


# ------------------------------------------------------------------------------ dBOT's six-task transfer chain
def transfer_stand_ins(root):
    """Demo-sized stand-ins of the six transfer sets in their published layouts, with their real class counts
    (CIFAR-10/100 python batches, Stanford Cars' devkit, Flowers-102's .mat files, iNaturalist 2018/2019 JSON):
    a few 8-px images each."""
    import json

    import numpy as np
    sio = pytest.importorskip("scipy.io")
    from test_transfer_datasets import write_cifar, write_flowers, write_image

    places = {}
    for name in ("cifar10", "cifar100"):
        write_cifar(root / name, name)
        places[name] = root / name
    cars = root / "cars" / "stanford_cars"
    (cars / "devkit").mkdir(parents=True)
    record = [("fname", "O"), ("class", "O")]
    for folder, annos in (("cars_train", cars / "devkit" / "cars_train_annos.mat"),
                          ("cars_test", cars / "cars_test_annos_withlabels.mat")):
        names = [f"{i:05d}.jpg" for i in range(1, 5)]
        for i, n in enumerate(names):
            write_image(cars / folder / n, 40 * i)
        sio.savemat(annos, {"annotations": np.array([(n, 1 + 50 * i) for i, n in enumerate(names)], dtype=record)})
    sio.savemat(cars / "devkit" / "cars_meta.mat",
                {"class_names": np.array([f"car {i}" for i in range(196)], dtype=object)})
    places["cars"] = root / "cars"
    write_flowers(root / "flowers")
    places["flowers"] = root / "flowers"
    for year, classes in ((2018, 8142), (2019, 1010)):
        folder = root / f"inat{year}"
        files = [f"train_val{year}/c/{i}.jpg" for i in range(4)]
        for i, f in enumerate(files):
            write_image(folder / f, 50 * i)
        cats = [{"id": i, "name": f"species {i}"} for i in range(classes)]
        for split, ids in (("train", range(4)), ("val", range(2))):
            (folder / f"{split}{year}.json").write_text(json.dumps({
                "images": [{"id": i, "file_name": files[i]} for i in ids],
                "annotations": [{"id": i, "image_id": i, "category_id": 7 * i} for i in ids], "categories": cats}))
        places[f"inat{year % 100}"] = folder
    return places


@pytest.mark.slow
def test_dbots_transfer_chain_runs_end_to_end(checkout, job, tmp_path):
    """dBOT's transfer command (six fine-tunings in one call, from one pretrained checkpoint) through run.sh on one
    CPU: each task its stand-in data (TASK:data_path=...), tiny sizes for every task (key=value), the checkpoint for
    all. The stand-in CIFAR files cannot match torchvision's md5 sums of the real ones: a sitecustomize module on
    PYTHONPATH turns that check off in the chain's processes, and nothing else."""
    import torch

    import models

    places = transfer_stand_ins(tmp_path / "data")
    custom = tmp_path / "site"
    custom.mkdir()
    (custom / "sitecustomize.py").write_text(
        "import torchvision.datasets.cifar as cifar\ncifar.CIFAR10._check_integrity = lambda self: True\n"
        "cifar.check_integrity = lambda *args, **kwargs: True\n")
    vit = models.create_model("vit_tiny_patch16", img_size=32, num_classes=0)
    ckpt = tmp_path / "checkpoint-1600.pth"
    torch.save({"model": vit.state_dict()}, ckpt)
    tasks = {"cifar10_cls": "cifar10", "cifar_cls": "cifar100", "cars_cls": "cars", "flwrs_cls": "flowers",
             "inat_cls": "inat18", "inat19_cls": "inat19"}
    res = subprocess.run(
        ["bash", str(checkout / "run.sh"), job, "+".join(tasks), "tiny", "0", str(ckpt),
         *(f"{task}:data_path={places[data]}" for task, data in tasks.items()),
         "input_size=32", "batch_size=2", "eff_batch_size=2", "epochs=1", "warmup_epochs=0", "num_workers=0",
         "print_freq=1"],
        capture_output=True, text=True, timeout=1200, cwd=checkout,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(custom)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    classes = {"cifar10": 10, "cifar100": 100, "cars": 196, "flowers": 102, "inat18": 8142, "inat19": 1010}
    for task, data in tasks.items():
        out = checkout / "output" / job / task
        results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
        assert results is not None and "acc1" in results, task
        head = torch.load(out / "checkpoint-last.pth", weights_only=False)["model"]["head.weight"]
        assert head.shape == (classes[data], 192), task
        log = (out / "cli_logs.txt").read_text()
        assert f"loaded {ckpt}" in log, task  # every task starts from the pretrained checkpoint

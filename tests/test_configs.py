"""Every recipe in configs/ dry-runs through its own entry script; effective batches survive a change of GPUs."""
import re
from pathlib import Path

import pytest
import yaml

import main_detect
import main_finetune
import main_knn
import main_linprobe
import main_pretrain
import main_segment
import models

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"pretrain": main_pretrain, "finetune": main_finetune, "linprobe": main_linprobe, "knn": main_knn,
           "detect": main_detect, "segment": main_segment}
RECIPES = sorted((ROOT / "configs").glob("*/*.yaml"))


def dry_run(script, argv: list[str], capsys) -> dict:
    """The resolved configuration; recipes name no data (the user's), so a folder that exists stands in for it."""
    data = [] if "--data_path" in argv else ["--data_path", str(ROOT)]
    assert script.main(argv + data + ["--dry_run=config"]) == {}
    return yaml.safe_load(capsys.readouterr().out)


def test_every_folder_of_configs_has_an_entry_script():
    assert {p.parent.name for p in RECIPES} == set(SCRIPTS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_dry_runs_through_its_entry_script(path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    resolved = dry_run(SCRIPTS[path.parent.name], ["--config", str(path)], capsys)
    recipe = yaml.safe_load(path.read_text())
    recipe.pop("data_path", None)  # replaced by dry_run's stand-in
    assert {key: resolved[key] for key in recipe} == recipe  # every key taken, none changed
    assert resolved["model"] in models.list_models()
    text = path.read_text()
    stated = re.search(r"[Ee]ffective batch (\d+) =", text)  # "Effective batch 1024 = 32 x 32 GPUs"
    if stated and path.parent.name != "knn":
        # a recipe that states its effective batch keeps it: eff_batch_size says so, accum_iter is derived
        assert recipe.get("eff_batch_size") == int(stated.group(1)) and "accum_iter" not in recipe, path.name
        assert resolved["batch_size"] * resolved["accum_iter"] <= resolved["eff_batch_size"]
    if resolved.get("mixup", 0) > 0 or resolved.get("cutmix", 0) > 0:
        assert resolved["batch_size"] % 2 == 0  # timm's Mixup flips the batch: it needs an even size


@pytest.mark.parametrize("world, accum", [(1, 8), (4, 2), (8, 1)])
def test_effective_batch_is_kept_when_the_number_of_gpus_changes(world, accum, capsys, monkeypatch):
    config = str(ROOT / "configs" / "pretrain" / "localmim_vit_base_100e.yaml")  # 2048 = 256 x accum x world
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    resolved = dry_run(main_pretrain, ["--config", config], capsys)
    assert (resolved["eff_batch_size"], resolved["accum_iter"]) == (2048, accum)
    assert dry_run(main_pretrain, ["--config", config, "--batch_size", "64"], capsys)["accum_iter"] == accum * 4


def test_a_slurm_job_resolves_its_effective_batch_before_submitting(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = str(ROOT / "configs" / "finetune" / "mae_vit_base.yaml")  # 1024 = 32 x accum x world
    resolved = dry_run(main_finetune, ["--config", config, "--launcher", "slurm", "--nodes", "2", "--ngpus", "8"],
                       capsys)
    assert resolved["accum_iter"] == 2


@pytest.mark.parametrize("argv, env_world, message", [
    (["--config", "configs/pretrain/localmim_vit_base_100e.yaml"], 3,
     "effective batch 2048 is not a multiple of batch_size 256 x 3 processes = 768: run on 1 / 2 / 4 / 8"),
    (["--config", "configs/pretrain/localmim_vit_base_100e.yaml", "--accum_iter", "4"], 8,
     "--accum_iter 4 gives an effective batch of 8192"),
    (["--config", "configs/finetune/mae_gastrovision.yaml", "--launcher", "slurm", "--ngpus", "2"], None,
     "effective batch 50 is not a multiple of batch_size 50 x 2 processes"),
])
def test_wrong_number_of_gpus_for_a_recipe_is_a_clear_error(argv, env_world, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    if env_world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(env_world))
    script = main_pretrain if "pretrain" in argv[1] else main_finetune
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_submitit_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "submitit", None)  # import submitit -> ImportError
    with pytest.raises(SystemExit) as exit_info:
        main_knn.main(["--launcher", "slurm", "--data_set", "demo", "--output_dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "needs submitit: pip install submitit" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing started


def test_a_stale_world_size_flag_is_reported(capsys, monkeypatch):
    """ViTFreeze's published commands carry --world_size; the process count torchrun started is the one that counts."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert main_pretrain.main(["--world_size", "4", "--accum_iter", "2", "--data_path", "demo",
                               "--dry_run=config"]) == {}
    assert "--world_size 4 ignored: this run has 8 process(es)" in capsys.readouterr().err
    assert main_pretrain.main(["--world_size", "8", "--data_path", "demo", "--dry_run=config"]) == {}
    assert "ignored" not in capsys.readouterr().err

"""run.sh treats its arguments and environment as data: no arithmetic evaluation of NNODES/NGPUS, no output outside
output/, and the recorded command line is shell-quoted."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_sh(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "run.sh"), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=cwd)


@pytest.mark.parametrize("var,value", [("NNODES", "NGPUS[$(touch {marker})]"), ("NNODES", "2; touch {marker}"),
                                       ("NNODES", "0"), ("NGPUS", "a[$(touch {marker})]")])
def test_nnodes_and_ngpus_are_never_evaluated(tmp_path, var, value):
    marker = tmp_path / "pwned"
    value = value.format(marker=marker)
    ngpus = value if var == "NGPUS" else "0"
    env = {"NNODES": value} if var == "NNODES" else {}
    res = run_sh("job_security", "pretrain_demo", "tiny", ngpus, env=env)
    assert res.returncode == 2, res.stderr
    assert f"{var} must be a number" in res.stderr
    assert not marker.exists(), "run.sh executed code from its environment"


@pytest.mark.parametrize("job", ["../../escape", "a/b", "..", "-rf", ""])
def test_job_name_stays_under_output(job):
    res = run_sh(job, "pretrain_demo", "tiny", "0")
    assert res.returncode == 2 and "JOB_NAME must be a plain folder name" in res.stderr, res.stderr


def test_recorded_command_line_is_shell_quoted(tmp_path):
    """The [run.sh] line, pasted back into a shell, gives the same arguments (an extra with a space and a quote)."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("run.sh", "record.sh"):
        (copy / name).write_text((ROOT / name).read_text())
    (copy / "configs" / "pretrain").mkdir(parents=True)
    (copy / "configs" / "pretrain" / "echo.yaml").write_text("model: mae_vit_tiny_patch16\n")
    # a stand-in entry script that prints its arguments (the dry run included)
    (copy / "main_pretrain.py").write_text("import sys, json\nprint(json.dumps(sys.argv[1:]))\n")
    res = subprocess.run(["bash", str(copy / "run.sh"), "jobq", "pretrain_echo", "tiny", "0", "--note", "it's a b"],
                         capture_output=True, text=True, timeout=60, cwd=copy)
    assert res.returncode == 0, res.stderr
    line = (copy / "output" / "jobq" / "pretrain_echo" / "run_sh_commands.txt").read_text().strip()
    assert line.startswith("[run.sh] ")
    parsed = subprocess.run(["bash", "-c", "set -- " + line[len("[run.sh] "):] + '; printf "%s\\n" "$@"'],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert parsed[0] == "python" and parsed[1] == "main_pretrain.py"
    assert parsed[-2:] == ["--note", "it's a b"]


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    """A PATH folder with a ``torchrun`` that only leaves a marker (nothing may start) and an ``nvidia-smi -L``
    listing two GPUs."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "torchrun").write_text(f"#!/bin/sh\ntouch {tmp_path / 'started'}\n")
    (folder / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Fake (UUID: GPU-0)'\necho 'GPU 1: Fake (UUID: GPU-1)'\n")
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return folder


@pytest.fixture
def mirror_sh(tmp_path, fake_bin):
    """run.sh of the checkout seen through symlinks in tmp_path (its ``output/`` lands there, not in the checkout),
    with ``fake_bin`` first on PATH; asserts that a refusal is one line and that nothing was started."""
    mirror = tmp_path / "checkout"
    mirror.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("output", ".git"):
            (mirror / entry.name).symlink_to(entry)

    def refused(*args: str, env: dict | None = None) -> str:
        res = subprocess.run(["bash", str(mirror / "run.sh"), *args], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", **(env or {})})
        assert res.returncode == 2, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not (tmp_path / "started").exists() and not (mirror / "output").exists()
        return res.stderr
    return refused


@pytest.mark.parametrize("ngpus,nnodes,msg", [("99999999999999999999", "1", "NGPUS must be 0..64"),
                                              ("65", "1", "NGPUS must be 0..64"),
                                              ("000000000000000000065", "1", "NGPUS must be 0..64"),
                                              ("1", "99999999999999999999", "NNODES must be 1..1024"),
                                              ("1", "1025", "NNODES must be 1..1024"),
                                              ("4", "1", "this node has 2 visible GPU(s)")])
def test_ngpus_and_nnodes_are_bounded(mirror_sh, ngpus, nnodes, msg):
    """Digits alone are not enough: 20 digits wrap around in bash arithmetic (torchrun was asked for
    7766279631452241919 processes); on one node NGPUS is also bounded by the GPUs nvidia-smi lists."""
    assert msg in mirror_sh("job_bounds", "pretrain_demo", "tiny", ngpus, "--dry_run", env={"NNODES": nnodes})


def test_cuda_visible_devices_narrows_the_gpus_a_node_offers(mirror_sh):
    stderr = mirror_sh("job_bounds", "pretrain_demo", "tiny", "2", "--dry_run", env={"CUDA_VISIBLE_DEVICES": "1"})
    assert "this node has 1 visible GPU(s)" in stderr


def test_ngpus_within_the_visible_gpus_starts_torchrun(tmp_path, fake_bin):
    """The bounds refuse nothing legitimate: 2 processes on a node listing 2 GPUs reach torchrun (a stand-in)."""
    copy = tmp_path / "repo"
    (copy / "configs" / "pretrain").mkdir(parents=True)
    for name in ("run.sh", "record.sh"):
        (copy / name).write_text((ROOT / name).read_text())
    (copy / "configs" / "pretrain" / "echo.yaml").write_text("model: mae_vit_tiny_patch16\n")
    (copy / "main_pretrain.py").write_text("print('resolved')\n")  # the up-front check's stand-in
    res = subprocess.run(["bash", str(copy / "run.sh"), "jobn", "pretrain_echo", "tiny", "0002"], capture_output=True,
                         text=True, timeout=60, cwd=copy, env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"})
    assert res.returncode == 0, res.stderr
    assert "torchrun --nproc_per_node=2 " in res.stdout and (tmp_path / "started").exists()


@pytest.mark.parametrize("job", [" -rf", "\t-x", "a\nb", "job\x1b[2J"])
def test_job_name_without_leading_space_or_control_characters(mirror_sh, job):
    assert "JOB_NAME must be a plain folder name" in mirror_sh(job, "pretrain_demo", "tiny", "0", "--dry_run")


@pytest.mark.parametrize("extra", ["lr_config.step=8\n11", "epochs=3\r", "--note=a\nb", "data.samples_per_gpu=\x072"])
def test_values_with_newlines_or_control_characters_are_refused(mirror_sh, extra):
    """``lr_config.step=$'8\\n11'`` became ``--lr_steps 8`` (``read`` stops at the newline): refused instead."""
    stderr = mirror_sh("job_cntrl", "pretrain_demo", "tiny", "0", extra, "--dry_run")
    assert "newline or another control character" in stderr

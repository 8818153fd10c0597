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

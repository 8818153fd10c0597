"""House rules that a reader relies on: import direction between packages, no grab-bag module names."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# package -> project packages it may import
# engine's step functions call pure model-side functions (e.g. models.masking.keyed_noise)
ALLOWED = {"models": set(), "util": set(), "engine": {"util", "models"}}
PROJECT = {"models", "engine", "util"}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT


def test_dependency_direction():
    bad = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            extra = imported_packages(path) - allowed - {package}
            if extra:
                bad.append(f"{path.relative_to(ROOT)} imports {sorted(extra)}")
    assert not bad, bad


def test_no_grab_bag_modules():
    names = {p.stem for pkg in PROJECT for p in (ROOT / pkg).rglob("*.py")}
    assert not names & {"misc", "utils", "helpers", "common"}

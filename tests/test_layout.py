"""House rules that a reader relies on: import direction between packages, no grab-bag module names."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# package -> project packages it may import
# engine's step functions call pure model-side functions (e.g. models.masking.keyed_noise)
ALLOWED = {"models": set(), "util": set(), "engine": {"util", "models"}}
PROJECT = {"models", "engine", "util"}
# leaf modules any package may import: they import the standard library only, so a model-side loader that words its
# messages with util/keys.py (the key lists and state-dict problems util/checkpoint.py words alike) brings in no
# file I/O, process group or training code; models/ still may not import the rest of util/
SHARED_LEAVES = {"util.keys"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (absolute imports, at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def imported_packages(path: Path) -> set[str]:
    """Project packages ``path`` imports, not counting imports of :data:`SHARED_LEAVES` (``from util.keys import
    x``, ``import util.keys``, ``from util import keys``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names if alias.name not in SHARED_LEAVES}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module not in SHARED_LEAVES and not all(f"{node.module}.{alias.name}" in SHARED_LEAVES
                                                            for alias in node.names):
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


def test_shared_leaves_import_the_standard_library_only():
    for module in SHARED_LEAVES:
        path = ROOT / (module.replace(".", "/") + ".py")
        outside = imported_modules(path) - set(sys.stdlib_module_names) - {"__future__"}
        assert not outside, f"{module} imports {sorted(outside)}"


def test_dependency_check_lets_only_the_shared_leaves_through(tmp_path):
    """The exception above can fail: a model-side file importing another util module is still caught."""
    path = tmp_path / "m.py"
    for source in ("from util.keys import describe_keys\n", "import util.keys\n", "from util import keys\n"):
        path.write_text(source)
        assert imported_packages(path) == set(), source
    for source in ("from util.checkpoint import load_checkpoint\n", "from util import keys, checkpoint\n",
                   "import util.keys, util.logging\n", "def f():\n    from util.distributed import DistInfo\n"):
        path.write_text(source)
        assert imported_packages(path) == {"util"}, source


def test_no_grab_bag_modules():
    names = {p.stem for pkg in PROJECT for p in (ROOT / pkg).rglob("*.py")}
    assert not names & {"misc", "utils", "helpers", "common"}


def helper_imports(path: Path, scripts: set[str]) -> set[str]:
    """Entry scripts among ``scripts`` whose helpers ``path`` imports (absolute imports, at any depth of the file).

    ``from main_x import main`` / ``cli`` alone is an alias of that entry point (the script names of the
    published MAE / LocalMIM / ViTFreeze commands, e.g.
    ``main_finetune_gastrovision.py``), not a shared helper, so it does not count; ``import main_x`` or any other
    name does."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if not all(alias.name in ("main", "cli") for alias in node.names):
                found.add(node.module.split(".")[0])
    return found & scripts


def test_entry_scripts_import_no_entry_script():
    """Shared helpers live in the packages: no ``main_*.py`` imports another's helpers, and no package imports an
    entry script at all."""
    scripts = {p.stem for p in ROOT.glob("main_*.py")}
    assert {"main_pretrain", "main_finetune", "main_linprobe", "main_knn"} <= scripts
    bad = []
    for path in sorted(ROOT.glob("main_*.py")):
        hits = helper_imports(path, scripts - {path.stem})
        if hits:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(hits)}")
    for path in [p for pkg in sorted(PROJECT) for p in sorted((ROOT / pkg).rglob("*.py"))]:
        hits = imported_modules(path) & scripts
        if hits:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(hits)}")
    assert not bad, bad


def test_layout_check_catches_an_entry_script_import(tmp_path):
    """The check above can fail: the import forms it must see (plain, from, inside a function), and the one alias
    form it lets pass."""
    scripts = {"main_knn", "main_pretrain"}
    for source in ("import main_knn\n", "from main_pretrain import save_schedule_png\n",
                   "def f():\n    from main_knn import embed\n", "from main_knn import main, embed\n"):
        (tmp_path / "main_x.py").write_text(source)
        assert helper_imports(tmp_path / "main_x.py", scripts), source
    for alias in ("from main_knn import main\n", "from main_knn import cli, main as knn_main\n"):
        (tmp_path / "main_x.py").write_text(alias)
        assert not helper_imports(tmp_path / "main_x.py", scripts), alias
    assert imported_modules(tmp_path / "main_x.py") & scripts == {"main_knn"}


MAX_SCRIPT_LINES = 150


def entry_scripts() -> list[Path]:
    """The ``main_*.py`` that build their own parser; the aliases (``main_finetune_hyperkvasir.py``, ...) take
    another script's ``main`` / ``cli``."""
    return [p for p in sorted(ROOT.glob("main_*.py")) if any(
        isinstance(node, ast.FunctionDef) and node.name == "build_parser" for node in ast.parse(p.read_text()).body)]


def test_entry_scripts_read_as_recipes():
    """An entry script is its parser, its ``main`` (the order of a run) and ``cli``, under 150 lines: the builders
    and helpers of a task live in its engine module (``engine/pretrain.py``, ``engine/finetune.py``, ...) and its
    flag groups in ``util/args``."""
    scripts = entry_scripts()
    assert {p.stem for p in scripts} == {"main_pretrain", "main_finetune", "main_linprobe", "main_knn",
                                         "main_segment", "main_detect"}
    long = {p.name: n for p in scripts if (n := len(p.read_text().splitlines())) >= MAX_SCRIPT_LINES}
    assert not long, f"entry scripts of {MAX_SCRIPT_LINES} lines or more: {long}"


def test_homes_of_the_method_and_the_loop_control():
    """FreezeOut, preemption, the run driver and evaluation metrics belong with the engine; util keeps generic
    helpers only."""
    for module in ("run", "train", "preemption", "freezeout", "metrics", "coco_eval", "evaluate"):
        assert (ROOT / "engine" / f"{module}.py").is_file(), module
    for gone in ("freezeout", "metrics", "coco_eval"):
        assert not (ROOT / "util" / f"{gone}.py").exists(), gone
    assert "class Preemption" not in (ROOT / "util" / "launch.py").read_text()

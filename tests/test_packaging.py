"""The install brings the dependencies only: no generic top-level names (``models``, ``engine``, ``util``, the
scripts) in site-packages, where they could shadow another project's or be shadowed by them. The scripts and the
tests import them from the checkout (pytest through its ``pythonpath``)."""
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_install_ships_no_top_level_packages_or_modules():
    """``packages`` and ``py-modules`` are given and empty: absent, setuptools would discover packages itself."""
    setuptools = pyproject()["tool"]["setuptools"]
    assert setuptools.get("packages") == [] and setuptools.get("py-modules") == []
    assert "package-dir" not in setuptools


def test_tests_import_the_checkout():
    assert pyproject()["tool"]["pytest"]["ini_options"]["pythonpath"] == ["."]
    assert {"models", "engine", "util"} <= {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}

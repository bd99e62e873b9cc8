"""The wheel carries every package of jna and its data (pyproject lists the packages explicitly:
``configs/`` is mapped into the wheel as ``jna.configs``, which package discovery cannot find)."""

from __future__ import annotations

import pathlib
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setuptools_table():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_is_listed(setuptools_table):
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "jna").rglob("__init__.py")}
    listed = set(setuptools_table["packages"])
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert {"jna.configs", "jna.configs.problems", "jna.configs.tuned"} <= listed


def test_every_data_file_is_matched(setuptools_table):
    data = setuptools_table["package-data"]
    for path in (ROOT / "configs").rglob("*.json"):
        package = ".".join(("jna", *path.parent.relative_to(ROOT).parts))
        assert any(path.match(pattern) for pattern in data.get(package, ())), path


def test_only_jna_is_packaged(setuptools_table):
    """The examples, benchmarks and tests live in the checkout, not in the wheel."""
    listed = setuptools_table["packages"]
    assert all(name == "jna" or name.startswith("jna.") for name in listed), listed
    assert (ROOT / "examples" / "nat_classifier" / "train.py").exists()

"""jna's data files: tile configs, tuned tables and benchmark problem sets.

The repository's top-level ``configs/`` is the one source of these files. The build maps it
into the wheel as the package ``jna.configs`` (``[tool.setuptools.package-dir]`` in
``pyproject.toml``), so an installed jna (wheel, ``pip install git+...``, or editable) reads
them with `importlib.resources`, whatever the current directory. A source checkout put on
``sys.path`` without installing (``PYTHONPATH=.``) has no ``jna.configs`` package; then the
checkout's own ``configs/`` is read.

Layout (relative to the root)::

    fused_triton.json, fused_mosaic.json   launch classes of the fused backends
    tuned/<device>.json                    tuned tables shipped per device (`jna.tuning.tables`)
    problems/<set>.json                    benchmark problem sets (`jna.tuning.problem_sets`)

Tables written by the tuner go to a user-writable cache instead (`user_cache_dir`), never into
the installed package.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import pathlib
from importlib.resources.abc import Traversable

__all__ = ["data_root", "data_file", "read_json", "list_json", "user_cache_dir"]


@functools.lru_cache(maxsize=1)
def data_root() -> Traversable:
    """The directory of jna's data files (see the module docstring)."""
    try:
        return importlib.resources.files("jna.configs")
    except ModuleNotFoundError:  # a source checkout on sys.path, not installed
        checkout = pathlib.Path(__file__).resolve().parents[2] / "configs"  # jna/_src/ -> the checkout
        if (checkout / "fused_triton.json").is_file():
            return checkout
        raise FileNotFoundError(
            "jna's data files (tile configs, problem sets) are missing: the package "
            "'jna.configs' is not installed and there is no configs/ beside this jna "
            f"({checkout}). Install jna with pip (a wheel, a git URL or `pip install -e .`).")


def data_file(*parts: str) -> Traversable:
    """A shipped file, e.g. ``data_file("problems", "public.json")``; FileNotFoundError if absent."""
    node = data_root().joinpath(*parts)
    if not node.is_file():
        raise FileNotFoundError(f"jna data file {'/'.join(parts)} is not in {data_root()}")
    return node


def read_json(*parts: str):
    """A shipped JSON file, parsed."""
    return json.loads(data_file(*parts).read_text(encoding="utf-8"))


def list_json(folder: str) -> list[Traversable]:
    """The shipped ``*.json`` files of a data folder, sorted by name (empty if the folder is absent)."""
    node = data_root().joinpath(folder)
    if not node.is_dir():
        return []
    return sorted((f for f in node.iterdir() if f.name.endswith(".json") and f.is_file()),
                  key=lambda f: f.name)


def user_cache_dir() -> pathlib.Path:
    """Where jna writes its own files (tuned tables): ``$JNA_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/jna``, else ``~/.cache/jna``. Not created here."""
    if os.environ.get("JNA_CACHE_DIR"):
        return pathlib.Path(os.environ["JNA_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jna"

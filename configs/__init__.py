"""jna's data files: tile configs, tuned tables, benchmark problem sets.

This folder is installed as the package ``jna.configs`` (see ``pyproject.toml``) and read
through `jna._src.resources`; it holds no code.
"""

"""Tuned tile configs per device: ``configs/tuned/<device>.json``, written by ``python -m jna.tuning``.

The fused backends choose tiles by ``tile efficiency x speed`` over launch classes whose speeds
were calibrated once (``configs/fused_*.json``). A tuned table measured on *this* device refines
that choice, per (backend, rank, head dim, dtype):

1. **exact**: a call whose window parameters, head dim and dtype equal a tuned problem's runs
   that problem's measured best config;
2. **speeds**: any other call of the same (backend, rank, head dim, dtype) uses the launch-class
   speeds measured by the tuner on this device (the mean over the tuned problems of that key)
   instead of the shipped calibration.

An explicit config (a backend instance such as ``FusedTriton(config)``) still wins over both. The table is looked up by the device
kind of ``jax.devices()[0]`` (``"NVIDIA H200"`` -> ``nvidia_h200.json``) in two places:

- the tables shipped with jna (package data, `jna._src.resources`: ``configs/tuned/`` in the repository);
- the user's tables, written by ``python -m jna.tuning``: ``$JNA_TUNED_DIR`` if set, else
  ``<user cache>/tuned/`` (`jna._src.resources.user_cache_dir`: ``$JNA_CACHE_DIR``, default
  ``~/.cache/jna``). They are read over the shipped ones: a user entry replaces a shipped entry
  of the same key and problem. A read-only site-packages never needs to be written.

``JNA_TUNED_DIR=off`` disables tuned tables (shipped and user) altogether.

File format::

    {"device": "NVIDIA H200", "entries": [
      {"backend": "fused-triton", "rank": 2, "head_dim": 128, "dtype": "bfloat16",
       "problem": {"shape": [...], "kernel_size": [...], "stride": [...], "dilation": [...],
                   "is_causal": [...], "batch": 1, "heads": 24},
       "objective": "fwd", "config": {...}, "ms": 17.1, "default_ms": 17.3,
       "class_speeds": [{"class": {...}, "speed": 330.0}, ...], "jax": "0.11.2", "date": "..."}]}
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import statistics

import jax

from jna import semantics
from jna._src import resources

def device_slug(device_kind: str | None = None) -> str:
    """File stem of a device kind: lower case, runs of other characters as ``_``."""
    kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or "unknown"


def tables_disabled() -> bool:
    return os.environ.get("JNA_TUNED_DIR") == "off"


def user_table_dir() -> pathlib.Path | None:
    """Where the tuner writes tables (None when tables are disabled)."""
    if tables_disabled():
        return None
    where = os.environ.get("JNA_TUNED_DIR")
    return pathlib.Path(where).expanduser() if where else resources.user_cache_dir() / "tuned"


def table_path(device_kind: str | None = None) -> pathlib.Path | None:
    """The user table of a device (what the tuner writes; it may not exist yet)."""
    base = user_table_dir()
    return None if base is None else base / f"{device_slug(device_kind)}.json"


def shipped_table(device_kind: str | None = None):
    """The table shipped with jna for a device (a `Traversable`), or None."""
    node = resources.data_root().joinpath("tuned", f"{device_slug(device_kind)}.json")
    return node if node.is_file() else None


@functools.lru_cache(maxsize=16)
def _parse(text: str) -> tuple[dict, ...]:
    return tuple(json.loads(text).get("entries", ()))


def _entry_key(entry: dict) -> str:
    return json.dumps([entry["backend"], entry["rank"], entry["head_dim"], entry["dtype"],
                       entry["problem"]], sort_keys=True)


def entries() -> tuple[dict, ...]:
    """The tuned entries for the current device: shipped, then the user's (a user entry replaces
    a shipped one of the same key and problem); empty without tables."""
    if tables_disabled():
        return ()
    merged: dict[str, dict] = {}
    for table in (shipped_table(), table_path()):
        if table is not None and table.is_file():
            for entry in _parse(table.read_text(encoding="utf-8")):
                merged.pop(_entry_key(entry), None)  # re-inserted last: the newest wins in `exact`
                merged[_entry_key(entry)] = entry
    return tuple(merged.values())


def problem_signature(params: semantics.NAParams) -> dict:
    return {"shape": list(params.spatial_shape), "kernel_size": list(params.kernel_size),
            "stride": list(params.stride), "dilation": list(params.dilation),
            "is_causal": list(params.is_causal)}


def _key_matches(entry: dict, backend: str, rank: int, head_dim: int, dtype: str) -> bool:
    return (entry["backend"] == backend and entry["rank"] == rank and entry["head_dim"] == head_dim
            and entry["dtype"] == dtype)


def exact_entry(backend: str, params: semantics.NAParams, head_dim: int, dtype: str) -> dict | None:
    """The tuned entry (config, objective, ms, ...) for exactly this problem, or None."""
    signature = problem_signature(params)
    found = None
    for entry in entries():
        if _key_matches(entry, backend, params.rank, head_dim, dtype) and all(
                entry["problem"][k] == v for k, v in signature.items()):
            found = entry  # the last one written wins
    return found


def exact(backend: str, params: semantics.NAParams, head_dim: int, dtype: str) -> dict | None:
    """The tuned config (a dict of the backend's config fields) for exactly this problem, or None."""
    found = exact_entry(backend, params, head_dim, dtype)
    return None if found is None else dict(found["config"])


def measured_slower(backend: str, other: str, params: semantics.NAParams, head_dim: int,
                    dtype: str) -> str | None:
    """Why ``backend`` should give way to ``other`` on this problem, or None: when the tuned
    table has this exact problem for both, measured with the same objective (and batch and
    heads), and ``other``'s best time is lower. Used by ``backend="auto"`` (`auto_declines`)."""
    mine, theirs = (exact_entry(b, params, head_dim, dtype) for b in (backend, other))
    if mine is None or theirs is None:
        return None
    same = all(mine.get(k) == theirs.get(k) for k in ("objective",)) and all(
        mine["problem"].get(k) == theirs["problem"].get(k) for k in ("batch", "heads"))
    if same and float(theirs["ms"]) < float(mine["ms"]):
        return (f"{other} measured faster on this problem on this device (tuned table, "
                f"{mine['objective']}: {theirs['ms']} vs {mine['ms']} ms)")
    return None


def class_speeds(backend: str, rank: int, head_dim: int, dtype: str) -> tuple[tuple[str, float], ...]:
    """Tuned launch-class speeds for a key: ``((class_json, relative speed), ...)``, or ``()``.

    Each tuned problem's class speeds are divided by its fastest class's (the chooser maximizes
    ``efficiency * speed``, so only ratios matter, and problems of different sizes or objectives
    then weigh alike); a class's speed is the mean over the problems that measured it.
    ``class_json`` is the class as canonical JSON (sorted keys), as `class_key` makes it.
    """
    speeds: dict[str, list[float]] = {}
    for entry in entries():
        if _key_matches(entry, backend, rank, head_dim, dtype):
            items = entry.get("class_speeds", ())
            top = max((float(item["speed"]) for item in items), default=0.0)
            if top <= 0:
                continue
            for item in items:
                speeds.setdefault(class_key(item["class"]), []).append(float(item["speed"]) / top)
    return tuple(sorted((k, statistics.fmean(v)) for k, v in speeds.items()))


def class_key(fields: dict) -> str:
    return json.dumps(fields, sort_keys=True)


def write_entry(entry: dict, device_kind: str, path: pathlib.Path | None = None) -> pathlib.Path:
    """Adds ``entry`` to the device's table (replacing an entry of the same key and problem)."""
    path = path or table_path(device_kind)
    if path is None:
        raise ValueError("JNA_TUNED_DIR=off: tuned tables are disabled, none is written")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {"device": device_kind, "entries": []}
    same = lambda e: (e["backend"], e["rank"], e["head_dim"], e["dtype"], e["problem"]) == (
        entry["backend"], entry["rank"], entry["head_dim"], entry["dtype"], entry["problem"])
    data["entries"] = [e for e in data["entries"] if not same(e)] + [entry]
    lines = ["{", f' "device": {json.dumps(data["device"])},', ' "entries": [']
    lines += ["  " + json.dumps(e) + ("," if i < len(data["entries"]) - 1 else "")
              for i, e in enumerate(data["entries"])]
    path.write_text("\n".join(lines + [" ]", "}"]) + "\n")
    return path

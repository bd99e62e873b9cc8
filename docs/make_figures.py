"""Draws the pictures of docs/semantics.md into docs/figures/ (PNG).

    .venv/bin/pip install matplotlib        # or: pip install -e '.[plot]'
    .venv/bin/python docs/make_figures.py

Every mask and every window slot is computed by `jna.semantics` (`normalize_params`,
`key_allowed`, `axis_neighbor_table`, `relative_position_index`); this script only draws.
1-D figures are query x key grids: row ``x`` is a query, column ``y`` a key, a filled cell means
the query may attend the key, a white dot marks the query's own position (key y = x).
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from jna import semantics  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "figures"
DPI = 90
# 0: not allowed, 1..: allowed (colour = dilation group, or a single colour).
COLOURS = ["#ffffff", "#3b75af", "#e1812c", "#3a923a", "#c03d3e"]


def axis_mask(length, kernel_size, stride=1, dilation=1, is_causal=False) -> np.ndarray:
    """``[L, L]`` bool, ``mask[x, y]``: query x may attend key y (one axis)."""
    params = semantics.normalize_params((length,), kernel_size, stride, dilation, is_causal)
    _, k, s, d, c = params.axis(0)
    x = np.arange(length)[:, None]
    y = np.arange(length)[None, :]
    return np.asarray(semantics.key_allowed(x, y, length, k, s, d, c))


def _grid(ax, values, title, stride=None):
    """Draws an [L, L] integer grid (0 = empty) with the query diagonal dotted."""
    length = values.shape[0]
    ax.imshow(values, cmap=ListedColormap(COLOURS[: int(values.max()) + 1]), vmin=0,
              vmax=max(int(values.max()), 1), interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, length, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, length, 1), minor=True)
    ax.grid(which="minor", color="#c8c8c8", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    ticks = np.arange(0, length, 1)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.tick_params(labelsize=6, length=2, pad=1)
    x = np.arange(length)  # the query itself: a dot on the diagonal
    ax.plot(x, x, "o", markersize=3.2, markerfacecolor="white", markeredgecolor="black",
            markeredgewidth=0.7, linestyle="none")
    if stride and stride > 1:  # stride groups of queries share one window
        for b in range(stride, length, stride):
            ax.axhline(b - 0.5, color="#c03d3e", linewidth=1.0)
    ax.set_xlabel("key y", fontsize=7, labelpad=1)
    ax.set_ylabel("query x", fontsize=7, labelpad=1)
    ax.set_title(title, fontsize=8, pad=3)


def _save(fig, name):
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pil_kwargs={"optimize": True})
    plt.close(fig)
    print(f"{path.relative_to(OUT.parent.parent)}: {path.stat().st_size / 1024:.1f} KiB")


def fig_1d(name, panels, ncols=2, size=3.3):
    """One PNG with a 1-D query x key grid per panel: ``(title, kwargs, colour_by_group)``."""
    fig, axes = plt.subplots(1, ncols, figsize=(size * ncols, size))
    for ax, (title, kwargs, by_group) in zip(np.atleast_1d(axes), panels):
        length = kwargs["length"]
        mask = axis_mask(**kwargs)
        values = mask.astype(int)
        if by_group:  # colour by dilation group g = y % d
            values = np.where(mask, 1 + np.arange(length)[None, :] % kwargs.get("dilation", 1), 0)
        _grid(ax, values, title, stride=kwargs.get("stride", 1))
    fig.tight_layout(pad=0.4)
    _save(fig, name)


def fig_2d(name):
    """A few queries' neighborhoods on 2-D maps (each panel: union of the queries' windows)."""
    panels = [
        ("K 5x5 (interior, corner, edge)", dict(shape=(12, 12), kernel_size=5),
         [(5, 7), (0, 0), (11, 2)]),
        ("K 3x3, dilation 2x2", dict(shape=(12, 12), kernel_size=3, dilation=2),
         [(5, 6), (0, 11)]),
        ("K 4x5, causal on axis 0 only", dict(shape=(12, 12), kernel_size=(4, 5),
                                              is_causal=(True, False)), [(6, 6), (1, 10)]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 3.3))
    for ax, (title, kwargs, queries) in zip(axes, panels):
        params = semantics.normalize_params(kwargs["shape"], kwargs["kernel_size"],
                                            kwargs.get("stride", 1), kwargs.get("dilation", 1),
                                            kwargs.get("is_causal", False))
        shape = params.spatial_shape
        values = np.zeros(shape, int)
        for colour, q in enumerate(queries, start=1):
            allowed = np.ones(shape, bool)  # the AND over axes of the per-axis rule
            for a in range(params.rank):
                length, k, s, d, c = params.axis(a)
                y = np.arange(length)
                ok = np.asarray(semantics.key_allowed(q[a], y, length, k, s, d, c))
                allowed &= ok.reshape([-1 if i == a else 1 for i in range(params.rank)])
            values[allowed] = colour
        ax.imshow(values, cmap=ListedColormap(COLOURS[: len(queries) + 1]), vmin=0,
                  vmax=len(queries), interpolation="nearest")
        for colour, q in enumerate(queries, start=1):
            ax.add_patch(plt.Rectangle((q[1] - 0.5, q[0] - 0.5), 1, 1, fill=False,
                                       edgecolor="black", linewidth=1.6))
            ax.text(q[1], q[0], "q", ha="center", va="center", fontsize=7, color="white",
                    fontweight="bold")
        ax.set_xticks(np.arange(-0.5, shape[1], 1), minor=True)
        ax.set_yticks(np.arange(-0.5, shape[0], 1), minor=True)
        ax.grid(which="minor", color="#c8c8c8", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
        ax.set_xticks(range(0, shape[1], 2))
        ax.set_yticks(range(0, shape[0], 2))
        ax.tick_params(labelsize=6, length=2, pad=1)
        ax.set_xlabel("axis 1", fontsize=7, labelpad=1)
        ax.set_ylabel("axis 0", fontsize=7, labelpad=1)
        ax.set_title(title, fontsize=8, pad=3)
    fig.tight_layout(pad=0.4)
    _save(fig, name)


def fig_slots(name):
    """Window slots (row-major) and relative-positional-bias indices of two 2-D queries."""
    params = semantics.normalize_params((7, 7), 3)
    tables = [semantics.axis_neighbor_table(params, a) for a in range(2)]
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.3))
    for ax, q in zip(axes, [(3, 4), (0, 6)]):
        ax.imshow(np.zeros(params.spatial_shape), cmap=ListedColormap(["#ffffff"]))
        k0, k1 = params.kernel_size
        for j0 in range(k0):
            for j1 in range(k1):
                y0, y1 = tables[0][0][q[0], j0], tables[1][0][q[1], j1]
                slot = j0 * k1 + j1
                r0 = int(semantics.relative_position_index(q[0], j0, 7, k0, 1, 1, False))
                r1 = int(semantics.relative_position_index(q[1], j1, 7, k1, 1, 1, False))
                ax.add_patch(plt.Rectangle((y1 - 0.5, y0 - 0.5), 1, 1, color="#a9c6e3"))
                ax.text(y1, y0 - 0.17, f"j={slot}", ha="center", va="center", fontsize=6.5)
                ax.text(y1, y0 + 0.22, f"({r0},{r1})", ha="center", va="center", fontsize=5.5,
                        color="#7a2a2a")
        ax.add_patch(plt.Rectangle((q[1] - 0.5, q[0] - 0.5), 1, 1, fill=False,
                                   edgecolor="black", linewidth=1.6))
        ax.set_xticks(np.arange(-0.5, 7, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, 7, 1), minor=True)
        ax.grid(which="minor", color="#c8c8c8", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
        ax.set_xticks(range(7))
        ax.set_yticks(range(7))
        ax.tick_params(labelsize=6, length=2, pad=1)
        ax.set_xlabel("axis 1", fontsize=7, labelpad=1)
        ax.set_ylabel("axis 0", fontsize=7, labelpad=1)
        ax.set_title(f"query {q}: slot j, rpb index (axis 0, axis 1)", fontsize=7.5, pad=3)
    fig.tight_layout(pad=0.4)
    _save(fig, name)


def main():
    L = 16
    fig_1d("na1d_kernel.png", [
        ("K=5 (s=1, d=1)", dict(length=L, kernel_size=5), False),
        ("K=4, even (s=1, d=1)", dict(length=L, kernel_size=4), False),
    ])
    fig_1d("na1d_dilation.png", [
        ("K=5, d=2 (colour: group y % 2)", dict(length=L, kernel_size=5, dilation=2), True),
        ("K=5, d=3, L=16 (groups of 6, 5, 5)", dict(length=L, kernel_size=5, dilation=3), True),
    ])
    fig_1d("na1d_causal.png", [
        ("K=5, causal (s=1)", dict(length=L, kernel_size=5, is_causal=True), False),
        ("K=5, causal, s=2", dict(length=L, kernel_size=5, stride=2, is_causal=True), False),
    ])
    fig_1d("na1d_stride.png", [
        ("K=5, s=2 (red: stride groups)", dict(length=L, kernel_size=5, stride=2), False),
        ("K=4, s=4: blocked", dict(length=L, kernel_size=4, stride=4), False),
    ])
    fig_2d("na2d_neighborhoods.png")
    fig_slots("na2d_slots_rpb.png")


if __name__ == "__main__":
    main()

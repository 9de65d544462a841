"""PNG plots of an evaluation summary: accuracy against context length per method, and accuracy
against block and anchor size per length. Needs matplotlib (``pip install 'star-sp[eval]'``).

The exact methods (global, ring) are the baseline: drawn last, on top, black and dashed with hollow
markers, so that a star setting that scores the same can never hide them.
"""

from __future__ import annotations

import os
import re

from ..errors import StarInputError

EXACT_STYLE = {"global": dict(color="black", linestyle="--", marker="o", markersize=9),
               "ring": dict(color="0.45", linestyle=":", marker="s", markersize=7)}
"""Line styles of the exact methods; their markers are hollow (``markerfacecolor='none'``)."""
BASELINE_ZORDER = 10  # above the star lines (matplotlib's default for lines is 2)


def method_label(name: str) -> str:
    """A method's name as a reader says it: ``star_b1/4_ablock/4`` -> ``block L/4, anchor = block/4``
    (L: the context length), ``star_b2048_a0`` -> ``block 2048, no anchor``, ``global`` -> ``global``."""
    match = re.fullmatch(r"star_b(.+)_a(.+)", name)
    if match is None:
        return name
    block, anchor = match.groups()
    block = f"L/{block[2:]}" if block.startswith("1/") else block
    if anchor == "0":
        anchor = "no anchor"
    elif anchor.startswith("block"):
        anchor = f"anchor = {anchor}"
    else:
        anchor = f"anchor {anchor}"
    return f"block {block}, {anchor}"


def length_label(tokens: int) -> str:
    """``2048`` -> ``2K``, ``1048576`` -> ``1M``; other counts as they are."""
    for size, unit in ((1 << 20, "M"), (1 << 10, "K")):
        if tokens >= size and tokens % size == 0:
            return f"{tokens // size}{unit}"
    return str(tokens)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise StarInputError("plots need matplotlib: pip install 'star-sp[eval]'") from None
    return plt


def length_figure(summary: dict):
    """Average score against context length, one line per method; the exact methods drawn last."""
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, NullLocator

    methods, lengths = summary["methods"], summary["lengths"]
    fig, ax = plt.subplots(figsize=(7.5, 4), layout="constrained")
    star = [m for m in methods if m not in EXACT_STYLE]
    exact = [m for m in ("ring", "global") if m in methods]  # global last: on top of everything
    for i, m in enumerate(star):
        ys = [summary["average"].get(f"{n}|{m}") for n in lengths]
        ax.plot(lengths, ys, marker="o", markersize=5, color=f"C{i % 10}", label=method_label(m))
    for m in exact:
        ys = [summary["average"].get(f"{n}|{m}") for n in lengths]
        ax.plot(lengths, ys, markerfacecolor="none", markeredgewidth=1.5, linewidth=1.5, zorder=BASELINE_ZORDER,
                label=f"{m} (exact)", **EXACT_STYLE[m])
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(lengths))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(lengths, [length_label(n) for n in lengths])
    if len(lengths) == 1:
        ax.set_xlim(lengths[0] / 1.5, lengths[0] * 1.5)
    return _score_axes(fig, ax, "context length (tokens)", "accuracy against context length")


def _score_axes(fig, ax, xlabel: str, title: str):
    """The labels, score range and legend both figures share (the legend outside the axes: it covers
    nothing drawn)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("average score (0-100)")
    ax.set_ylim(0, 102)
    ax.set_title(title)
    fig.legend(loc="outside right upper", fontsize=8)
    return fig


def block_anchor_figure(summary: dict):
    """Average score of each star setting (one group of bars, one bar per length); over each bar a
    black dashed mark at the global score of its length. ``None`` without star settings."""
    plt = _pyplot()

    methods, lengths = summary["methods"], summary["lengths"]
    star = [m for m in methods if m not in EXACT_STYLE]  # global and ring have no block or anchor
    if not star:
        return None
    fig, ax = plt.subplots(figsize=(max(7.5, 1.3 * len(star) + 2.5), 4.2), layout="constrained")
    width = 0.8 / len(lengths)
    for i, n in enumerate(lengths):
        xs = [j + (i - (len(lengths) - 1) / 2) * width for j in range(len(star))]
        ys = [summary["average"].get(f"{n}|{m}", 0.0) for m in star]
        ax.bar(xs, ys, width=width, color=f"C{i % 10}", label=f"{length_label(n)} tokens")
        base = summary["average"].get(f"{n}|global")
        if base is not None:
            ax.hlines([base] * len(xs), [x - width / 2 for x in xs], [x + width / 2 for x in xs], colors="black",
                      linestyles="--", linewidth=1.5, zorder=BASELINE_ZORDER,
                      label="global (exact) at that length" if i == 0 else None)
    ax.set_xticks(range(len(star)), [method_label(m).replace(", ", ",\n") for m in star], fontsize=8)
    return _score_axes(fig, ax, "Star Attention setting (block size as a share of the context length L; anchor size)",
                       "accuracy against block and anchor size")


def write_plots(summary: dict, out_dir: str) -> list[str]:
    """Write ``accuracy_vs_length.png`` and (with star settings) ``accuracy_vs_block_anchor.png`` to
    ``out_dir``; returns their paths."""
    plt = _pyplot()
    paths = []
    for name, fig in (("accuracy_vs_length.png", length_figure(summary)),
                      ("accuracy_vs_block_anchor.png", block_anchor_figure(summary))):
        if fig is not None:
            paths.append(os.path.join(out_dir, name))
            fig.savefig(paths[-1], dpi=120)
            plt.close(fig)
    return paths

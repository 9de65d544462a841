"""PNG plots of an evaluation summary: accuracy against context length per method, and accuracy
against block and anchor size per length. Needs matplotlib (``pip install 'star-sp[eval]'``)."""

from __future__ import annotations

import os

from ..errors import StarInputError


def write_plots(summary: dict, out_dir: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise StarInputError("plots need matplotlib: pip install 'star-sp[eval]'") from None
    paths = []
    methods, lengths = summary["methods"], summary["lengths"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        ys = [summary["average"].get(f"{n}|{m}") for n in lengths]
        ax.plot(lengths, ys, marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("average score (0-100)")
    ax.set_ylim(0, 102)
    ax.set_title("accuracy against context length")
    ax.legend(fontsize=7)
    paths.append(_save(plt, fig, out_dir, "accuracy_vs_length.png"))

    star = [m for m in methods if m.startswith("star_")]  # global and ring have no block or anchor
    if star:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(star) * len(lengths)), 4))
        width = 0.8 / len(lengths)
        for i, n in enumerate(lengths):
            ys = [summary["average"].get(f"{n}|{m}", 0.0) for m in star]
            ax.bar([j + i * width for j in range(len(star))], ys, width=width, label=f"{n} tokens")
            base = summary["average"].get(f"{n}|global")
            if base is not None:
                ax.axhline(base, linestyle="--", linewidth=0.8, color=f"C{i}")
        ax.set_xticks([j + width * (len(lengths) - 1) / 2 for j in range(len(star))])
        ax.set_xticklabels([m.replace("star_", "") for m in star], rotation=30, fontsize=7)
        ax.set_ylabel("average score (0-100); dashed: global")
        ax.set_ylim(0, 102)
        ax.set_title("accuracy against block (b) and anchor (a) size")
        ax.legend(fontsize=7)
        paths.append(_save(plt, fig, out_dir, "accuracy_vs_block_anchor.png"))
    return paths


def _save(plt, fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""The needle-in-a-haystack picture: accuracy by depth (rows) and length (columns), one panel per set and task.

Reads the records of :func:`factors.evaluation.ruler.records` (offline or served alike), so a heatmap can be
drawn from either ``--json`` output.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def grid(recs: Sequence[dict[str, Any]], set_name: str, task: str) -> tuple[list[float], list[int], list[list[float]]]:
    """(depths, lengths, accuracy[depth][length]) of one set and task; NaN where no record was measured."""
    mine = [r for r in recs if r["set"] == set_name and r["task"] == task]
    depths = sorted({r["depth"] for r in mine})
    lengths = sorted({r["length"] for r in mine})
    by = {(r["depth"], r["length"]): r["accuracy"] for r in mine}
    return depths, lengths, [[by.get((d, n), float("nan")) for n in lengths] for d in depths]


def plot_heatmaps(recs: Sequence[dict[str, Any]], output: str | Path, title: str | None = None) -> int:
    """One depth × length heatmap per set (rows) and task (columns), accuracy 0 (red) to 1 (green), each cell
    annotated; writes the PNG and returns 0."""
    if not recs:
        raise ValueError("no records to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["set"] for r in recs))
    tasks = list(dict.fromkeys(r["task"] for r in recs))
    fig, axes = plt.subplots(
        len(sets),
        len(tasks),
        figsize=(1.0 + 3.2 * len(tasks), 0.8 + 2.8 * len(sets)),
        squeeze=False,
    )
    for i, s in enumerate(sets):
        for j, t in enumerate(tasks):
            ax = axes[i][j]
            depths, lengths, acc = grid(recs, s, t)
            image = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45, fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
            if len(depths) * len(lengths) <= 160:
                for y, row in enumerate(acc):
                    for x, a in enumerate(row):
                        if a == a:  # not NaN
                            ink = "white" if a < 0.2 or a > 0.85 else "black"  # readable on dark red and green
                            ax.text(x, y, f"{a:.2f}", ha="center", va="center", fontsize=7, color=ink)
            ax.set_title(f"{s} · {t}", fontsize=9)
            ax.set_xlabel("length", fontsize=8)
            if j == 0:
                ax.set_ylabel("needle depth", fontsize=8)
        fig.colorbar(image, ax=axes[i][-1], label="accuracy")  # one per row keeps the grid tight_layout's
    fig.suptitle(title or "retrieval accuracy by needle depth and prompt length", fontsize=10)
    fig.tight_layout()
    # as plotting.save_figure writes a figure, without its legend (a heatmap has no labelled lines)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    print(f"wrote {output}", file=sys.stderr)
    return 0

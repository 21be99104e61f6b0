"""The last step every plotting command shares: legend, layout, write the PNG, say where."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def save_figure(fig: Any, ax: Any, output: str | Path) -> int:
    """Legend, layout, write the PNG (creating its folder), report it on stderr; returns exit status 0."""
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    print(f"wrote {output}", file=sys.stderr)
    return 0


def plot_ppl_records(
    records: list[dict[str, Any]], output: str | Path, window: int | None = None, title: str | None = None
) -> int:
    """Perplexity against length, one line per ``set`` of the ``{"set", "length", "ppl"}`` records (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in dict.fromkeys(r["set"] for r in records):
        pts = sorted((r["length"], r["ppl"]) for r in records if r["set"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("perplexity")
    if window:
        ax.axvline(window, color="grey", linestyle=":", label=f"trained window ({window})")
    ax.set_title(title or "perplexity against length")
    ax.grid(True, which="both", alpha=0.3)
    code = save_figure(fig, ax, output)
    plt.close(fig)
    return code

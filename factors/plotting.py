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

"""The README's list of ``LONGROPE_*`` variables is exactly the server's settings (none missing, none stale)."""

from __future__ import annotations

import re
from pathlib import Path

from server.settings import ServerSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_every_setting_and_nothing_else() -> None:
    text = README.read_text()
    start = text.index("Every longrope option also reads")
    paragraph = text[start : text.index("\n\n", start)]
    listed = set(re.findall(r"`LONGROPE_([A-Z_]+)`", paragraph))
    fields = {name.upper() for name in ServerSettings.model_fields}
    assert listed == fields, f"README lists {sorted(listed - fields)} too many, misses {sorted(fields - listed)}"

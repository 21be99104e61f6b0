"""Command-line options win over LONGROPE_* whichever way they are written (``--opt value`` or ``--opt=value``)."""

from __future__ import annotations

import pytest

from server.app import _given


@pytest.mark.parametrize("argv", [["--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--port", "1", "--host=::"]])
def test_option_given_in_either_form(argv: list[str]) -> None:
    assert _given(argv, "--host")


@pytest.mark.parametrize("argv", [[], ["--hostname", "x"], ["--hosts=x"], ["--port=8000"], ["host"]])
def test_other_options_do_not_count(argv: list[str]) -> None:
    assert not _given(argv, "--host")

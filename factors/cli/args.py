"""The argument toolkit every ``longrope-factors`` command shares: comma-list types and the option groups
that name a model (its geometry from config.json, or the loaded model for measuring).

No torch here: building the parser and ``--help`` never load it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from factors.formats import read_model_rope
from factors.geometry import RopeGeometry
from factors.schema import FactorSetError

DTYPES = ("float32", "bfloat16", "float16")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help where X says something: not for None, False or empty-list
    defaults, nor where the help already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if action.default is None or action.default is False or action.default == [] or "default" in help_text:
            return action.help
        return super()._get_help_string(action)


def _items(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def int_list(*, minimum: int = 1, unique: bool = False, what: str = "integers") -> Callable[[str], list[int]]:
    """argparse ``type`` for ``1,2,3``: one or more integers ≥ ``minimum``; with ``unique`` sorted and deduplicated,
    else in the order given."""
    bound = "> 0" if minimum == 1 else f"≥ {minimum}"

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in _items(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if unique:
            values = sorted(set(values))
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"expected one or more {what} {bound}, got {text!r}")
        return values

    parse.__name__ = "integer list"  # argparse's name for the type in its own messages
    return parse


def float_list(*, low: float | None = None, high: float | None = None) -> Callable[[str], list[float]]:
    """argparse ``type`` for ``0,0.5,1``: one or more numbers, within [low, high] where given."""

    def parse(text: str) -> list[float]:
        try:
            values = [float(v) for v in _items(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected one or more numbers, got {text!r}")
        outside = [v for v in values if (low is not None and v < low) or (high is not None and v > high)]
        if outside:
            raise argparse.ArgumentTypeError(f"{outside} outside [{low}, {high}]")
        return values

    parse.__name__ = "number list"
    return parse


def critical_dim(text: str) -> str | int | None:
    """argparse ``type`` for ``--critical-dim``: ``auto``, ``off`` (None) or a RoPE pair index ≥ 0."""
    from factors.search.critical import parse_critical_dim

    try:
        return parse_critical_dim(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


critical_dim.__name__ = "critical dimension"


def name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse ``type`` for ``pi,ntk,yarn``: one or more names, each from ``choices``."""

    def parse(text: str) -> list[str]:
        names = _items(text)
        unknown = [n for n in names if n not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"expected comma-separated names from {', '.join(choices)}, got {text!r}")
        return names

    parse.__name__ = "name list"
    return parse


# -- a model's geometry (config.json only; for CSV input and generated sets) ------------------------


def add_geometry_options(p: argparse.ArgumentParser, for_csv: bool = True) -> None:
    """--model DIR, or --rope-theta/--rotary-dim/--original-max-len; with ``for_csv`` the CSV-only options."""
    g = p.add_argument_group("model geometry (for CSV input or generated sets)")
    g.add_argument("--model", metavar="DIR", help="a Hugging Face model folder; its config.json gives the geometry")
    g.add_argument("--rope-theta", type=float, help="RoPE base (instead of --model)")
    g.add_argument("--rotary-dim", type=int, help="rotated dims per head (instead of --model)")
    g.add_argument("--original-max-len", type=int, help="the model's pretraining window (instead of --model)")
    if for_csv:
        g.add_argument("--max-len", type=int, help="window the CSV's set serves (CSV input only)")
        g.add_argument("--name", help="set name for CSV input (default: the file name)")
        g.add_argument("--n-hat", type=int, default=0, help="n̂ for CSV input (default 0)")
        g.add_argument("--mscale", type=float, help="mscale for CSV input (default: LongRoPE's formula)")


def geometry_from_args(args: argparse.Namespace, required: bool) -> RopeGeometry | None:
    """The geometry the options of :func:`add_geometry_options` give (``None`` when none is given and not
    required); FactorSetError when it is incomplete."""
    if args.model:
        return read_model_rope(args.model).geometry
    given = [args.rope_theta, args.rotary_dim, args.original_max_len]
    if all(v is not None for v in given):
        return RopeGeometry(args.rope_theta, args.rotary_dim, args.original_max_len)
    if required or any(v is not None for v in given):
        raise FactorSetError("give --model DIR, or all of --rope-theta, --rotary-dim and --original-max-len")
    return None


# -- a loaded model (measuring commands) ------------------------------------------------------------


def add_model_options(p: argparse.ArgumentParser, *, required: bool = True, model_help: str | None = None) -> None:
    """The "model" group of the measuring commands: --model DIR, --device, --dtype, --threads."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=required,
        metavar="DIR",
        help=model_help or "Hugging Face Llama-family model folder",
    )
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    g.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype the model is loaded and run in")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")

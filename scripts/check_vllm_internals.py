"""Check every vLLM internal server/vllm_ext/ relies on (server/vllm_ext/internals.py) against a vLLM.

    python scripts/check_vllm_internals.py                       # the installed vLLM: imported + its sources
    python scripts/check_vllm_internals.py --source DIR_OR_WHEEL  # sources only, nothing imported or installed

``--source`` takes a folder holding ``vllm/`` (an unpacked wheel, a site-packages), the ``vllm/`` folder
itself, or a ``.whl`` read in place; e.g. for a release that cannot be installed here::

    pip download --no-deps vllm==0.33.0 -d /tmp/vllm033
    python scripts/check_vllm_internals.py --source /tmp/vllm033/vllm-0.33.0-*.whl

Exit status 0 when every entry holds, 1 otherwise (each problem printed with the file that relies on it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.vllm_ext.internals import INTERNALS  # noqa: E402
from server.vllm_ext.internals_check import check_installed, check_source  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="a vLLM source tree or wheel, read without importing it")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every entry, not only the problems")
    args = parser.parse_args(argv)
    if args.source is not None and not args.source.exists():
        parser.error(f"--source {args.source} does not exist (a folder holding vllm/, or a .whl)")
    results = check_source(INTERNALS, args.source) if args.source else check_installed(INTERNALS)
    against = str(args.source) if args.source else "the installed vLLM"
    failed = 0
    for entry, problems in results.items():
        if problems:
            failed += 1
            print(f"FAIL {entry.label}: {'; '.join(problems)}  [{entry.used_by}]")
        elif args.verbose:
            print(f"ok   {entry.label}")
    print(f"{len(results) - failed}/{len(results)} vLLM internals as expected in {against}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""clients/ is installable without the engine or the search: importing it loads no torch, matplotlib or vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "matplotlib", "vllm", "numpy", "transformers")


def _loaded_after(code: str) -> dict[str, bool]:
    probe = f"import json, sys\n{code}\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_client_modules_import_without_torch_matplotlib_or_vllm() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, clients.client, clients.cli; "
            "print('torch' in sys.modules, 'matplotlib' in sys.modules, 'vllm' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False"]


def test_client_cli_help_and_torch_free_factor_modules() -> None:
    assert not any(_loaded_after("import clients.cli\nclients.cli.build_parser().format_help()").values())
    # what the clients (and anything that only reads or writes set files) use
    assert not any(_loaded_after("import factors, factors.schema, factors.geometry, factors.formats").values())


def test_factors_exports_stay_importable() -> None:
    loaded = _loaded_after(
        "import factors\n"
        "from factors import FactorSet, FactorSetError, RopeGeometry, parse_factor_set, load_any\n"
        "assert 'torch' not in sys.modules\n"
        "from factors import cos_sin, yarn_set, make_baseline\n"
        "from factors import *\n"
        "missing = [n for n in factors.__all__ if n not in globals()]\n"
        "assert not missing, missing\n"
        "from factors.baselines import RopeGeometry as R\n"
        "assert R is RopeGeometry"
    )
    assert loaded["torch"]  # names that need torch load it on first use

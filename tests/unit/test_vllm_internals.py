"""Every vLLM internal server/vllm_ext/ relies on exists with the shape it expects, in the installed vLLM; the
checker finds what a release moved, renamed or re-shaped (on synthetic source trees); the table lists every
vLLM import of server/vllm_ext/; the moved argument parser resolves wherever a release keeps it."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from server.vllm_ext import compat
from server.vllm_ext.internals import INTERNALS, Internal
from server.vllm_ext.internals_check import check_by_import, check_installed, check_source

ROOT = Path(__file__).resolve().parents[2]
VLLM_EXT = ROOT / "server" / "vllm_ext"


@pytest.fixture(scope="module")
def installed_results() -> dict[Internal, list[str]]:
    return check_installed(INTERNALS)


def test_installed_vllm_has_every_internal(installed_results: dict[Internal, list[str]]) -> None:
    problems = {f"{e.label} [{e.used_by}]": p for e, p in installed_results.items() if p}
    assert not problems, problems


def _vllm_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every ``from vllm... import name`` / ``import vllm...`` in a file ("" for a module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "vllm":
            found += [(node.module or "", alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "vllm"]
    return found


def test_table_lists_every_vllm_import_of_vllm_ext() -> None:
    listed = {(module, e.name.split(".")[0]) for e in INTERNALS for module in e.modules}
    listed_modules = {module for e in INTERNALS for module in e.modules}
    missing = []
    for path in sorted(VLLM_EXT.glob("*.py")):
        for module, name in _vllm_imports(path):
            known = (module, name) in listed if name else (module in listed_modules or module == "vllm")
            if not known:
                missing.append(f"{path.name}: {module}{'.' + name if name else ''}")
    assert not missing, f"add a row to server/vllm_ext/internals.py for: {missing}"
    assert len(_vllm_imports(VLLM_EXT / "runner.py")) >= 1  # the scan sees the lazy imports inside functions


# -- the checker on synthetic vLLM source trees: what it must find, and what it must report
GOOD = {
    "vllm/__init__.py": "from .version import __version__\n",
    "vllm/version.py": 'try:\n    from ._version import __version__\nexcept ImportError:\n    __version__ = "dev"\n',
    "vllm/_version.py": '__version__ = "9.9.9"\n',
    "vllm/plugins/__init__.py": 'GROUP = "vllm.general_plugins"\nTABLE: dict = {"KEY": 1, "OTHER": 2}\n',
    "vllm/worker/__init__.py": "",
    "vllm/worker/base.py": """
        class Base:
            def __init__(self, config):
                self.config = config
                self.register_buffer("cache", None, persistent=False)

            def hook(self, scheduler_output, num_scheduled_tokens):
                return None

            @classmethod
            def build(cls, args, extra=None):
                return cls(args)
        """,
    "vllm/worker/runner.py": """
        from vllm.worker.base import Base

        class Runner(Base):
            positions: list

            async def rpc(self, method, timeout=None, args=()):
                return None

            def step(self):
                return self.hook(None, None)
        """,
    "vllm/entry/__init__.py": "from .impl import make_parser\n",
    "vllm/entry/impl.py": "def make_parser(parser, **kwargs):\n    return parser\n",
}

ENTRIES = (
    Internal("vllm", "__version__"),
    Internal("vllm.plugins", "GROUP", value="vllm.general_plugins"),
    Internal("vllm.plugins", "TABLE", keys=("KEY",)),
    Internal("vllm.worker.runner", "Runner.hook", "(self, scheduler_output, num_scheduled_tokens)", False),
    Internal("vllm.worker.runner", "Runner.build", "(args)"),
    Internal("vllm.worker.runner", "Runner.rpc", "(self, method, *, args)", True),
    Internal("vllm.worker.runner", "Runner.step", uses=("hook",)),
    Internal("vllm.worker.runner", "Runner.config"),  # instance attribute, inherited
    Internal("vllm.worker.runner", "Runner.cache"),  # registered buffer
    Internal("vllm.worker.runner", "Runner.positions"),  # annotated class attribute
    Internal(("vllm.new_place", "vllm.entry"), "make_parser", "(parser, *, prog)"),  # moved: first found wins
)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    return root


def _problems(files: dict[str, str], tmp_path: Path) -> dict[str, list[str]]:
    results = check_source(ENTRIES, _write(tmp_path, files))
    return {e.label + ("" if e.sig is None else e.sig): p for e, p in results.items() if p}


def test_checker_accepts_a_matching_tree(tmp_path: Path) -> None:
    assert _problems(GOOD, tmp_path) == {}
    assert all(not p for p in check_source(ENTRIES, tmp_path / "vllm").values())  # the vllm/ folder itself


def test_checker_reads_a_wheel_in_place(tmp_path: Path) -> None:
    _write(tmp_path / "tree", GOOD)
    wheel = tmp_path / "vllm-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for rel, text in GOOD.items():
            zf.writestr(rel, textwrap.dedent(text))
    assert all(not p for p in check_source(ENTRIES, wheel).values())
    assert all(not p for p in check_source(ENTRIES, tmp_path / "tree").values())


def _changed(path: str, old: str, new: str) -> dict[str, str]:
    assert old in GOOD[path], old
    return {**GOOD, path: GOOD[path].replace(old, new)}


@pytest.mark.parametrize(
    "path,old,new,entry,expected",
    [
        ("vllm/worker/base.py", "def hook(", "def _hook(", "Runner.hook", "not found in vllm.worker.runner"),
        (
            "vllm/worker/base.py",
            "scheduler_output, num_scheduled_tokens",
            "num_scheduled_tokens, scheduler_output",
            "Runner.hook",
            "positional parameters start (self, num_scheduled_tokens, scheduler_output)",
        ),
        (
            "vllm/worker/base.py",
            "num_scheduled_tokens):",
            "num_scheduled_tokens, layout):",
            "Runner.hook",
            "new required parameter(s) layout",
        ),
        ("vllm/worker/base.py", "def hook(", "async def hook(", "Runner.hook", "is async"),
        ("vllm/worker/runner.py", "async def rpc(", "def rpc(", "Runner.rpc", "is not async"),
        ("vllm/worker/runner.py", "args=()", "arguments=()", "Runner.rpc", "no parameter args"),
        ("vllm/worker/runner.py", "return self.hook(None, None)", "return None", "Runner.step", "does not use hook"),
        ("vllm/worker/base.py", "self.config = config", "self.settings = config", "Runner.config", "not found"),
        ("vllm/worker/base.py", 'register_buffer("cache"', 'register_buffer("table"', "Runner.cache", "not found"),
        ("vllm/plugins/__init__.py", '"KEY": 1', '"KEYS": 1', "TABLE", "has no key 'KEY'"),
        ("vllm/plugins/__init__.py", '"vllm.general_plugins"', '"vllm.plugins"', "GROUP", "is 'vllm.plugins'"),
        ("vllm/entry/__init__.py", "make_parser", "make_cli_parser", "make_parser", "not found in vllm.new_place or"),
        ("vllm/entry/impl.py", "**kwargs", "prefix=None", "make_parser", "no parameter prog"),
        ("vllm/worker/runner.py", "class Runner(Base):", "class Runner:", "Runner.build", "not found"),
    ],
)
def test_checker_reports_what_a_release_changed(
    tmp_path: Path, path: str, old: str, new: str, entry: str, expected: str
) -> None:
    problems = _problems(_changed(path, old, new), tmp_path)
    hits = {label: p for label, p in problems.items() if f":{entry}" in label}
    assert len(problems) >= 1 and hits, problems
    assert any(expected in msg for msgs in hits.values() for msg in msgs), hits


def test_an_attribute_set_on_self_is_not_taken_for_the_method(tmp_path: Path) -> None:
    base = GOOD["vllm/worker/base.py"].replace("def hook(", "def _hook(")
    base = base.replace("self.config = config", "self.config = config\n                self.hook = None")
    problems = _problems({**GOOD, "vllm/worker/base.py": base}, tmp_path)
    assert problems == {
        "vllm.worker.runner:Runner.hook(self, scheduler_output, num_scheduled_tokens)": [
            "is not a function (an attribute set on self)"
        ]
    }


def test_missing_module_and_instance_attribute_seen_by_import_only_through_source(tmp_path: Path) -> None:
    _write(tmp_path, {k: v for k, v in GOOD.items() if k != "vllm/worker/runner.py"})
    problems = check_source(ENTRIES, tmp_path)
    runner_rows = [p for e, p in problems.items() if e.modules == ("vllm.worker.runner",)]
    assert runner_rows and all(p == ["not found in vllm.worker.runner"] for p in runner_rows)


def test_import_check_reports_what_import_sees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(
        tmp_path,
        {
            "fakevllm_c/__init__.py": "",
            "fakevllm_c/m.py": """
                class K:
                    def __init__(self):
                        self.inst = 1

                    async def rpc(self, method, timeout=None):
                        return None
                """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert check_by_import(Internal("fakevllm_c.m", "K.rpc", "(self, method, *, timeout)", True)) == []
    assert check_by_import(Internal("fakevllm_c.m", "K.rpc", "(self, method, *, args)", True)) == ["no parameter args"]
    assert check_by_import(Internal("fakevllm_c.m", "K.rpc", "(self, method)", False)) == ["is async"]
    assert check_by_import(Internal("fakevllm_c.m", "K.gone", "(self)")) == ["fakevllm_c.m has no K.gone"]
    assert check_by_import(Internal("fakevllm_c.m", "K.inst")) == []  # instance attribute: the source pass's job
    assert check_by_import(Internal(("fakevllm_c.new", "fakevllm_c.m"), "K")) == []
    assert check_by_import(Internal("fakevllm_c.nope", "K")) == ["no module fakevllm_c.nope"]


def test_script_exit_status(tmp_path: Path) -> None:
    """The documented command: 1 and a FAIL line per broken entry on a tree lacking the internals, 2 on a
    path that does not exist."""
    _write(tmp_path, GOOD)
    script = ROOT / "scripts" / "check_vllm_internals.py"
    run = subprocess.run([sys.executable, str(script), "--source", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL vllm.v1.worker.gpu_model_runner:GPUModelRunner._prepare_inputs: not found" in run.stdout
    assert f"1/{len(INTERNALS)} vLLM internals as expected" in run.stdout  # only vllm.__version__ is there
    missing = subprocess.run([sys.executable, str(script), "--source", str(tmp_path / "nope")], capture_output=True)
    assert missing.returncode == 2


# -- compat: the parser wherever a release keeps it
def test_make_arg_parser_resolves_in_the_installed_vllm() -> None:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="t")
    compat.make_arg_parser(parser)
    args = parser.parse_args(["--max-num-seqs", "3", "--uvicorn-log-level", "debug"])
    assert args.max_num_seqs == 3 and args.uvicorn_log_level == "debug"


def test_first_found_skips_missing_modules_but_not_broken_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(
        tmp_path,
        {
            "fakevllm_a/__init__.py": "",
            "fakevllm_a/old.py": "def make_arg_parser(p):\n    return 'old'\n",
            "fakevllm_a/broken.py": "import fakevllm_a.not_there\ndef make_arg_parser(p):\n    return 'broken'\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = compat.first_found(("fakevllm_a.new", "fakevllm_a.old"), "make_arg_parser")
    assert found(None) == "old"
    with pytest.raises(ModuleNotFoundError, match="fakevllm_a.not_there"):  # not mistaken for "moved"
        compat.first_found(("fakevllm_a.broken", "fakevllm_a.old"), "make_arg_parser")
    with pytest.raises(ImportError, match="no make_arg_parser in any of fakevllm_a.new, fakevllm_b.x"):
        compat.first_found(("fakevllm_a.new", "fakevllm_b.x"), "make_arg_parser")

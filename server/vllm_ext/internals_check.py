"""Checks that the vLLM internals :mod:`.internals` lists exist with the shape this package relies on.

Two ways, the same table:

- **statically** over a vLLM source tree (a ``site-packages`` folder, an unpacked wheel, or the ``.whl`` file
  itself): modules, classes, functions, methods (inherited ones too), parameters, ``async``, class and
  instance attributes (``self.x = ...``, ``register_buffer("x")``), names a body must use, dict keys,
  constant values — nothing is imported, so a release that cannot be installed here can be read;
- **by import** against the installed vLLM: the same entries imported and inspected (``inspect.signature``),
  plus the static pass over the installed sources for what only source shows (instance attributes, uses).

Neither torch nor vLLM is imported except by :func:`check_installed`: ``--source`` runs where vLLM is not
installed at all (checked with the system python3 here).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .internals import Internal

Node = ast.AST


# -- the expected signature: "(self, a, b, *, c)": a, b the leading positional parameters in that order;
# c accepted by keyword (a named parameter, or **kwargs); any other parameter must have a default.
@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "pos", "kw", "varargs", "varkw"
    required: bool


def parse_spec(sig: str) -> tuple[list[str], list[str]]:
    body = sig.strip().removeprefix("(").removesuffix(")")
    names = [p.strip() for p in body.split(",") if p.strip()]
    if "*" in names:
        star = names.index("*")
        return names[:star], names[star + 1 :]
    return names, []


def compare_signature(params: list[Param], sig: str) -> list[str]:
    positional, keywords = parse_spec(sig)
    pos = [p for p in params if p.kind == "pos"]
    problems = []
    got = [p.name for p in pos[: len(positional)]]
    if got != positional:
        problems.append(f"positional parameters start ({', '.join(got)}), expected ({', '.join(positional)})")
    named = {p.name for p in params if p.kind in ("pos", "kw")}
    has_varkw = any(p.kind == "varkw" for p in params)
    missing = [k for k in keywords if k not in named and not has_varkw]
    if missing:
        problems.append(f"no parameter {', '.join(missing)}")
    expected = set(positional) | set(keywords)
    new_required = [p.name for p in params if p.required and p.name not in expected]
    if new_required:
        problems.append(f"new required parameter(s) {', '.join(new_required)}")
    return problems


def params_of_ast(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[Param]:
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    first_default = len(positional) - len(a.defaults)
    out = [Param(arg.arg, "pos", i < first_default) for i, arg in enumerate(positional)]
    if any(_decorator_name(d) == "classmethod" for d in fn.decorator_list):
        out = out[1:]
    if a.vararg:
        out.append(Param(a.vararg.arg, "varargs", False))
    out += [Param(arg.arg, "kw", default is None) for arg, default in zip(a.kwonlyargs, a.kw_defaults, strict=True)]
    if a.kwarg:
        out.append(Param(a.kwarg.arg, "varkw", False))
    return out


def params_of_object(obj: Any) -> list[Param]:
    kinds = {
        inspect.Parameter.POSITIONAL_ONLY: "pos",
        inspect.Parameter.POSITIONAL_OR_KEYWORD: "pos",
        inspect.Parameter.KEYWORD_ONLY: "kw",
        inspect.Parameter.VAR_POSITIONAL: "varargs",
        inspect.Parameter.VAR_KEYWORD: "varkw",
    }
    out = []
    for p in inspect.signature(obj).parameters.values():
        required = p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        out.append(Param(p.name, kinds[p.kind], required))
    return out


def _decorator_name(node: Node) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def names_used(node: Node) -> set[str]:
    """Attribute names, bare names and string constants anywhere in ``node``."""
    used: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute):
            used.add(sub.attr)
        elif isinstance(sub, ast.Name):
            used.add(sub.id)
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            used.add(sub.value)
    return used


# -- a source tree: a folder that holds vllm/ (or the vllm/ folder itself), or a wheel read in place
class SourceTree:
    def __init__(self, location: Path) -> None:
        location = Path(location)
        self._zip = zipfile.ZipFile(location) if location.is_file() else None
        if self._zip is None and (location / "__init__.py").is_file() and not (location / "vllm").is_dir():
            location = location.parent  # the vllm/ folder itself
        self.root = location
        self._parsed: dict[str, ast.Module | None] = {}

    def _read(self, relpath: str) -> str | None:
        if self._zip is not None:
            try:
                return self._zip.read(relpath).decode()
            except KeyError:
                return None
        path = self.root / relpath
        return path.read_text() if path.is_file() else None

    def module(self, dotted: str) -> ast.Module | None:
        if dotted not in self._parsed:
            base = dotted.replace(".", "/")
            text = self._read(f"{base}.py")
            text = text if text is not None else self._read(f"{base}/__init__.py")
            try:
                self._parsed[dotted] = ast.parse(text) if text is not None else None
            except SyntaxError as err:
                raise ValueError(
                    f"cannot parse {dotted}: {err} (a release written for a newer Python: run the check with it)"
                ) from err
        return self._parsed[dotted]

    def is_package(self, dotted: str) -> bool:
        return self._read(dotted.replace(".", "/") + "/__init__.py") is not None


@dataclass
class Found:
    """What a name resolved to: a module, or a node and the module it is in."""

    module: str
    node: Node
    instance: bool = False  # an attribute set on ``self`` inside ``node`` (a method), not ``node`` itself


def _top_level(body: list[ast.stmt]):
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.If | ast.With):
            yield from _top_level(stmt.body)
            yield from _top_level(getattr(stmt, "orelse", []))
        elif isinstance(stmt, ast.Try):
            for part in (stmt.body, *[h.body for h in stmt.handlers], stmt.orelse, stmt.finalbody):
                yield from _top_level(part)


def _targets(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, ast.Assign):
        return [t.id for t in stmt.targets if isinstance(t, ast.Name)]
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return [stmt.target.id]
    return []


class StaticChecker:
    def __init__(self, tree: SourceTree) -> None:
        self.tree = tree

    def _absolute(self, module: str, stmt: ast.ImportFrom) -> str:
        if not stmt.level:
            return stmt.module or ""
        parts = module.split(".")
        if not self.tree.is_package(module):
            parts = parts[:-1]
        parts = parts[: len(parts) - (stmt.level - 1)]
        return ".".join([*parts, *([stmt.module] if stmt.module else [])])

    def resolve(self, module: str, name: str, depth: int = 0) -> Found | None:
        """``name`` at the top level of ``module`` (following ``from x import name`` re-exports)."""
        tree = self.tree.module(module)
        if tree is None or depth > 6:
            return None
        for stmt in _top_level(tree.body):
            if isinstance(stmt, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and stmt.name == name:
                return Found(module, stmt)
            if name in _targets(stmt):
                return Found(module, stmt)
            if isinstance(stmt, ast.ImportFrom):
                for alias in stmt.names:
                    if (alias.asname or alias.name) == name:
                        source = self._absolute(module, stmt)
                        return self.resolve(source, alias.name, depth + 1) or self._as_module(f"{source}.{alias.name}")
        return self._as_module(f"{module}.{name}")

    def _as_module(self, dotted: str) -> Found | None:
        tree = self.tree.module(dotted)
        return Found(dotted, tree) if tree is not None else None

    def _base(self, owner: Found, base: Node) -> Found | None:
        if isinstance(base, ast.Name):
            found = self.resolve(owner.module, base.id)
        elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
            holder = self.resolve(owner.module, base.value.id)
            found = self.resolve(holder.module, base.attr) if holder and isinstance(holder.node, ast.Module) else None
        else:
            return None
        return found if found and isinstance(found.node, ast.ClassDef) else None

    def member(self, cls: Found, name: str, seen: int = 0) -> Found | None:
        """``name`` on class ``cls``: defined in its body, assigned on ``self`` in a method, or inherited."""
        assert isinstance(cls.node, ast.ClassDef)
        for stmt in cls.node.body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) and stmt.name == name:
                return Found(cls.module, stmt)
            if name in _targets(stmt):
                return Found(cls.module, stmt)
        for stmt in cls.node.body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) and _sets_on_self(stmt, name):
                return Found(cls.module, stmt, instance=True)
        if seen < 12:
            for base in cls.node.bases:
                parent = self._base(cls, base)
                if parent is not None and (hit := self.member(parent, name, seen + 1)) is not None:
                    return hit
        return None

    def find(self, module: str, name: str) -> Found | None:
        if not name:
            return self._as_module(module)
        head, _, rest = name.partition(".")
        found = self.resolve(module, head)
        for part in rest.split(".") if rest else []:
            if found is None or not isinstance(found.node, ast.ClassDef):
                return None
            found = self.member(found, part)
        return found

    def check(self, entry: Internal) -> list[str]:
        found = None
        for module in entry.modules:
            found = self.find(module, entry.name)
            if found is not None:
                break
        if found is None:
            return [f"not found in {' or '.join(entry.modules)}"]
        node = found.node
        problems = []
        is_fn = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not found.instance
        if entry.sig is not None:
            if is_fn:
                problems += compare_signature(params_of_ast(node), entry.sig)
            else:
                kind = "an attribute set on self" if found.instance else type(node).__name__
                problems.append(f"is not a function ({kind})")
        if entry.is_async is not None and is_fn and isinstance(node, ast.AsyncFunctionDef) != entry.is_async:
            problems.append("is async" if not entry.is_async else "is not async")
        if entry.uses:
            scope = node if is_fn or isinstance(node, ast.ClassDef | ast.Module) and not found.instance else None
            missing = [u for u in entry.uses if scope is None or u not in names_used(scope)]
            if missing:
                problems.append(f"does not use {', '.join(missing)}")
        if entry.keys:
            value = getattr(node, "value", None)
            keys = (
                {k.value for k in value.keys if isinstance(k, ast.Constant)} if isinstance(value, ast.Dict) else set()
            )
            problems += [f"has no key {k!r}" for k in entry.keys if k not in keys]
        if entry.value is not None:
            value = getattr(node, "value", None)
            got = value.value if isinstance(value, ast.Constant) else None
            if got != entry.value:
                problems.append(f"is {got!r}, expected {entry.value!r}")
        return problems


def _sets_on_self(fn: ast.FunctionDef | ast.AsyncFunctionDef, name: str) -> bool:
    for sub in ast.walk(fn):
        targets: list[Node] = []
        if isinstance(sub, ast.Assign):
            targets = list(sub.targets)
        elif isinstance(sub, ast.AnnAssign | ast.AugAssign):
            targets = [sub.target]
        for t in targets:
            if (
                isinstance(t, ast.Attribute)
                and t.attr == name
                and isinstance(t.value, ast.Name)
                and t.value.id == "self"
            ):
                return True
        if (
            isinstance(sub, ast.Call)
            and _decorator_name(sub.func) in ("register_buffer", "register_parameter")
            and sub.args
            and isinstance(sub.args[0], ast.Constant)
            and sub.args[0].value == name
        ):
            return True
    return False


_ABSENT = object()


def _import_name(entry: Internal) -> tuple[Any, list[str]]:
    """(object, []) for the entry's name in the first of its modules that imports and has it; else (_ABSENT,
    problems). An instance attribute (not on the class) comes back as (_ABSENT, []): only source shows it."""
    problems = []
    for dotted in entry.modules:
        try:
            obj: Any = importlib.import_module(dotted)
        except ModuleNotFoundError as err:
            if err.name is not None and (dotted == err.name or dotted.startswith(err.name + ".")):
                problems.append(f"no module {dotted}")
                continue
            return _ABSENT, [f"import {dotted} failed: {err}"]
        except Exception as err:  # a module that exists but cannot be imported here
            return _ABSENT, [f"import {dotted} failed: {type(err).__name__}: {err}"]
        parts = entry.name.split(".") if entry.name else []
        for i, part in enumerate(parts):
            if not hasattr(obj, part):
                if i > 0 and i == len(parts) - 1 and entry.sig is None and not entry.keys and entry.value is None:
                    return _ABSENT, []
                problems.append(f"{dotted} has no {'.'.join(parts[: i + 1])}")
                break
            obj = getattr(obj, part)
        else:
            return obj, []
    return _ABSENT, problems


def check_by_import(entry: Internal) -> list[str]:
    """The entry against the imported vLLM: what import and ``inspect`` can see."""
    obj, problems = _import_name(entry)
    if obj is _ABSENT:
        return problems
    problems = []
    if entry.sig is not None:
        if not callable(obj):
            return [f"is not callable ({type(obj).__name__})"]
        problems += compare_signature(params_of_object(obj), entry.sig)
    if entry.is_async is not None and inspect.iscoroutinefunction(inspect.unwrap(obj)) != entry.is_async:
        problems.append("is async" if not entry.is_async else "is not async")
    problems += [f"has no key {k!r}" for k in entry.keys if k not in obj]
    if entry.value is not None and obj != entry.value:
        problems.append(f"is {obj!r}, expected {entry.value!r}")
    return problems


def check_source(entries: tuple[Internal, ...], location: Path) -> dict[Internal, list[str]]:
    """Every entry against the vLLM sources at ``location``; entry → problems (empty: as expected)."""
    checker = StaticChecker(SourceTree(location))
    return {entry: checker.check(entry) for entry in entries}


def check_installed(entries: tuple[Internal, ...]) -> dict[Internal, list[str]]:
    """Every entry against the installed vLLM, imported, and statically over its installed sources."""
    import vllm

    static = check_source(entries, Path(vllm.__file__).parent)
    return {entry: [*check_by_import(entry), *(f"source: {p}" for p in static[entry])] for entry in entries}

"""Readers for the deployment files under deploy/ and the Dockerfiles, shared by the tests in this folder.

Kept free of pytest so the structural tests and the live Prometheus test read the files the same way."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "longrope-serve.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"
DATASOURCE_UID = "prometheus"

# Values Grafana would put in for its built-in interval variables. Generous on purpose: the live test
# queries at one instant, a few seconds after its traffic, and every window must still cover that traffic.
GRAFANA_BUILTINS = {"__rate_interval": "2m", "__interval": "1m", "__range": "10m"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)$")


@dataclass(frozen=True)
class Query:
    """One PromQL expression of the dashboard and where it sits (for error messages)."""

    where: str
    expr: str
    label: str | None = None  # for a variable's label_values(...): the label whose values it lists


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def iter_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    """All PromQL in the dashboard: panel targets, annotation queries and template variable queries."""
    queries: list[Query] = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            queries.append(Query(f"panel {panel['id']} '{panel['title']}' target {target['refId']}", target["expr"]))
    for ann in dashboard.get("annotations", {}).get("list", []):
        if "expr" in ann:
            queries.append(Query(f"annotation '{ann['name']}'", ann["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        text = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = _LABEL_VALUES.match(text.strip())
        if m:
            queries.append(Query(f"variable '{var['name']}'", m["selector"], label=m["label"]))
        else:
            queries.append(Query(f"variable '{var['name']}'", text))
    return queries


def substitute(expr: str, values: dict[str, str]) -> str:
    """The expression with Grafana's variables replaced; an unknown variable is an error, not left in."""

    def repl(m: re.Match[str]) -> str:
        name = m[1] or m[2]
        if name in values:
            return values[name]
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        raise KeyError(f"variable ${name} in {expr!r} has no value; known: {sorted({**GRAFANA_BUILTINS, **values})}")

    return _VARIABLE.sub(repl, expr)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if not full:
            continue
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    if pending:
        raise ValueError(f"{path}: a line continuation at the end of the file")
    return out

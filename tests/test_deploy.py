"""The deploy files (Dockerfile, .dockerignore, deploy/) agree with the code and with each other.

Names, ports, paths and settings that only meet at run time (a compose service name in a
Prometheus target, a mount target in a Grafana provider, an ``INGESTOR_*`` variable in a
unit file) are checked here, without a Docker engine or a running systemd. The external
validators (``docker compose config``, ``promtool``, ``systemd-analyze``) run where they
are installed and are skipped, with the reason, where not.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from ingestor.config import Settings, env_name, load_settings
from ingestor.supervisor import FEATURES_DRAIN_TIMEOUT_S, PRODUCER_STOP_TIMEOUT_S, WRITER_DRAIN_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
UNIT_FILE = DEPLOY / "systemd" / "ingestor.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "ingestor.env.example"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ingestor.json"
SETTING_NAMES = {env_name(f.name) for f in fields(Settings)}
# What a stop may take before the supervisor gives up on its children (ingestor/supervisor.py):
# a container or unit killed sooner loses the batches still on their way to the writer.
DRAIN_S = PRODUCER_STOP_TIMEOUT_S + FEATURES_DRAIN_TIMEOUT_S + WRITER_DRAIN_TIMEOUT_S
EXPECTED_MIGRATIONS = sorted(p.name for p in (ROOT / "ingestor" / "db" / "sql").glob("*.sql"))


# -- compose -------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:(\$)|\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def _interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` with nothing set, as on a machine with no deploy/.env.

    A variable without a default is an error here: ``up`` would run with it empty.
    """

    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        expr = m.group(2) if m.group(2) is not None else m.group(3)
        for op in (":-", "-"):
            name, sep, default = expr.partition(op)
            if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                return default
        raise AssertionError(f"compose variable without a default: ${{{expr}}}")

    return _VAR.sub(one, text)


def _resolve(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _resolve(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v) for v in node]
    return _interpolate(node) if isinstance(node, str) else node


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _resolve(yaml.safe_load(COMPOSE_FILE.read_text()))


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every volume entry, short or long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append((v["source"], v["target"]))
        else:
            source, target = v.split(":")[:2]
            out.append((source, target))
    return out


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path, for the bind mounts (sources that are paths)."""
    return {t: (COMPOSE_FILE.parent / s).resolve() for s, t in _mounts(service) if s.startswith((".", "/"))}


def _seconds(duration: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def _flags(command: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in command if arg.startswith("--") and "=" in arg)


def test_compose_has_the_four_services_pinned_and_restarting(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"timescaledb", "ingestor", "prometheus", "grafana"}
    for name, svc in services.items():
        assert svc.get("restart") == "unless-stopped", name
        if name == "ingestor":
            continue
        repo, _, tag = svc["image"].rpartition(":")
        assert repo and tag and tag != "latest" and "/" not in tag, f"{name}: pin an image tag ({svc['image']})"
    assert services["timescaledb"]["image"].startswith("timescale/timescaledb:")
    assert services["timescaledb"]["image"].endswith("-pg16")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_the_ingestor_is_built_from_the_repository_dockerfile(compose: dict[str, Any]) -> None:
    build = compose["services"]["ingestor"]["build"]
    context = (COMPOSE_FILE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == ROOT / "Dockerfile"
    # An image name next to build makes `docker compose pull` look for it in a registry.
    assert "image" not in compose["services"]["ingestor"]


def test_every_published_port_is_on_loopback(compose: dict[str, Any]) -> None:
    published = {}
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            if isinstance(port, dict):
                host_ip, target = port.get("host_ip", ""), int(port["target"])
            else:
                parts = str(port).split(":")
                assert len(parts) == 3, f"{name}: {port!r} publishes on every address; give 127.0.0.1"
                host_ip, target = parts[0], int(parts[2].split("/")[0])
            assert host_ip == "127.0.0.1", f"{name}: {port!r}"
            published.setdefault(name, set()).add(target)
    assert published == {"timescaledb": {5432}, "ingestor": {_ingestor_settings(compose).http_port},
                         "prometheus": {9090}, "grafana": {3000}}


def test_bind_mount_sources_exist_and_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in compose["services"].items():
        for source, target in _mounts(svc):
            assert target.startswith("/"), f"{name}: {target}"
            if source.startswith((".", "/")):
                assert (COMPOSE_FILE.parent / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
        for env_file in svc.get("env_file", []):
            if isinstance(env_file, str) or env_file.get("required", True):
                path = env_file if isinstance(env_file, str) else env_file["path"]
                assert (COMPOSE_FILE.parent / path).exists(), f"{name}: {path} does not exist"
    assert used == declared
    # Each service that keeps state keeps it on a named volume, not in its container.
    state = {"timescaledb": "/var/lib/postgresql/data", "prometheus": "/prometheus", "grafana": "/var/lib/grafana",
             "ingestor": _ingestor_settings(compose).data_dir.as_posix()}
    for name, path in state.items():
        assert any(t == path and s in declared for s, t in _mounts(compose["services"][name])), name


def test_healthy_dependencies_have_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    healthy_deps = set()
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if spec["condition"] == "service_healthy":
                healthy_deps.add((name, dep))
                built_with_check = "build" in services[dep] and _dockerfile_has("HEALTHCHECK")
                has_check = "healthcheck" in services[dep] or built_with_check
                assert has_check, f"{name} waits for {dep} to be healthy, which has no healthcheck"
    assert {("ingestor", "timescaledb"), ("grafana", "prometheus")} <= healthy_deps
    db = services["timescaledb"]
    test = " ".join(db["healthcheck"]["test"][1:])
    assert "pg_isready" in test and "-h 127.0.0.1" in test
    env = _env(db)
    assert f"-U {env['POSTGRES_USER']}" in test and f"-d {env['POSTGRES_DB']}" in test
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["timescaledb"]["environment"]
    assert raw["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:-"), "from the environment, with a default"


def _ingestor_env(compose: dict[str, Any]) -> dict[str, str]:
    """What the container sees: the image's ENV, then compose's environment on top."""
    return {**_dockerfile_env(), **_env(compose["services"]["ingestor"])}


def _ingestor_settings(compose: dict[str, Any]) -> Settings:
    return load_settings(environ=_ingestor_env(compose), env_file=None)


def test_the_ingestor_environment_is_real_settings_wired_to_the_database(compose: dict[str, Any]) -> None:
    env = _ingestor_env(compose)
    ours = {k for k in env if k.startswith("INGESTOR_")}
    assert ours <= SETTING_NAMES, f"not settings: {sorted(ours - SETTING_NAMES)}"
    assert {"INGESTOR_DSN", "INGESTOR_HTTP_HOST", "INGESTOR_DATA_DIR"} <= ours
    settings = _ingestor_settings(compose)  # validates every value as `ingestor run` would
    assert settings.http_host == "0.0.0.0"
    assert settings.dsn is not None
    dsn = urlsplit(settings.dsn)
    db = _env(compose["services"]["timescaledb"])
    assert dsn.hostname == "timescaledb" and dsn.port == 5432
    assert (dsn.username, dsn.password, dsn.path) == (db["POSTGRES_USER"], db["POSTGRES_PASSWORD"],
                                                      "/" + db["POSTGRES_DB"])


def test_the_ingestor_gets_time_to_drain(compose: dict[str, Any]) -> None:
    svc = compose["services"]["ingestor"]
    assert _seconds(svc["stop_grace_period"]) >= DRAIN_S
    assert svc.get("init") is True
    assert _dockerfile_instructions("STOPSIGNAL")[-1] in ("SIGTERM", "15")


def _prometheus_config(compose: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    prom = compose["services"]["prometheus"]
    config_in_container = _flags(prom["command"])["config.file"]
    host = _bind_mounts(prom)[config_in_container]
    return host, yaml.safe_load(host.read_text())


def _ingestor_job(config: dict[str, Any]) -> dict[str, Any]:
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == "ingestor"]
    assert len(jobs) == 1
    return jobs[0]


def test_prometheus_scrapes_the_ingestor_service(compose: dict[str, Any]) -> None:
    host, config = _prometheus_config(compose)
    assert host == DEPLOY / "prometheus" / "prometheus.yml"
    job = _ingestor_job(config)
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"ingestor:{_ingestor_settings(compose).http_port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) in ("5s", "15s")
    flags = _flags(compose["services"]["prometheus"]["command"])
    assert "storage.tsdb.retention.time" in flags
    assert any(t == flags["storage.tsdb.path"] and not s.startswith((".", "/"))
               for s, t in _mounts(compose["services"]["prometheus"]))


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    r = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _dashboard_datasource_uids(dashboard: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(uids and names the panels, targets and variables refer to, template variables used)."""
    refs: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ds = node.get("datasource")
            if isinstance(ds, dict) and ds.get("type") not in ("grafana", "datasource") and "uid" in ds:
                refs.add(ds["uid"])
            elif isinstance(ds, str):
                refs.add(ds)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dashboard)
    variables = {r for r in refs if r.startswith("$")}
    return refs - variables, variables


def test_grafana_provisioning_matches_the_mounts_and_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = _bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == DEPLOY / "grafana" / "provisioning"

    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert len(datasources) == 1
    ds = datasources[0]
    assert (ds["uid"], ds["type"], ds.get("isDefault")) == ("prometheus", "prometheus", True)
    url = urlsplit(ds["url"])
    listen = _flags(compose["services"]["prometheus"]["command"]).get("web.listen-address", ":9090")
    assert (url.hostname, url.port) == ("prometheus", int(listen.rsplit(":", 1)[1]))
    _, prom_config = _prometheus_config(compose)
    job = _ingestor_job(prom_config)
    # $__rate_interval is built from it: it has to be the interval the samples really have.
    assert ds["jsonData"]["timeInterval"] == job.get("scrape_interval", prom_config["global"]["scrape_interval"])

    providers = yaml.safe_load((provisioning / "dashboards" / "ingestor.yml").read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"]
    dashboards_dir = mounts[providers[0]["options"]["path"]]
    assert dashboards_dir == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    home_dir, home_name = str(PurePosixPath(home).parent), PurePosixPath(home).name
    assert mounts[home_dir] / home_name == DASHBOARD

    assert DASHBOARD.is_file(), "the dashboard (deploy/grafana/dashboards/ingestor.json) is missing"
    dashboard = json.loads(DASHBOARD.read_text())
    uids, variables = _dashboard_datasource_uids(dashboard)
    assert uids, "the dashboard refers to no datasource: nothing would be drawn"
    assert uids <= {ds["uid"], ds["name"]}, f"the dashboard refers to datasources not provisioned: {uids}"
    declared = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    for var in variables:
        name = var.strip("${}").split(":")[0]
        assert declared.get(name, {}).get("type") == "datasource", f"{var}: not a datasource variable"
        assert declared[name].get("query") == "prometheus", f"{var}: not a Prometheus datasource variable"


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True,
                                        timeout=60).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    r = subprocess.run([docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# -- Dockerfile ----------------------------------------------------------------------

def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue  # Docker drops comment lines even inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        instruction, _, args = (pending + line).strip().partition(" ")
        out.append((instruction.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def _dockerfile_instructions(name: str) -> list[str]:
    return [args for instruction, args in _dockerfile() if instruction == name]


def _dockerfile_has(name: str) -> bool:
    return bool(_dockerfile_instructions(name))


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
    return value


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _dockerfile_instructions("ENV"):
        for item in shlex.split(args):
            key, sep, value = item.partition("=")
            assert sep, f"ENV {args}: use KEY=VALUE"
            env[key] = value
    return env


def test_the_image_runs_ingestor_as_a_non_root_user() -> None:
    assert _dockerfile_instructions("FROM") == ["python:3.11-slim"]
    user = _dockerfile_instructions("USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    assert _exec_form(_dockerfile_instructions("ENTRYPOINT")[-1]) == ["ingestor"]
    assert _exec_form(_dockerfile_instructions("CMD")[-1])[0] == "run"
    env = _dockerfile_env()
    assert {k for k in env if k.startswith("INGESTOR_")} <= SETTING_NAMES
    settings = load_settings(environ=env, env_file=None)
    assert settings.http_host == "0.0.0.0"
    assert [int(p.split("/")[0]) for a in _dockerfile_instructions("EXPOSE") for p in a.split()] == [settings.http_port]
    volumes = [v for a in _dockerfile_instructions("VOLUME") for v in _exec_form(a)]
    assert volumes == [settings.data_dir.as_posix()]


@contextmanager
def _health_server(status: int) -> Iterator[int]:
    """A server answering /health as the supervisor's does (200 healthy, 503 not); yields its port."""

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [200, 503])
def test_the_healthcheck_passes_on_200_and_fails_on_503(status: int) -> None:
    """The image's HEALTHCHECK command itself, run here with the image's port variable."""
    options, _, command = _dockerfile_instructions("HEALTHCHECK")[-1].partition("CMD ")
    assert "--start-period=" in options
    argv = _exec_form(command)
    assert argv[0] == "python"
    with _health_server(status) as port:
        # A clean environment: no proxy variables between the check and 127.0.0.1.
        r = subprocess.run([sys.executable, *argv[1:]], env={"INGESTOR_HTTP_PORT": str(port)},
                           capture_output=True, timeout=30)
    assert (r.returncode == 0) == (status == 200), r.stderr.decode()


def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rx, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pattern[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pattern[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                rx, i = rx + pattern[i:end + 1], end + 1
            else:
                rx, i = rx + re.escape(pattern[i]), i + 1
        out.append((negate, re.compile(rx)))
    return out


def _ignored(relpath: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or a directory above it decides."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negate, rx in patterns:
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_local_state_and_bulk_out() -> None:
    patterns = _ignore_patterns()
    for path in (".git/HEAD", ".venv/bin/python", ".env", "benchmarks/results/run.json", "tests/test_deploy.py",
                 "ingestor/__pycache__/cli.cpython-311.pyc", "__pycache__/x.pyc", "ingestor.egg-info/PKG-INFO"):
        assert _ignored(path, patterns), path
    for path in ("setup.cfg", "pyproject.toml", "README.md", "ingestor/cli.py", "ingestor/db/sql/001_tables.sql"):
        assert not _ignored(path, patterns), path


def _copy_sources() -> Iterator[tuple[list[str], str]]:
    for args in _dockerfile_instructions("COPY") + _dockerfile_instructions("ADD"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        yield words[:-1], words[-1]


def test_every_copy_source_exists_in_the_build_context() -> None:
    patterns = _ignore_patterns()
    sources = [s for srcs, _ in _copy_sources() for s in srcs]
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: missing"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        kept = [p for p in files if not _ignored(p.relative_to(ROOT).as_posix(), patterns)]
        assert kept, f"COPY {source}: .dockerignore leaves nothing of it in the build context"


def _image_tree(root: Path) -> tuple[bool, Path]:
    """Lay out under ``root`` what the Dockerfile's COPY lines put in the image (the build
    context less .dockerignore); return (editable install?, the directory pip installs)."""
    patterns = _ignore_patterns()
    workdir = PurePosixPath("/")
    install: tuple[bool, Path] | None = None
    for instruction, args in _dockerfile():
        if instruction == "WORKDIR":
            workdir = workdir / args
        elif instruction == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            dest = root / (workdir / words[-1]).relative_to("/")
            for source in words[:-1]:
                src = ROOT / source
                files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
                for f in files:
                    if _ignored(f.relative_to(ROOT).as_posix(), patterns):
                        continue
                    target = dest / f.name if src.is_file() else dest / f.relative_to(src)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, target)
        elif instruction == "RUN" and "pip install" in args:
            words = shlex.split(args.split("pip install", 1)[1].split("&&")[0])
            editable = "-e" in words or "--editable" in words
            targets = [w for w in words if not w.startswith("-")]
            assert len(targets) == 1, f"RUN {args}: install one project"
            install = (editable, root / (workdir / targets[0]).relative_to("/"))
    assert install is not None, "the Dockerfile installs nothing with pip"
    return install


def _migrations_seen(pythonpath: Path, cwd: Path) -> tuple[str, list[str]]:
    """Where `ingestor.db.migrate` is imported from and the migrations it loads, in a fresh
    interpreter whose ``ingestor`` comes from ``pythonpath`` (ahead of the venv's editable one)."""
    code = ("import json, ingestor.db.migrate as m; "
            "print(json.dumps([m.__file__, [x.name for x in m.load_migrations()]]))")
    r = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(pythonpath)}, cwd=cwd,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    module, names = json.loads(r.stdout)
    assert Path(module).is_relative_to(pythonpath), f"imported {module}, not the image's copy"
    return module, names


def _install_wheel(project: Path, tmp_path: Path) -> Path:
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(project)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = wheels.glob("ingestor-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300,
                   capture_output=True)
    return target


def test_the_image_finds_its_migrations(tmp_path: Path) -> None:
    """Without them `ingestor run` would apply nothing and start with no tables. The image
    installs a wheel of its tree (not editable): the migrations must travel as package data."""
    editable, project = _image_tree(tmp_path / "image")
    assert not editable and (project / "setup.cfg").is_file()
    _, names = _migrations_seen(_install_wheel(project, tmp_path), tmp_path)
    assert names == EXPECTED_MIGRATIONS


# -- systemd -------------------------------------------------------------------------

def _unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (systemd keys repeat, so no configparser)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return _unit(UNIT_FILE.read_text())["Service"]


def _one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key)
    assert values is not None, f"{key}= is not set"
    assert len(values) == 1, f"{key}= is set {len(values)} times"
    return values[0]


def _unit_env(service: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in service.get("Environment", []):
        for item in shlex.split(line):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def test_the_unit_runs_the_venv_ingestor_with_settings_in_the_environment(service: dict[str, list[str]]) -> None:
    argv = shlex.split(_one(service, "ExecStart"))
    assert argv[:2] == ["/opt/ingestor/.venv/bin/ingestor", "run"]
    # A flag here would silently win over the same setting in the environment file.
    assert not [a for a in argv[2:] if a.startswith("-")], argv
    assert _one(service, "Type") in ("exec", "simple")
    assert (_one(service, "User"), _one(service, "Group")) == ("ingestor", "ingestor")
    assert _one(service, "EnvironmentFile") == "-/etc/ingestor/ingestor.env"
    env = _unit_env(service)
    assert {k for k in env if k.startswith("INGESTOR_")} <= SETTING_NAMES
    settings = load_settings(environ=env, env_file=None)
    assert settings.shards == 4
    assert settings.dsn is None  # the embedded PostgreSQL, unless the environment file names a server


def test_the_unit_can_write_the_data_dir_and_the_embedded_postgres_socket(service: dict[str, list[str]]) -> None:
    env = _unit_env(service)
    data_dir = Path(env["INGESTOR_DATA_DIR"])
    assert data_dir == Path("/var/lib") / _one(service, "StateDirectory")
    assert _one(service, "WorkingDirectory") == str(data_dir)
    # embedded-postgres puts its socket in <data dir>/pg when the path fits a sockaddr_un
    # (108 bytes with the terminating NUL), else in the runtime directory.
    socket = data_dir / "pg" / ".s.PGSQL.5432"
    assert len(str(socket).encode()) < 108
    assert env["XDG_RUNTIME_DIR"] == "/run/" + _one(service, "RuntimeDirectory")
    assert _one(service, "RuntimeDirectoryMode") == "0700"  # platformdirs rejects a looser one
    assert "AF_UNIX" in _one(service, "RestrictAddressFamilies").split()


def test_the_unit_stops_by_draining(service: dict[str, list[str]]) -> None:
    assert _one(service, "KillSignal") == "SIGTERM"
    assert _one(service, "KillMode") == "mixed"  # SIGTERM to the supervisor alone: it orders the stop
    assert int(_one(service, "TimeoutStopSec")) >= DRAIN_S
    assert _one(service, "Restart") == "on-failure"
    assert int(_one(service, "LimitNOFILE")) >= 65536


HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "ProtectClock": "yes", "ProtectHostname": "yes",
    "RestrictNamespaces": "yes", "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
    "SystemCallArchitectures": "native", "CapabilityBoundingSet": "", "AmbientCapabilities": "", "UMask": "0077",
}


def test_the_unit_is_hardened(service: dict[str, list[str]]) -> None:
    assert {k: _one(service, k) for k in HARDENING} == HARDENING
    assert set(_one(service, "RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    # Not known to work with the C extensions and PostgreSQL's JIT: see the unit's comment.
    assert "MemoryDenyWriteExecute" not in service


def test_the_example_environment_file_names_real_settings_with_valid_values() -> None:
    seen = 0
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.fullmatch(r"#?(INGESTOR_[A-Z_]+)=(.*)", line.strip())
        if not m:
            continue
        seen += 1
        name, value = m.groups()
        assert name in SETTING_NAMES, line
        # Each one as an operator would uncomment it (some exclude others, e.g. SYMBOLS and TOP).
        load_settings(environ={name: value}, env_file=None)
    assert seen >= 5


def _systemd_version() -> int:
    out = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"systemd (\d+)", out)
    return int(m.group(1)) if m else 0


@pytest.fixture
def verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart on a binary that exists here (verify checks that it does)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    binary = Path(sys.executable).with_name("ingestor")
    binary = binary if binary.exists() else Path(sys.executable)
    text = UNIT_FILE.read_text().replace("ExecStart=/opt/ingestor/.venv/bin/ingestor", f"ExecStart={binary}")
    assert text != UNIT_FILE.read_text()
    copy = tmp_path / "ingestor.service"
    copy.write_text(text)
    return copy


def test_systemd_analyze_verifies_the_unit(verifiable_unit: Path) -> None:
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(verifiable_unit)], capture_output=True,
                       text=True, timeout=60)
    # An unknown or misspelt directive is only a warning (exit 0) naming the file and line.
    assert r.returncode == 0 and str(verifiable_unit) not in r.stdout + r.stderr, r.stdout + r.stderr


def test_systemd_analyze_rates_the_unit_well_protected(verifiable_unit: Path) -> None:
    if _systemd_version() < 250:
        pytest.skip("systemd-analyze security --offline needs systemd 250 or later")
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(verifiable_unit)],
                       capture_output=True, text=True, timeout=60)
    overall = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout)
    assert r.returncode == 0 and overall, r.stdout[-2000:] + r.stderr
    assert float(overall.group(1)) <= 2.0

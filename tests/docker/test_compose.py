"""docker/compose.yaml, docker/Caddyfile and the Dockerfile agree: mounts, ports, profiles, the trained volume."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT

SERVING = ("server", "server-gpu", "replica")


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    compose = yaml.safe_load((REPO_ROOT / "docker" / "compose.yaml").read_text())
    result: dict[str, Any] = compose["services"]
    return result


def dockerfile_env(name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", (REPO_ROOT / "Dockerfile").read_text())
    assert match, name
    return match.group(1)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path → source (named volume or host path, maybe `${VAR:-default}`), options dropped."""
    result = {}
    for volume in service["volumes"]:
        source, _, rest = volume.rpartition(":/")
        result["/" + rest.split(":")[0]] = source
    return result


def test_train_writes_where_every_server_discovers_adapters(services: dict[str, Any]) -> None:
    train = services["train"]
    out = train["command"][train["command"].index("--out") + 1]
    assert train["restart"] == "no" and "train" in train["profiles"]
    assert mounts(train)["/runs"] == "runs" and out.startswith("/runs/")
    discovered = dockerfile_env("HPR_ADAPTERS_DIR").split(":")
    assert "/runs" in discovered and "/adapters" in discovered
    for name in SERVING:
        assert mounts(services[name])["/runs"] == "runs", name
        assert "/adapters" in mounts(services[name]), name


def test_servers_are_health_checked_and_restarted(services: dict[str, Any]) -> None:
    port = dockerfile_env("HPR_PORT")
    for name in SERVING:
        service = services[name]
        assert service["restart"] == "unless-stopped", name
        assert f"127.0.0.1:{port}/health" in " ".join(service["healthcheck"]["test"]), name
    assert services["server"]["ports"] == [f"${{PORT:-8000}}:{port}"]
    assert "profiles" not in services["server"]  # `docker compose up` starts it


def test_gpu_profile_reserves_an_nvidia_gpu_for_the_cuda_image(services: dict[str, Any]) -> None:
    gpu = services["server-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["args"]["VARIANT"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["ports"] != services["server"]["ports"]  # both may run on one host


def test_proxy_spreads_over_the_replicas(services: dict[str, Any]) -> None:
    caddyfile = (REPO_ROOT / "docker" / "Caddyfile").read_text()
    upstream = re.search(r"dynamic a \{\s*name (\S+)\s*port (\d+)", caddyfile)
    assert upstream and upstream.group(1) == "replica" and upstream.group(2) == dockerfile_env("HPR_PORT")
    proxy = services["proxy"]
    assert "./Caddyfile:/etc/caddy/Caddyfile:ro" in proxy["volumes"]
    assert proxy["profiles"] == services["replica"]["profiles"] == ["scale"]
    assert proxy["depends_on"]["replica"]["condition"] == "service_healthy"
    assert "ports" not in services["replica"]  # only the proxy is published
    assert "flush_interval -1" in caddyfile  # streamed tokens are not held back


def test_servers_require_an_api_key_from_the_env_file(services: dict[str, Any]) -> None:
    for name in SERVING:
        key = services[name]["environment"]["HPR_API_KEY"]
        # `${VAR:?message}`: compose refuses to start without it, with that message
        assert re.fullmatch(r"\$\{HPR_API_KEY:\?.*docker/\.env.*\}", key), (name, key)
    example = (REPO_ROOT / "docker" / "env.example").read_text()
    assert re.search(r"^HPR_API_KEY=$", example, re.MULTILINE)  # shipped without a key: each deployment sets its own
    assert "docker/.env" in (REPO_ROOT / ".gitignore").read_text().splitlines()

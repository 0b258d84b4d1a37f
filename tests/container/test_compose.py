"""docker-compose.yml as a compose tool reads it (Debian's docker-compose: `docker-compose config` validates the file
against the compose schema and resolves it with .env), not only as YAML (tests/unit/test_container.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from relay.config import Settings
from tests.container.engine import ROOT, unavailable
from tests.unit.test_container import DOT_ENV


def compose_config(directory: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`docker-compose config` on a copy of the compose file, beside a .env with `env`."""
    if shutil.which("docker-compose") is None:
        unavailable("docker-compose is not installed (.ci/run installs Debian's docker-compose)")
    shutil.copy(ROOT / "docker-compose.yml", directory / "docker-compose.yml")
    (directory / ".env").write_text("".join(f"{name}={value}\n" for name, value in env.items()))
    return subprocess.run(["docker-compose", "config"], cwd=directory, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_docker_compose_accepts_the_file_filled_in_from_env_example(tmp_path):
    result = compose_config(tmp_path, DOT_ENV)
    assert result.returncode == 0, result.stderr
    relay = yaml.safe_load(result.stdout)["services"]["relay"]
    environment = relay["environment"]
    settings = Settings.load(env={**DOT_ENV, **{k: str(v) for k, v in environment.items()}})
    assert environment["RELAY_ANNOUNCED_IP"] == DOT_ENV["PUBLIC_IP"] == settings.announced_ip
    assert relay["read_only"] is True and relay["tmpfs"] == ["/tmp"]  # the relay's workers write to /tmp only
    assert "healthcheck" not in relay  # the image's own health check applies
    grace = relay["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > settings.drain_timeout_s


@pytest.mark.parametrize("variable", ["PUBLIC_IP", "TURN_SECRET"])
def test_docker_compose_refuses_the_file_without_a_required_variable(tmp_path, variable):
    result = compose_config(tmp_path, {**DOT_ENV, variable: ""})
    assert result.returncode != 0 and f"set {variable} in .env" in result.stderr

"""Unit tests for the `relay` command (relay/cli.py) and the simulator knobs (relay/simulator/config.py)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys

import aiohttp
import pytest

from relay.cli import SECRET_KNOBS, sim_config_from
from relay.config import Settings
from relay.simulator.config import ALL_KNOBS, PER_SESSION, SERVER_ONLY, KnobError, SimConfig, with_overrides
from tests.processes import clean_env


LAUNCHERS = [
    pytest.param([sys.executable, "-m", "relay"], id="python-m-relay"),
    pytest.param(
        ["relay"],
        id="console-script",
        marks=pytest.mark.skipif(shutil.which("relay") is None, reason="`relay` console script not on PATH"),
    ),
]


def run_relay(launcher: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, *args], env=clean_env(), capture_output=True, text=True, timeout=60)


# --- help and usage errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_top_level_help(launcher):
    result = run_relay(launcher, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: relay" in result.stdout
    assert "serve" in result.stdout and "simulator" in result.stdout


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_serve_help_names_every_setting_env(launcher):
    result = run_relay(launcher, "serve", "--help")
    assert result.returncode == 0, result.stderr
    env_names = [Settings.env_name(name) for name in Settings.model_fields]
    assert {"RELAY_HOST", "RELAY_PORT", "RELAY_UPSTREAM_URL", "OPENAI_API_KEY", "RELAY_UPSTREAM_API_KEY"} <= set(env_names)
    for env_name in env_names:
        assert env_name in result.stdout, env_name
    for flag in ("--host", "--port", "--log-level", "--model", "--upstream-url", "--upstream-auth-header"):
        assert re.search(rf"(?<![\w-]){flag}(?![\w-])", result.stdout), flag


def test_serve_has_no_flags_for_secrets():
    result = run_relay([sys.executable, "-m", "relay"], "serve", "--help")
    assert "--openai-api-key" not in result.stdout
    assert "--upstream-api-key" not in result.stdout


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_simulator_help_names_every_knob_flag(launcher):
    result = run_relay(launcher, "simulator", "--help")
    assert result.returncode == 0, result.stderr
    flags = ["--" + name.replace("_", "-") for name in ALL_KNOBS if name not in SECRET_KNOBS]
    assert {"--close-after-events", "--stall-s", "--reject-auth", "--close-abruptly"} <= set(flags)
    for flag in flags:
        assert re.search(rf"(?<![\w-]){flag}(?![\w-])", result.stdout), flag
    assert "--api-key" not in result.stdout  # a secret: environment only
    for name in ALL_KNOBS:
        assert "RELAY_SIM_" + name.upper() in result.stdout, name


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_no_command_exits_2_with_help(launcher):
    result = run_relay(launcher)
    assert result.returncode == 2
    assert "usage: relay" in result.stdout + result.stderr
    assert "serve" in result.stdout + result.stderr


def test_serve_bad_port_exits_2_naming_port():
    result = run_relay([sys.executable, "-m", "relay"], "serve", "--port", "abc")
    assert result.returncode == 2
    assert "port" in result.stderr
    assert "RELAY_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_a_tools_module_that_does_not_import_exits_2_naming_it():
    result = run_relay([sys.executable, "-m", "relay"], "serve", "--port", "0", "--tools", "tests.no_such_tools")
    assert result.returncode == 2
    assert "RELAY_TOOLS" in result.stderr and "tests.no_such_tools" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_a_directory_it_cannot_use_exits_2_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for flag, env in (("--recordings-dir", "RELAY_RECORDINGS_DIR"), ("--history-dir", "RELAY_HISTORY_DIR")):
        result = run_relay([sys.executable, "-m", "relay"], "serve", "--port", "0", flag, str(blocker / "sub"))
        assert result.returncode == 2
        assert env in result.stderr and "cannot use" in result.stderr and "Traceback" not in result.stderr


def test_serve_with_workers_and_no_writable_temporary_directory_exits_2_saying_what_to_mount(monkeypatch, capsys):
    import tempfile

    from relay.cli import main

    def no_directory() -> str:  # what tempfile says on a read-only root without a /tmp mount
        raise FileNotFoundError(2, "No usable temporary directory found in ['/tmp', '/var/tmp', '/usr/tmp', '/']")

    monkeypatch.setattr(tempfile, "gettempdir", no_directory)
    monkeypatch.delenv("RELAY_WORKER_INDEX", raising=False)
    assert main(["serve", "--port", "0", "--workers", "2"]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.splitlines()) == 1 and "--tmpfs /tmp" in stderr and "RELAY_WORKERS=1" in stderr


def test_simulator_bad_knob_value_exits_2():
    result = run_relay([sys.executable, "-m", "relay"], "simulator", "--speed", "fast")
    assert result.returncode == 2
    assert "speed" in result.stderr
    assert "Traceback" not in result.stderr


# --- sim_config_from ------------------------------------------------------------------------------------------


def test_sim_config_defaults_without_flags_or_env():
    assert sim_config_from({}, env={}) == SimConfig()


def test_sim_config_flags_over_env_over_defaults():
    config = sim_config_from(
        {"speed": "2", "close_after_events": None, "host": "0.0.0.0", "port": 1},
        env={"RELAY_SIM_SPEED": "3", "RELAY_SIM_DELTA_MS": "50", "RELAY_SIM_CLOSE_AFTER_EVENTS": "7"},
    )
    assert config.speed == 2.0  # flag wins
    assert config.delta_ms == 50  # env applies
    assert config.close_after_events == 7  # a None flag means "not given"
    assert config.stall_s == SimConfig().stall_s  # default
    assert isinstance(config.delta_ms, int) and isinstance(config.speed, float)


@pytest.mark.parametrize(
    ("values", "env", "expected"),
    [
        ({"reject_auth": True}, {}, True),  # a store_true flag
        ({}, {"RELAY_SIM_REJECT_AUTH": "yes"}, True),
        ({}, {"RELAY_SIM_REJECT_AUTH": "1"}, True),
        ({}, {"RELAY_SIM_REJECT_AUTH": "off"}, False),
        ({}, {"RELAY_SIM_REJECT_AUTH": "FALSE"}, False),
    ],
)
def test_sim_config_booleans(values, env, expected):
    assert sim_config_from(values, env=env).reject_auth is expected


def test_sim_config_optional_knob_can_be_none():
    config = sim_config_from({}, env={"RELAY_SIM_API_KEY": "secret", "RELAY_SIM_CLOSE_AFTER_S": "none"})
    assert config.api_key == "secret"
    assert config.close_after_s is None


@pytest.mark.parametrize(
    ("values", "env"),
    [
        ({"speed": "fast"}, {}),
        ({}, {"RELAY_SIM_SPEED": "fast"}),
        ({"close_after_events": "1.5"}, {}),
        ({}, {"RELAY_SIM_REJECT_AUTH": "maybe"}),
    ],
)
def test_sim_config_bad_value_raises_knob_error(values, env):
    with pytest.raises(KnobError) as caught:
        sim_config_from(values, env=env)
    assert isinstance(caught.value, ValueError)


# --- with_overrides (per-session query parameters) ------------------------------------------------------------


def test_with_overrides_applies_sim_params_and_ignores_others():
    base = SimConfig(speed=8.0)
    config = with_overrides(base, {"model": "gpt-realtime", "sim_close_after_events": "20", "sim_close_abruptly": "true"})
    assert config.close_after_events == 20
    assert config.close_abruptly is True
    assert config.speed == 8.0  # untouched knobs keep the server's value
    assert base.close_after_events is None  # the server-wide config is not changed


def test_with_overrides_without_sim_params_is_the_base():
    base = SimConfig(stall_s=1.0)
    assert with_overrides(base, {"model": "gpt-realtime"}) == base


def test_with_overrides_unknown_knob():
    with pytest.raises(KnobError, match="sim_warp_speed"):
        with_overrides(SimConfig(), {"sim_warp_speed": "9"})


@pytest.mark.parametrize("name", sorted(SERVER_ONLY))
def test_with_overrides_refuses_server_only_knobs(name):
    assert name not in PER_SESSION
    with pytest.raises(KnobError):
        with_overrides(SimConfig(), {f"sim_{name}": "1"})


def test_with_overrides_bad_value():
    with pytest.raises(KnobError, match="stall_s"):
        with_overrides(SimConfig(), {"sim_stall_s": "long"})


# --- relay serve end to end -----------------------------------------------------------------------------------

LISTENING = re.compile(r"relay listening on http://127\.0\.0\.1:(\d+)/")


@pytest.mark.timeout(60)
async def test_relay_serve_starts_answers_healthz_and_stops_on_sigterm():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--port", "0", "--host", "127.0.0.1",
        env=clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        lines: list[str] = []
        port = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while port is None:
            remaining = deadline - loop.time()
            assert remaining > 0, f"no 'relay listening' line within 20 s: {lines}"
            raw = await asyncio.wait_for(proc.stderr.readline(), remaining)
            assert raw, f"relay exited before listening (rc={await proc.wait()}): {lines}"
            line = raw.decode(errors="replace")
            match = LISTENING.search(line)
            if match:
                port = int(match.group(1))
            else:
                lines.append(line)
        assert any("upstream: built-in Realtime simulator" in line for line in lines), lines
        assert 0 < port < 65536

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
                assert await response.json() == {"status": "ok"}

        proc.terminate()
        returncode = await asyncio.wait_for(proc.wait(), 10)
        rest = (await asyncio.wait_for(proc.stderr.read(), 10)).decode(errors="replace")
        assert returncode == 0, rest
        assert "relay stopping" in rest
        assert "Traceback" not in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_serve_help_shows_real_defaults():
    result = run_relay([sys.executable, "-m", "relay"], "serve", "--help")
    assert result.returncode == 0 and "PydanticUndefined" not in result.stdout
    assert "default: []" in " ".join(result.stdout.split())  # ICE servers: none

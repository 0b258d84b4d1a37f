"""Unit tests for relay.config (Settings) and relay.upstream.target (choose_upstream)."""

from __future__ import annotations

import pytest

from relay.config import Settings, SettingsError, cpu_limit, default_workers
from relay.upstream.target import UpstreamTarget, choose_upstream

CANARY = "sk-canary-123"


def test_defaults():
    settings = Settings.load(env={})
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.log_level == "info"
    assert settings.model == "gpt-realtime"
    assert settings.openai_api_key is None and settings.upstream_url is None
    assert settings.upstream_auth_header == "Authorization"


@pytest.mark.parametrize(("files", "cpus"), [
    ({"cpu.max": "50000 100000\n"}, 1),  # cgroup v2, --cpus 0.5: at least one
    ({"cpu.max": "200000 100000\n"}, 2),  # a pod limited to 2 CPUs
    ({"cpu.max": "150000 100000\n"}, 1),  # whole CPUs only
    ({"cpu.max": "max 100000\n"}, None),  # no quota
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # cgroup v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),  # no cgroup file system
])
def test_the_cpu_limit_is_the_cgroup_quota_in_whole_cpus(tmp_path, files, cpus):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_limit(str(tmp_path)) == cpus


def test_the_default_worker_count_follows_a_cpu_quota_below_the_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr("relay.config.cpu_limit", lambda: 2)
    assert default_workers() == 2 and Settings.load(env={}).workers == 2  # not 62 on a 64-core node
    monkeypatch.setattr("relay.config.cpu_limit", lambda: None)
    assert default_workers() == 62
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("relay.config.cpu_limit", lambda: 8)  # a quota above the cores it may run on
    assert default_workers() == 2


def test_env_applies():
    settings = Settings.load(env={"RELAY_PORT": "9000", "RELAY_HOST": "0.0.0.0", "RELAY_LOG_LEVEL": "debug",
                                   "RELAY_API_KEYS": "k"})
    assert (settings.host, settings.port, settings.log_level) == ("0.0.0.0", 9000, "debug")


def test_empty_env_value_means_unset():
    assert Settings.load(env={"RELAY_PORT": ""}).port == 8080


def test_flag_overrides_env():
    assert Settings.load(env={"RELAY_PORT": "9000"}, port="9001").port == 9001
    assert Settings.load(env={"RELAY_PORT": "9000"}, port=None).port == 9000


@pytest.mark.parametrize(
    ("env", "flags"),
    [
        pytest.param({"RELAY_PORT": "abc"}, {}, id="env-abc"),
        pytest.param({"RELAY_PORT": "70000"}, {}, id="env-70000"),
        pytest.param({}, {"port": "abc"}, id="flag-abc"),
        pytest.param({}, {"port": "-1"}, id="flag-negative"),
    ],
)
def test_bad_port_names_the_setting(env, flags):
    with pytest.raises(SettingsError) as caught:
        Settings.load(env=env, **flags)
    assert isinstance(caught.value, ValueError)
    assert "port" in str(caught.value)
    assert "RELAY_PORT" in str(caught.value)


@pytest.mark.parametrize("url", ["http://example.com/v1/realtime", "https://x", "example.com"])
def test_non_websocket_upstream_url_is_refused(url):
    with pytest.raises(SettingsError, match="RELAY_UPSTREAM_URL"):
        Settings.load(env={"RELAY_UPSTREAM_URL": url})


def test_bad_log_level_is_refused():
    with pytest.raises(SettingsError, match="RELAY_LOG_LEVEL"):
        Settings.load(env={"RELAY_LOG_LEVEL": "loud"})


# --- secrets --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"OPENAI_API_KEY": CANARY}, id="openai"),
        pytest.param({"RELAY_UPSTREAM_URL": "wss://up.example/rt", "RELAY_UPSTREAM_API_KEY": CANARY}, id="url"),
    ],
)
def test_secrets_never_printed(env):
    settings = Settings.load(env=env)
    target = choose_upstream(settings)
    assert target.headers  # the key is there ...
    assert any(CANARY in value for value in target.headers.values())
    for text in (repr(settings), str(settings), settings.model_dump_json(), target.describe(), repr(target),
                 str(target)):
        assert CANARY not in text  # ... but never shown
    assert "with a key" in target.describe()


# --- choose_upstream ------------------------------------------------------------------------------------------


def test_no_key_no_url_is_the_simulator():
    target = choose_upstream(Settings.load(env={}))
    assert target == UpstreamTarget("simulator", None)
    assert target.headers == {}
    assert "built-in Realtime simulator" in target.describe()


def test_simulator_describe_with_url():
    line = UpstreamTarget("simulator", "ws://127.0.0.1:5555/v1/realtime?model=gpt-realtime").describe()
    assert "built-in Realtime simulator" in line
    assert "ws://127.0.0.1:5555/v1/realtime" in line


def test_openai_key_only():
    target = choose_upstream(Settings.load(env={"OPENAI_API_KEY": CANARY}))
    assert target.kind == "openai"
    assert target.url == "wss://api.openai.com/v1/realtime?model=gpt-realtime"
    assert target.headers == {"Authorization": f"Bearer {CANARY}"}
    assert "OpenAI Realtime API" in target.describe()


def test_openai_model_setting_goes_into_the_url():
    target = choose_upstream(Settings.load(env={"OPENAI_API_KEY": "k", "RELAY_MODEL": "gpt-realtime-mini"}))
    assert target.url == "wss://api.openai.com/v1/realtime?model=gpt-realtime-mini"


AZURE_URL = "wss://res.openai.azure.com/openai/v1/realtime?model=my-deployment&api-version=2025-08-28"


def test_upstream_url_with_own_key_and_header():
    env = {
        "RELAY_UPSTREAM_URL": AZURE_URL,
        "RELAY_UPSTREAM_API_KEY": "azure-key",
        "RELAY_UPSTREAM_AUTH_HEADER": "api-key",
    }
    target = choose_upstream(Settings.load(env=env))
    assert target.kind == "url"
    assert target.url == AZURE_URL
    assert target.headers == {"api-key": "azure-key"}
    assert "api-version" not in target.describe()  # the query string (which may hold secrets) is not logged


def test_the_openai_key_never_goes_to_another_host():
    target = choose_upstream(Settings.load(env={"RELAY_UPSTREAM_URL": AZURE_URL, "OPENAI_API_KEY": CANARY}))
    assert (target.kind, target.url) == ("url", AZURE_URL)
    assert target.headers == {}


def test_a_key_goes_over_plain_ws_only_on_loopback():
    with pytest.raises(SettingsError, match="wss://"):
        Settings.load(env={"RELAY_UPSTREAM_URL": "ws://up.example/rt", "RELAY_UPSTREAM_API_KEY": "k"})
    for url in ("ws://127.0.0.1:9/rt", "ws://[::1]:9/rt", "ws://localhost:9/rt", "wss://up.example/rt"):
        assert choose_upstream(Settings.load(env={"RELAY_UPSTREAM_URL": url, "RELAY_UPSTREAM_API_KEY": "k"})).headers


def test_credentials_in_the_url_are_not_logged():
    line = choose_upstream(Settings.load(env={"RELAY_UPSTREAM_URL": "wss://user:pw@up.example:8443/rt?key=s"})).describe()
    assert "pw" not in line and "key=s" not in line and "wss://up.example:8443/rt" in line


def test_upstream_url_wins_over_openai_key():
    env = {"RELAY_UPSTREAM_URL": "ws://127.0.0.1:9999/v1/realtime", "RELAY_UPSTREAM_API_KEY": "own",
           "OPENAI_API_KEY": CANARY}
    target = choose_upstream(Settings.load(env=env))
    assert (target.kind, target.url) == ("url", "ws://127.0.0.1:9999/v1/realtime")
    assert target.headers == {"Authorization": "Bearer own"}


def test_upstream_url_without_any_key():
    target = choose_upstream(Settings.load(env={"RELAY_UPSTREAM_URL": "ws://127.0.0.1:9999/v1/realtime"}))
    assert (target.kind, target.headers) == ("url", {})
    assert "without a key" in target.describe()


def test_upstream_url_flag_overrides_env():
    settings = Settings.load(env={"RELAY_UPSTREAM_URL": "wss://env.example/rt"}, upstream_url="wss://flag.example/rt")
    assert choose_upstream(settings).url == "wss://flag.example/rt"


def test_the_operator_session_and_the_clients_fields():
    settings = Settings.load(env={"RELAY_SESSION": '{"instructions": "You are Ada."}',
                                  "RELAY_CLIENT_SESSION_FIELDS": "audio, output_modalities"})
    assert settings.session == {"type": "realtime", "instructions": "You are Ada."}
    assert settings.client_session_fields == ["audio", "output_modalities"]
    assert Settings.load(env={}).session == {} and "instructions" not in Settings.load(env={}).client_session_fields
    assert Settings.load(env={"RELAY_CLIENT_SESSION_FIELDS": "*"}).client_session_fields == ["*"]
    for env, named in [({"RELAY_SESSION": "[1]"}, "RELAY_SESSION"), ({"RELAY_SESSION": "{"}, "RELAY_SESSION"),
                       ({"RELAY_CLIENT_SESSION_FIELDS": "audio.voice"}, "RELAY_CLIENT_SESSION_FIELDS"),
                       ({"RELAY_TRUSTED_PROXIES": "10.0.0.0/33"}, "RELAY_TRUSTED_PROXIES"),
                       ({"RELAY_MAX_CALLS": "0"}, "RELAY_MAX_CALLS"),
                       ({"RELAY_CALLS_PER_IP_PER_S": "0"}, "RELAY_CALLS_PER_IP_PER_S")]:
        with pytest.raises(SettingsError, match=named):
            Settings.load(env=env)

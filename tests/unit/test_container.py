"""The container files, checked as text: docker-compose.yml is parsed and filled in from .env.example as Compose would;
its relay service must be consistent with the relay's settings and with coturn; the Dockerfile, the README's
`docker run` examples and CI must agree. tests/container builds and runs the image, and has docker-compose check the
compose file."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from relay.config import Settings, SettingsError

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
DOCKERFILE = (ROOT / "Dockerfile").read_text()
CI = (ROOT / ".ci" / "run").read_text()
# What an operator puts in .env where the example leaves a value empty
FILLED_IN = {"PUBLIC_IP": "203.0.113.10", "TURN_SECRET": "0123456789abcdef0123456789abcdef",
             "RELAY_API_KEYS": "sk-compose-check"}
VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")  # Compose's ${VAR}, ${VAR:-default}, ${VAR:?error}


def _env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


ENV_EXAMPLE = _env_example()
DOT_ENV = {**ENV_EXAMPLE, **FILLED_IN}  # .env as an operator fills it in


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${…} from `env` (.env), `$$` is a literal `$` (left for the container's shell)."""

    def one(match: re.Match) -> str:
        name, operator, argument = match.groups()
        value = env.get(name)
        empty = value is None or (value == "" and operator and operator.startswith(":"))
        if operator and operator.endswith("?") and empty:
            raise AssertionError(f"compose would refuse to start: {name}: {argument}")
        if operator and operator.endswith("-") and empty:
            return argument
        return value or ""

    parts = value.split("$$")
    return "$".join(VARIABLE.sub(one, part) for part in parts)


def service(name: str) -> dict:
    return COMPOSE["services"][name]


def environment(name: str) -> dict[str, str]:
    return {key: interpolate(str(value), DOT_ENV) for key, value in service(name).get("environment", {}).items()}


def variable_of(raw: str) -> str:
    """The .env variable a raw compose value takes (`${TURN_SECRET:?…}` -> TURN_SECRET)."""
    match = VARIABLE.fullmatch(raw)
    assert match, f"{raw!r} is not one ${{VARIABLE}}"
    return match[1]


def published(name: str) -> list[tuple[str, tuple[int, int], tuple[int, int], str]]:
    """The service's port mappings: (host address, host ports, container ports, protocol); ranges as (low, high)."""
    mappings = []
    for spec in service(name).get("ports", []):
        spec = interpolate(str(spec), DOT_ENV)
        spec, _, protocol = spec.partition("/")
        parts = spec.rsplit(":", 2)
        host_ip = parts[0] if len(parts) == 3 else ""
        host, container = parts[-2], parts[-1]
        ranges = []
        for ports in (host, container):
            low, _, high = ports.partition("-")
            ranges.append((int(low), int(high or low)))
        mappings.append((host_ip, ranges[0], ranges[1], protocol or "tcp"))
    return mappings


def coturn_command() -> str:
    command = service("coturn")["command"]
    return " ".join(command) if isinstance(command, list) else command


def coturn_option(name: str) -> str:
    match = re.search(rf"--{name}=(\S+)", coturn_command())
    assert match, f"coturn has no --{name}"
    return match[1].strip('"')


def coturn_shell_variable(text: str) -> str:
    """The .env variable behind a `$$NAME` of coturn's shell command (through coturn's environment). `$$`: the
    container's shell expands it; a single `$` would have Compose write the value into the command line."""
    match = re.fullmatch(r"\$\$\{?(\w+)\}?", text.strip('"'))
    assert match, f"{text!r} is not a shell variable"
    return variable_of(service("coturn")["environment"][match[1]])


def container_env() -> dict[str, str]:
    """The relay container's environment: env_file (.env), then `environment:`."""
    assert service("relay")["env_file"] in (".env", [".env"])
    return {**DOT_ENV, **environment("relay")}


# --- the relay service -------------------------------------------------------------------------------------------


def test_the_relays_settings_in_compose_are_valid_and_wired():
    settings = Settings.load(env=container_env())
    assert settings.host == "0.0.0.0"
    assert settings.announced_ip == FILLED_IN["PUBLIC_IP"]
    assert settings.turn_secret.get_secret_value() == FILLED_IN["TURN_SECRET"]
    assert len(settings.turn_urls) == 2
    # Without a key, the relay refuses to start: open access is the operator's explicit choice.
    with pytest.raises(SettingsError, match="RELAY_API_KEYS"):
        Settings.load(env={**container_env(), "RELAY_API_KEYS": ""})


def test_the_relay_publishes_its_http_port_and_its_udp_range_one_to_one_as_its_sysctl_says():
    port = int(environment("relay")["RELAY_PORT"])
    mappings = published("relay")
    assert any(container == (port, port) and protocol == "tcp" for _, _, container, protocol in mappings)
    low, high = map(int, str(service("relay")["sysctls"]["net.ipv4.ip_local_port_range"]).split())
    assert 1024 < low < high <= 65535
    udp = [(host, container) for _, host, container, protocol in mappings if protocol == "udp"]
    assert udp == [((low, high), (low, high))]  # same ports outside and in: the announced candidates' ports
    # the page and the API on the host's loopback unless HTTP_BIND says otherwise
    assert [ip for ip, _, container, _ in mappings if container == (port, port)] == ["127.0.0.1"]


def test_the_health_check_is_the_images_and_asks_healthz_on_the_relays_port():
    assert "healthcheck" not in service("relay")  # compose keeps the image's (tests/container: it turns healthy)
    (check,) = [rest for keyword, rest in dockerfile_instructions() if keyword == "HEALTHCHECK"]
    assert re.search(r"CMD .*/healthz", check) and "RELAY_PORT" in check
    assert not re.search(r"^#\s*syntax=", DOCKERFILE, re.MULTILINE)  # BuildKit would fetch a frontend from Docker Hub


def test_docker_waits_longer_than_the_drain():
    grace = service("relay")["stop_grace_period"]
    seconds = int(re.fullmatch(r"(\d+)s", grace)[1])
    assert seconds > Settings.load(env=container_env()).drain_timeout_s


def _image_env() -> dict[str, str]:
    env = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            env |= dict(word.split("=", 1) for word in shlex.split(rest))
    return env


def test_every_docker_run_example_stops_after_the_drain():
    """`docker stop` waits 10 s unless told otherwise (--stop-timeout): a drain as long would have live calls
    killed (exit 137) instead of ended with relay.shutdown."""
    image_drain = float(_image_env()["RELAY_DRAIN_TIMEOUT_S"])
    examples = re.findall(r"docker run [^\n`]*", (ROOT / "README.md").read_text() + DOCKERFILE)
    assert len(examples) >= 2
    for example in examples:
        drain = re.search(r"RELAY_DRAIN_TIMEOUT_S=(\d+)", example)
        stop = re.search(r"--stop-timeout[ =](\d+)", example)
        assert float(stop[1] if stop else 10) > (float(drain[1]) if drain else image_drain), example


# --- TURN --------------------------------------------------------------------------------------------------------


def test_the_relay_and_coturn_share_one_secret_and_coturn_checks_it_the_rest_way():
    relay_secret = variable_of(service("relay")["environment"]["RELAY_TURN_SECRET"])
    printed = re.search(r"static-auth-secret=\S*\s+(\S+)\s*>\s*(\S+)", coturn_command())
    assert printed, "coturn's static-auth-secret is written to a config file"
    assert coturn_shell_variable(printed[1]) == relay_secret
    assert f"-c {printed[2]}" in coturn_command()
    assert "--use-auth-secret" in coturn_command()
    assert "--static-auth-secret" not in coturn_command()  # never on a command line (ps shows it)
    assert "--lt-cred-mech" not in coturn_command()


def test_the_relays_turn_urls_reach_coturns_published_listening_port():
    listening = int(coturn_option("listening-port"))
    external = interpolate("${%s}" % coturn_shell_variable(coturn_option("external-ip")), DOT_ENV)
    mappings = published("coturn")
    urls = environment("relay")["RELAY_TURN_URLS"].split(",")
    assert urls
    for url in urls:
        match = re.fullmatch(r"turn:([^:?]+)(?::(\d+))?(?:\?transport=(udp|tcp))?", url)
        assert match, url
        host, port, transport = match[1], int(match[2] or 3478), match[3] or "udp"
        assert host == external == FILLED_IN["PUBLIC_IP"]
        assert port == listening
        assert (((port, port), (port, port), transport) in
                [(host_ports, container, protocol) for _, host_ports, container, protocol in mappings])


def test_coturn_publishes_its_relay_port_range_one_to_one():
    low, high = int(coturn_option("min-port")), int(coturn_option("max-port"))
    assert ((low, high), (low, high), "udp") in [(h, c, p) for _, h, c, p in published("coturn")]
    relay_low, relay_high = map(int, str(service("relay")["sysctls"]["net.ipv4.ip_local_port_range"]).split())
    assert high < relay_low or low > relay_high  # one host: the two ranges must not overlap


def test_coturn_relays_to_the_relay_and_to_no_private_network():
    denied = re.findall(r"--denied-peer-ip=(\S+)", coturn_command())
    for network in ("10.0.0.0", "127.0.0.0", "172.16.0.0", "192.168.0.0", "169.254.0.0"):
        assert any(d.startswith(network) for d in denied), network
    assert coturn_shell_variable(coturn_option("allowed-peer-ip")) == "PUBLIC_IP"


# --- variables ---------------------------------------------------------------------------------------------------


def test_every_variable_compose_uses_is_in_env_example():
    used = {match[1] for match in VARIABLE.finditer(COMPOSE_TEXT.replace("$$", ""))}
    assert used and used <= set(ENV_EXAMPLE), used - set(ENV_EXAMPLE)
    # and every $NAME coturn's shell reads is in coturn's environment
    shell = set(re.findall(r"\$\$\{?(\w+)", COMPOSE_TEXT))
    assert shell <= set(service("coturn")["environment"]), shell


def test_every_relay_name_in_compose_and_env_example_is_a_setting():
    settings = {Settings.env_name(name) for name in Settings.model_fields}
    names = set(re.findall(r"\bRELAY_[A-Z0-9_]+", COMPOSE_TEXT)) | {n for n in ENV_EXAMPLE if n.startswith("RELAY_")}
    assert names and names <= settings, names - settings


def test_env_example_values_are_valid_settings_and_dot_env_is_never_committed():
    for name, value in ENV_EXAMPLE.items():
        if name.startswith("RELAY_") or name == "OPENAI_API_KEY":
            Settings.load(env={"RELAY_INSECURE": "true", "RELAY_HOST": "127.0.0.1", name: value})
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


# --- the Dockerfile ----------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    found = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_the_image_is_slim_python_and_runs_as_a_numeric_non_root_user():
    instructions = dockerfile_instructions()
    # Users get the official slim Python image; CI gives BASE one made from Debian's mirror (tests/container).
    assert ("ARG", "BASE=python:3.11-slim-bookworm") in instructions
    bases = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    assert bases == ["${BASE}", "${BASE}"]
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users, "no USER: the relay would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0
    env = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    assert "RELAY_HOST=0.0.0.0" in env and "RELAY_INSECURE" not in env  # open access is never the image's default
    assert ("EXPOSE", "8080/tcp") in instructions
    assert [rest for keyword, rest in instructions if keyword == "CMD"] == ['["serve"]']


def test_the_image_holds_only_what_runs():
    copied = [shlex.split(rest)[:-1] for keyword, rest in dockerfile_instructions() if keyword == "COPY"
              and not rest.startswith("--from")]
    assert sorted(sum(copied, [])) == ["README.md", "pyproject.toml", "relay"]
    installs = " ".join(rest for keyword, rest in dockerfile_instructions() if keyword == "RUN")
    assert "[test]" not in installs and " -e " not in installs  # no test extras, no editable install
    dockerignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert dockerignore[dockerignore.index("**")] == "**"  # everything out, then the three back in
    assert {"!pyproject.toml", "!README.md", "!relay/"} <= set(dockerignore)


def _steps(text: str) -> list[str]:
    return [step.strip() for line in text.splitlines() for step in line.split("&&") if step.strip()]


def test_ci_builds_and_runs_the_image_with_what_it_installs():
    """CI proves the Dockerfile by building it and calling through the image (tests/container), which fail the run
    when CI is set and the engine is missing: .ci/run installs the engine, mmdebstrap and docker-compose."""
    packages = {word for step in _steps(CI) if "apt-get install" in step for word in step.split()}
    assert {"docker.io", "mmdebstrap", "docker-compose"} <= packages
    from tests.container import engine

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.shutil, "which", lambda tool: None if tool == "dockerd" else f"/usr/bin/{tool}")
        assert "dockerd" in (reason := engine.missing_requirements())
        patch.setenv("CI", "true")
        with pytest.raises(pytest.fail.Exception):
            engine.unavailable(reason)
        patch.delenv("CI")
        with pytest.raises(pytest.skip.Exception):
            engine.unavailable(reason)


def test_ci_installs_every_debian_package_of_the_image():
    def packages(text: str) -> set[str]:
        found = set()
        for step in _steps(text):
            if "apt-get install" in step:
                found |= {word for word in step.split("apt-get install", 1)[1].split() if not word.startswith("-")}
        return found

    image = packages(" && ".join(rest for keyword, rest in dockerfile_instructions() if keyword == "RUN"))
    assert "libopus0" in image
    assert image <= packages(CI), image - packages(CI)

"""The image from the repository's Dockerfile, run as an operator runs it: uid 10001 on a read-only root with a tmpfs
/tmp, healthy, ready, carrying a call with the built-in simulator, drained by `docker stop`. Every container runs with
`--network host` and listens on 127.0.0.1 (RELAY_ICE_ADDRESSES=127.0.0.1): no packet leaves loopback."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.container.calls import free_port, median_ms, spoken_turn, timed
from tests.container.engine import Engine, health_check
from tests.processes import clean_env, relay_serve
from tests.webrtc_client import call_relay

# The first test builds the image (a few minutes on a fresh machine); every wait below has its own bound.
pytestmark = pytest.mark.timeout(1800)
LOOPBACK = ["--network", "host", "-e", "RELAY_HOST=127.0.0.1", "-e", "RELAY_ICE_ADDRESSES=127.0.0.1"]
TURNS = 3  # spoken turns through each relay, alternating, for the round trips' medians


async def _healthy(engine: Engine, container: str, base: str, since: float, timeout: float = 60) -> tuple[float, float]:
    """Seconds from `since` to /healthz answering and to Docker calling the container healthy."""
    answered = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
        async with asyncio.timeout(timeout):
            while True:
                if answered is None:
                    try:
                        async with http.get(f"{base}/healthz") as response:
                            answered = timed(since) if response.status == 200 else None
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        pass
                status = await asyncio.to_thread(engine.inspect, container,
                                                 "{{.State.Status}} {{.State.Health.Status}}")
                assert not status.startswith("exited"), engine.docker("logs", container).stderr
                if status.endswith(" healthy") and answered is not None:
                    return answered, timed(since)
                await asyncio.sleep(0.1)


def _uid_of(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


async def test_the_image_runs_as_10001_on_a_read_only_root_carries_a_call_and_docker_stop_drains_it(
        docker_engine: Engine, image: str):
    figures = docker_engine.figures
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    since = time.monotonic()
    container = docker_engine.docker("run", "--detach", "--read-only", "--tmpfs", "/tmp", *LOOPBACK,
                                     "-e", f"RELAY_PORT={port}", image).stdout.strip()
    try:
        answered, healthy = await _healthy(docker_engine, container, base, since)
        figures["cold start: docker run to /healthz answering (s)"] = answered
        figures["cold start: docker run to healthy (s)"] = healthy
        assert healthy < health_check(docker_engine, image)["StartPeriod"] / 1e9  # well within the start period
        assert docker_engine.inspect(container, "{{.HostConfig.ReadonlyRootfs}}") == "true"
        assert _uid_of(int(docker_engine.inspect(container, "{{.State.Pid}}"))) == 10001
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/readyz") as response:
                assert response.status == 200

        # The same relay outside the container, in the same run: the turns alternate between the two.
        inside, outside = [], []
        async with relay_serve(env=clean_env(RELAY_ICE_ADDRESSES="127.0.0.1"), timeout=30) as (_, host_base, _):
            for _ in range(TURNS):
                inside.append(await spoken_turn(base))
                outside.append(await spoken_turn(host_base))
        figures["round trip, end of speech to the answer's first audio, in the container (median ms)"] = (
            median_ms(inside))
        figures["the same outside the container (median ms)"] = median_ms(outside)

        # `docker stop` with its default timeout (10 s) lets the image's drain run out: the call is told, exit 0.
        call = await call_relay(base)
        try:
            await call.wait_for("session.created", timeout=20)
            stopping = asyncio.ensure_future(asyncio.to_thread(docker_engine.docker, "stop", container, timeout=60))
            event = await call.wait_for("relay.shutdown", timeout=30)
            assert event["reason"] == "server_shutdown"
            await asyncio.wait_for(stopping, 60)
        finally:
            await call.close()
        state = docker_engine.inspect(container, "{{.State.ExitCode}} {{.State.OOMKilled}}")
        assert state == "0 false", docker_engine.docker("logs", container).stderr[-3000:]
    finally:
        docker_engine.docker("rm", "-f", container, check=False)


def test_without_a_writable_tmp_the_relay_says_what_to_mount_in_one_line(docker_engine: Engine, image: str):
    result = docker_engine.docker("run", "--rm", "--read-only", *LOOPBACK, "-e", f"RELAY_PORT={free_port()}",
                                  "-e", "RELAY_WORKERS=2", image, check=False, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "--tmpfs /tmp" in line


@pytest.mark.parametrize(("cpus", "workers"), [("0.5", 1), ("1", 1), ("1.5", 1)])
def test_the_default_worker_count_follows_the_containers_cpu_quota(docker_engine: Engine, image: str, cpus: str,
                                                                    workers: int):
    result = docker_engine.docker(
        "run", "--rm", "--network", "host", "--read-only", f"--cpus={cpus}", "--entrypoint", "python", image, "-c",
        "from relay.config import Settings; print(Settings.load(env={}).workers)", timeout=60)
    assert int(result.stdout) == workers

"""`relay serve --workers N`: calls live in one worker; requests about them reach it from any worker."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from relay.config import Settings
from relay.protocol import new_id
from relay.server.app import create_app
from relay.server.calls import CALLS
from relay.server.workers import Worker
from relay.upstream.target import choose_upstream
from tests.processes import clean_env, relay_serve
from tests.webrtc_client import call_relay


def test_a_call_id_names_its_worker():
    for index in (0, 1, 9, 10, 61):
        call_id = Worker(index, 62).call_id(new_id("rtc"))
        assert re.fullmatch(r"rtc_[A-Za-z0-9]{22}", call_id) and Worker.owner(call_id) == index
    assert Worker.owner("sess_abc") is None and Worker.owner("rtc_") is None


@pytest.fixture
async def two_workers(simulator, tmp_path):
    """Two worker apps in this process, each on its own port and Unix socket, as the master would run them."""
    settings = Settings.load(env={}, upstream_url=simulator.url, ice_addresses="127.0.0.1", workers="2")
    runners, urls, apps = [], [], []
    for index in range(2):
        worker = Worker(index, 2, tmp_path)
        app = create_app(settings, choose_upstream(settings), worker)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        await web.UnixSite(runner, str(worker.socket_path(index))).start()
        runners.append(runner)
        apps.append(app)
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
    yield apps, urls
    for runner in runners:
        await runner.cleanup()


async def test_transcripts_and_resumes_reach_across_workers(two_workers, simulator):
    apps, urls = two_workers
    first = await call_relay(urls[1])  # owned by worker 1, no history directory: its transcript lives there only
    try:
        await first.wait_for("session.created")
        first.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Remember 42."}]}})
        await first.wait_for("conversation.item.done")
    finally:
        await first.close()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{urls[0]}/v1/realtime/calls/{first.call_id}/transcript") as response:  # via worker 0
            assert response.status == 200
            assert (await response.json())["entries"][0]["text"] == "Remember 42."
    second = await call_relay(urls[0], resume=first.call_id)  # worker 0 asks worker 1 for the conversation
    try:
        assert Worker.owner(second.call_id) == 0
        item = await second.wait_for(lambda e: e["type"] == "conversation.item.done", timeout=10)
        assert item["item"]["content"][0]["text"] == "Remember 42."
    finally:
        await second.close()


async def test_hangup_and_delete_reach_the_owning_worker(two_workers):
    apps, urls = two_workers
    async with aiohttp.ClientSession() as http:
        for method in ("post", "delete"):
            call = await call_relay(urls[1])  # answered by worker 1
            assert Worker.owner(call.call_id) == 1 and call.call_id in apps[1][CALLS]
            path = call.location + ("/hangup" if method == "post" else "")
            async with http.request(method, urls[0] + path) as response:  # asked of worker 0
                assert response.status == (200 if method == "post" else 204)
            assert call.call_id not in apps[1][CALLS]
            await call.close()
        unknown = Worker(1, 2).call_id(new_id("rtc"))
        async with http.post(f"{urls[0]}/v1/realtime/calls/{unknown}/hangup") as response:
            assert response.status == 404 and (await response.json())["error"]["code"] == "call_not_found"


async def test_a_call_of_a_missing_worker_is_a_503(two_workers, tmp_path):
    apps, urls = two_workers
    (tmp_path / "worker-1.sock").unlink()
    orphan = Worker(1, 2).call_id(new_id("rtc"))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{urls[0]}/v1/realtime/calls/{orphan}/hangup") as response:
            assert response.status == 503 and (await response.json())["error"]["code"] == "worker_unavailable"


async def test_relay_serve_with_two_workers(simulator):
    env = clean_env(RELAY_UPSTREAM_URL=simulator.url, RELAY_ICE_ADDRESSES="127.0.0.1",
                    RELAY_CALLS_PER_IP_PER_S="1000")  # 8 calls in a row from one address
    async with relay_serve("--workers", "2", env=env) as (process, base, line):
        assert "(2 workers)" in line
        owners = set()
        async with aiohttp.ClientSession() as http:
            for _ in range(8):
                call = await call_relay(base)
                owners.add(Worker.owner(call.call_id))
                async with http.post(f"{base}{call.location}/hangup", headers={"Connection": "close"}) as response:
                    assert response.status == 200  # whichever worker the kernel picked for this request
                await call.close()
        assert owners <= {0, 1}
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _gone(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


async def _workers_of(process, count: int = 2) -> list[int]:
    async with asyncio.timeout(15):
        while len(children := _children(process.pid)) < count:
            await asyncio.sleep(0.05)
    return children


@pytest.mark.parametrize("how", ["sigterm-during-startup", "master-killed"])
async def test_no_worker_outlives_the_master(simulator, how):
    env = clean_env(RELAY_UPSTREAM_URL=simulator.url, RELAY_ICE_ADDRESSES="127.0.0.1")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--port", "0", "--workers", "2", env=env,
        stderr=subprocess.DEVNULL)
    try:
        workers = await _workers_of(process)
        if how == "sigterm-during-startup":
            process.send_signal(signal.SIGTERM)  # the workers are still importing: not yet listening
            assert await asyncio.wait_for(process.wait(), 30) == 0
        else:
            process.kill()  # no chance to clean up: the workers must notice by themselves
            await process.wait()
        async with asyncio.timeout(20):
            while not all(_gone(pid) for pid in workers):
                await asyncio.sleep(0.1)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

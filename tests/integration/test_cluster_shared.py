"""Cluster mode with Redis (issue 19, point 2): relays as separate processes on 127.0.0.N sharing Debian's
redis-server (started by the test, no persistence, stopped by its pid). The registry finds the nodes; limits and
single-use secrets hold across relays (and one is given back when no call comes of it); a call's transcript outlives
its relay (killed, or drained and gone; a relay restarted under its node id says it ended); Redis down: single-use
secrets fail closed, limits fail open, both counted."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiortc import RTCPeerConnection

from relay.cluster.ids import new_call_id, owner_of
from relay.cluster.registry import Registry
from relay.cluster.store import connect
from relay.cluster.transcripts import Transcripts, encode, record
from relay.config import Settings
from relay.protocol import new_id
from relay.server.app import create_app
from relay.upstream.target import choose_upstream
from tests.integration.test_cluster_forwarding import (AUTH, KEY as AUTH_KEY, Node, free_port, metric, metrics_of,
                                                       node_env, running, start_node, talk)
from tests.unit.test_cluster_redis import RedisServer, redis_server  # noqa: F401 (a fixture)
from tests.webrtc_client import call_relay

SDP = {"Content-Type": "application/sdp"}


def shared_env(simulator, node: str, port: int, redis: RedisServer, **extra: str) -> dict[str, str]:
    return node_env(simulator, node, RELAY_REDIS_URL=redis.url, RELAY_ADVERTISE_URL=f"http://127.0.0.{node}:{port}",
                    **extra)


@pytest.fixture
async def shared_nodes(simulator, redis_server) -> AsyncIterator[list[Node]]:
    """Nodes 1 (two workers: a forwarded request may reach the worker that does not own the call) and 2."""
    port = free_port()
    async with running(start_node("1", port, shared_env(simulator, "1", port, redis_server, RELAY_WORKERS="2")),
                       start_node("2", port, shared_env(simulator, "2", port, redis_server,
                                                        RELAY_CLIENT_SECRET_SINGLE_USE="true"))) as nodes:
        yield nodes


async def an_offer() -> str:
    pc = RTCPeerConnection()
    pc.addTransceiver("audio")
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    offer = pc.localDescription.sdp
    await pc.close()
    return offer


async def mint(http: aiohttp.ClientSession, node: Node) -> dict[str, str]:
    async with http.post(f"{node.base}/v1/realtime/client_secrets", json={}, headers=AUTH) as response:
        assert response.status == 200
        return {"Authorization": f"Bearer {(await response.json())['value']}"}


async def test_calls_of_every_worker_are_reached_from_the_other_node(shared_nodes):
    one, two = shared_nodes
    async with aiohttp.ClientSession() as http:
        for _ in range(12):  # the kernel spreads node 2's connections over node 1's workers
            call = await call_relay(one.base, headers=AUTH)
            try:
                assert owner_of(call.call_id).node == "1"
                async with http.ws_connect(f"{two.base}/v1/realtime?call_id={call.call_id}", headers=AUTH,
                                           protocols=["realtime"]) as backend:
                    await backend.send_json({"type": "session.update",
                                             "session": {"type": "realtime", "instructions": "Via node 2."}})
                    await call.wait_for(lambda e: e["type"] == "session.updated"
                                        and e["session"].get("instructions") == "Via node 2.")
                for _ in range(2):  # to either of node 1's workers (a new connection each time)
                    async with http.get(f"{two.base}{call.location}/transcript", headers=AUTH) as response:
                        assert response.status == 200 and (await response.json())["status"] == "active"
                async with http.post(f"{two.base}{call.location}/hangup",
                                     headers={**AUTH, "Connection": "close"}) as response:
                    assert response.status == 200
            finally:
                await call.close()
            if "backend socket relayed to worker" in one.output():
                break
    # A socket node 2 opened reached the worker of node 1 that does not own the call, which passed it on, signed.
    assert "backend socket relayed to worker" in one.output()


async def saved(redis: RedisServer, call_id: str) -> None:
    """Wait until Redis has the call's transcript (bounded)."""
    store = connect(redis.url)
    try:
        async with asyncio.timeout(10):
            while not ((await Transcripts(store, 60).load(call_id)) or {}).get("entries"):
                await asyncio.sleep(0.1)
    finally:
        await store.aclose()


async def test_a_killed_nodes_calls_are_a_prompt_404_and_their_transcripts_live_on(simulator, redis_server):
    port = free_port()
    async with running(*(start_node(n, port, shared_env(simulator, n, port, redis_server)) for n in ("1", "2"))) \
            as (one, two), aiohttp.ClientSession() as http:
        call = await talk(two.base)
        try:
            await saved(redis_server, call.call_id)  # at most a second after it changed
            two.process.send_signal(signal.SIGKILL)
            await two.process.wait()
        finally:
            await call.close()
        for method, path in (("POST", f"{call.location}/hangup"), ("DELETE", call.location),
                             ("GET", f"/v1/realtime?call_id={call.call_id}")):
            started = time.monotonic()
            async with http.request(method, one.base + path, headers=AUTH) as response:
                assert response.status == 404 and (await response.json())["error"]["code"] == "call_not_found"
            assert time.monotonic() - started < 5  # prompt: no waiting for a timeout
        async with http.get(f"{one.base}{call.location}/transcript", headers=AUTH) as response:
            assert response.status == 200, await response.text()  # what Redis last got, the call ended with its node
            body = await response.json()
            assert body["status"] == "ended" and body["entries"][0]["text"] == "Remember 42."
        resumed = await call_relay(one.base, headers=AUTH, resume=call.call_id)
        try:
            item = await resumed.wait_for(lambda e: e["type"] == "conversation.item.done", timeout=10)
            assert item["item"]["content"][0]["text"] == "Remember 42."
        finally:
            await resumed.close()


async def registered(redis: RedisServer) -> dict[str, list[str]]:
    """Each node in the registry: its workers' states."""
    store = connect(redis.url)
    try:
        return {node: [e.state for e in entries]
                for node, entries in (await Registry(store, "reader", 0).nodes(time.time())).items()}
    finally:
        await store.aclose()


async def test_a_drained_nodes_calls_resume_on_another(simulator, redis_server):
    port = free_port()
    envs = {n: shared_env(simulator, n, port, redis_server, RELAY_DRAIN_TIMEOUT_S="3") for n in ("1", "2")}
    async with running(*(start_node(n, port, env) for n, env in envs.items())) as (one, two):
        call = await talk(two.base)
        try:
            assert await registered(redis_server) == {"1": ["serving"], "2": ["serving"]}
            two.process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):  # its heartbeat says so within a second
                while (await registered(redis_server)).get("2") != ["draining"]:
                    await asyncio.sleep(0.1)
            shutdown = await call.wait_for("relay.shutdown", timeout=15)
            assert shutdown["resume_call_id"] == call.call_id
            assert await asyncio.wait_for(two.process.wait(), 30) == 0
            assert await registered(redis_server) == {"1": ["serving"]}  # it left as it stopped
        finally:
            await call.close()
        resumed = await call_relay(one.base, headers=AUTH, resume=call.call_id)  # its relay is gone: from Redis
        try:
            assert resumed.call_id.startswith("rtc_1_")
            item = await resumed.wait_for(lambda e: e["type"] == "conversation.item.done", timeout=10)
            assert item["item"]["content"][0]["text"] == "Remember 42."
        finally:
            await resumed.close()


async def test_a_single_use_secret_used_at_two_nodes_at_once_makes_one_call(shared_nodes):
    one, two = shared_nodes
    offer = await an_offer()
    async with aiohttp.ClientSession() as http:

        async def use(node: Node, secret: dict[str, str]) -> tuple[int, str]:
            async with http.post(f"{node.base}/v1/realtime/calls", data=offer, headers={**secret, **SDP}) as answer:
                return answer.status, answer.headers.get("Location", "")

        once = await mint(http, two)
        status, location = await use(one, once)  # minted at node 2, taken at node 1: only shared state knows
        assert status == 201 and (await use(two, once))[0] == 401
        async with http.delete(f"{one.base}{location}", headers=AUTH) as response:
            assert response.status == 204
        secret = await mint(http, two)
        results = await asyncio.gather(*(use((one, two)[i % 2], secret) for i in range(20)))
        made = [location for status, location in results if status == 201]
        assert len(made) == 1 and sorted(status for status, _ in results) == [201] + [401] * 19
        async with http.delete(f"{one.base}{made[0]}", headers=AUTH) as response:
            assert response.status == 204


async def test_a_single_use_secret_is_given_back_when_no_call_comes_of_it(shared_nodes):
    one, two = shared_nodes
    offer = await an_offer()
    async with aiohttp.ClientSession() as http:
        once = await mint(http, two)
        for body in ("v=0\r\n", "not an offer"):  # refused after the secret was taken: not used
            async with http.post(f"{one.base}/v1/realtime/calls", data=body, headers={**once, **SDP}) as answer:
                assert answer.status == 400
        async with http.post(f"{two.base}/v1/realtime/calls", data=offer, headers={**once, **SDP}) as answer:
            assert answer.status == 201
            location = answer.headers["Location"]
        async with http.post(f"{one.base}/v1/realtime/calls", data=offer, headers={**once, **SDP}) as answer:
            assert answer.status == 401  # used now
        async with http.delete(f"{one.base}{location}", headers=AUTH) as response:
            assert response.status == 204


async def test_a_restarted_nodes_own_call_in_redis_is_ended(simulator, redis_server):
    """A node's worker restarted: the call Redis last heard of as live is not carried here any more."""
    settings = Settings.load(env={}, upstream_url=simulator.url, ice_addresses="127.0.0.1", api_keys=AUTH_KEY,
                             node_id="1", cluster_secret="c" * 40, redis_url=redis_server.url,
                             advertise_url="http://127.0.0.1:9")
    call_id = new_call_id(new_id("rtc"), 0, "1")
    snapshot = {"entries": [{"seq": 0, "role": "user", "text": "Remember 42."}], "entries_dropped": 0, "usage": {}}
    store = connect(redis_server.url)
    try:
        await Transcripts(store, 60).save([(call_id, encode(record(call_id, "active", "1", snapshot)))])
    finally:
        await store.aclose()
    async with TestClient(TestServer(create_app(settings, choose_upstream(settings)), host="127.0.0.1")) as client:
        async with client.get(f"/v1/realtime/calls/{call_id}/transcript", headers=AUTH) as response:
            body = await response.json()
    assert response.status == 200 and body["status"] == "ended" and body["entries"][0]["text"] == "Remember 42."


async def test_limits_hold_across_relays(simulator, redis_server):
    port = free_port()
    limits = {"RELAY_CALLS_PER_IP_PER_S": "0.01", "RELAY_CALLS_PER_KEY_PER_S": "0.01"}  # then one every 100 s
    async with running(*(start_node(n, port, shared_env(simulator, n, port, redis_server, **limits))
                         for n in ("1", "2"))) as nodes, aiohttp.ClientSession() as http:

        async def offers(count: int, headers: dict[str, str]) -> list[int]:
            statuses = []
            for i in range(count):  # alternately at each relay
                async with http.post(f"{nodes[i % 2].base}/v1/realtime/calls", data="v=0\r\n",
                                     headers={**headers, **SDP}) as response:
                    statuses.append(response.status)
            return statuses

        secret = await mint(http, nodes[0])  # callers without a key are limited by address: bursts of 5
        assert await offers(7, secret) == [400] * 5 + [429, 429]  # five bad offers past the limit, then 429s
        assert await offers(102, AUTH) == [400] * 100 + [429, 429]  # a key: bursts of 100, across both relays


async def test_redis_down_secrets_fail_closed_and_limits_open_both_counted(shared_nodes, redis_server):
    one, two = shared_nodes
    offer = await an_offer()
    async with aiohttp.ClientSession() as http:
        secret = await mint(http, two)
        redis_server.stop()
        async with http.post(f"{two.base}/v1/realtime/calls", data=offer, headers={**secret, **SDP}) as response:
            assert response.status == 503 and response.headers["Retry-After"] == "1"
            error = (await response.json())["error"]
            assert error["code"] == "client_secret_unverifiable" and "Redis" in error["message"]
        call = await call_relay(two.base, headers=AUTH)  # the limits cannot be checked: open
        await call.close()
        metrics = await metrics_of(http, two)
        assert metric(metrics, "relay_redis_errors_total", what="secrets") >= 1
        assert metric(metrics, "relay_redis_errors_total", what="limits") >= 1
        redis_server.start()
        call = await call_relay(one.base, headers=secret)  # refused while Redis was down: not used up
        await call.close()

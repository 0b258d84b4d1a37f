"""Cluster mode's shared state against a real redis-server (Debian's), started per test on a free loopback port with
no persistence and stopped by its pid: single-use secrets, cluster-wide limits, transcripts, the registry, and what
each does when Redis is down (raises SharedStateError, counted by what it was for)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from pathlib import Path
from typing import Iterator

import pytest
import redis
from prometheus_client import REGISTRY

from relay.cluster.limits import SharedRateLimiter
from relay.cluster.peers import Peers
from relay.cluster.registry import TTL_S, Entry, Registry
from relay.cluster.single_use import SingleUse
from relay.cluster.store import QUIET_S, SharedStateError, connect
from relay.cluster.transcripts import Revisions, Transcripts, record
from relay.core.history import History
from relay.server.cluster import Cluster, publish

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class RedisServer:
    """A redis-server on 127.0.0.1:`port`, no persistence; stop() and start() again keep the port."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        with redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def errors(what: str) -> float:
    return REGISTRY.get_sample_value("relay_redis_errors_total", {"what": what}) or 0.0


# --- single-use secrets ------------------------------------------------------------------------------------------


async def test_a_single_use_secret_is_taken_once_by_fifty_relays_at_once(redis_server):
    clients = [connect(redis_server.url) for _ in range(5)]  # five relays' clients
    try:
        now = time.time()
        uses = [SingleUse(clients[i % 5]).consume("nonce1", now + 600, now) for i in range(50)]
        assert sum(await asyncio.gather(*uses)) == 1
        assert await SingleUse(clients[0]).consume("nonce2", now + 600, now)  # another secret: its own first use
        assert 590 <= await clients[0].redis.ttl("relay:secret:nonce1") <= 601  # remembered while the secret is valid
    finally:
        for client in clients:
            await client.aclose()


# --- cluster-wide limits -----------------------------------------------------------------------------------------


async def test_two_relays_draw_from_one_bucket(redis_server):
    one, two = connect(redis_server.url), connect(redis_server.url)
    try:
        limiters = [SharedRateLimiter(one, "ip", rate=0.01, burst=5), SharedRateLimiter(two, "ip", rate=0.01, burst=5)]
        waits = [await limiters[i % 2].take("192.0.2.1") for i in range(6)]
        assert waits[:5] == [0.0] * 5 and waits[5] > 50  # the burst spent across both relays; then ~100 s
        assert await limiters[1].take("192.0.2.2") == 0.0  # another address: its own bucket
        assert await SharedRateLimiter(one, "key", 0.01, 5).take("192.0.2.1") == 0.0  # another kind: its own
        assert 0 < await one.redis.ttl("relay:rate:ip:192.0.2.1") <= limiters[0].ttl_s
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_shared_bucket_refills_at_its_rate(redis_server):
    client = connect(redis_server.url)
    try:
        limiter = SharedRateLimiter(client, "key", rate=50.0, burst=1)
        assert await limiter.take("key0") == 0.0
        wait = await limiter.take("key0")
        assert 0 < wait <= 1 / 50
        await asyncio.sleep(0.1)  # five tokens' worth, capped at the burst
        assert await limiter.take("key0") == 0.0
    finally:
        await client.aclose()


# --- transcripts and the registry --------------------------------------------------------------------------------


async def test_transcripts_are_kept_for_their_ttl(redis_server):
    client = connect(redis_server.url)
    try:
        store = Transcripts(client, ttl_s=120)
        snapshot = {"entries": [{"seq": 0, "role": "user", "text": "Remember 42."}], "entries_dropped": 0, "usage": {}}
        await store.save([record("rtc_a_0x", "active", "a", snapshot), record("rtc_a_0x", "ended", "a", snapshot)])
        assert await store.load("rtc_a_0x") == record("rtc_a_0x", "ended", "a", snapshot)  # the last write wins
        assert 110 <= await client.redis.ttl("relay:transcript:rtc_a_0x") <= 120
        assert await store.load("rtc_a_0y") is None
        await client.redis.set("relay:transcript:rtc_a_0z", "not json")
        assert await store.load("rtc_a_0z") is None
    finally:
        await client.aclose()


async def test_the_registry_knows_a_node_while_a_worker_of_it_beats(redis_server):
    client = connect(redis_server.url)
    try:
        now = time.time()
        first, second = Registry(client, "a", 0), Registry(client, "a", 1)
        await first.beat(Entry("http://10.0.0.1:8080", "serving", 2, 50, now))
        await second.beat(Entry("http://10.0.0.1:8080", "draining", 1, 50, now))
        await Registry(client, "b", 0).beat(Entry("http://10.0.0.2:8080", "serving", 0, 50, now - 60))  # stale
        assert await first.lookup("a", now) == "http://10.0.0.1:8080"
        assert await first.lookup("b", now) is None and await first.lookup("c", now) is None
        assert 0 < await client.redis.ttl("relay:node:a") <= TTL_S
        nodes = await first.nodes(now)
        assert set(nodes) == {"a"} and sorted(e.state for e in nodes["a"]) == ["draining", "serving"]
        await first.leave()
        assert await first.lookup("a", now) == "http://10.0.0.1:8080"  # its other worker still beats
        await second.leave()
        assert await first.lookup("a", now) is None and not await client.redis.exists("relay:node:a")
        peers = Peers(first, "http://relay-{node}.internal:8080")
        await first.beat(Entry("http://10.0.0.1:8080", "serving", 0, 50, time.time()))
        assert await peers.url_of("a") == "http://10.0.0.1:8080"  # the registry's word first
        assert await peers.url_of("b") == "http://relay-b.internal:8080"  # then the template's
    finally:
        await client.aclose()


# --- Redis down --------------------------------------------------------------------------------------------------


async def test_redis_down_is_an_error_of_what_it_was_for_and_counted(tmp_path):
    client = connect(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    now = time.time()
    attempts = {
        "secrets": lambda: SingleUse(client).consume("nonce", now + 60, now),
        "limits": lambda: SharedRateLimiter(client, "ip", 1.0, 5).take("192.0.2.1"),
        "transcripts": lambda: Transcripts(client, 60).load("rtc_a_0x"),
        "registry": lambda: Registry(client, "a", 0).beat(Entry("http://h:1", "serving", 0, 1, now)),
    }
    try:
        for what, attempt in attempts.items():
            before = errors(what)
            with pytest.raises(SharedStateError):
                await attempt()
            assert errors(what) == before + 1, what
        before = errors("registry")
        assert await Peers(Registry(client, "a", 0), "http://relay-{node}:8080").url_of("b") == "http://relay-b:8080"
        assert errors("registry") == before + 1  # the template stands in, and the failure is counted
    finally:
        await client.aclose()


async def test_a_relay_carries_on_when_redis_restarts(redis_server):
    client = connect(redis_server.url)
    try:
        store = SingleUse(client)
        now = time.time()
        assert await store.consume("before", now + 60, now)
        redis_server.stop()
        with pytest.raises(SharedStateError):
            await store.consume("during", now + 60, now)
        redis_server.start()
        assert await store.consume("after", now + 60, now)  # a new connection, no restart of the relay
        assert not await store.consume("after", now + 60, now)
    finally:
        await client.aclose()


async def test_after_a_timeout_redis_is_left_alone_for_a_moment(redis_server):
    store = connect(redis_server.url)
    pauser = connect(redis_server.url)
    try:
        now = time.time()
        await pauser.redis.execute_command("CLIENT", "PAUSE", "1500")  # Redis holds every command for 1.5 s
        paused_at = time.monotonic()
        with pytest.raises(SharedStateError):
            await SingleUse(store).consume("a", now + 60, now)  # times out (0.5 s, and once more)
        await asyncio.sleep(max(0.0, paused_at + 1.6 - time.monotonic()))  # Redis answers again
        before = errors("secrets")
        with pytest.raises(SharedStateError):
            await SingleUse(store).consume("b", now + 60, now)  # not asked: the timeout was less than QUIET_S ago
        assert errors("secrets") == before + 1  # counted all the same
        await asyncio.sleep(QUIET_S)
        assert await SingleUse(store).consume("b", now + 60, now)
    finally:
        await store.aclose()
        await pauser.aclose()


async def test_while_redis_is_down_a_node_is_where_the_registry_last_said(redis_server):
    store = connect(redis_server.url)
    try:
        registry = Registry(store, "a", 0)
        await registry.beat(Entry("http://10.0.0.1:8080", "serving", 0, 50, time.time()))
        peers = Peers(registry, "http://relay-{node}:8080")
        assert await peers.url_of("a") == "http://10.0.0.1:8080"
        assert await peers.url_of("b") == "http://relay-b:8080"  # not registered: the template
        redis_server.stop()
        before = errors("registry")
        assert await peers.url_of("a") == "http://10.0.0.1:8080"  # Redis down: its last word
        assert await peers.url_of("b") == "http://relay-b:8080"
        assert errors("registry") == before + 2
        assert await Peers(registry, None).url_of("a") is None  # nothing remembered, no template: gone
    finally:
        await store.aclose()


def said(text: str) -> SimpleNamespace:
    """A call (as publish() sees one) whose transcript holds `text`."""
    history = History({})
    history.on_client_event({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    return SimpleNamespace(history=history)


async def test_transcripts_are_written_as_they_change_and_when_calls_end(redis_server):
    store = connect(redis_server.url)
    cluster = Cluster(node="a", store=store, transcripts=Transcripts(store, 60))
    calls, revisions = {"rtc_a_0x": said("Remember 42.")}, Revisions()
    try:
        await publish(cluster, calls, revisions)
        stored = await cluster.stored_transcript("rtc_a_0x")
        assert stored["status"] == "active" and stored["entries"][0]["text"] == "Remember 42."
        await store.redis.set("relay:transcript:rtc_a_0x", "{}")
        await publish(cluster, calls, revisions)
        assert await cluster.stored_transcript("rtc_a_0x") == {}  # unchanged since written: not written again
        ended = calls.pop("rtc_a_0x")
        cluster.call_ended("rtc_a_0x", ended.history)
        await publish(cluster, calls, revisions)
        assert (await cluster.stored_transcript("rtc_a_0x"))["status"] == "ended"
    finally:
        await store.aclose()


async def test_an_ended_calls_transcript_waits_for_redis_to_come_back(redis_server):
    store = connect(redis_server.url)
    cluster = Cluster(node="a", store=store, transcripts=Transcripts(store, 60))
    try:
        redis_server.stop()
        cluster.call_ended("rtc_a_0y", said("Remember 43.").history)
        await publish(cluster, {}, Revisions())  # fails: kept for the next time
        redis_server.start()
        await publish(cluster, {}, Revisions())
        stored = await cluster.stored_transcript("rtc_a_0y")
        assert stored["status"] == "ended" and stored["entries"][0]["text"] == "Remember 43."
    finally:
        await store.aclose()

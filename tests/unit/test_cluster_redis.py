"""Cluster mode's shared state against a real redis-server (Debian's), started per test on a free loopback port with
no persistence and stopped by its pid (without redis-server: skipped, saying why; failed when CI is set): single-use
secrets (taken once, given back), cluster-wide limits, transcripts (bounded), the registry (a second relay with the
same node id named), and what each does when Redis is down (raises SharedStateError, counted by what it was for)."""

from __future__ import annotations

import asyncio
import logging
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
from relay.cluster.peers import Peers, RegistryDown
from relay.cluster.registry import SAME_NODE_S, TTL_S, Entry, Registry
from relay.cluster.single_use import SingleUse
from relay.cluster.store import QUIET_S, SharedStateError, connect
from relay.cluster.transcripts import MAX_RECORD_BYTES, Revisions, Transcripts, encode, record
from relay.core.history import History
from relay.server import cluster as cluster_module
from relay.server.cluster import Cluster
from relay.server.cluster_tasks import PUBLISH_BYTES, beat, publish
from tests.cluster.requirements import require_redis_server

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
    require_redis_server()
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
        assert sum(use is not None for use in await asyncio.gather(*uses)) == 1
        assert await SingleUse(clients[0]).consume("nonce2", now + 600, now)  # another secret: its own first use
        assert 590 <= await clients[0].redis.ttl("relay:secret:nonce1") <= 601  # remembered while the secret is valid
    finally:
        for client in clients:
            await client.aclose()


async def test_a_use_whose_set_nx_was_sent_twice_still_takes_the_secret(redis_server):
    """redis-py sends a command again when its answer timed out: a SET NX that took the key the first time answers
    nil the second. The value there is this use's own: it took the secret."""
    client = connect(redis_server.url)
    try:
        now = time.time()
        await client.redis.set("relay:secret:nonce1", "use-a", nx=True, ex=60)  # the first sending, answer lost
        assert await SingleUse(client).consume("nonce1", now + 60, now, use="use-a") == "use-a"
        assert await SingleUse(client).consume("nonce1", now + 60, now, use="use-b") is None  # another use
    finally:
        await client.aclose()


async def test_a_secret_given_back_is_free_again_but_only_by_the_use_that_took_it(redis_server):
    client = connect(redis_server.url)
    try:
        now = time.time()
        secrets = SingleUse(client)
        taken = await secrets.consume("nonce1", now + 60, now)
        await secrets.release("nonce1", "another use")  # not the taker: nothing happens
        assert await secrets.consume("nonce1", now + 60, now) is None
        await secrets.release("nonce1", taken)
        assert await secrets.consume("nonce1", now + 60, now) is not None
    finally:
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
        await store.save([("rtc_a_0x", encode(record("rtc_a_0x", "active", "a", snapshot))),
                          ("rtc_a_0x", encode(record("rtc_a_0x", "ended", "a", snapshot)))])
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
        with pytest.raises(RegistryDown):  # nothing remembered, no template: not known to be gone (a 503)
            await Peers(registry, None).url_of("a")
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
        with pytest.raises(SharedStateError):
            await publish(cluster, {}, Revisions())  # fails: kept for the next time
        redis_server.start()
        await publish(cluster, {}, Revisions())
        stored = await cluster.stored_transcript("rtc_a_0y")
        assert stored["status"] == "ended" and stored["entries"][0]["text"] == "Remember 43."
    finally:
        await store.aclose()


async def test_a_transcript_in_redis_is_bounded_and_so_is_a_ticks_work(redis_server):
    """A client can make a call's transcript over 100 MB (500 entries of any length): Redis gets its newest
    entries up to MAX_RECORD_BYTES, the others counted as dropped, and one tick writes PUBLISH_BYTES at most."""
    store = connect(redis_server.url)
    cluster = Cluster(node="a", store=store, transcripts=Transcripts(store, 60))
    calls = {f"rtc_a_0{i}": said("x" * 200_000) for i in range(30)}
    for call in calls.values():
        call.history.on_client_event({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Remember 42."}]}})
        for _ in range(2):  # 600 kB each
            call.history.on_client_event({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "y" * 200_000}]}})
    revisions = Revisions()
    try:
        assert not await publish(cluster, calls, revisions)  # some left for the next tick
        written = [key async for key in store.redis.scan_iter(match="relay:transcript:*")]
        assert 0 < len(written) < len(calls)
        assert sum([await store.redis.strlen(key) for key in written]) <= PUBLISH_BYTES + MAX_RECORD_BYTES
        assert await publish(cluster, calls, revisions)  # the others: this tick
        for call_id in calls:
            assert await store.redis.strlen(f"relay:transcript:{call_id}") <= MAX_RECORD_BYTES
            stored = await cluster.stored_transcript(call_id)
            assert [e["text"][0] for e in stored["entries"]] == ["y"]  # the newest that fits
            assert stored["entries_dropped"] == 3
    finally:
        await store.aclose()


async def test_a_second_relay_with_the_same_node_id_is_named_in_the_log(redis_server, caplog, monkeypatch):
    store = connect(redis_server.url)

    async def beaten() -> str:
        monkeypatch.setattr(cluster_module, "_logged", {})  # logged at most every 10 s: not here
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="relay.cluster"):
            await beat(mine, lambda: Entry("http://10.0.0.1:8080", "serving", 0, 50, time.time()))
        return caplog.text

    try:
        mine = Registry(store, "a", 0)
        assert await mine.beat(Entry("http://10.0.0.1:8080", "serving", 0, 50, time.time())) == []
        assert await beaten() == ""  # its own entry is no other relay
        # Another relay as node a, worker 0 too: it overwrites this one's entry, seen as this one beats next.
        await Registry(store, "a", 0).beat(Entry("http://10.0.0.2:8080", "serving", 0, 50, time.time()))
        assert "another relay beats as node a, at http://10.0.0.2:8080" in await beaten()
        assert await beaten() == ""  # this one's entry again
        await Registry(store, "a", 1).beat(Entry("http://10.0.0.3:8080", "serving", 0, 50, time.time()))
        assert "at http://10.0.0.3:8080" in await beaten()
        await asyncio.sleep(SAME_NODE_S)  # it stopped (killed, and started again elsewhere): no other relay now
        assert await beaten() == ""
    finally:
        await store.aclose()

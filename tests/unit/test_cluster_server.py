"""Cluster mode's HTTP side without Redis or other relays' processes (relay/server/cluster.py): what a forwarding
relay answers when the owner cannot be looked up, that nobody in particular is never vouched for, a keep-alive
connection the owner closed, and the background tasks (the heartbeat, the transcripts) carrying on and handing over
at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from relay.cluster.ids import new_call_id
from relay.cluster.peers import Peers
from relay.cluster.registry import Entry
from relay.cluster.store import SharedStateError
from relay.cluster.transcripts import Revisions
from relay.core.history import History
from relay.protocol import new_id
from relay.server import cluster as cluster_module
from relay.server import cluster_tasks
from relay.server.cluster import Cluster, as_response, ask_node, route_to_owner
from relay.server.cluster_tasks import _last_writes, keep_beating, keep_publishing, publish

SECRET = b"s" * 32


class Registry:
    """A registry that knows one address for every node, or whose Redis does not answer (`down`)."""

    def __init__(self, url: str | None = None, down: bool = False) -> None:
        self.url, self.down, self.node = url, down, "1"
        self.beats: list[Entry] = []

    async def lookup(self, node: str, now: float) -> str | None:
        if self.down:
            raise SharedStateError("registry")
        return self.url

    async def beat(self, entry: Entry) -> list[Entry]:
        self.beats.append(entry)
        return []


@contextlib.asynccontextmanager
async def cluster_of(registry: Registry, keys_required: bool = True) -> AsyncIterator[Cluster]:
    async with aiohttp.ClientSession() as http:
        yield Cluster(node="1", secret=SECRET, peers=Peers(registry, None), http=http, keys_required=keys_required)


def a_call_of(node: str) -> str:
    return new_call_id(new_id("rtc"), 0, node)


# --- asking another node -------------------------------------------------------------------------------------------


async def test_redis_down_and_no_other_way_to_the_node_is_a_503_to_try_again():
    async with cluster_of(Registry(down=True)) as cluster:
        reply = await ask_node(cluster, "2", "POST", f"/v1/realtime/calls/{a_call_of('2')}/hangup", "backend:key0",
                               "192.0.2.1")
    response = as_response(reply)
    assert reply.outcome == "owner_unavailable" and response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert json.loads(response.body)["error"]["code"] == "owner_unavailable"
    async with cluster_of(Registry(url=None)) as cluster:  # asked, and the node is not there: gone
        reply = await ask_node(cluster, "2", "GET", f"/v1/realtime/calls/{a_call_of('2')}/transcript", "relay", "")
    assert reply.outcome == "owner_gone" and as_response(reply).status == 404


@contextlib.asynccontextmanager
async def recorder() -> AsyncIterator[tuple[str, list[str]]]:
    """A stand-in for another node: its URL, and the paths it was asked for."""
    asked: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.json_response({"id": "x", "status": "ended"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/"), asked


async def hangup_through(cluster: Cluster) -> int:
    """A hangup of node 2's call, with no credentials, at a relay whose auth let it through as nobody."""
    async def hangup(request: web.Request) -> web.Response:
        return web.json_response({"handled": "here"})

    app = web.Application(middlewares=[route_to_owner(cluster)])
    app.router.add_post("/v1/realtime/calls/{call_id}/hangup", hangup)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        async with client.post(f"/v1/realtime/calls/{a_call_of('2')}/hangup") as response:
            return response.status


async def test_relays_with_api_keys_never_vouch_for_nobody_in_particular():
    async with recorder() as (url, asked):
        async with cluster_of(Registry(url)) as cluster:
            assert await hangup_through(cluster) == 401
        assert asked == []  # nothing reached the owner
        async with cluster_of(Registry(url), keys_required=False) as cluster:  # open access: anyone is anyone
            assert await hangup_through(cluster) == 200
        assert len(asked) == 1


async def serve_once_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers a connection's first request (keep-alive), then closes it when the next one comes, unanswered: an
    owner whose idle keep-alive connection closed just as it was used again."""
    for answered in (False, True):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        if answered:
            break
        body = b'{"id":"x","status":"ended"}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
    writer.close()


async def test_a_keep_alive_connection_the_owner_closed_is_tried_again_before_the_owner_is_called_gone():
    server = await asyncio.start_server(serve_once_per_connection, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with cluster_of(Registry(url)) as cluster:
            for _ in range(3):  # the second and third go out on the first's pooled connection, which is closed
                reply = await ask_node(cluster, "2", "POST", f"/v1/realtime/calls/{a_call_of('2')}/hangup",
                                       "backend:key0", "192.0.2.1")
                assert (reply.outcome, reply.status) == ("answered", 200)
    finally:
        server.close()
        await server.wait_closed()


# --- the background tasks ------------------------------------------------------------------------------------------


class Transcripts:
    """Stands in for the transcripts in Redis: a save fails once (`fail`), or waits until `let_go` is set."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail, self.saved, self.saving = fail, [], asyncio.Event()
        self.let_go = asyncio.Event()
        self.let_go.set()

    async def save(self, records: list[tuple[str, str]]) -> None:
        self.saving.set()
        await self.let_go.wait()
        if self.fail is not None:
            failure, self.fail = self.fail, None
            raise failure
        self.saved += [(call_id, json.loads(text)["status"]) for call_id, text in records]


async def test_a_publish_cancelled_mid_write_leaves_the_ended_calls_to_the_last_writes():
    transcripts = Transcripts()
    cluster = Cluster(node="a", transcripts=transcripts)  # type: ignore[arg-type]
    cluster.call_ended("rtc_a_0x", History({}))
    transcripts.let_go.clear()
    task = asyncio.ensure_future(publish(cluster, {}, Revisions()))
    await asyncio.wait_for(transcripts.saving.wait(), 5)
    task.cancel()  # the app's cleanup, while Redis is slow
    await asyncio.gather(task, return_exceptions=True)
    transcripts.let_go.set()
    await _last_writes(cluster, {})
    assert transcripts.saved == [("rtc_a_0x", "ended")]


async def test_the_heartbeat_and_the_transcripts_carry_on_after_an_unexpected_error(monkeypatch, caplog):
    monkeypatch.setattr(cluster_tasks, "BEAT_S", 0.01)
    monkeypatch.setattr(cluster_tasks, "PUBLISH_EVERY_S", 0.01)
    monkeypatch.setattr(cluster_module, "_logged", {})
    registry, failures = Registry(), [RuntimeError("a bug")]

    def entry() -> Entry:
        if failures:
            raise failures.pop()
        return Entry("http://10.0.0.1:8080", "serving", 0, 1, 0.0)

    transcripts = Transcripts(fail=RuntimeError("another bug"))
    cluster = Cluster(node="a", transcripts=transcripts)  # type: ignore[arg-type]
    calls: dict[str, Any] = {}
    with caplog.at_level(logging.ERROR, logger="relay.cluster"):
        tasks = [asyncio.ensure_future(keep_beating(registry, entry)),  # type: ignore[arg-type]
                 asyncio.ensure_future(keep_publishing(cluster, calls))]
        try:
            cluster.call_ended("rtc_a_0x", History({}))
            async with asyncio.timeout(5):
                while not registry.beats or not transcripts.saved:
                    await asyncio.sleep(0.01)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    assert transcripts.saved == [("rtc_a_0x", "ended")]  # written the next time, after the failed one
    assert "cluster heartbeat failed" in caplog.text and "writing transcripts failed" in caplog.text


@pytest.mark.parametrize("failure", [SharedStateError("transcripts"), RuntimeError("a bug")])
async def test_ended_calls_whose_write_failed_are_written_next_time(failure):
    transcripts = Transcripts(fail=failure)
    cluster = Cluster(node="a", transcripts=transcripts)  # type: ignore[arg-type]
    cluster.call_ended("rtc_a_0x", History({}))
    with pytest.raises(type(failure)):
        await publish(cluster, {}, Revisions())
    assert await publish(cluster, {}, Revisions())
    assert transcripts.saved == [("rtc_a_0x", "ended")]

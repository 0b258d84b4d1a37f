"""Cluster mode without Redis (issue 19, point 1): relays as separate processes, each on its own loopback address
(127.0.0.N, node id N, one port for all, as pods behind a headless Service), finding each other with
RELAY_PEER_URL_TEMPLATE. A request about a call that reaches the wrong relay is answered by the call's own; what
travels between relays is signed and carries no client credentials (nor a body, nor a host the client named); a
forged or stale signature is refused; a client secret that is not one goes nowhere; a dead owner is a prompt 404,
and one gone dark under a backend's socket is noticed. Some run a relay in the test's process (create_app), in
front of a stand-in for another node."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from relay.cluster.ids import new_call_id
from relay.cluster.signing import CALLER, CLIENT, NODE, SIGNATURE, Forwarded, sign, verify
from relay.config import Settings
from relay.protocol import new_id
from relay.server import control
from relay.server.app import create_app
from relay.server.workers import Worker
from relay.upstream.target import choose_upstream
from tests.processes import clean_env
from tests.webrtc_client import ClientCall, call_relay

KEY = "sk-cluster-test-key"
OTHER_KEY = "sk-cluster-other-key"
CLUSTER_SECRET = "c" * 40
TOKEN_SECRET = "t" * 40
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    """A port free on every 127.0.0.N of the tests (checked on the first; the others have nothing on them)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Node:
    """A `relay serve` process on 127.0.0.<node>:<port>; every line it writes is kept."""

    node: str
    port: int
    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.{self.node}:{self.port}"

    def output(self) -> str:
        return "".join(self.lines)


def node_env(simulator: Any, node: str, **extra: str) -> dict[str, str]:
    defaults = {"RELAY_CALLS_PER_IP_PER_S": "1000", "RELAY_WORKERS": "1", "RELAY_CALL_IDLE_TIMEOUT_S": "10",
                "RELAY_CLUSTER_SECRET": CLUSTER_SECRET}
    return clean_env(RELAY_UPSTREAM_URL=simulator.url + "?model=gpt-realtime", RELAY_ICE_ADDRESSES="127.0.0.1",
                     RELAY_API_KEYS=f"{KEY},{OTHER_KEY}", RELAY_TOKEN_SECRET=TOKEN_SECRET, RELAY_NODE_ID=node,
                     **(defaults | extra))


async def start_node(node: str, port: int, env: dict[str, str], timeout: float = 30.0) -> Node:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--host", f"127.0.0.{node}", "--port", str(port), env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = Node(node, port, process)

    async def read() -> None:
        while line := await process.stderr.readline():
            started.lines.append(line.decode(errors="replace"))

    started.reader = asyncio.ensure_future(read())
    deadline = time.monotonic() + timeout
    while not re.search(rf"relay listening on http://127\.0\.0\.{node}:{port}/", started.output()):
        if process.returncode is not None or time.monotonic() > deadline:
            await stop_node(started)
            raise AssertionError(f"node {node} did not start:\n{started.output()}")
        await asyncio.sleep(0.05)
    return started


async def stop_node(node: Node) -> None:
    """SIGKILL by its pid if it still runs; the reader ends at EOF."""
    if node.process.returncode is None:
        node.process.kill()
        await node.process.wait()
    if node.reader is not None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(node.reader, 10)


@contextlib.asynccontextmanager
async def running(*starts: Any) -> AsyncIterator[list[Node]]:
    """Start nodes (coroutines of start_node) together; every one is stopped on the way out."""
    results = await asyncio.gather(*starts, return_exceptions=True)
    nodes = [r for r in results if isinstance(r, Node)]
    try:
        for result in results:
            if isinstance(result, BaseException):
                raise result
        yield nodes
    finally:
        for node in nodes:
            await stop_node(node)


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def metrics_of(http: aiohttp.ClientSession, node: Node) -> str:
    async with http.get(f"{node.base}/metrics") as response:
        return await response.text()


async def talk(base: str, text: str = "Remember 42.") -> ClientCall:
    """A call at `base` (API key) whose transcript holds `text`."""
    call = await call_relay(base, headers=AUTH)
    await call.wait_for("session.created")
    call.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    await call.wait_for("conversation.item.done")
    return call


def template(port: int) -> str:
    return f"http://127.0.0.{{node}}:{port}"


@pytest.fixture
async def two_nodes(simulator) -> AsyncIterator[list[Node]]:
    port = free_port()
    async with running(*(start_node(n, port, node_env(simulator, n, RELAY_PEER_URL_TEMPLATE=template(port)))
                         for n in ("1", "2"))) as nodes:
        yield nodes


# --- any relay answers for any call ------------------------------------------------------------------------------


async def test_hangup_delete_transcript_and_control_socket_reach_the_calls_node(two_nodes):
    one, two = two_nodes
    async with aiohttp.ClientSession() as http:
        call = await talk(one.base)
        try:
            assert call.call_id.startswith("rtc_1_")
            async with http.get(f"{two.base}/v1/realtime/calls/{call.call_id}/transcript", headers=AUTH) as response:
                assert response.status == 200, await response.text()
                body = await response.json()
                assert body["status"] == "active" and body["entries"][0]["text"] == "Remember 42."
            async with http.ws_connect(f"{two.base}/v1/realtime?call_id={call.call_id}", headers=AUTH,
                                       protocols=["realtime"]) as backend:
                await backend.send_json({"type": "session.update",
                                         "session": {"type": "realtime", "instructions": "From node 2."}})
                await call.wait_for(lambda e: e["type"] == "session.updated"
                                    and e["session"].get("instructions") == "From node 2.")
                async with asyncio.timeout(10):  # the backend hears the call's events, through node 2
                    while (await backend.receive_json())["type"] != "session.updated":
                        pass
                async with http.post(f"{two.base}{call.location}/hangup", headers=AUTH) as response:
                    assert response.status == 200 and (await response.json())["status"] == "ended"
                message = await asyncio.wait_for(backend.receive(), 10)  # the owner closed it: relayed back
                assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            async with http.get(f"{two.base}/v1/realtime/calls/{call.call_id}/transcript", headers=AUTH) as response:
                assert response.status == 200 and (await response.json())["status"] == "ended"
        finally:
            await call.close()
        call = await call_relay(two.base, headers=AUTH)
        try:
            async with http.delete(f"{one.base}{call.location}", headers=AUTH) as response:
                assert response.status == 204
            async with http.delete(f"{one.base}{call.location}", headers=AUTH) as response:
                assert response.status == 404 and (await response.json())["error"]["code"] == "call_not_found"
        finally:
            await call.close()
        assert "backend socket relayed to node 1" in two.output()


async def test_a_client_secret_ends_its_own_call_at_any_node_and_no_other(two_nodes):
    one, two = two_nodes
    async with aiohttp.ClientSession() as http:
        secrets = []
        for _ in range(2):
            async with http.post(f"{two.base}/v1/realtime/client_secrets", json={}, headers=AUTH) as response:
                secrets.append({"Authorization": f"Bearer {(await response.json())['value']}"})
        call = await call_relay(one.base, headers=secrets[0])  # minted at node 2, used at node 1
        try:
            async with http.post(f"{two.base}{call.location}/hangup", headers=secrets[1]) as response:
                assert response.status == 401  # another secret: the owner compares the nonce node 2 vouches for
            async with http.get(f"{two.base}{call.location}/transcript", headers=secrets[0]) as response:
                assert response.status == 401  # a client secret does not read transcripts, wherever it asks
            async with http.post(f"{two.base}{call.location}/hangup", headers=secrets[0]) as response:
                assert response.status == 200
        finally:
            await call.close()


async def test_a_call_resumes_at_another_node_while_its_node_is_up(two_nodes):
    one, two = two_nodes
    first = await talk(two.base)
    await first.close()
    second = await call_relay(one.base, headers=AUTH, resume=first.call_id)  # node 1 asks node 2 (no Redis)
    try:
        item = await second.wait_for(lambda e: e["type"] == "conversation.item.done", timeout=10)
        assert item["item"]["content"][0]["text"] == "Remember 42."
    finally:
        await second.close()


# --- what travels between relays ---------------------------------------------------------------------------------


@dataclass
class Recorder:
    """Stands in for node 9: records what a relay forwards to it (checking the signature), answers, echoes."""

    received: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        vouched = verify(CLUSTER_SECRET.encode(), request.method, request.raw_path, body, request.headers,
                         time.time())
        self.received.append({"method": request.method, "path": request.raw_path, "vouched": vouched,
                              "headers": {k.lower(): v for k, v in request.headers.items()}, "body": body})
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse(protocols=("realtime",))
            await ws.prepare(request)
            async for message in ws:
                await ws.send_str(f"node 9 got {message.data}")
            return ws
        return web.json_response({"answered_by": "node 9"}, headers={"X-Owner": "node 9"})


@contextlib.asynccontextmanager
async def recording_node_9(port: int) -> AsyncIterator[Recorder]:
    recorder = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.9", port).start()
    try:
        yield recorder
    finally:
        await runner.cleanup()


async def test_a_forwarded_request_is_signed_and_carries_no_client_credentials(simulator):
    port = free_port()
    async with recording_node_9(port) as recorder:
        env = node_env(simulator, "1", RELAY_PEER_URL_TEMPLATE=template(port))
        async with running(start_node("1", port, env)) as (one,), aiohttp.ClientSession() as http:
            call_id = new_call_id(new_id("rtc"), 0, "9")
            sent = {**AUTH, "Cookie": "session=abc", CALLER: "backend:key1", "X-Forwarded-For": "203.0.113.9"}
            for method, path in (("POST", f"/v1/realtime/calls/{call_id}/hangup"),
                                 ("DELETE", f"/v1/realtime/calls/{call_id}"),
                                 ("GET", f"/v1/realtime/calls/{call_id}/transcript")):
                async with http.request(method, one.base + path, headers=sent) as response:
                    assert response.status == 200 and response.headers["X-Owner"] == "node 9"
                    assert await response.json() == {"answered_by": "node 9"}
            async with http.ws_connect(f"{one.base}/v1/realtime?call_id={call_id}", protocols=["realtime"],
                                       headers={"Authorization": f"Bearer {OTHER_KEY}"}) as backend:
                await backend.send_str("hello")
                assert await asyncio.wait_for(backend.receive_str(), 10) == "node 9 got hello"
            async with http.ws_connect(f"{one.base}/v1/realtime?call_id={call_id}",  # a browser's way with a key
                                       protocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as backend:
                assert backend.protocol == "realtime"
                await backend.send_str("hi")
                assert await asyncio.wait_for(backend.receive_str(), 10) == "node 9 got hi"
        assert [r["method"] for r in recorder.received] == ["POST", "DELETE", "GET", "GET", "GET"]
        for forwarded in recorder.received:
            assert "authorization" not in forwarded["headers"] and "cookie" not in forwarded["headers"]
            assert not any(KEY in value or OTHER_KEY in value for value in forwarded["headers"].values())
        # What node 1 vouches for: itself, the key's index (not the key, not what the client claimed), the client.
        assert [r["vouched"] for r in recorder.received] == [Forwarded("1", "backend:key0", "127.0.0.1")] * 3 + [
            Forwarded("1", "backend:key1", "127.0.0.1"), Forwarded("1", "backend:key0", "127.0.0.1")]
        assert recorder.received[3]["path"] == f"/v1/realtime?call_id={call_id}"


async def test_many_backend_sockets_are_relayed_to_a_node_at_once(simulator):
    port = free_port()
    async with recording_node_9(port):
        env = node_env(simulator, "1", RELAY_PEER_URL_TEMPLATE=template(port))
        async with running(start_node("1", port, env)) as (one,), contextlib.AsyncExitStack() as sockets, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            url = f"{one.base}/v1/realtime?call_id={new_call_id(new_id('rtc'), 0, '9')}"
            backends = await asyncio.gather(*(sockets.enter_async_context(
                http.ws_connect(url, headers=AUTH, protocols=["realtime"])) for _ in range(120)))
            for index, backend in enumerate(backends):  # all open at once: each holds a connection to node 9
                await backend.send_str(str(index))
                assert await asyncio.wait_for(backend.receive_str(), 10) == f"node 9 got {index}"


async def test_a_forged_or_stale_signature_is_refused(two_nodes):
    one, _ = two_nodes
    unknown = new_call_id(new_id("rtc"), 0, "1")
    path = f"/v1/realtime/calls/{unknown}/hangup"
    secret = CLUSTER_SECRET.encode()
    vouched = Forwarded("2", "backend:key0", "192.0.2.1")
    good = sign(secret, "POST", path, b"", vouched, time.time())
    forged = {**good, SIGNATURE: good[SIGNATURE][:-4] + "0000"}
    stale = sign(secret, "POST", path, b"", vouched, time.time() - 60)
    foreign = sign(b"x" * 40, "POST", path, b"", vouched, time.time())
    other_node = {**good, NODE: "3"}
    creating = sign(secret, "POST", "/v1/realtime/calls", b"", vouched, time.time())
    async with aiohttp.ClientSession() as http:
        before = metric(await metrics_of(http, one), "relay_cluster_signatures_refused_total")
        for headers in (forged, stale, foreign, other_node):
            async with http.post(one.base + path, headers=headers) as response:
                assert response.status == 401
                assert (await response.json())["error"]["code"] == "invalid_cluster_signature"
        async with http.post(one.base + "/v1/realtime/calls", headers=creating, data="v=0\r\n") as response:
            assert response.status == 401  # signed, but calls are never created through another relay
        async with http.post(one.base + path, headers={CALLER: "backend:key0", CLIENT: "192.0.2.1"}) as response:
            assert response.status == 401  # unsigned cluster headers are nothing: no key, no entry
            assert (await response.json())["error"]["code"] == "missing_api_key"
        fresh = sign(secret, "POST", path, b"", vouched, time.time())
        async with http.post(one.base + path, headers=fresh) as response:
            assert response.status == 404  # a good signature: trusted as the key's holder, and there is no such call
        anyone = sign(secret, "POST", path, b"", Forwarded("2", "anyone", "192.0.2.1"), time.time())
        async with http.post(one.base + path, headers=anyone) as response:
            assert response.status == 401  # trusted for what it says: nobody with a key, on a relay with keys
        after = metric(await metrics_of(http, one), "relay_cluster_signatures_refused_total")
        assert after == before + 5


# --- a dead owner ------------------------------------------------------------------------------------------------


def stuffed_listener(host: str, port: int) -> list[socket.socket]:
    """A port whose accept queue is full: new connections hang (SYNs dropped), as to a host that went dark."""
    listener = socket.socket()
    listener.bind((host, port))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect((host, port))
        fillers.append(filler)
    return [listener, *fillers]


async def test_a_dead_owner_is_a_prompt_404_whether_it_refuses_or_is_dark(simulator):
    port = free_port()
    dark = stuffed_listener("127.0.0.7", port)
    try:
        env = node_env(simulator, "1", RELAY_PEER_URL_TEMPLATE=template(port))
        async with running(start_node("1", port, env)) as (one,), aiohttp.ClientSession() as http:
            for node in ("7", "8"):  # 7: connections hang; 8: refused (nothing listens on 127.0.0.8)
                call_id = new_call_id(new_id("rtc"), 0, node)
                for method, path in (("POST", f"/v1/realtime/calls/{call_id}/hangup"),
                                     ("DELETE", f"/v1/realtime/calls/{call_id}"),
                                     ("GET", f"/v1/realtime/calls/{call_id}/transcript"),
                                     ("GET", f"/v1/realtime?call_id={call_id}")):
                    started = time.monotonic()
                    async with http.request(method, one.base + path, headers=AUTH) as response:
                        assert response.status == 404, (node, method, path, await response.text())
                        assert (await response.json())["error"]["code"] == "call_not_found"
                    assert time.monotonic() - started < 5  # not hanging until some long timeout
            metrics = await metrics_of(http, one)
            assert metric(metrics, "relay_forwarded_requests_total", outcome="owner_gone") == 8
    finally:
        for sock in dark:
            sock.close()


async def test_relays_with_different_cluster_secrets_say_so_and_answer_503(simulator):
    port = free_port()
    envs = {"1": node_env(simulator, "1", RELAY_PEER_URL_TEMPLATE=template(port)),
            "2": node_env(simulator, "2", RELAY_PEER_URL_TEMPLATE=template(port), RELAY_CLUSTER_SECRET="d" * 40)}
    async with running(*(start_node(n, port, env) for n, env in envs.items())) as (one, two), \
            aiohttp.ClientSession() as http:
        call_id = new_call_id(new_id("rtc"), 0, "1")
        for method, path in (("POST", f"/v1/realtime/calls/{call_id}/hangup"),
                             ("GET", f"/v1/realtime?call_id={call_id}")):
            async with http.request(method, two.base + path, headers=AUTH) as response:
                assert response.status == 503 and (await response.json())["error"]["code"] == "owner_unavailable"
        assert metric(await metrics_of(http, two), "relay_forwarded_requests_total", outcome="refused") == 2
        assert metric(await metrics_of(http, one), "relay_cluster_signatures_refused_total") == 2
    assert "node 1 refused this relay's signature: RELAY_CLUSTER_SECRET differs" in two.output()


async def test_a_nodes_workers_resume_each_others_calls_behind_api_keys(simulator, tmp_path):
    """Within a node (no Redis): the worker that takes the resume asks the call's worker for its transcript, with no
    credentials of its own to show (a client secret reads no transcript), over their Unix socket."""
    settings = Settings.load(env={}, upstream_url=simulator.url, ice_addresses="127.0.0.1", workers="2",
                             api_keys=KEY, node_id="1", cluster_secret=CLUSTER_SECRET,
                             peer_url_template="http://127.0.0.{node}:9")
    runners, bases = [], []
    try:
        for index in range(2):
            worker = Worker(index, 2, tmp_path)
            runner = web.AppRunner(create_app(settings, choose_upstream(settings), worker), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            await web.UnixSite(runner, str(worker.socket_path(index))).start()
            runners.append(runner)
            bases.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
        first = await talk(bases[1])
        await first.close()
        async with aiohttp.ClientSession() as http:
            secret = await http.post(f"{bases[0]}/v1/realtime/client_secrets", json={}, headers=AUTH)
            token = {"Authorization": f"Bearer {(await secret.json())['value']}"}
        second = await call_relay(bases[0], headers=token, resume=first.call_id)
        try:
            assert second.call_id.startswith("rtc_1_0")
            item = await second.wait_for(lambda e: e["type"] == "conversation.item.done", timeout=10)
            assert item["item"]["content"][0]["text"] == "Remember 42."
        finally:
            await second.close()
        async with aiohttp.ClientSession() as http:  # a client without a key still reads nothing through worker 0
            async with http.get(f"{bases[0]}/v1/realtime/calls/{first.call_id}/transcript") as response:
                assert response.status == 401
    finally:
        for runner in runners:
            await runner.cleanup()


# --- in this process: a relay in front of stand-ins for other nodes ----------------------------------------------


@contextlib.asynccontextmanager
async def relay_in_front(port: int, **settings: str) -> AsyncIterator[str]:
    """Node 1 in this process on 127.0.0.1 (a free port), other nodes at 127.0.0.<node>:`port`; its base URL."""
    loaded = Settings.load(env={}, upstream_url="ws://127.0.0.1:9/v1/realtime", ice_addresses="127.0.0.1",
                           api_keys=f"{KEY},{OTHER_KEY}", token_secret=TOKEN_SECRET, node_id="1",
                           cluster_secret=CLUSTER_SECRET, peer_url_template=template(port), **settings)
    runner = web.AppRunner(create_app(loaded, choose_upstream(loaded)), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def raw_request(base: str, head: str, body: bytes = b"") -> tuple[int, str, bytes]:
    """Send `head` (a request's first line and headers) as it is, and `body`: (status, content type, body)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode() + b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    content_type = next((line.split(b":", 1)[1].strip().decode() for line in headers.split(b"\r\n")
                         if line.lower().startswith(b"content-type:")), "")
    return int(status_line.split()[1]), content_type, body


async def test_a_client_secret_that_is_not_one_is_refused_before_anything_is_forwarded():
    port = free_port()
    async with recording_node_9(port) as recorder, relay_in_front(port) as base, aiohttp.ClientSession() as http:
        call_id = new_call_id(new_id("rtc"), 0, "9")
        for method, path in (("POST", f"/v1/realtime/calls/{call_id}/hangup"),
                             ("DELETE", f"/v1/realtime/calls/{call_id}")):
            async with http.request(method, base + path, headers={"Authorization": "Bearer ek_garbage"}) as response:
                assert response.status == 401
                assert (await response.json())["error"]["code"] == "invalid_client_secret"
        assert recorder.received == []


async def test_what_is_forwarded_is_the_relative_path_and_no_body():
    """An absolute-form request target (`POST http://elsewhere/…`) names a host: the path alone goes on, signed as
    the owner checks it. A body nothing reads is not passed on."""
    port = free_port()
    async with recording_node_9(port) as recorder, relay_in_front(port) as base:
        path = f"/v1/realtime/calls/{new_call_id(new_id('rtc'), 0, '9')}/hangup"
        status, _, body = await raw_request(base, f"POST http://elsewhere.example{path} HTTP/1.1\r\nHost: x\r\n"
                                                  f"Authorization: Bearer {KEY}\r\n", b"hello")
        assert status == 200 and json.loads(body) == {"answered_by": "node 9"}
        status, _, _ = await raw_request(base, f"DELETE {path.removesuffix('/hangup')} HTTP/1.1\r\nHost: x\r\n"
                                               f"Authorization: Bearer {KEY}\r\n", b"hello")
        assert status == 200
    assert [(r["method"], r["path"], r["body"]) for r in recorder.received] == [
        ("POST", path, b""), ("DELETE", path.removesuffix("/hangup"), b"")]


async def test_a_body_over_the_limit_at_a_cluster_route_is_a_json_error():
    port = free_port()
    async with relay_in_front(port, max_sdp_bytes="1024") as base, aiohttp.ClientSession() as http:
        path = f"/v1/realtime/calls/{new_call_id(new_id('rtc'), 0, '1')}/hangup"
        body = b"x" * 2048
        signed = sign(CLUSTER_SECRET.encode(), "POST", path, body, Forwarded("2", "backend:key0", "192.0.2.1"),
                      time.time())
        async with http.post(base + path, data=body, headers=signed) as response:  # read to check the signature
            assert response.status == 413 and response.content_type == "application/json"
            assert (await response.json())["error"]["code"] == "request_too_large"


async def handshake_then_silence(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A node that takes a WebSocket and then goes dark: it answers nothing more, pings included."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    key = re.search(r"(?im)^sec-websocket-key:\s*(\S+)", head).group(1)
    accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Protocol: realtime\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(3600)  # holds the connection open: no FIN, no RST


async def test_a_relayed_backend_socket_notices_an_owner_gone_dark(monkeypatch):
    monkeypatch.setattr(control, "HEARTBEAT_S", 0.4)
    port = free_port()
    dark = await asyncio.start_server(handshake_then_silence, "127.0.0.8", port)
    try:
        async with relay_in_front(port) as base, aiohttp.ClientSession() as http:
            url = f"{base}/v1/realtime?call_id={new_call_id(new_id('rtc'), 0, '8')}"
            async with http.ws_connect(url, headers=AUTH, protocols=["realtime"]) as backend:
                message = await asyncio.wait_for(backend.receive(), 5)  # pinged, no pong: the relay closes it
                assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    finally:
        dark.close()

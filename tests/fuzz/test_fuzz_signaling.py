"""Fuzzing the signaling endpoint over real HTTP: mutated SDP offers and multipart bodies, against a relay with the
simulator behind it. Every answer is a 201 or a JSON 4xx (never a 5xx), every call a 201 made is ended cleanly, and
nothing is left behind."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiortc import RTCPeerConnection
from hypothesis import HealthCheck, given, settings, strategies as st

from relay.server.calls import CALLS, STARTING
from tests.integration.test_webrtc_call import _serve, relay_settings

FUZZ = settings(max_examples=1000, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def offer_lines() -> list[str]:
    async def make() -> str:
        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="sendrecv")
        pc.createDataChannel("oai-events")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make()).splitlines()


@pytest.fixture
async def relay(simulator):
    app, runner, url = await _serve(relay_settings(simulator.url + "?model=gpt-realtime", calls_per_ip_per_s="10000",
                                                   client_session_fields="*", upstream_timeout_s="5"))
    async with aiohttp.ClientSession() as http:
        yield app, url, http
    await runner.cleanup()


STATUSES: dict[int, int] = {}  # what the relay answered, over the module's cases


@pytest.fixture(scope="module", autouse=True)
def reached_both_outcomes():
    """The fuzzing is worth something only if it reaches calls made as well as offers refused."""
    yield
    if STATUSES:
        assert STATUSES.get(201, 0) >= 50 and sum(v for k, v in STATUSES.items() if 400 <= k < 500) >= 50, STATUSES
texts = st.text(max_size=40) | st.sampled_from(["", "0", "-1", "99999999999", "opus/48000/2", "UDP/TLS/RTP/SAVPF",
                                                  "sha-256 ZZ", "candidate:1 1 udp 1 127.0.0.1 0 typ host", " "])
mutation = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 200)),
    st.tuples(st.just("duplicate"), st.integers(0, 200)),
    st.tuples(st.just("replace_value"), st.integers(0, 200), texts),
    st.tuples(st.just("insert"), st.integers(0, 200), st.sampled_from(["a=", "m=", "c=", "b=", "x="]), texts),
    st.tuples(st.just("number"), st.integers(0, 200), st.integers(-2**40, 2**40)),
    st.tuples(st.just("truncate"), st.integers(0, 5000)),
)


def mutate(lines: list[str], mutations: list[tuple]) -> str:
    lines = list(lines)
    for op, *args in mutations:
        i = args[0] % len(lines) if lines and op != "truncate" else 0
        if op == "delete" and lines:
            del lines[i]
        elif op == "duplicate" and lines:
            lines.insert(i, lines[i])
        elif op == "replace_value" and lines:
            lines[i] = lines[i].split("=", 1)[0] + "=" + args[1]
        elif op == "insert":
            lines.insert(i, args[1] + args[2])
        elif op == "number" and lines:
            head, _, rest = lines[i].partition(" ")
            lines[i] = f"{head} {args[1]} {rest}" if rest else f"{head}{args[1]}"
        elif op == "truncate":
            return "\r\n".join(lines)[: args[0]]
    return "\r\n".join(lines) + "\r\n"


async def post(relay, data, headers) -> int:
    app, url, http = relay
    async with http.post(f"{url}/v1/realtime/calls", data=data, headers=headers) as response:
        body = await response.text()
        assert response.status < 500, (response.status, body)
        if response.status == 201:
            async with http.delete(url + response.headers["Location"]) as ended:
                assert ended.status in (204, 404)  # 404: it has already ended (its peer could not connect)
        else:
            error = json.loads(body)["error"]
            assert isinstance(error["code"], str) and isinstance(error["message"], str)
        STATUSES[response.status] = STATUSES.get(response.status, 0) + 1
        return response.status


async def settled(app) -> None:
    """No call left, none being set up."""
    async with asyncio.timeout(10):
        while app[CALLS] or app[STARTING]:
            await asyncio.sleep(0.05)


@FUZZ
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
async def test_mutated_offers_get_an_answer_or_a_json_4xx(relay, offer_lines, mutations):
    await post(relay, mutate(offer_lines, mutations).encode(), {"Content-Type": "application/sdp"})
    await settled(relay[0])


parts = st.lists(st.tuples(st.sampled_from(["sdp", "session", "other", ""]),
                           st.sampled_from(["application/sdp", "application/json", "text/plain"]),
                           st.binary(max_size=200) | st.sampled_from([b"{}", b"[]", b'{"type":"realtime"}', b"null",
                                                                      b'{"type":"realtime","audio":1}', b"v=0"])),
                 max_size=4)


@FUZZ
@given(parts=parts, boundary=st.sampled_from(["b0undary", "x"]), damage=st.integers(0, 400) | st.none())
async def test_multipart_bodies_get_an_answer_or_a_json_4xx(relay, offer_lines, parts, boundary, damage):
    chunks = []
    for name, content_type, data in parts:
        if name == "sdp" and data == b"v=0":
            data = "\r\n".join(offer_lines).encode() + b"\r\n"
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'
                      f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    if damage is not None:
        body = body[:damage]
    await post(relay, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    await settled(relay[0])


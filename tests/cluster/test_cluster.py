"""Cluster mode on one machine, through one address: three relays (separate processes, node ids 0, 1, 2, each on its
own loopback address), Redis from Debian's redis-server, Debian's nginx in front doing plain round robin (conftest.py,
stack.py). Calls, hangups, transcripts, backends' sidebands and client secrets work whichever relay each request
reaches; one single-use secret makes one call however many relays it is tried at at once; the per-key and
per-address limits hold for the cluster, not per relay; a relay killed with SIGKILL costs only its own calls (prompt
404s for them); a drained relay's call resumes on another.

nginx's round robin takes the relays in turn (0, 1, 2, 0, ...): `steer` sends cheap requests until the next one
goes to the relay wanted, and every answer through nginx says which relay gave it (X-Upstream)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import websockets
from aiortc import RTCPeerConnection

from tests.audio_checks import loud_ms
from tests.cluster.stack import KEY, LIMITED_KEY, Cluster, metric_value
from tests.integration.test_openai_sdk import HELLO48, sdk
from tests.integration.test_sideband import Backend, user_says
from tests.webrtc_client import ClientCall, call_relay

BAD_OFFER = "v=0\r\n"  # refused as an offer (400 invalid_offer), after the limits: an admitted creation
PROMPT_S = 3.0  # a request about a dead relay's call is answered within this


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def from_address(address: str) -> aiohttp.ClientSession:
    """An HTTP client whose connections come from `address` (a loopback address of its own: its own per-address
    allowance, as nginx reports it in X-Forwarded-For)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


@dataclass
class Answer:
    status: int
    body: Any  # the JSON body, the text otherwise
    node: int | None  # the relay that answered (nginx's X-Upstream); None when not through nginx
    seconds: float
    headers: dict[str, str]

    @property
    def code(self) -> str | None:
        return self.body.get("error", {}).get("code") if isinstance(self.body, dict) else None


async def ask(cluster: Cluster, http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Answer:
    """One request (`url` relative to nginx's address, or absolute)."""
    url = url if url.startswith("http") else cluster.front + url
    started = time.monotonic()
    async with http.request(method, url, **kwargs) as response:
        text = await response.text()
        body = json.loads(text) if response.content_type == "application/json" else text
        return Answer(response.status, body, cluster.node_at(response.headers.get("X-Upstream")),
                      time.monotonic() - started, dict(response.headers))


async def steer(cluster: Cluster, http: aiohttp.ClientSession, node: int) -> None:
    """Make nginx's next request go to `node`: cheap requests until the one before it answered."""
    previous = (node - 1) % len(cluster.nodes)
    for _ in range(2 * len(cluster.nodes) + 2):
        if (await ask(cluster, http, "GET", "/healthz")).node == previous:
            return
    raise AssertionError(f"nginx's round robin did not come to node {previous}")


async def make_call(cluster: Cluster, http: aiohttp.ClientSession, headers: dict[str, str],
                    node: int | None = None, resume: str | None = None) -> tuple[ClientCall, int]:
    """A call through nginx (steered to `node` when given): the client and the relay that created it (its owner)."""
    answered: list[int | None] = []

    async def post(sdp: str) -> tuple[str, str]:
        if node is not None:
            await steer(cluster, http, node)
        params = {"resume": resume} if resume else None
        async with http.post(f"{cluster.front}/v1/realtime/calls", data=sdp, params=params,
                             headers={"Content-Type": "application/sdp", **headers}) as response:
            body = await response.text()
            if response.status != 201:
                raise AssertionError(f"relay answered {response.status}: {body}")
            answered.append(cluster.node_at(response.headers.get("X-Upstream")))
            return body, response.headers["Location"]

    call = await call_relay(cluster.front, post=post)
    (owner,) = answered
    assert owner is not None and (node is None or owner == node), (owner, node)
    return call, owner


async def remember(call: ClientCall, text: str) -> None:
    """A typed user message, in the call's transcript once the model has it."""
    await call.wait_for("session.created")
    call.send(user_says(text))
    await call.wait_for(lambda e: e["type"] == "conversation.item.done"
                        and e["item"].get("content", [{}])[0].get("text") == text)


async def transcript_texts(cluster: Cluster, http: aiohttp.ClientSession, call_id: str, url: str = "") -> Answer:
    return await ask(cluster, http, "GET", f"{url}/v1/realtime/calls/{call_id}/transcript", headers=bearer(KEY))


def texts(answer: Answer) -> list[str]:
    return [entry.get("text") for entry in answer.body.get("entries", [])]


async def spoken_turn(call: ClientCall) -> None:
    """The client says hello; the model's answer is heard (loud audio after the turn) and its transcript comes."""
    start, heard = len(call.events), len(call.audio)
    call.mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)
    await call.wait_for("input_audio_buffer.speech_stopped", after=start, timeout=20)
    await call.wait_for("response.output_audio_transcript.done", after=start, timeout=20)
    await call.wait_for("output_audio_buffer.stopped", after=start, timeout=20)
    assert len(loud_ms(call.received()[sum(len(a) for a in call.audio[:heard]):])) * 5 > 200  # ms of loud audio


async def forwarded(cluster: Cluster, http: aiohttp.ClientSession, outcome: str = "answered") -> dict[int, float]:
    """Each live node's count of requests it forwarded to another node, by outcome (its /metrics, all workers)."""
    counts = {}
    for node in cluster.nodes:
        if node.alive():
            answer = await ask(cluster, http, "GET", node.base + "/metrics")
            counts[node.index] = metric_value(answer.body, "relay_forwarded_requests_total", outcome=outcome)
    return counts


async def offer_sdp() -> str:
    """A real offer (a throwaway peer's), for creations that no client will connect to."""
    pc = RTCPeerConnection()
    pc.addTransceiver("audio")
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def mint(cluster: Cluster, http: aiohttp.ClientSession, node: int | None = None) -> tuple[str, int]:
    """A client secret minted through nginx (at `node`): its value and the relay that minted it."""
    if node is not None:
        await steer(cluster, http, node)
    answer = await ask(cluster, http, "POST", "/v1/realtime/client_secrets", headers=bearer(KEY), json={})
    assert answer.status == 200 and answer.body["value"].startswith("ek_"), answer
    return answer.body["value"], answer.node


# --- any relay answers for any call -------------------------------------------------------------------------------


async def test_calls_hangups_and_transcripts_work_whichever_relay_answers(cluster):
    count = len(cluster.nodes)
    async with aiohttp.ClientSession() as http:
        before = await forwarded(cluster, http)
        calls: list[tuple[ClientCall, int]] = []
        try:
            for index in range(2 * count):  # two calls per relay, created through nginx
                calls.append(await make_call(cluster, http, bearer(KEY), node=index % count))
            assert sorted(owner for _, owner in calls) == sorted(list(range(count)) * 2)
            for index, (call, _) in enumerate(calls):
                await remember(call, f"Remember {index}.")
            # Each call's transcript from every relay: the owner's own and, forwarded, the others'.
            for index, (call, owner) in enumerate(calls):
                answered = set()
                for _ in range(count):
                    answer = await transcript_texts(cluster, http, call.call_id)
                    assert answer.status == 200 and f"Remember {index}." in texts(answer), answer
                    answered.add(answer.node)
                assert answered == set(range(count)), answered
            # Hang up each call at a relay that is not its owner: half with POST .../hangup, half with DELETE.
            for index, (call, owner) in enumerate(calls):
                other = (owner + 1 + index % 2) % count
                await steer(cluster, http, other)
                if index % 2 == 0:
                    answer = await ask(cluster, http, "POST", f"{call.location}/hangup", headers=bearer(KEY))
                    assert (answer.status, answer.body["status"]) == (200, "ended"), answer
                else:
                    answer = await ask(cluster, http, "DELETE", call.location, headers=bearer(KEY))
                    assert answer.status == 204, answer
                assert answer.node == other != owner
            # Ended: a second hangup is a 404 wherever it lands; the transcript is still there, from every relay.
            for call, owner in calls:
                for node in range(count):
                    await steer(cluster, http, node)
                    answer = await ask(cluster, http, "POST", f"{call.location}/hangup", headers=bearer(KEY))
                    assert (answer.status, answer.code, answer.node) == (404, "call_not_found", node), answer
                answer = await transcript_texts(cluster, http, call.call_id)
                assert answer.status == 200 and answer.body["entries"], answer
            # Each relay counted the requests it forwarded: a live transcript of each of the 4 calls of the other
            # relays, 2 hangups, and the ended calls' second hangups (the owners' 404s).
            after = await forwarded(cluster, http)
            assert all(after[n] - before[n] >= 4 + 2 for n in range(count)), (before, after)
        finally:
            for call, _ in calls:
                await call.close()


async def test_a_backend_attaches_through_any_relay(cluster):
    count = len(cluster.nodes)
    async with aiohttp.ClientSession() as http:
        call, owner = await make_call(cluster, http, bearer(KEY), node=0)
        try:
            await call.wait_for("session.created")
            # One backend after another, each attached at another relay: each one's change reaches the call.
            async with sdk(cluster.front, KEY) as client:
                for node in range(count):
                    await steer(cluster, http, node)
                    async with client.realtime.connect(call_id=call.call_id) as connection:
                        reached = cluster.node_at(connection._connection.response.headers.get("X-Upstream"))
                        assert reached == node, (reached, node)
                        backend = Backend(connection)
                        instructions = f"The backend attached at node {node}."
                        await connection.session.update(session={"type": "realtime", "instructions": instructions})
                        await call.wait_for(lambda e: e["type"] == "session.updated"
                                            and e["session"].get("instructions") == instructions)
                        await backend.wait_for(lambda e: e["type"] == "session.updated"
                                               and e["session"].get("instructions") == instructions)
                # A backend at another relay than the owner follows a spoken turn, then hangs the call up.
                await steer(cluster, http, (owner + 1) % count)
                async with client.realtime.connect(call_id=call.call_id) as connection:
                    backend = Backend(connection)
                    await spoken_turn(call)
                    await backend.wait_for("input_audio_buffer.speech_stopped")
                    await backend.wait_for("response.output_audio_transcript.done")
                    await steer(cluster, http, (owner + 2) % count)
                    await client.realtime.calls.hangup(call.call_id)
                    code, reason = await backend.closed()
                    assert code == 1000 and reason.startswith("call ended"), (code, reason)
        finally:
            await call.close()
    # The relays that were not the owner say in their logs that they relayed a backend's socket to it.
    for node in cluster.nodes:
        relayed = f"call {call.call_id}: backend socket relayed to node {owner}"
        assert (relayed in node.output()) == (node.index != owner), (node.index, owner)


async def test_client_secrets_work_whichever_relay_mints_or_takes_them(cluster):
    count = len(cluster.nodes)
    async with aiohttp.ClientSession() as http:
        calls = []
        try:
            for node in range(count):
                secret, minter = await mint(cluster, http, node)
                assert minter == node
                taker = (node + 1) % count
                async with from_address(f"127.0.0.{21 + node}") as app:  # the app, from an address of its own
                    call, owner = await make_call(cluster, app, bearer(secret), node=taker)
                    calls.append((call, owner, secret))
                    await call.wait_for("session.created")
                    # Single use, cluster-wide: refused at every relay, the minter's included.
                    with pytest.raises(AssertionError, match="401.*already been used"):
                        await make_call(cluster, app, bearer(secret), node=minter)
            for index, (call, owner, secret) in enumerate(calls):
                other = (owner + 1) % count
                # Its client secret reads no transcript, wherever it asks.
                await steer(cluster, http, other)
                answer = await ask(cluster, http, "GET", f"{call.location}/transcript", headers=bearer(secret))
                assert (answer.status, answer.code, answer.node) == (401, "invalid_api_key", other), answer
                # Another call's secret cannot end it, even forwarded.
                stranger = calls[(index + 1) % count][2]
                await steer(cluster, http, other)
                answer = await ask(cluster, http, "POST", f"{call.location}/hangup", headers=bearer(stranger))
                assert (answer.status, answer.node) == (401, other), answer
                # Its own secret ends it from another relay than its owner.
                await steer(cluster, http, other)
                answer = await ask(cluster, http, "POST", f"{call.location}/hangup", headers=bearer(secret))
                assert (answer.status, answer.body["status"], answer.node) == (200, "ended", other), answer
        finally:
            for call, _, _ in calls:
                await call.close()


async def test_fifty_concurrent_uses_of_one_single_use_secret_make_one_call(cluster):
    async with aiohttp.ClientSession() as http:
        secret, _ = await mint(cluster, http)
        sdp = await offer_sdp()
        apps = [from_address(f"127.0.0.{100 + i}") for i in range(50)]  # 50 clients, 50 addresses
        try:
            answers = await asyncio.gather(*(
                ask(cluster, app, "POST", "/v1/realtime/calls", data=sdp,
                    headers={"Content-Type": "application/sdp", **bearer(secret)}) for app in apps))
        finally:
            await asyncio.gather(*(app.close() for app in apps))
        created = [a for a in answers if a.status == 201]
        refused = [a for a in answers if a.status == 401]
        assert len(created) == 1 and len(refused) == 49, [(a.status, a.code) for a in answers]
        assert all("already been used" in a.body["error"]["message"] for a in refused), refused[0]
        assert {a.node for a in answers} == set(range(len(cluster.nodes)))  # all three relays were asked
        # The one call (no client will connect to it) ends at once, from whichever relay.
        answer = await ask(cluster, http, "DELETE", created[0].headers["Location"], headers=bearer(KEY))
        assert answer.status == 204, answer


async def test_per_key_and_per_address_limits_hold_for_the_cluster(cluster):
    from relay.server.calls import KEY_BURST
    from relay.server.limits import BURST

    count = len(cluster.nodes)
    async with aiohttp.ClientSession() as http:
        # A key's allowance (a burst of KEY_BURST at 0.01/s) is the cluster's, not each relay's: sent 1.5 times
        # as many, only KEY_BURST are admitted (per relay, each would admit all it gets).
        sent = int(KEY_BURST * 1.5)
        gate = asyncio.Semaphore(10)

        async def create(headers: dict[str, str], client: aiohttp.ClientSession, data: str) -> Answer:
            async with gate:
                return await ask(cluster, client, "POST", "/v1/realtime/calls", data=data,
                                 headers={"Content-Type": "application/sdp", **headers})

        answers = await asyncio.gather(*(create(bearer(LIMITED_KEY), http, BAD_OFFER) for _ in range(sent)))
        admitted = [a for a in answers if a.status != 429]
        assert {a.status for a in admitted} == {400}
        assert len(admitted) == int(KEY_BURST), ([a.status for a in answers], len(admitted))
        assert {a.node for a in answers} == set(range(count))
        limited = next(a for a in answers if a.status == 429)
        assert limited.code == "rate_limit_exceeded" and "RELAY_CALLS_PER_KEY_PER_S" in limited.body["error"]["message"]
        # An address's allowance (a burst of BURST) likewise: callers with client secrets from one address.
        sdp = await offer_sdp()
        secrets = [(await mint(cluster, http))[0] for _ in range(int(BURST) * count - 1)]
        async with from_address("127.0.0.30") as app:
            answers = [await create(bearer(secret), app, sdp) for secret in secrets]
        created = [a for a in answers if a.status == 201]
        assert len(created) == int(BURST), [(a.status, a.code, a.node) for a in answers]
        assert {a.code for a in answers if a.status != 201} == {"rate_limit_exceeded"}
        assert {a.node for a in answers} == set(range(count))
        # Another address has its own allowance.
        async with from_address("127.0.0.31") as app:
            created.append(await create(bearer((await mint(cluster, http))[0]), app, sdp))
            assert created[-1].status == 201, created[-1]
        for answer in created:  # no client connects to these calls: end them
            assert (await ask(cluster, http, "DELETE", answer.headers["Location"], headers=bearer(KEY))).status == 204


# --- relays that go away ----------------------------------------------------------------------------------------
# With a relay gone, nginx's turn order is no longer simple (it tries the dead one, then another): these tests ask
# the relays left directly, and through nginx often enough to reach each of them.


async def test_a_killed_relay_costs_only_its_own_calls(cluster):
    count = len(cluster.nodes)
    victim = count - 1
    left = [node for node in cluster.nodes if node.index != victim]
    async with aiohttp.ClientSession() as http:
        calls = [await make_call(cluster, http, bearer(KEY), node=node) for node in range(count)]
        try:
            for index, (call, _) in enumerate(calls):
                await remember(call, f"Before the kill {index}.")
            doomed = calls[victim][0]
            async with asyncio.timeout(5):  # its relay writes a live call's transcript to Redis once a second
                while f"Before the kill {victim}." not in json.dumps(cluster.stored_transcript(doomed.call_id)):
                    await asyncio.sleep(0.1)
            gone_before = await forwarded(cluster, http, "owner_gone")
            cluster.kill(victim)  # SIGKILL to the relay's master and workers at once: nothing cleans up
            killed_at = time.monotonic()
            # Its call is gone: every relay left says so at once, asked directly or through nginx.
            while True:
                answers = []
                for node in left:
                    answers.append(await ask(cluster, http, "POST", f"{node.base}{doomed.location}/hangup",
                                             headers=bearer(KEY)))
                    answers.append(await ask(cluster, http, "DELETE", node.base + doomed.location,
                                             headers=bearer(KEY)))
                for _ in range(2 * count):
                    answers.append(await ask(cluster, http, "POST", f"{doomed.location}/hangup", headers=bearer(KEY)))
                assert all(a.seconds < PROMPT_S for a in answers), [(a.status, round(a.seconds, 2)) for a in answers]
                if all((a.status, a.code) == (404, "call_not_found") for a in answers):
                    break
                assert time.monotonic() < killed_at + 20, [(a.status, a.body) for a in answers]
                await asyncio.sleep(0.2)
            first_404_s = time.monotonic() - killed_at
            assert {a.node for a in answers if a.node is not None} == {node.index for node in left}
            gone_after = await forwarded(cluster, http, "owner_gone")  # counted as such by the relays left
            assert all(gone_after[node.index] > gone_before[node.index] for node in left), (gone_before, gone_after)
            # A backend's attach is refused the same way.
            started = time.monotonic()
            with pytest.raises(websockets.InvalidStatus) as caught:
                async with sdk(cluster.front, KEY) as client, client.realtime.connect(call_id=doomed.call_id):
                    pass
            assert caught.value.response.status_code == 404 and time.monotonic() - started < PROMPT_S
            assert json.loads(caught.value.response.body)["error"]["code"] == "call_not_found"
            # What was said in it is still there: its transcript is kept in Redis.
            for node in left:
                answer = await transcript_texts(cluster, http, doomed.call_id, node.base)
                assert answer.status == 200 and f"Before the kill {victim}." in texts(answer), answer
            # The other relays' calls go on: a spoken turn, a typed one; each hung up at the other relay left.
            for index, (call, owner) in enumerate(calls[:victim]):
                if index == 0:
                    await spoken_turn(call)
                else:
                    start = len(call.events)
                    call.send(user_says("Still there?"))
                    call.send({"type": "response.create"})
                    await call.wait_for("response.done", after=start, timeout=20)
                assert not [e for e in call.events if e["type"] in ("error", "relay.shutdown")]
                other = next(node for node in left if node.index != owner)
                answer = await ask(cluster, http, "POST", f"{other.base}{call.location}/hangup", headers=bearer(KEY))
                assert (answer.status, answer.body["status"]) == (200, "ended"), answer
            print(f"the killed relay's call: 404 call_not_found everywhere {first_404_s:.2f} s after SIGKILL")
        finally:
            for call, _ in calls:
                await call.close()
            cluster.restart(victim)  # the pod comes back: same node id, address and port


async def test_a_drained_relays_call_resumes_on_another(cluster):
    drained = 1
    left = [node for node in cluster.nodes if node.index != drained]
    async with aiohttp.ClientSession() as http:
        call, _ = await make_call(cluster, http, bearer(KEY), node=drained)
        resumed = None
        try:
            await remember(call, "Remember 42.")
            cluster.terminate(drained)  # SIGTERM: it drains for RELAY_DRAIN_TIMEOUT_S (1 s), then ends its calls
            event = await call.wait_for("relay.shutdown", timeout=15)
            assert event["resume_call_id"] == call.call_id and event["reconnect"] is True, event
            await call.close()
            # The client comes back through nginx, wherever it lands: a relay still draining says 503, try again.
            deadline = time.monotonic() + 20
            while True:
                try:
                    resumed, node = await make_call(cluster, http, bearer(KEY), resume=call.call_id)
                    break
                except AssertionError as exc:
                    assert "503" in str(exc) and "shutting_down" in str(exc), exc
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
            assert node != drained
            item = await resumed.wait_for(lambda e: e["type"] == "conversation.item.done"
                                          and e["item"].get("content", [{}])[0].get("text") == "Remember 42.",
                                          timeout=10)
            assert item
            assert await asyncio.to_thread(cluster.nodes[drained].process.wait, 30) == 0
            # The ended call's transcript, from every relay left (its own is gone).
            for other in left:
                answer = await transcript_texts(cluster, http, call.call_id, other.base)
                assert answer.status == 200 and "Remember 42." in texts(answer), answer
            answer = await ask(cluster, http, "DELETE", resumed.location, headers=bearer(KEY))
            assert answer.status == 204, answer
        finally:
            await call.close()
            if resumed is not None:
                await resumed.close()
            cluster.restart(drained)


async def test_a_killed_relay_restarts_in_place(cluster):
    node = cluster.nodes[0]
    try:
        async with aiohttp.ClientSession() as http:  # a connection open to it when it dies, as a client's may be
            assert (await ask(cluster, http, "GET", node.base + "/healthz")).status == 200
            cluster.kill(node.index)
        cluster.restart(node.index, same_port=True)  # the same address and port: the pod's network is kept
    finally:
        if not node.alive():
            cluster.restart(node.index)

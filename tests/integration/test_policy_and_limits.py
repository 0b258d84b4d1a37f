"""The event policy and the limits, over real calls to a relay with the simulator behind it."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from relay.server.calls import CALLS, KEY_BURST
from tests.integration.test_auth import KEY, bearer, request
from tests.integration.test_webrtc_call import _serve, relay_settings
from tests.unit.test_policy import FORBIDDEN_ITEMS, LOCKED_CHANGES
from tests.webrtc_client import call_relay

OPERATOR = {"instructions": "You are Ada.", "tools": [{"type": "function", "name": "lookup_order",
                                                       "description": "An order's status",
                                                       "parameters": {"type": "object", "properties": {}}}]}
MINIMAL_SDP = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
KEY_BURST_FOR_TEST = int(KEY_BURST)


@pytest.fixture
async def served(simulator):
    runners = []

    async def serve(**settings):
        app, runner, url = await _serve(relay_settings(simulator.url + "?model=gpt-realtime", **settings))
        runners.append(runner)
        return app, url

    yield serve
    for runner in runners:
        await runner.cleanup()


async def metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        (line,) = [m for m in (await response.text()).splitlines() if m.startswith(name + " ")]
    return float(line.split()[1])


async def test_locked_fields_are_kept_and_the_rest_of_each_event_applied(served, simulator):
    app, url = await served(session=json.dumps(OPERATOR))
    call = await call_relay(url)
    try:
        created = await call.wait_for("session.created")
        assert created["session"]["instructions"] == "You are Ada."
        updates = [event for event, _, _ in LOCKED_CHANGES if event["type"] == "session.update"]
        ids = [f"evt_locked_{i}" for i in range(len(updates))]
        for event_id, event in zip(ids, updates):
            call.send({**event, "event_id": event_id})
        # Every one is answered as by OpenAI (an SDK waits for it), and told what was kept, never with an error.
        async with asyncio.timeout(10):
            while sum(e["type"] == "session.updated" for e in call.events) < len(updates):
                await asyncio.sleep(0.02)
        kept = {e["client_event_id"]: e["params"] for e in call.events if e["type"] == "relay.policy.fields_kept"}
        assert kept == {event_id: params for event_id, (event, params, _) in zip(ids, LOCKED_CHANGES)
                        if event["type"] == "session.update"}
        assert not [e for e in call.events if e["type"] == "error"]
        final = [e for e in call.events if e["type"] == "session.updated"][-1]["session"]
        assert final["instructions"] == "You are Ada." and final["audio"]["output"]["voice"] == "cedar"
        # Each went upstream (by its id), without what was kept.
        received = {e.get("event_id"): e for session in simulator.recorder.sessions for e in session.received}
        assert set(ids) <= set(received)
        sent = json.dumps([received[i] for i in ids])
        for marker in ("Ignore your rules.", "pmpt_other", "gpt-realtime-mini", '"name": "pay"', "helpful assistant"):
            assert marker not in sent
        (live,) = app[CALLS].values()
        assert (live.core.stats.fields_kept, live.core.stats.policy_refusals) == (len(updates), 0)
        live.flush_metrics()  # counted for Prometheus too (the registry is this process's: at least ours)
        assert await metric(url, "relay_policy_fields_kept_total") >= len(updates)
    finally:
        await call.close()


async def test_forbidden_items_never_reach_the_model(served, simulator):
    app, url = await served(session=json.dumps(OPERATOR), tools="relay.tools.examples")
    call = await call_relay(url)
    try:
        await call.wait_for("session.created")
        # The relay's own tool is current_time: the FORBIDDEN_ITEMS list names get_weather; name it as the relay's.
        events = [json.loads(json.dumps(e).replace("get_weather", "current_time")) for e in FORBIDDEN_ITEMS]
        ids = [f"evt_forbidden_{i}" for i in range(len(events))]
        for event_id, event in zip(ids, events):
            call.send({**event, "event_id": event_id})
        # What the client may change still goes through, after all of them (the channel keeps order).
        call.send({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"]}})
        updated = await call.wait_for("session.updated")
        assert updated["session"]["output_modalities"] == ["text"]
        errors = {e["error"]["event_id"]: e["error"] for e in call.events if e["type"] == "error"}
        assert set(errors) == set(ids) and {error["code"] for error in errors.values()} == {"item_not_allowed"}
        received = [e for session in simulator.recorder.sessions for e in session.received]
        assert [e for e in received if e.get("event_id") in ids] == [] and "New rules." not in json.dumps(received)
        (live,) = app[CALLS].values()
        assert live.core.stats.policy_refusals == len(events)
        live.flush_metrics()
        assert await metric(url, "relay_policy_refusals_total") >= len(events)
    finally:
        await call.close()


async def test_only_a_backend_sets_the_agent_when_it_creates_a_call(served):
    app, url = await served(session=json.dumps(OPERATOR), api_keys=KEY)
    secret = (await request("POST", f"{url}/v1/realtime/client_secrets", bearer(KEY), json={}))[1]["value"]
    client = await call_relay(url, headers=bearer(secret), session={"type": "realtime", "instructions": "Be Bob."})
    try:
        assert (await client.wait_for("session.created"))["session"]["instructions"] == "You are Ada."
        assert (await client.wait_for("relay.policy.fields_kept"))["params"] == ["session.instructions"]
        types = [e["type"] for e in client.events]
        assert types[0] == "session.created"  # the first event, as from OpenAI; what was kept comes after it
    finally:
        await client.close()
    backend = await call_relay(url, headers=bearer(KEY), session={"type": "realtime", "instructions": "Be Bob."})
    try:
        assert (await backend.wait_for("session.created"))["session"]["instructions"] == "Be Bob."
        # Its client, on the data channel, is still a client.
        backend.send({"type": "session.update", "session": {"type": "realtime", "instructions": "Be Carl."}})
        assert (await backend.wait_for("relay.policy.fields_kept"))["params"] == ["session.instructions"]
        assert (await backend.wait_for("session.updated"))["session"]["instructions"] == "Be Bob."
    finally:
        await backend.close()


async def test_a_call_asks_the_upstream_for_the_model_its_client_chose(served, simulator):
    app, url = await served(models="gpt-realtime-mini")
    call = await call_relay(url, session={"type": "realtime", "model": "gpt-realtime-mini"})
    try:
        assert (await call.wait_for("session.created"))["session"]["model"] == "gpt-realtime-mini"
        assert simulator.recorder.sessions[-1].model == "gpt-realtime-mini"
    finally:
        await call.close()
    with pytest.raises(AssertionError, match="400.*invalid_value.*session.model"):
        await call_relay(url, session={"type": "realtime", "model": "gpt-realtime-2"})


async def test_concurrent_calls_beyond_the_limit_get_503_with_retry_after(served):
    app, url = await served(max_calls="1", workers="1")
    first = await call_relay(url)
    try:
        status, body, headers = await request("POST", f"{url}/v1/realtime/calls", {"Content-Type": "application/sdp"},
                                              data=MINIMAL_SDP)
        assert (status, body["error"]["code"]) == (503, "too_many_calls") and int(headers["Retry-After"]) >= 1
        status, _, _ = await request("GET", f"{url}/healthz")
        assert status == 200
    finally:
        await first.close()
        await request("DELETE", f"{url}{first.location}")
    second = await call_relay(url)  # the place is free again
    await second.close()


async def test_call_creations_per_address_are_limited_with_429(served):
    app, url = await served(calls_per_ip_per_s="0.05", trusted_proxies="127.0.0.1")
    sdp = {"Content-Type": "application/sdp"}
    statuses = [(await request("POST", f"{url}/v1/realtime/calls", sdp, data="not sdp"))[0] for _ in range(5)]
    assert statuses == [400] * 5  # a burst of 5, even of bad offers
    status, body, headers = await request("POST", f"{url}/v1/realtime/calls", sdp, data="not sdp")
    assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded") and int(headers["Retry-After"]) >= 10
    # Behind a trusted proxy, each client has its own allowance.
    status, _, _ = await request("POST", f"{url}/v1/realtime/calls", sdp | {"X-Forwarded-For": "203.0.113.9"},
                                 data="not sdp")
    assert status == 400
    # Other requests are not limited.
    assert (await request("GET", f"{url}/relay/client-config"))[0] == 200


async def test_a_backend_is_limited_by_its_api_key_not_by_its_address(served):
    app, url = await served(api_keys=f"{KEY},sk-other", calls_per_ip_per_s="0.05", calls_per_key_per_s="0.05")
    sdp = {"Content-Type": "application/sdp"}
    # A backend posts many users' offers from one address: past the address's burst of 5, its key's burst applies.
    statuses = [(await request("POST", f"{url}/v1/realtime/calls", sdp | bearer(KEY), data="not sdp"))[0]
                for _ in range(KEY_BURST_FOR_TEST)]
    assert statuses == [400] * KEY_BURST_FOR_TEST
    status, body, headers = await request("POST", f"{url}/v1/realtime/calls", sdp | bearer(KEY), data="not sdp")
    assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded") and "RELAY_CALLS_PER_KEY_PER_S" in \
        body["error"]["message"] and int(headers["Retry-After"]) >= 10
    # Another key has its own allowance; a caller without a key has the address's.
    assert (await request("POST", f"{url}/v1/realtime/calls", sdp | bearer("sk-other"), data="not sdp"))[0] == 400
    secret = (await request("POST", f"{url}/v1/realtime/client_secrets", bearer(KEY), json={}))[1]["value"]
    statuses = [(await request("POST", f"{url}/v1/realtime/calls", sdp | bearer(secret), data="not sdp"))[0]
                for _ in range(6)]
    assert statuses == [400] * 5 + [429]


async def test_a_data_channel_message_over_the_limit_gets_an_error_and_the_call_goes_on(served):
    app, url = await served(max_message_bytes="2048")
    call = await call_relay(url)
    try:
        await call.wait_for("session.created")
        def user_text(text: str, event_id: str) -> str:
            return json.dumps({"type": "conversation.item.create", "event_id": event_id, "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}},
                ensure_ascii=False)

        call.send(user_text("é" * 1100, "evt_big"))  # 1100 characters, over 2200 bytes
        error = await call.wait_for("error")
        assert error["error"]["code"] == "message_too_large" and "2048" in error["error"]["message"]
        call.send(user_text("é" * 800, "evt_small"))  # under 2048 bytes
        await call.wait_for("conversation.item.added")
    finally:
        await call.close()


async def test_a_call_ends_at_its_maximum_duration(served):
    app, url = await served(max_call_duration_s="1.5")
    call = await call_relay(url)
    try:
        await call.wait_for("session.created")
        error = await call.wait_for("error", timeout=10)
        assert error["error"]["code"] == "call_duration_exceeded"
        async with asyncio.timeout(10):
            while app[CALLS]:
                await asyncio.sleep(0.05)
    finally:
        await call.close()


async def test_bodies_over_the_limit_and_unknown_routes_get_json_errors(served):
    app, url = await served(api_keys=KEY, max_sdp_bytes="2048")
    status, body, _ = await request("POST", f"{url}/v1/realtime/client_secrets", bearer(KEY), data="x" * 5000)
    assert (status, body["error"]["code"]) == (413, "request_too_large") and "2048" in body["error"]["message"]
    status, body, _ = await request("POST", f"{url}/v1/realtime/calls", bearer(KEY) | {"Content-Type": "application/sdp"},
                                    data="v=0\r\n" + "a" * 5000)
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    status, body, _ = await request("GET", f"{url}/v1/realtime/nothing-here", bearer(KEY))
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body, headers = await request("PUT", f"{url}/v1/realtime/calls", bearer(KEY))
    assert (status, body["error"]["code"]) == (405, "method_not_allowed") and "POST" in headers["Allow"]

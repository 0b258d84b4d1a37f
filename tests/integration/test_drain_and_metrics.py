"""`relay serve` as a process, with real calls: readiness, graceful drain on SIGTERM, Prometheus metrics, JSON logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from relay.config import Settings
from relay.server.app import create_app
from relay.upstream.target import choose_upstream
from relay.server.workers import Worker
from tests.processes import LoggedRelay, clean_env, relay_logged
from tests.webrtc_client import ClientCall, call_relay, load_pcm48

HELLO48 = load_pcm48("speech_hello_48k.wav")
OFFER = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
CLOSE = {"Connection": "close"}  # each request on a new connection: with workers, the kernel picks one anew


def relay_env(simulator, **settings: str) -> dict[str, str]:
    if "calls_per_ip_per_s" in Settings.model_fields:  # these tests make calls in a row from one address
        settings.setdefault("calls_per_ip_per_s", "1000")
    return clean_env(RELAY_UPSTREAM_URL=simulator.url + "?model=gpt-realtime", RELAY_ICE_ADDRESSES="127.0.0.1",
                     **{f"RELAY_{k.upper()}": v for k, v in settings.items()})


async def readyz(http: aiohttp.ClientSession, base: str) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{base}/readyz", headers=CLOSE) as response:
        return response.status, await response.json()


async def until_draining(http: aiohttp.ClientSession, relay: LoggedRelay, in_a_row: int = 1,
                         workers: int = 1) -> dict[str, Any]:
    """Poll /readyz until it has said 503 `in_a_row` times running (bounded). With workers, one without calls
    leaves at once when it drains: a connection the kernel had just queued at its socket is reset (unless
    net.ipv4.tcp_migrate_req is set); the worker that has the call answers."""
    seen = 0
    async with asyncio.timeout(20):
        while seen < in_a_row:
            try:
                status, body = await readyz(http, relay.base)
            except aiohttp.ClientConnectionError as exc:
                if workers > 1:
                    continue
                raise AssertionError(f"the relay stopped listening while it should drain:\n{relay.output()}") from exc
            seen = seen + 1 if status == 503 else 0
            if seen < in_a_row:
                await asyncio.sleep(0.05)
    return body


async def scrape(http: aiohttp.ClientSession, base: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    async with http.get(f"{base}/metrics", headers=CLOSE) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def hang_up(http: aiohttp.ClientSession, base: str, call: ClientCall) -> None:
    async with http.post(f"{base}{call.location}/hangup", headers=CLOSE) as response:
        assert response.status == 200


async def exits_cleanly(relay: LoggedRelay, timeout: float = 30) -> None:
    assert await asyncio.wait_for(relay.process.wait(), timeout) == 0, relay.output()


# --- readiness and drain ----------------------------------------------------------------------------------------


async def still_answers(call) -> int:
    """A typed turn gets its reply (response.done); the index of the events from which it was waited for."""
    start = len(call.events)
    call.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Still there?"}]}})
    call.send({"type": "response.create"})
    await call.wait_for("response.done", after=start, timeout=20)
    return start


async def test_a_drain_keeps_live_calls_refuses_new_ones_and_ends_with_the_last_call(simulator):
    async with relay_logged("--workers", "1", env=relay_env(simulator, drain_timeout_s="600")) as relay, \
            aiohttp.ClientSession() as http:
        status, body = await readyz(http, relay.base)
        assert status == 200 and body["status"] == "ready" and body["calls"] == 0
        call = await call_relay(relay.base)
        try:
            await call.wait_for("session.created")
            relay.process.send_signal(signal.SIGTERM)
            body = await until_draining(http, relay)
            assert body["status"] == "draining" and body["reason"]
            async with http.post(f"{relay.base}/v1/realtime/calls", data=OFFER,
                                 headers={"Content-Type": "application/sdp", **CLOSE}) as response:
                assert response.status == 503
                assert int(response.headers["Retry-After"]) > 0
                assert (await response.json())["error"]["code"] == "shutting_down"
            # The live call goes on: its events are answered, the model's audio still plays.
            start = await still_answers(call)
            await call.wait_for("output_audio_buffer.stopped", after=start, timeout=20)
            assert relay.process.returncode is None
            await hang_up(http, relay.base, call)
        finally:
            await call.close()
        # The drain timeout is 10 minutes: the relay leaves because its last call ended.
        await exits_cleanly(relay)
    assert "relay.shutdown" not in call.types()
    assert f"call {call.call_id} ended: hangup" in relay.output()


async def test_after_the_drain_timeout_a_call_gets_relay_shutdown_and_the_relay_exits_0(simulator):
    async with relay_logged("--workers", "1", env=relay_env(simulator, drain_timeout_s="1")) as relay:
        call = await call_relay(relay.base)
        try:
            await call.wait_for("session.created")
            relay.process.send_signal(signal.SIGTERM)
            event = await call.wait_for("relay.shutdown", timeout=30)
            assert event["reason"] == "server_shutdown" and event["reconnect"] is True
            assert event["resume_call_id"] == call.call_id and event["message"]
            await exits_cleanly(relay)
        finally:
            await call.close()
    assert f"call {call.call_id} ended: server shutdown" in relay.output()


async def test_a_second_sigterm_ends_the_drain_at_once(simulator):
    async with relay_logged("--workers", "1", env=relay_env(simulator, drain_timeout_s="600")) as relay, \
            aiohttp.ClientSession() as http:
        call = await call_relay(relay.base)
        try:
            await call.wait_for("session.created")
            relay.process.send_signal(signal.SIGTERM)
            await until_draining(http, relay)
            relay.process.send_signal(signal.SIGTERM)
            await exits_cleanly(relay)  # long before the 10 minutes of drain
            await call.wait_for("relay.shutdown", timeout=10)
        finally:
            await call.close()


async def test_two_workers_drain_together_and_a_second_sigterm_stops_them(simulator):
    async with relay_logged("--workers", "2", env=relay_env(simulator, drain_timeout_s="600")) as relay, \
            aiohttp.ClientSession() as http:
        call = await call_relay(relay.base)
        try:
            await call.wait_for("session.created")
            relay.process.send_signal(signal.SIGTERM)
            await until_draining(http, relay, in_a_row=6, workers=2)  # whichever worker answers
            assert relay.process.returncode is None  # the master waits for the drain, not its old 30 s
            relay.process.send_signal(signal.SIGTERM)
            await exits_cleanly(relay)
            await call.wait_for("relay.shutdown", timeout=10)
        finally:
            await call.close()


async def test_a_sigterm_to_the_whole_process_group_drains_and_does_not_hurry(simulator):
    """systemd's KillMode=control-group, `docker stop` of a shell entrypoint: each worker gets SIGTERM from the
    group and again from the master passing it on. That is still the first signal: the calls go on."""
    async with relay_logged("--workers", "2", env=relay_env(simulator, drain_timeout_s="600"), own_group=True) as relay, \
            aiohttp.ClientSession() as http:
        call = await call_relay(relay.base)
        try:
            await call.wait_for("session.created")
            os.killpg(relay.process.pid, signal.SIGTERM)  # the relay's own group: the master and its workers only
            await until_draining(http, relay, in_a_row=6, workers=2)
            await still_answers(call)
            assert relay.process.returncode is None and "relay.shutdown" not in call.types()
            await hang_up(http, relay.base, call)
        finally:
            await call.close()
        await exits_cleanly(relay)
    assert "relay.shutdown" not in call.types()


async def test_readyz_says_503_while_the_worker_is_full_and_metrics_can_be_turned_off(simulator):
    settings = Settings.load(env={}, upstream_url=simulator.url + "?model=gpt-realtime", ice_addresses="127.0.0.1",
                             max_calls="1", metrics="false", workers="1")
    runner = web.AppRunner(create_app(settings, choose_upstream(settings)), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as http:
            assert await readyz(http, base) == (200, {"status": "ready", "calls": 0, "max_calls": 1})
            call = await call_relay(base)
            try:
                status, body = await readyz(http, base)
                assert status == 503 and body["status"] == "full" and (body["calls"], body["max_calls"]) == (1, 1)
                await hang_up(http, base, call)
            finally:
                await call.close()
            assert (await readyz(http, base))[0] == 200
            async with http.get(f"{base}/metrics") as response:
                assert response.status == 404
    finally:
        await runner.cleanup()


# --- metrics and logs -------------------------------------------------------------------------------------------


async def test_metrics_move_with_a_call_and_its_events_are_logged_as_json(simulator):
    async with relay_logged("--workers", "1", env=relay_env(simulator, log_format="json")) as relay, \
            aiohttp.ClientSession() as http:
        before = await scrape(http, relay.base)
        call = await call_relay(relay.base)
        try:
            await call.wait_for("session.created")
            assert value(await scrape(http, relay.base), "relay_calls_active") == 1
            call.mic.say_between(HELLO48, lead_ms=300, tail_ms=900)
            await call.wait_for("output_audio_buffer.stopped", timeout=20)
            start = len(call.events)
            call.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Thanks."}]}})
            await call.wait_for("conversation.item.done", after=start)
            await hang_up(http, relay.base, call)
        finally:
            await call.close()
        after = await scrape(http, relay.base)
        relay.process.send_signal(signal.SIGTERM)
        await exits_cleanly(relay)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("relay_calls_started_total") == 1
    assert grew("relay_calls_ended_total", reason="hangup") == 1
    assert value(after, "relay_calls_active") == 0
    assert grew("relay_turn_latency_seconds_count") == 1 and grew("relay_turn_latency_seconds_sum") > 0
    for path in ("rtp", "datachannel", "upstream"):
        assert grew("relay_received_bytes_total", path=path) > 0, path
        assert grew("relay_sent_bytes_total", path=path) > 0, path
    assert grew("relay_outbound_frames_total") > 0
    assert value(after, "relay_event_loop_lag_seconds_count") > 0
    for name in ("relay_barge_ins_total", "relay_truncations_total", "relay_upstream_reconnects_total",
                 "relay_upstream_rollovers_total", "relay_outbound_frames_late_total",
                 "relay_outbound_frames_dropped_total", "relay_draining"):
        assert (name, ()) in after, name

    lines = [json.loads(line) for line in relay.stderr]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    events = {line["event"]: line for line in lines if line.get("call_id") == call.call_id and "event" in line}
    assert {"started", "connected", "ended"} <= events.keys()
    ended = events["ended"]
    assert ended["reason"] == "hangup" and ended["outcome"] == "hangup" and ended["duration_s"] > 0
    assert ended["frames"] > 0 and ended["rtp_in"] > 0 and ended["level"] == "info"


async def test_metrics_add_up_over_two_workers(simulator):
    async with relay_logged("--workers", "2", env=relay_env(simulator)) as relay, aiohttp.ClientSession() as http:
        owners, calls = set(), 0
        async with asyncio.timeout(60):
            while owners != {0, 1}:  # until each worker has had a call (the kernel picks; ~2 tries on average)
                call = await call_relay(relay.base, headers=CLOSE)
                calls += 1
                owners.add(Worker.owner(call.call_id))
                await hang_up(http, relay.base, call)
                await call.close()
        live = await call_relay(relay.base, headers=CLOSE)
        try:
            await live.wait_for("session.created")
            for _ in range(6):  # any worker's /metrics counts every worker's calls
                samples = await scrape(http, relay.base)
                assert value(samples, "relay_calls_started_total") == calls + 1
                assert value(samples, "relay_calls_ended_total", reason="hangup") == calls
                assert value(samples, "relay_calls_active") == 1
            await hang_up(http, relay.base, live)
        finally:
            await live.close()
        samples = await scrape(http, relay.base)
        assert value(samples, "relay_calls_active") == 0
        assert value(samples, "relay_sent_bytes_total", path="upstream") > 0
        relay.process.send_signal(signal.SIGTERM)
        await exits_cleanly(relay)

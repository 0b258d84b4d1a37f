"""What a caller notices when the relay replaces its upstream session: after a drop (reconnect) and before expiry
(rollover). One process: the simulator, the relay's app and an aiortc client peer on loopback.

    python bench/session_changes.py [--rounds 10] [--json results.json]

- **Reconnect**: every simulator session drops (TCP abort, the relay sees 1006) right after its first
  `response.output_audio.delta`, so each typed turn loses its session mid-reply and the relay reconnects with a
  history one turn longer than the last. Printed: `relay.upstream.reconnecting` (sent as the relay sees the loss)
  -> `relay.upstream.reconnected` at the client, and the relay's open + replay time, by history length.
- **Rollover**: simulator sessions last 6 s and the relay rolls over 2 s ahead, with a typed turn between
  rollovers. Printed: the relay's open + replay time for each, and the gaps between outbound RTP packets as the
  client received them within 200 ms of a switch, against the gaps elsewhere.

Packets are timed on arrival at the client (its jitter buffer is bypassed), so a pause in the outbound stream
would show as a gap well over 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web  # noqa: E402

from bench.analysis import percentile, run  # noqa: E402
from bench.peers import PrecodedVoice, connect, encode_opus  # noqa: E402
from relay.config import Settings  # noqa: E402
from relay.call.upstream import UpstreamLink  # noqa: E402
from relay.server.app import create_app  # noqa: E402
from relay.simulator.config import SimConfig  # noqa: E402
from relay.simulator.server import start_simulator  # noqa: E402
from relay.upstream.target import choose_upstream  # noqa: E402
from relay.webrtc.aiortc_internals import restrict_host_addresses  # noqa: E402

SWITCH_WINDOW_S = 0.2  # packets this close to a rollover (its event at the client) count as "near a switch"
FAST = SimConfig(first_delta_delay_ms=20, speed=20.0, transcription_delay_ms=10)


@contextlib.asynccontextmanager
async def one_call(http: aiohttp.ClientSession, sim_config: SimConfig, query: str = "", **settings: str):
    """A simulator, the relay's app and one client call on loopback: (call, opens), where `opens` gets
    (items replayed, seconds) for every upstream session the relay opens after the call's first."""
    opens: list[tuple[int, float]] = []
    original = UpstreamLink.open

    async def timed(self, session, replay, from_client=False):
        started = time.perf_counter()
        result = await original(self, session, replay, from_client)
        opens.append((len(replay), time.perf_counter() - started))
        return result

    sim = await start_simulator(sim_config)
    runner, url = await serve(sim.url + "?model=gpt-realtime" + query, **settings)
    UpstreamLink.open = timed
    call = None
    try:
        call = await connect(url, PrecodedVoice(encode_opus(np.zeros(960 * 50, "<i2"))), decode=False, http=http)
        await wait_for(call, "session.created", 0)
        async with asyncio.timeout(10):  # aiortc may hand over messages before it marks the channel open
            while call.channel.readyState != "open":
                await asyncio.sleep(0.01)
        yield call, opens
    finally:
        if call is not None:
            await call.close()
        UpstreamLink.open = original
        await runner.cleanup()
        await sim.stop()
    del opens[0]  # the call's own first session


async def serve(upstream_url: str, **settings: str) -> tuple[web.AppRunner, str]:
    config = Settings.load(env={}, upstream_url=upstream_url, ice_addresses="127.0.0.1", workers=1,
                           calls_per_ip_per_s="100000", **settings)
    runner = web.AppRunner(create_app(config, choose_upstream(config)), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/v1/realtime/calls"


def say(channel, text: str) -> None:
    channel.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
    channel.send(json.dumps({"type": "response.create"}))


async def wait_for(call, event_type: str, after: int, timeout: float = 15.0) -> tuple[int, float]:
    """Index and arrival time of the first `event_type` event from index `after`."""
    async with asyncio.timeout(timeout):
        while True:
            for index in range(after, len(call.events)):
                if call.events[index]["type"] == event_type:
                    return index, call.event_times[index]
            await asyncio.sleep(0.005)


async def reconnects(rounds: int, http: aiohttp.ClientSession) -> dict:
    fault = dataclasses.replace(FAST, close_after_event_type="response.output_audio.delta", close_abruptly=True)
    downtimes = []
    async with one_call(http, fault, upstream_retry_backoff_s="0.05") as (call, opens):
        for turn in range(rounds):
            say(call.channel, f"Turn {turn} of the call.")
            lost, lost_at = await wait_for(call, "relay.upstream.reconnecting", len(call.events))
            _, back_at = await wait_for(call, "relay.upstream.reconnected", lost)
            downtimes.append(back_at - lost_at)
            await asyncio.sleep(0.3)
    return {"reconnect_s": downtimes, "opens": opens}


async def rollovers(rounds: int, http: aiohttp.ClientSession) -> dict:
    switches = []
    async with one_call(http, FAST, "&sim_max_session_s=6", rollover_before_s="2") as (call, opens):
        after = 0
        for turn in range(rounds):
            say(call.channel, f"Turn {turn} of the call.")
            index, at = await wait_for(call, "relay.upstream.rolled_over", after, timeout=20)
            switches.append(at)
            after = index + 1
        await asyncio.sleep(1.0)
    times = np.asarray(call.log.times[50:])  # from the second second on: the stream has settled
    gaps, ends = np.diff(times), times[1:]
    near = np.zeros(gaps.size, dtype=bool)
    for at in switches:
        near |= np.abs(ends - at) < SWITCH_WINDOW_S
    return {"opens": opens, "gaps_near_switch_s": gaps[near].tolist(), "gaps_elsewhere_s": gaps[~near].tolist()}


def report(reconnect: dict, rollover: dict) -> None:
    ms = [t * 1000 for t in reconnect["reconnect_s"]]
    print(f"reconnect, relay.upstream.reconnecting -> reconnected at the client: p50 {percentile(ms, 50):.1f} ms, max {max(ms):.1f} ms "
          f"(n={len(ms)})")
    for items, seconds in reconnect["opens"]:
        print(f"  open + replay of {items:2d} items: {seconds * 1000:6.1f} ms")
    opens = [s * 1000 for _, s in rollover["opens"]]
    print(f"rollover, open + replay beside the live session: p50 {percentile(opens, 50):.1f} ms (n={len(opens)})")
    for where in ("near_switch", "elsewhere"):
        gaps = [g * 1000 for g in rollover[f"gaps_{where}_s"]]
        print(f"  gaps between outbound packets {where.replace('_', ' a ')}: p50 {percentile(gaps, 50):.1f} ms, "
              f"p99 {percentile(gaps, 99):.1f} ms, max {max(gaps):.1f} ms (n={len(gaps)})")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    restrict_host_addresses(["127.0.0.1"])
    async with aiohttp.ClientSession() as http:
        reconnect = await reconnects(args.rounds, http)
        rollover = await rollovers(args.rounds, http)
    report(reconnect, rollover)
    if args.json:
        args.json.write_text(json.dumps({"reconnect": reconnect, "rollover": rollover}, indent=2))


if __name__ == "__main__":
    run(main())

"""One call on loopback, measured from inside the relay: where its time goes, frame by frame.

    python bench/call_latency.py [--markers 30] [--json results.json]

(The comparison with Pipecat and a bare aiortc echo, in separate processes, is bench/compare.py. This one runs
client, relay and simulator in one process so it can time the relay's own methods.)

A client peer (aiortc) sends silence with a short tone marker once a second. The upstream is the simulator in echo
mode (every appended chunk comes straight back as audio), so the upstream adds no delay of its own. Printed:

- mouth-to-upstream: a marker leaving the client's track -> the append holding it reaching the upstream (p50/p99)
- processing per 20 ms frame, inbound (RTP packet -> append queued) and outbound (audio delta -> frames queued,
  and each playout tick), p50/p99, measured by wrapping the relay's methods (no instrumentation in the relay)
- outbound frame timing: how late each frame left the playout track against its schedule (p99)
- echo round trip, client to client, through the client's aiortc jitter buffer
- barge-in as the relay sees it (speech_started reaching its core -> the last frame of the reply leaving it) and
  as the client hears it; truncation error; fidelity of a reply

Everything runs in one process on one event loop (uvloop), client and upstream included, so the figures include
their share of the CPU: a conservative measure of the relay. The relay's audio-sender changes are process-wide,
so the client peer uses them too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web  # noqa: E402

from relay.config import Settings  # noqa: E402
from relay.call.call import Call  # noqa: E402
from relay.server.app import create_app  # noqa: E402
from relay.server.calls import CALLS  # noqa: E402
from relay.simulator.config import SimConfig  # noqa: E402
from relay.simulator.server import start_simulator  # noqa: E402
from relay.upstream.target import choose_upstream  # noqa: E402
from relay.webrtc import inbound as inbound_module  # noqa: E402
from relay.webrtc.aiortc_internals import restrict_host_addresses  # noqa: E402
from tests.webrtc_client import ClientCall, Microphone, call_relay  # noqa: E402
from bench.analysis import (  # noqa: E402
    MARKER_MS, fidelity_db, marker, onsets, pair_arrivals, percentile, run, speech, summary, tone)
from tests.audio_checks import loud_ms  # noqa: E402

MARKER_EVERY_S = 1.0



async def speak_markers(mic: Microphone, count: int) -> None:
    """First a sentence (for fidelity), then one marker a second (for timing)."""
    mic.say(speech())
    mic.say(np.zeros(48000, dtype="<i2"))
    for index in range(count):
        mic.say(np.zeros(int(MARKER_EVERY_S * 48000) - MARKER_MS * 48, dtype="<i2"))
        mic.say(marker(), mark=f"m{index}")
    mic.say(np.zeros(48000, dtype="<i2"))
    await asyncio.sleep(count * MARKER_EVERY_S + 1.5 + speech().size / 48000 + 1.0)


def round_trips(call: ClientCall, count: int) -> list[float]:
    """Marker sent -> the frame holding its echo received, for each marker heard back."""
    received = call.received()
    frame_of_sample = np.repeat(np.arange(len(call.audio)), [len(a) for a in call.audio])
    heard = [call.audio_times[frame_of_sample[i]] for i in onsets(received, 48000)]
    sent = [call.mic.marks[f"m{i}"] for i in range(count) if f"m{i}" in call.mic.marks]
    return pair_arrivals(sent, heard)


class Timings:
    """Wraps a method to time each call (perf_counter), without touching the relay's code."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        bucket = self.samples.setdefault(label, [])

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                bucket.append(time.perf_counter() - start)

        setattr(owner, name, timed)


async def through_relay(count: int) -> dict:
    simulator = await start_simulator(SimConfig(echo_appends=True))
    settings = Settings.load(env={}, upstream_url=simulator.url, ice_addresses="127.0.0.1",
                             calls_per_ip_per_s="100000")
    timings = Timings()
    timings.wrap(inbound_module.InboundAudio, "add", "inbound per packet")
    timings.wrap(Call, "on_audio_delta", "outbound per delta")
    timings.wrap(Call, "next_frame", "outbound per tick")
    app = create_app(settings, choose_upstream(settings))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    call = await call_relay(url)
    await call.wait_for("session.created")
    await asyncio.sleep(1.0)  # let ICE, DTLS and the first packets settle
    relay_call = next(iter(app[CALLS].values()))
    depths: list[int] = []

    async def sample_queue() -> None:
        while True:
            depths.append(len(relay_call.core._queue))
            await asyncio.sleep(0.1)

    sampler = asyncio.ensure_future(sample_queue())
    await speak_markers(call.mic, count)
    sampler.cancel()
    record = simulator.recorder.sessions[-1]
    upstream_audio = np.frombuffer(bytes(record.input_audio), dtype="<i2")
    arrivals = record.append_arrivals
    upstream_times = []
    for sample in onsets(upstream_audio, 24000):
        needed = (sample + 24) * 2  # a millisecond into the marker
        upstream_times.append(next(t for t, total in arrivals if total >= needed))
    sent = [call.mic.marks[f"m{i}"] for i in range(count) if f"m{i}" in call.mic.marks]
    mouth = pair_arrivals(sent, upstream_times)
    result = {
        "mouth_to_upstream_ms": mouth,
        "round_trip_ms": round_trips(call, count),
        "lateness_ms": list(relay_call.peer.track.lateness),
        "timings": timings.samples,
        "inbound_stats": vars(relay_call.peer.inbound.stats),
        "playout_queue_frames": depths,
        "playout_reanchors": relay_call.peer.track.reanchors,
        "skipped": relay_call.core.stats.leading_silence_skipped,
    }
    await call.close()
    await runner.cleanup()
    await simulator.stop()
    return result


async def barge_ins(count: int) -> dict:
    """Interrupt the model `count` times; measure how fast its audio stops and how exact the truncation is.

    The user says a steady tone; the simulator (normal mode, replies generated 4x faster than real time) echoes it
    after 300 ms of prefix padding. A moment into the reply the user talks over it with another tone."""
    simulator = await start_simulator(SimConfig(first_delta_delay_ms=100))
    settings = Settings.load(env={}, upstream_url=simulator.url, ice_addresses="127.0.0.1",
                             calls_per_ip_per_s="100000")
    app = create_app(settings, choose_upstream(settings))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    call = await call_relay(f"http://127.0.0.1:{runner.addresses[0][1]}")
    await call.wait_for("session.created")
    relay_call = next(iter(app[CALLS].values()))
    # Instrument without touching the relay: when speech_started reaches the core, when frames leave the track.
    event_at: list[float] = []
    frames_out: list[tuple[float, bool]] = []
    on_event, next_frame = relay_call.core.on_server_event, relay_call.next_frame

    def on_server_event(event, now=None):
        if event.get("type") == "input_audio_buffer.speech_started":
            event_at.append(time.monotonic())
        return on_event(event, now)

    def timed_next_frame():
        frame = next_frame()
        frames_out.append((time.monotonic(), frame is not None))
        return frame

    relay_call.core.on_server_event = on_server_event
    relay_call.peer.track._next_frame = timed_next_frame
    # Fidelity first, the way a reply is really heard: the model's reply (here the echo of the committed speech)
    # arrives faster than real time and plays from the queue.
    mark = len(call.events)
    reply_from = len(call.audio)
    call.mic.say(np.zeros(48 * 400, "<i2"))
    call.mic.say(speech())
    call.mic.say(np.zeros(48 * 900, "<i2"))
    await call.wait_for("output_audio_buffer.stopped", after=mark, timeout=30)
    fidelity = fidelity_db(np.concatenate(call.audio[reply_from:]), speech())
    relay_ms, client_ms, truncation_error_ms = [], [], []
    rng = np.random.default_rng(7)
    for _ in range(count):
        mark = len(call.events)
        call.mic.say(np.zeros(48 * 400, "<i2"))
        call.mic.say(tone(1200))
        call.mic.say(np.zeros(48 * 700, "<i2"))
        await call.wait_for("output_audio_buffer.started", after=mark, timeout=20)
        reply_start = len(call.audio)
        await asyncio.sleep(0.45 + float(rng.uniform(0, 0.5)))  # 300 ms of prefix padding, then into the tone
        before = len(call.events)
        call.mic.say(tone(600, hz=660))
        call.mic.say(np.zeros(48 * 800, "<i2"))
        await call.wait_for("output_audio_buffer.cleared", after=before, timeout=10)
        speech_at_client = next(call.event_times[i] for i, e in enumerate(call.events)
                                if i >= before and e["type"] == "input_audio_buffer.speech_started")
        await call.wait_for("output_audio_buffer.stopped", after=before, timeout=20)  # the interruption's reply
        # Relay side: the last frame of the interrupted reply left this long after speech_started arrived.
        t_event = event_at[-1]
        sent_after = [t for t, sound in frames_out if t >= t_event and sound]
        flushed_at = next((t for t, sound in frames_out if t >= t_event and not sound), t_event)
        relay_ms.append(max([t for t in sent_after if t <= flushed_at], default=t_event) - t_event)
        # Client side: the last loud frame of the interrupted reply reached the client's track this long after
        # the speech_started event reached the client (its jitter buffer included).
        next_reply = next(i for i, e in enumerate(call.events) if i > before and e["type"] == "output_audio_buffer.started")
        next_reply_frames = next(k for k, t in enumerate(call.audio_times) if t >= call.event_times[next_reply])
        heard = np.concatenate(call.audio[reply_start:next_reply_frames])
        loud = loud_ms(heard)
        last_loud_frame = reply_start + (loud[-1] // 20 if loud else 0)
        client_ms.append(call.audio_times[min(last_loud_frame, len(call.audio_times) - 1)] - speech_at_client)
        truncate = next(e for e in reversed(simulator.recorder.sessions[-1].received)
                        if e.get("type") == "conversation.item.truncate")
        heard_ms = 300 + (loud[-1] + 5 - loud[0] if loud else 0)  # prefix padding + the tone received
        truncation_error_ms.append((truncate["audio_end_ms"] - heard_ms) / 1000)
    await call.close()
    await runner.cleanup()
    await simulator.stop()
    return {"relay_barge_in_ms": relay_ms, "client_barge_in_ms": client_ms, "truncation_error_ms": truncation_error_ms,
            "fidelity_db": fidelity}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markers", type=int, default=30, help="markers to send per run (one a second)")
    parser.add_argument("--barge-ins", type=int, default=10, help="interruptions to measure")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    restrict_host_addresses(["127.0.0.1"])
    relayed = await through_relay(args.markers)
    interruptions = await barge_ins(args.barge_ins)
    per_frame = {
        label: [v * 1000 for v in values] for label, values in relayed["timings"].items()
    }
    lines = [
        f"mouth-to-upstream            {summary(relayed['mouth_to_upstream_ms'])}",
        *(f"processing, {label:<17}{'p50':>4} {percentile(v, 50) * 1000:7.1f} us   p99 {percentile(v, 99) * 1000:7.1f} us"
          f"   (n={len(v)})" for label, v in per_frame.items()),
        f"outbound frame lateness      p50 {percentile(relayed['lateness_ms'], 50) * 1000:7.2f} ms   "
        f"p99 {percentile(relayed['lateness_ms'], 99) * 1000:7.2f} ms",
        f"echo round trip, via relay   {summary(relayed['round_trip_ms'])}",
        f"barge-in, event at relay -> last frame out  {summary(interruptions['relay_barge_in_ms'])}",
        f"barge-in, event at client -> last audio in  {summary(interruptions['client_barge_in_ms'])}",
        f"truncation error (audio_end_ms - heard)     {summary(interruptions['truncation_error_ms'])}",
        f"fidelity (median SNR of 200 ms windows)     relay {interruptions['fidelity_db']:.1f} dB",
        f"inbound: {relayed['inbound_stats']}",
        f"playout queue depth (frames, sampled every 100 ms): max {max(relayed['playout_queue_frames'])}, "
        f"mean {statistics.fmean(relayed['playout_queue_frames']):.2f}; playout schedule re-anchored after stalls: "
        f"{relayed['playout_reanchors']}; leading silence skipped: {relayed['skipped']} frames",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"relay": relayed, "barge_in": interruptions},
                                        default=float, indent=1))


if __name__ == "__main__":
    run(main())

"""One call on loopback, measured: what the relay adds to the audio path.

    python bench/call_latency.py [--markers 30] [--json results.json]

A client peer (aiortc) sends silence with a short tone marker once a second. The upstream is the simulator in echo
mode (every appended chunk comes straight back as audio), so the upstream adds no delay of its own. Printed:

- mouth-to-upstream: a marker leaving the client's track -> the append holding it reaching the upstream (p50/p99)
- processing per 20 ms frame, inbound (RTP packet -> append queued) and outbound (audio delta -> frames queued,
  and each playout tick), p50/p99, measured by wrapping the relay's methods (no instrumentation in the relay)
- outbound frame timing: how late each frame left the playout track against its schedule (p99)
- echo round trip, client to client: through the relay, and through a bare aiortc echo peer (decode, re-encode)

Everything runs in one process on one event loop (uvloop), client and upstream included, so the figures include
their share of the CPU: a conservative measure of the relay. The relay's audio-sender changes are process-wide,
so the client peer uses them too while the relay runs; the bare aiortc echo runs last, with aiortc's stock sender
on both peers.
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
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.contrib.media import MediaRelay  # noqa: E402

from relay.config import Settings  # noqa: E402
from relay.server import calls as calls_module  # noqa: E402
from relay.server.app import create_app  # noqa: E402
from relay.simulator.config import SimConfig  # noqa: E402
from relay.simulator.server import start_simulator  # noqa: E402
from relay.upstream.target import choose_upstream  # noqa: E402
from relay.webrtc import inbound as inbound_module  # noqa: E402
from relay.webrtc.aiortc_internals import restrict_host_addresses, speed_up_audio_sender  # noqa: E402
from tests.webrtc_client import ClientCall, Microphone, call_relay  # noqa: E402

MARKER_MS = 60
MARKER_EVERY_S = 1.0
ONSET_DB = -30.0


def marker() -> np.ndarray:
    t = np.arange(MARKER_MS * 48) / 48000
    return (np.sin(2 * np.pi * 1000 * t) * 32767 * 0.25).astype("<i2")


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else float("nan")


def onsets(samples: np.ndarray, rate: int, window_ms: int = 5) -> list[int]:
    """Sample indexes where a loud run starts after quiet (window resolution)."""
    size = rate * window_ms // 1000
    frames = samples[: samples.size // size * size].astype(np.float64).reshape(-1, size)
    loud = 10 * np.log10(np.mean(frames**2, axis=1) / 32768**2 + 1e-12) > ONSET_DB
    starts, quiet_run = [], 100
    for index, is_loud in enumerate(loud):
        if is_loud and quiet_run >= 20:  # at least 100 ms of quiet before
            starts.append(index * size)
        quiet_run = 0 if is_loud else quiet_run + 1
    return starts


def speech() -> np.ndarray:
    from tests.webrtc_client import load_pcm48

    return load_pcm48("speech_hello_48k.wav")


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
    return _pair(sent, heard)


def _pair(sent: list[float], heard: list[float], limit_s: float = 0.8) -> list[float]:
    """Match each sent marker to the first later arrival within `limit_s`."""
    out, j = [], 0
    for t in sent:
        while j < len(heard) and heard[j] < t:
            j += 1
        if j < len(heard) and heard[j] - t < limit_s:
            out.append(heard[j] - t)
            j += 1
    return out


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
    settings = Settings.load(env={}, upstream_url=simulator.url, ice_addresses="127.0.0.1")
    timings = Timings()
    timings.wrap(inbound_module.InboundAudio, "add", "inbound per packet")
    timings.wrap(calls_module.Call, "_on_audio_delta", "outbound per delta")
    timings.wrap(calls_module.Call, "_next_frame", "outbound per tick")
    app = create_app(settings, choose_upstream(settings))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    call = await call_relay(url)
    await call.wait_for("session.created")
    await asyncio.sleep(1.0)  # let ICE, DTLS and the first packets settle
    relay_call = next(iter(app[calls_module.CALLS].values()))
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
    mouth = _pair(sent, upstream_times)
    result = {
        "mouth_to_upstream_ms": mouth,
        "round_trip_ms": round_trips(call, count),
        "lateness_ms": list(relay_call.track.lateness),
        "timings": timings.samples,
        "inbound_stats": vars(relay_call.inbound.stats),
        "playout_queue_frames": depths,
        "playout_reanchors": relay_call.track.reanchors,
        "skipped": relay_call.core.stats.leading_silence_skipped,
    }
    await call.close()
    await runner.cleanup()
    await simulator.stop()
    return result


def tone(ms: int, hz: float = 440.0) -> np.ndarray:
    t = np.arange(ms * 48) / 48000
    return (np.sin(2 * np.pi * hz * t) * 32767 * 0.1).astype("<i2")


def loud_windows_ms(samples: np.ndarray, window_ms: int = 5) -> list[int]:
    size = 48 * window_ms
    frames = samples[: samples.size // size * size].astype(np.float64).reshape(-1, size)
    level = 10 * np.log10(np.mean(frames**2, axis=1) / 32768**2 + 1e-12)
    return [i * window_ms for i in np.nonzero(level > -40)[0]]


async def barge_ins(count: int) -> dict:
    """Interrupt the model `count` times; measure how fast its audio stops and how exact the truncation is.

    The user says a steady tone; the simulator (normal mode, replies generated 4x faster than real time) echoes it
    after 300 ms of prefix padding. A moment into the reply the user talks over it with another tone."""
    simulator = await start_simulator(SimConfig(first_delta_delay_ms=100))
    settings = Settings.load(env={}, upstream_url=simulator.url, ice_addresses="127.0.0.1")
    app = create_app(settings, choose_upstream(settings))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    call = await call_relay(f"http://127.0.0.1:{runner.addresses[0][1]}")
    await call.wait_for("session.created")
    relay_call = next(iter(app[calls_module.CALLS].values()))
    # Instrument without touching the relay: when speech_started reaches the core, when frames leave the track.
    event_at: list[float] = []
    frames_out: list[tuple[float, bool]] = []
    on_event, next_frame = relay_call.core.on_server_event, relay_call._next_frame

    def on_server_event(event):
        if event.get("type") == "input_audio_buffer.speech_started":
            event_at.append(time.monotonic())
        return on_event(event)

    def timed_next_frame():
        frame = next_frame()
        frames_out.append((time.monotonic(), frame is not None))
        return frame

    relay_call.core.on_server_event = on_server_event
    relay_call.track._next_frame = timed_next_frame
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
        loud = loud_windows_ms(heard)
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


def fidelity_db(received: np.ndarray, sent: np.ndarray, window_ms: int = 200, slack_ms: int = 20) -> float:
    """Median signal-to-noise of `sent` as found in `received`, window by window.

    One global alignment is found first; each 200 ms window of speech is then realigned within +-20 ms and scored
    with a least-squares gain, so a single dropped or inserted frame costs one window, not the whole sentence."""
    from tests.audio_checks import best_alignment

    offset, _ = best_alignment(received, sent)
    size, slack = 48 * window_ms, 48 * slack_ms
    scores = []
    for start in range(0, sent.size - size, size):
        ref = sent[start : start + size].astype(np.float64)
        if 10 * np.log10(np.mean(ref**2) / 32768**2 + 1e-12) < -40:
            continue  # silence: nothing to compare
        lo = max(0, offset + start - slack)
        segment = received[lo : offset + start + size + slack]
        if segment.size < size:
            continue
        local, _ = best_alignment(segment, sent[start : start + size])
        got = segment[local : local + size].astype(np.float64)
        gain = np.dot(got, ref) / np.dot(ref, ref)
        noise = got - gain * ref
        scores.append(10 * np.log10(np.dot(gain * ref, gain * ref) / (np.dot(noise, noise) + 1e-9)))
    return float(np.median(scores)) if scores else float("nan")


async def bare_aiortc_echo(count: int) -> dict:
    """The same client against an aiortc peer that sends back what it receives (decode, re-encode)."""
    server = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    media = MediaRelay()

    @server.on("track")
    def on_track(track):
        server.addTrack(media.subscribe(track))

    client_pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    mic = Microphone()
    client_pc.addTrack(mic)
    call = ClientCall(client_pc, None, mic, "bare", "")

    @client_pc.on("track")
    def on_client_track(track):
        async def record():
            while True:
                frame = await track.recv()
                call.audio.append(frame.to_ndarray().reshape(-1, 2)[:, 0].astype("<i2"))
                call.audio_times.append(time.monotonic())
        call._tasks.append(asyncio.ensure_future(record()))

    await client_pc.setLocalDescription(await client_pc.createOffer())
    await server.setRemoteDescription(client_pc.localDescription)
    await server.setLocalDescription(await server.createAnswer())
    await client_pc.setRemoteDescription(RTCSessionDescription(server.localDescription.sdp, "answer"))
    await asyncio.sleep(1.0)
    await speak_markers(mic, count)
    result = {"round_trip_ms": round_trips(call, count), "fidelity_db": fidelity_db(call.received(), speech())}
    await call.close()
    await server.close()
    return result


def summary(values_s: list[float]) -> str:
    ms = [v * 1000 for v in values_s]
    if not ms:
        return "no samples"
    return f"p50 {percentile(ms, 50):7.2f} ms   p99 {percentile(ms, 99):7.2f} ms   (n={len(ms)})"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markers", type=int, default=30, help="markers to send per run (one a second)")
    parser.add_argument("--barge-ins", type=int, default=10, help="interruptions to measure")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    restrict_host_addresses(["127.0.0.1"])
    relayed = await through_relay(args.markers)
    interruptions = await barge_ins(args.barge_ins)
    speed_up_audio_sender(False)  # the baseline is stock aiortc on both peers
    bare = await bare_aiortc_echo(args.markers)
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
        f"echo round trip, bare aiortc {summary(bare['round_trip_ms'])}",
        f"barge-in, event at relay -> last frame out  {summary(interruptions['relay_barge_in_ms'])}",
        f"barge-in, event at client -> last audio in  {summary(interruptions['client_barge_in_ms'])}",
        f"truncation error (audio_end_ms - heard)     {summary(interruptions['truncation_error_ms'])}",
        f"fidelity (median SNR of 200 ms windows)     relay {interruptions['fidelity_db']:.1f} dB, "
        f"bare aiortc echo {bare['fidelity_db']:.1f} dB",
        f"inbound: {relayed['inbound_stats']}",
        f"playout queue depth (frames, sampled every 100 ms): max {max(relayed['playout_queue_frames'])}, "
        f"mean {statistics.fmean(relayed['playout_queue_frames']):.2f}; playout schedule re-anchored after stalls: "
        f"{relayed['playout_reanchors']}; leading silence skipped: {relayed['skipped']} frames",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"relay": relayed, "bare_aiortc": bare, "barge_in": interruptions},
                                        default=float, indent=1))


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())

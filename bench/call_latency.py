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
their share of the CPU: a conservative measure of the relay.
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
from relay.webrtc.aiortc_internals import restrict_host_addresses  # noqa: E402
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


async def speak_markers(mic: Microphone, count: int) -> None:
    for index in range(count):
        mic.say(np.zeros(int(MARKER_EVERY_S * 48000) - MARKER_MS * 48, dtype="<i2"))
        mic.say(marker(), mark=f"m{index}")
    mic.say(np.zeros(48000, dtype="<i2"))
    await asyncio.sleep(count * MARKER_EVERY_S + 1.5)


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
    result = {"round_trip_ms": round_trips(call, count)}
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
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    restrict_host_addresses(["127.0.0.1"])
    relayed = await through_relay(args.markers)
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
        f"inbound: {relayed['inbound_stats']}",
        f"playout queue depth (frames, sampled every 100 ms): max {max(relayed['playout_queue_frames'])}, "
        f"mean {statistics.fmean(relayed['playout_queue_frames']):.2f}; playout schedule re-anchored after stalls: "
        f"{relayed['playout_reanchors']}; leading silence skipped: {relayed['skipped']} frames",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"relay": relayed, "bare_aiortc": bare}, default=float, indent=1))


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())

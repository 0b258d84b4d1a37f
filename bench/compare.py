"""The relay side by side with Pipecat and a bare aiortc echo, in one run, in separate processes, on loopback.

    pip install -e ".[test,bench]"
    python bench/compare.py [--markers 30] [--barge-ins 10] [--out bench-results]

Processes: two simulators (an echo one that returns every appended chunk at once, and a normal one that answers
turns and can be interrupted), each target in turn (pinned to CPU 0, with the RTP timing probe of bench/probe),
and client peers (this process and load processes, pinned to the other CPUs; simulators and load as SCHED_IDLE
processes, stand-ins for other machines). The targets:

- direct: a bare aiortc echo peer (stock aiortc), the baseline with no relay and no upstream;
- relay: `relay serve --workers 1` (and, for the scaling ramps, 1 and 2 workers sharing every core with the load);
- pipecat: Pipecat's SmallWebRTCTransport + OpenAIRealtimeLLMService (bench/targets/pipecat_server.py).

Measured, per target: the echo round trip of 60 ms markers (client packet out -> echo packet in), mouth-to-upstream
(marker out -> the append holding it at the upstream), fidelity (median SNR of an echoed sentence), barge-in (the
upstream's speech_started -> the last packet of the interrupted reply at the client), truncation error
(audio_end_ms sent upstream - the item's audio the client received) and a capacity ramp (see bench/capacity.py).
Writes results.json, results.md and the plots into --out. Every loop is bounded; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import capacity  # noqa: E402
from bench.analysis import (  # noqa: E402
    fidelity_db, level_db, marker, onsets, pair_arrivals, percentile, run, speech, tone)
from bench.peers import BenchCall, connect  # noqa: E402
from bench.stack import Stack, Target, other_cpus  # noqa: E402
from relay.webrtc.aiortc_internals import restrict_host_addresses  # noqa: E402
from tests.audio_checks import loud_ms  # noqa: E402
from tests.webrtc_client import Microphone, silence48  # noqa: E402

MARKER_EVERY_S = 1.0
SETTLE_S = 1.5  # ICE, DTLS and the first packets


async def simulator_record(upstream: str, http: aiohttp.ClientSession) -> dict:
    """The simulator's newest session record, with its input audio (24 kHz PCM16)."""
    base = upstream.replace("ws://", "http://").removesuffix("/v1/realtime")
    async with http.get(f"{base}/v1/simulator/sessions") as response:
        sessions = await response.json()
    if not sessions:
        return {}
    session = sessions[-1]["session_id"] or sessions[-1]["connection_id"]
    async with http.get(f"{base}/v1/simulator/sessions/{session}") as response:
        record = await response.json()
    async with http.get(f"{base}/v1/simulator/sessions/{session}/input_audio.wav") as response:
        record["input_audio"] = np.frombuffer((await response.read())[44:], dtype="<i2")
    return record


async def clear_records(upstream: str, http: aiohttp.ClientSession) -> None:
    base = upstream.replace("ws://", "http://").removesuffix("/v1/realtime")
    async with http.delete(f"{base}/v1/simulator/sessions"):
        pass


async def echo_latency(target: Target, upstream: str | None, markers: int, http: aiohttp.ClientSession) -> dict:
    """A sentence (for fidelity), then a marker a second (for timing), echoed back."""
    if upstream:
        await clear_records(upstream, http)
    mic = Microphone()
    call = await connect(target.offer_url, mic, decode=True, http=http)
    await asyncio.sleep(SETTLE_S)
    sentence = speech()
    mic.say(sentence)
    mic.say(silence48(1000))
    for index in range(markers):
        mic.say(silence48(int(MARKER_EVERY_S * 1000) - 60))
        mic.say(marker(), mark=f"m{index}")
    mic.say(silence48(1000))
    await asyncio.sleep(markers * MARKER_EVERY_S + sentence.size / 48000 + 2.5)
    audio, times = call.log.sample_times()
    await call.close()
    sent = [mic.marks[f"m{i}"] for i in range(markers) if f"m{i}" in mic.marks]
    heard = [float(times[i]) for i in onsets(audio, 48000) if i < times.size]
    result = {"round_trip_s": pair_arrivals(sent, heard), "fidelity_db": fidelity_db(audio, sentence),
              "markers_sent": len(sent)}
    if upstream:
        record = await simulator_record(upstream, http)
        arrivals = record.get("append_arrivals", [])
        at_upstream = []
        for sample in onsets(record.get("input_audio", np.zeros(0, "<i2")), 24000):
            needed = (sample + 24) * 2  # a millisecond into the marker
            at_upstream.append(next((t for t, total in arrivals if total >= needed), float("inf")))
        result["mouth_to_upstream_s"] = pair_arrivals(sent, at_upstream)
    return result


async def wait_for_sound(call: BenchCall, after: float, timeout: float) -> float | None:
    """The arrival time of the first loud packet received after `after`, waiting up to `timeout`."""
    deadline = time.monotonic() + timeout
    index = 0
    while time.monotonic() < deadline:
        log = call.log
        while index < len(log.pcm):
            if log.times[index] >= after and level_db(log.pcm[index]) > -40:
                return log.times[index]
            index += 1
        await asyncio.sleep(0.01)
    return None


def carries_sound(pcm: np.ndarray) -> bool:
    """Whether a decoded packet holds sound of its own. Its first 10 ms are left out: Opus delays audio by its
    encoder's look-ahead plus the decoder's overlap (6.5 + 2.5 ms at 48 kHz), so the packet after the last sound
    still starts with that sound's tail."""
    return level_db(pcm[480:]) > -40


def interrupted_reply(call: BenchCall, reply_at: float, gap_s: float = 0.15) -> tuple[np.ndarray, float]:
    """The reply that began at `reply_at`, up to its first silence of `gap_s`: its audio (with the packet after
    the last sound, which holds that sound's codec-delayed tail), and the arrival time of its last packet with
    sound."""
    log = call.log
    first = next(i for i, t in enumerate(log.times) if t >= reply_at)
    last = first
    for index in range(first, len(log.pcm)):
        if carries_sound(log.pcm[index]):
            last = index
        elif log.times[index] - log.times[last] > gap_s:
            break
    return np.concatenate(log.pcm[first : last + 2]), log.times[last]


async def barge_ins(target: Target, upstream: str, count: int, http: aiohttp.ClientSession) -> dict:
    """Interrupt the model `count` times. The user says a tone; the simulator answers with it (after 300 ms of
    prefix padding) 4x faster than real time; a moment into the reply the user talks over it with another tone."""
    await clear_records(upstream, http)
    mic = Microphone()
    call = await connect(target.offer_url, mic, decode=True, http=http)
    await asyncio.sleep(SETTLE_S)
    rng = np.random.default_rng(7)
    replies: list[tuple[float, float]] = []  # (reply heard from, interruption sent at)
    for index in range(count):
        asked = time.monotonic()
        mic.say(silence48(400))
        mic.say(tone(1200))
        mic.say(silence48(700))
        reply_at = await wait_for_sound(call, asked + 1.7, timeout=10)  # after the user's own tone
        if reply_at is None:
            break
        await asyncio.sleep(0.45 + float(rng.uniform(0, 0.5)))  # 300 ms of padding, then into the tone
        mic.say(tone(600, hz=660), mark=f"i{index}")
        mic.say(silence48(800))
        await asyncio.sleep(3.0)  # the interruption is answered too; let that reply end
        replies.append((reply_at, mic.marks.get(f"i{index}", time.monotonic())))
    await asyncio.sleep(1.0)
    record = await simulator_record(upstream, http)
    await call.close()
    started = [t for kind, t in zip(record["sent_types"], record["sent_at"]) if kind == "input_audio_buffer.speech_started"]
    truncates = [e for e in record["received"] if e.get("type") == "conversation.item.truncate"]
    barge_in, truncation_error, missing_truncates = [], [], 0
    pending = iter(truncates)  # one per interruption, in order
    for reply_at, interrupted_at in replies:
        event_at = next((t for t in started if t >= interrupted_at), None)
        if event_at is None:
            continue
        audio, last_packet_at = interrupted_reply(call, reply_at)
        barge_in.append(last_packet_at - event_at)
        loud = loud_ms(audio)
        heard_ms = 300 + (loud[-1] + 5 - loud[0] if loud else 0)  # the padding, then the tone as received
        sent = next(pending, None)
        if sent is None:
            missing_truncates += 1
            continue
        truncation_error.append((sent["audio_end_ms"] - heard_ms) / 1000)
    return {"barge_in_s": barge_in, "truncation_error_s": truncation_error, "interruptions": len(replies),
            "truncates_missing": missing_truncates}


async def scenarios(stack: Stack, args: argparse.Namespace, echo: str, voice: str) -> dict:
    results: dict = {}
    async with aiohttp.ClientSession() as http:
        for kind in ("direct", "relay", "pipecat"):
            target = stack.target(kind, None if kind == "direct" else echo)
            print(f"[{kind}] echo latency and fidelity ...", flush=True)
            results[kind] = await echo_latency(target, None if kind == "direct" else echo, args.markers, http)
            stack.stop(target.process)
            if kind != "direct" and args.barge_ins:
                target = stack.target(kind, voice)
                print(f"[{kind}] barge-in and truncation ...", flush=True)
                results[kind] |= await barge_ins(target, voice, args.barge_ins, http)
                stack.stop(target.process)
    return results


def report(results: dict) -> str:
    direct = results["direct"]
    rows = ["| measure | relay | pipecat | direct aiortc echo |", "| --- | --- | --- | --- |"]

    def cell(values_s: list[float] | None) -> str:
        if not values_s:
            return "—"
        ms = [v * 1000 for v in values_s]
        return f"p50 {percentile(ms, 50):.1f}, p99 {percentile(ms, 99):.1f} ms"

    def added(kind: str) -> str:
        ours, base = results[kind]["round_trip_s"], direct["round_trip_s"]
        if not ours or not base:
            return "—"
        return (f"p50 {(percentile(ours, 50) - percentile(base, 50)) * 1000:+.1f}, "
                f"p99 {(percentile(ours, 99) - percentile(base, 99)) * 1000:+.1f} ms")

    relay, pipecat = results["relay"], results["pipecat"]
    rows += [
        f"| echo round trip (client packet out → echo packet in) | {cell(relay['round_trip_s'])} | "
        f"{cell(pipecat['round_trip_s'])} | {cell(direct['round_trip_s'])} |",
        f"| added latency (round trip − direct) | {added('relay')} | {added('pipecat')} | 0 |",
        f"| mouth-to-upstream | {cell(relay.get('mouth_to_upstream_s'))} | "
        f"{cell(pipecat.get('mouth_to_upstream_s'))} | — |",
        f"| barge-in (upstream speech_started → last interrupted packet at the client) | "
        f"{cell(relay.get('barge_in_s'))} | {cell(pipecat.get('barge_in_s'))} | — |",
        f"| truncation error (audio_end_ms − audio received) | {cell(relay.get('truncation_error_s'))} | "
        f"{cell(pipecat.get('truncation_error_s'))} | — |",
        f"| fidelity (median SNR, 200 ms windows) | {relay['fidelity_db']:.1f} dB | {pipecat['fidelity_db']:.1f} dB"
        f" | {direct['fidelity_db']:.1f} dB |",
    ]
    for kind in ("relay", "pipecat"):
        missing = results[kind].get("truncates_missing")
        if missing:
            rows.append(f"\n{kind}: {missing} of {results[kind]['interruptions']} interruptions sent no truncate.")
    return "\n".join(rows)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markers", type=int, default=30, help="markers per echo run (one a second)")
    parser.add_argument("--barge-ins", type=int, default=10, help="interruptions per target")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--skip-capacity", action="store_true")
    capacity.add_arguments(parser)
    args = parser.parse_args()
    os.sched_setaffinity(0, {int(c) for c in other_cpus().split(",")})
    restrict_host_addresses(["127.0.0.1"])
    args.out.mkdir(parents=True, exist_ok=True)
    stack = Stack(Path(tempfile.mkdtemp(prefix="relay-bench-")))
    print(f"logs in {stack.work}", flush=True)
    try:
        echo = stack.simulator("sim-echo", "--echo-appends")
        voice = stack.simulator("sim-voice", "--first-delta-delay-ms", "100")
        results = await scenarios(stack, args, echo, voice)
        if not args.skip_capacity:
            results["capacity"] = await capacity.ramps(stack, echo, args)
    finally:
        stack.stop()
    text = report(results)
    if "capacity" in results:
        text += "\n\n" + capacity.report(results["capacity"])
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(results, default=float, indent=1))
    from bench.plot import plot_all

    for path in plot_all(results, args.out):
        print(f"plot: {path}")


if __name__ == "__main__":
    run(main())

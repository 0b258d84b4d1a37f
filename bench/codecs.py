"""G.711 against Opus through one relay, in one run: the relay's CPU per call-second and the echo round trips.

    python bench/codecs.py [--calls 8] [--window 10] [--rounds 2] [--markers 20] [--turns 5] [--json out.json]

Processes, all on loopback and each stopped by its PID: two simulators (an echo one, `--echo-appends`, that returns
every appended chunk at once, in the session's own format: a G.711 session gets its bytes back as they came; and a
normal one that answers turns, first delta after 100 ms), two `relay serve --workers 1` processes pinned to CPU 0
(relay A on the echo simulator, relay B on the normal one; no RTP probe in them: it assumes a 48 kHz clock), load
processes and this one on the other CPUs. Unlike bench/capacity.py, simulators and load run at normal priority:
the relay has CPU 0 to itself here, and on a machine shared with other work SCHED_IDLE stand-ins are starved.

- CPU: relay A carries a batch of `--calls` concurrent calls of one codec, full duplex (each caller sends speech
  in a loop, pre-encoded, and the echo simulator sends it all back, as bench/capacity.py loads a relay), then a
  batch of the other codec, taking turns (ABBA...) for `--rounds` rounds in the same relay process, so both meet
  the same process (an unmeasured batch of 2 calls of each codec goes first: a relay's first calls import and build
  what later ones reuse). Over a `--window` after 3 s of warm-up, the relay's utime + stime (/proc/<pid>/stat, its
  process tree) gives CPU ms per call-second; /metrics gives its outbound frames, late frames (> 20 ms after their
  time by the relay's own playout clock) and RTP bytes, and proves each batch's calls were answered with the codec
  asked for (relay_calls_by_codec_total). The idle relay's CPU is measured first (10 ms tick resolution).
- Echo round trip: one call of each codec on relay A: a 60 ms marker a second (bench/analysis.py), from the packet
  holding its onset leaving the client to the packet holding its echo's onset reaching the client. Both ends are
  timed at the client's packets (sent: handed to DTLS/SRTP, so the client's own encoder and aiortc's 48 -> 8 kHz
  resampler FIFO are left out; received: before the client's jitter buffer, bench/peers.py's PacketLog).
- End of speech to first audio back: one call of each codec on relay B, `--turns` spoken turns: the sentence's last
  loud packet leaving the client, to the first loud packet of the reply (the echo of the sentence) reaching it.
  It includes the simulator's server VAD (500 ms of silence ends the turn) and its 100 ms to the first delta: the
  same for both codecs; the difference is the relay's (and the codecs').

Prints a table and the figures as JSON. Every loop is bounded; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.analysis import level_db, marker, onsets, pair_arrivals, percentile, run, speech  # noqa: E402
from bench import peers  # noqa: E402
from bench.peers import BenchCall, PacketLog, PrecodedVoice, encode_opus  # noqa: E402
from bench.stack import (  # noqa: E402
    ROOT, Stack, cpu_seconds, free_port, other_cpus, pinned, process_tree, wait_for_http)
from relay.webrtc.aiortc_internals import restrict_host_addresses  # noqa: E402
from tests.audio_checks import loud_ms, resample  # noqa: E402
from tests.processes import clean_env  # noqa: E402
from tests.webrtc_client import Microphone, OutboundRtp, negotiated_codec, silence48  # noqa: E402

CODECS = ("opus", "pcmu")  # as aiortc names them in an offer: "opus", "PCMU"
CLOCK = {"opus": 48000, "pcmu": 8000}
WARM_S = 3.0
SETTLE_S = 1.5  # ICE, DTLS and the first packets
MARKER_EVERY_S = 1.0
LOUD_DB = -40.0
MAX_LOAD_S = 600.0  # a load process ends by itself after this, whatever happens


# --- client peers --------------------------------------------------------------------------------------------------


class G711Log(PacketLog):
    """PacketLog for a G.711 call: each packet's arrival time and, when decoding, its audio (8 kHz, FFmpeg's own
    decoder)."""

    def __init__(self, decode: bool, codec: str = "pcmu") -> None:
        super().__init__(decode=False)
        self._g711 = None
        if decode:
            self._g711 = av.CodecContext.create({"pcmu": "pcm_mulaw", "pcma": "pcm_alaw"}[codec], "r")
            self._g711.sample_rate, self._g711.layout, self._g711.format = 8000, "mono", "s16"

    def add(self, packet: Any) -> tuple[bool, None]:
        self.times.append(time.monotonic())
        if self._g711 is not None:
            frames = self._g711.decode(av.Packet(packet._data))
            pcm = [f.to_ndarray().ravel() for f in frames]
            self.pcm.append(np.concatenate(pcm).astype("<i2") if pcm else np.zeros(160, "<i2"))
        return False, None


def packet_log(codec: str, decode: bool) -> PacketLog:
    return PacketLog(decode) if codec == "opus" else G711Log(decode, codec)


async def connect(url: str, track: Any, codec: str, *, decode: bool, http: aiohttp.ClientSession) -> BenchCall:
    """bench/peers.py's connect, offering one audio codec only; raises unless the answer chose it."""
    call = await peers.connect(url, track, decode=decode, http=http, codec=codec, log=packet_log(codec, decode))
    chosen = negotiated_codec(call.pc.remoteDescription.sdp)
    if chosen is None or chosen[0] != codec:
        await call.pc.close()
        raise RuntimeError(f"offered {codec} only, the answer chose {chosen}")
    return call


def encode_g711(pcm48: np.ndarray, codec: str = "pcmu") -> list[bytes]:
    """20 ms G.711 packets (160 bytes) of 48 kHz mono audio, as a G.711 peer sends it."""
    pcm8 = resample(pcm48, 48000, 8000)
    encoder = av.CodecContext.create({"pcmu": "pcm_mulaw", "pcma": "pcm_alaw"}[codec], "w")
    encoder.sample_rate, encoder.layout, encoder.format = 8000, "mono", "s16"
    encoder.time_base = fractions.Fraction(1, 8000)
    packets: list[bytes] = []
    for start in range(0, pcm8.size - 160 + 1, 160):
        frame = av.AudioFrame.from_ndarray(pcm8[start : start + 160].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 8000, start
        packets += [bytes(p) for p in encoder.encode(frame)]
    data = b"".join(packets)
    return [data[i : i + 160] for i in range(0, len(data) - 159, 160)]


async def first_wait(condition, timeout: float) -> bool:
    """Whether `condition()` came true within `timeout` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.02)
    return False


async def first_loud_after(log: PacketLog, since: float, index: int, timeout: float) -> float | None:
    """The arrival time of the first loud packet that arrived after `since` (from packet `index` on), waiting up to
    `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        while index < len(log.pcm):
            if log.times[index] > since and level_db(log.pcm[index]) > LOUD_DB:
                return log.times[index]
            index += 1
        await asyncio.sleep(0.01)
    return None


# --- load processes (the CPU part) ---------------------------------------------------------------------------------


async def run_load(url: str, calls: int, codec: str, max_s: float) -> None:
    """A load process: `calls` peers offering `codec` only, sending pre-encoded speech in a loop until standard
    input closes (or `max_s`); received RTP is only counted (bench/capacity.py's count_received_rtp_only)."""
    from bench.capacity import count_received_rtp_only

    restrict_host_addresses(["127.0.0.1"])
    count_received_rtp_only()
    audio = np.concatenate([speech(), np.zeros(24000, "<i2")])
    packets = encode_opus(audio) if codec == "opus" else encode_g711(audio, codec)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http, asyncio.timeout(90):
        peers = await asyncio.gather(*(connect(url, PrecodedVoice(packets), codec, decode=False, http=http)
                                       for _ in range(calls)))
        for peer in peers:
            peer.pc.getTransceivers()[0].receiver.transport.bench_log = peer.log
        while not all(peer.log.times for peer in peers):
            await asyncio.sleep(0.05)
    print("up", flush=True)
    stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    try:
        await asyncio.wait_for(stdin_closed, max_s)
    except TimeoutError:
        pass
    print(json.dumps({"packets": [len(peer.log.times) for peer in peers]}), flush=True)
    await asyncio.gather(*(peer.close() for peer in peers), return_exceptions=True)


class Load:
    """One load process (this file with --load), on the client CPUs."""

    def __init__(self, url: str, calls: int, codec: str, work: Path, name: str) -> None:
        self.calls, self.codec = calls, codec
        self.log = work / f"{name}.log"
        self.process = subprocess.Popen(
            pinned(other_cpus(), [sys.executable, str(Path(__file__).resolve()), "--load", url,
                                  "--calls", str(calls), "--codec", codec, "--max-s", str(MAX_LOAD_S)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log.open("w"), cwd=ROOT, text=True)

    def wait_up(self, timeout: float = 90.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if line.startswith("up"):
                return True
            if not line and self.process.poll() is not None:
                return False
        return False

    def stop(self) -> dict:
        """End its calls and the process (by its PID); what it said last (packets received per call)."""
        said: dict = {}
        if self.process.poll() is None:
            try:
                out, _ = self.process.communicate(timeout=30)  # closes its standard input: it ends its calls
                said = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            except ValueError:
                pass
        return said


# --- the relay and its upstreams -----------------------------------------------------------------------------------------------------


def simulator(stack: Stack, name: str, *flags: str) -> str:
    """A simulator on the client CPUs, at normal priority (on a machine shared with other work a SCHED_IDLE
    upstream is starved, and the relay then plays silence instead of the echo); its ws:// URL."""
    port = free_port()
    command = pinned(other_cpus(), [sys.executable, "-m", "relay", "simulator", "--port", str(port),
                                    "--log-level", "warning", *flags])
    log = stack.work / f"{name}.log"
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log.open("w"),
                               env=clean_env(), cwd=ROOT)
    stack.processes.append(process)
    wait_for_http(f"http://127.0.0.1:{port}/healthz", process, log)
    return f"ws://127.0.0.1:{port}/v1/realtime"


class Relay:
    """`relay serve --workers 1` pinned to CPU 0 (no RTP probe), on `upstream`."""

    def __init__(self, stack: Stack, upstream: str, name: str) -> None:
        env = clean_env(PYTHONPATH=str(ROOT), RELAY_UPSTREAM_URL=f"{upstream}?model=gpt-realtime",
                        RELAY_ICE_ADDRESSES="127.0.0.1", RELAY_CALLS_PER_IP_PER_S="100000")
        command = pinned("0", [sys.executable, "-m", "relay", "serve", "--port", "0", "--workers", "1",
                               "--log-level", "info"])
        self.process, self.log, self.base = stack._start(
            name, command, env, r"relay listening on (http://127\.0\.0\.1:\d+)/")
        self.offer_url = self.base + "/v1/realtime/calls"

    def cpu(self) -> float:
        return cpu_seconds(process_tree(self.process.pid))

    async def metrics(self, http: aiohttp.ClientSession) -> dict[str, float]:
        """The counters this bench reads, from /metrics."""
        async with http.get(f"{self.base}/metrics", headers={"Connection": "close"}) as response:
            text = await response.text()
        wanted = {}
        for line in text.splitlines():
            found = re.match(r'^(relay_outbound_frames_total|relay_outbound_frames_late_total|'
                             r'relay_sent_bytes_total\{path="rtp"\}|'
                             r'relay_calls_by_codec_total\{codec="(\w+)"\}) ([0-9.e+-]+)$', line)
            if found:
                name = f"calls_{found.group(2)}" if found.group(2) else found.group(1).split("{")[0]
                wanted[name] = float(found.group(3))
        return wanted


async def cpu_batch(relay: Relay, stack: Stack, codec: str, calls: int, window: float,
                    http: aiohttp.ClientSession, name: str) -> dict:
    load = Load(relay.offer_url, calls, codec, stack.work, name)
    try:
        before_calls = await relay.metrics(http)
        if not await asyncio.to_thread(load.wait_up):
            return {"codec": codec, "failed": f"calls did not come up (see {load.log})"}
        await asyncio.sleep(WARM_S)
        t0, cpu0, m0 = time.monotonic(), relay.cpu(), await relay.metrics(http)
        await asyncio.sleep(window)
        t1, cpu1, m1 = time.monotonic(), relay.cpu(), await relay.metrics(http)
    finally:
        said = await asyncio.to_thread(load.stop)
    wall = t1 - t0
    frames = m1.get("relay_outbound_frames_total", 0) - m0.get("relay_outbound_frames_total", 0)
    late = m1.get("relay_outbound_frames_late_total", 0) - m0.get("relay_outbound_frames_late_total", 0)
    answered = m1.get(f"calls_{codec}", 0) - before_calls.get(f"calls_{codec}", 0)
    rtp_bytes = m1.get("relay_sent_bytes_total", 0) - m0.get("relay_sent_bytes_total", 0)
    return {
        "codec": codec, "calls": calls, "window_s": wall, "answered_with_codec": answered,
        "cpu_ms_per_call_s": (cpu1 - cpu0) * 1000 / (wall * calls),
        "cpu_share": (cpu1 - cpu0) / wall,
        "frames_per_call_s": frames / (wall * calls) if frames else None,
        "late_fraction": late / frames if frames else None,
        # RTP payload bytes a frame the relay sent: for Opus, how much of it was the echo rather than silence
        "rtp_bytes_per_frame": rtp_bytes / frames if frames else None,
        "packets_received_per_call": said.get("packets"),
    }


# --- latency -------------------------------------------------------------------------------------------------------
# Both ends are timed at the client's packets: when the packet left (handed to DTLS/SRTP: the client's own encoder
# and, for G.711, aiortc's 48 -> 8 kHz resampler FIFO, are left out) and when a packet came in (before the client's
# jitter buffer). What is between is the network (loopback), the relay both ways and the upstream.


def tap_sent(call: BenchCall) -> OutboundRtp:
    """Note every RTP packet the call's audio sender hands to its transport (after the answer is applied)."""
    sender = call.pc.getTransceivers()[0].sender
    tap = OutboundRtp(sender.transport)
    setattr(sender, "_RTCRtpSender__transport", tap)
    return tap


def decoded_sent(tap: OutboundRtp, codec: str) -> tuple[list[np.ndarray], list[float]]:
    """The sent packets' audio (one array a packet, at the codec's clock rate) and when each left."""
    log = packet_log(codec, decode=True)
    for seen in tap.sent:
        log.add(type("Sent", (), {"_data": seen.payload})())
    return log.pcm, [seen.time for seen in tap.sent]


def onset_times(pcm: list[np.ndarray], times: list[float], rate: int) -> list[float]:
    """When the packet holding each onset (a loud run after >= 100 ms of quiet) left or arrived."""
    if not pcm:
        return []
    audio = np.concatenate(pcm)
    per_sample = np.repeat(np.asarray(times[: len(pcm)]), [p.size for p in pcm])
    return [float(per_sample[i]) for i in onsets(audio, rate) if i < per_sample.size]


async def echo_round_trip(relay: Relay, codec: str, markers: int, http: aiohttp.ClientSession) -> dict:
    """Markers echoed by the echo simulator: the packet holding a marker's onset out -> the one holding its echo's in."""
    mic = Microphone()
    call = await connect(relay.offer_url, mic, codec, decode=True, http=http)
    sent = tap_sent(call)
    try:
        await asyncio.sleep(SETTLE_S)
        for index in range(markers):
            mic.say(silence48(int(MARKER_EVERY_S * 1000) - 60))
            mic.say(marker(), mark=f"m{index}")
        mic.say(silence48(1000))
        await asyncio.sleep(markers * MARKER_EVERY_S + 1.5)
    finally:
        await call.close()
    out = onset_times(*decoded_sent(sent, codec), CLOCK[codec])
    back = onset_times(call.log.pcm, call.log.times, CLOCK[codec])
    return {"round_trip_s": pair_arrivals(out, back), "markers_sent": len(out)}


def loud_end(pcm48: np.ndarray) -> int:
    """The sample just after the last loud 5 ms of `pcm48`."""
    loud = loud_ms(pcm48)
    return (loud[-1] + 5) * 48 if loud else pcm48.size


def last_loud_before(pcm: list[np.ndarray], times: list[float], since: float, until: float) -> float | None:
    """When the last loud packet between `since` and `until` left."""
    found = None
    for samples, at in zip(pcm, times):
        if since <= at < until and level_db(samples) > LOUD_DB:
            found = at
    return found


async def end_of_speech_to_reply(relay: Relay, codec: str, turns: int, http: aiohttp.ClientSession) -> dict:
    """Spoken turns on the normal simulator: the sentence's last loud packet out -> the reply's first loud one in."""
    sentence = speech()[: loud_end(speech())]
    mic = Microphone()
    call = await connect(relay.offer_url, mic, codec, decode=True, http=http)
    sent = tap_sent(call)
    replies: list[tuple[float, float]] = []  # (the turn's first frame handed to the sender, first loud packet back)
    missed = 0
    try:
        if not await first_wait(lambda: any(e["type"] == "session.created" for e in call.events), 10):
            raise RuntimeError("no session.created")
        await asyncio.sleep(SETTLE_S)
        for index in range(turns):
            events_before = len(call.events)
            mic.say(silence48(300), mark=f"start{index}")
            mic.say(sentence)
            mic.say(silence48(2500), mark=f"end{index}")
            if not await first_wait(lambda: f"end{index}" in mic.marks, 10):
                raise RuntimeError("the microphone stalled")
            heard = await first_loud_after(call.log, mic.marks[f"end{index}"], 0, 10)
            if heard is None:
                missed += 1
            else:
                replies.append((mic.marks[f"start{index}"], heard))
            stopped = await first_wait(lambda: any(e["type"] == "output_audio_buffer.stopped"
                                                   for e in call.events[events_before:]), 20)
            if not stopped:
                missed += 1
                break
    finally:
        await call.close()
    pcm, times = decoded_sent(sent, codec)
    latencies = []
    for started, heard in replies:
        spoken_until = last_loud_before(pcm, times, started, heard)
        if spoken_until is None:
            missed += 1
        else:
            latencies.append(heard - spoken_until)
    return {"end_of_speech_to_reply_s": latencies, "turns": turns, "missed": missed}


# --- the run -------------------------------------------------------------------------------------------------------


def summary_ms(values_s: list[float]) -> str:
    if not values_s:
        return "—"
    ms = [v * 1000 for v in values_s]
    return f"p50 {percentile(ms, 50):.1f} / p99 {percentile(ms, 99):.1f} ms (n={len(ms)})"


def report(results: dict) -> str:
    rows = [f"relay: 1 worker pinned to CPU 0; {results['calls']} concurrent full-duplex calls a batch, "
            f"{results['window_s']:.0f} s windows, batches taking turns ({' '.join(b['codec'] for b in results['batches'])})"
            f" in one relay process (after an unmeasured warm-up batch of each); idle relay {results['idle_cpu_ms_per_s']:.1f} CPU ms/s",
            "",
            "| codec | relay CPU ms per call-second (each batch) | relay CPU, whole batch | late frames | "
            "echo round trip (marker out → echo in) | end of speech → first reply audio |",
            "| --- | --- | --- | --- | --- | --- |"]
    for codec in CODECS:
        batches = [b for b in results["batches"] if b["codec"] == codec and "cpu_ms_per_call_s" in b]
        per_call = " / ".join(f"{b['cpu_ms_per_call_s']:.1f}" for b in batches) or "failed"
        share = " / ".join(f"{b['cpu_share'] * 100:.0f} %" for b in batches) or "—"
        late = " / ".join("—" if b["late_fraction"] is None else f"{b['late_fraction'] * 100:.2f} %"
                          for b in batches) or "—"
        rows.append(f"| {codec} | {per_call} | {share} | {late} | "
                    f"{summary_ms(results['echo'][codec]['round_trip_s'])} | "
                    f"{summary_ms(results['turns'][codec]['end_of_speech_to_reply_s'])} |")
    means = {codec: [b["cpu_ms_per_call_s"] for b in results["batches"] if b["codec"] == codec
                     and "cpu_ms_per_call_s" in b] for codec in CODECS}
    if all(means.values()):
        opus, pcmu = (float(np.mean(means[c])) for c in CODECS)
        rows += ["", f"mean CPU ms per call-second: opus {opus:.1f}, pcmu {pcmu:.1f} "
                     f"(pcmu = {pcmu / opus * 100:.0f} % of opus)"]
    return "\n".join(rows)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=8, help="concurrent calls per CPU batch")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of CPU measured per batch")
    parser.add_argument("--rounds", type=int, default=2, help="batches of each codec, taking turns")
    parser.add_argument("--markers", type=int, default=20, help="echo markers per codec (one a second)")
    parser.add_argument("--turns", type=int, default=5, help="spoken turns per codec")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.sched_setaffinity(0, {int(c) for c in other_cpus().split(",")})
    restrict_host_addresses(["127.0.0.1"])
    stack = Stack(Path(tempfile.mkdtemp(prefix="relay-bench-codecs-")))
    print(f"logs in {stack.work}", flush=True)
    results: dict[str, Any] = {"calls": args.calls, "window_s": args.window, "batches": [], "echo": {}, "turns": {}}
    try:
        echo = simulator(stack, "sim-echo", "--echo-appends")
        voice = simulator(stack, "sim-voice", "--first-delta-delay-ms", "100")
        relay_a = Relay(stack, echo, "relay-echo")
        relay_b = Relay(stack, voice, "relay-voice")
        async with aiohttp.ClientSession() as http, asyncio.timeout(1800):
            await asyncio.sleep(1.0)
            t0, c0 = time.monotonic(), relay_a.cpu()
            await asyncio.sleep(3.0)
            results["idle_cpu_ms_per_s"] = (relay_a.cpu() - c0) * 1000 / (time.monotonic() - t0)
            for codec in CODECS:  # the first calls of each kind build and import what later ones reuse: unmeasured
                print(f"[warm-up] 2 {codec} calls ...", flush=True)
                await cpu_batch(relay_a, stack, codec, 2, 2.0, http, f"warm-{codec}")
            for round_index in range(args.rounds):
                for codec in CODECS if round_index % 2 == 0 else CODECS[::-1]:
                    print(f"[cpu] {args.calls} {codec} calls, round {round_index + 1} ...", flush=True)
                    batch = await cpu_batch(relay_a, stack, codec, args.calls, args.window, http,
                                            f"load-{codec}-{round_index}")
                    print(f"  {json.dumps(batch)}", flush=True)
                    results["batches"].append(batch)
                    await asyncio.sleep(2.0)  # the calls' ends settle before the next window
            for codec in CODECS:
                print(f"[echo] {codec}: {args.markers} markers ...", flush=True)
                results["echo"][codec] = await echo_round_trip(relay_a, codec, args.markers, http)
                print(f"[turns] {codec}: {args.turns} turns ...", flush=True)
                results["turns"][codec] = await end_of_speech_to_reply(relay_b, codec, args.turns, http)
    finally:
        stack.stop()
    print(report(results))
    print(json.dumps(results, default=float))
    if args.json:
        args.json.write_text(json.dumps(results, default=float, indent=1))


if __name__ == "__main__":
    if "--load" in sys.argv:
        load_parser = argparse.ArgumentParser()
        load_parser.add_argument("--load", required=True)
        load_parser.add_argument("--calls", type=int, required=True)
        load_parser.add_argument("--codec", choices=["opus", "pcmu", "pcma"], required=True)
        load_parser.add_argument("--max-s", type=float, default=MAX_LOAD_S)
        options = load_parser.parse_args()
        asyncio.run(run_load(options.load, options.calls, options.codec, options.max_s))
    else:
        run(main())

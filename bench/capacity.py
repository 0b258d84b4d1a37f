"""Capacity ramp: full-duplex calls with continuous speech, added step by step until frames come out late.

The target runs pinned (one core for one worker); load processes, pinned to the other CPUs, each add --ramp-step
calls that send pre-encoded speech in a loop and only count the packets that come back (so the load generator
stays cheap: see count_received_rtp_only).
After each step has warmed up, one window is measured:

- late frames: from the target's RTP probe (bench/probe): frames that left > 20 ms after their schedule. The
  window is cut in three and the median third counts, so one hiccup of this shared machine (a 100 ms pause of a
  busy neighbour makes every call's next frames late) does not decide a step alone; all three are kept;
- CPU ms per call-second: the target's utime + stime (all its processes) over the window, per call;
- RSS per call: the target's resident memory above what it held before the first call, per call.

The ramp stops at the first step with more than 0.5 % late frames (or at --max-calls); capacity is the last step
that passed. Also measured: the load processes' own CPU, so a saturated load generator is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stack import (  # noqa: E402
    ALL_CPUS, ROOT, Stack, Target, cpu_seconds, machine_cpu_seconds, other_cpus, pinned, process_tree, rss_bytes,
    stand_in)

LATE_LIMIT = 0.005
WARM_S = 3.0
MAX_LOAD_S = 900.0  # a load process ends by itself after this (or its --max-s), whatever happens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ramp-step", type=int, default=4, help="calls added per capacity step")
    parser.add_argument("--max-calls", type=int, default=80, help="the ramp stops here at the latest")
    parser.add_argument("--window", type=float, default=9.0, help="seconds measured per capacity step")


class Load:
    """One load process: `calls` client peers against `url`."""

    def __init__(self, url: str, calls: int, cpus: str | None, work: Path, name: str,
                 max_s: float = MAX_LOAD_S) -> None:
        self.calls = calls
        log = (work / f"{name}.log").open("w")
        self.process = subprocess.Popen(
            stand_in(pinned(cpus, [sys.executable, str(Path(__file__)), "--load", url, "--calls", str(calls),
                                   "--max-s", str(max_s)])),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=ROOT, text=True)

    def wait_up(self, timeout: float = 60.0) -> bool:
        """True once every call of this process has received audio."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.process.stdout.readline()
            if text.startswith("up"):
                return True
            if not text and self.process.poll() is not None:
                return False
        return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # the load process ends its calls and exits
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def snapshot(target: Target, loads: list[Load]) -> dict:
    pids = target.pids()
    load_pids = [pid for load in loads for pid in process_tree(load.process.pid)]
    busy, stolen = machine_cpu_seconds()
    return {"t": time.monotonic(), "cpu": cpu_seconds(pids), "rss": rss_bytes(pids), **target.probe(),
            "load_cpu": cpu_seconds(load_pids), "machine_cpu": busy, "stolen_cpu": stolen}


def ramp(stack: Stack, target: Target, args: argparse.Namespace, load_cpus: str | None) -> dict:
    time.sleep(1.0)
    idle = snapshot(target, [])
    loads: list[Load] = []
    steps = []
    try:
        while sum(load.calls for load in loads) < args.max_calls:
            loads.append(Load(target.offer_url, args.ramp_step, load_cpus, stack.work, f"load-{target.name}-{len(loads)}"))
            if not loads[-1].wait_up():
                steps.append({"calls": sum(load.calls for load in loads), "failed": "calls did not come up"})
                break
            time.sleep(WARM_S)
            marks = [snapshot(target, loads)]
            for _ in range(3):
                time.sleep(args.window / 3)
                marks.append(snapshot(target, loads))
            before, after = marks[0], marks[-1]
            thirds = [(b["late"] - a["late"]) / (b["frames"] - a["frames"]) if b["frames"] > a["frames"] else 1.0
                      for a, b in zip(marks, marks[1:])]
            calls = sum(load.calls for load in loads)
            wall = after["t"] - before["t"]
            frames = after["frames"] - before["frames"]
            step = {
                "calls": calls,
                "frames": frames,
                "late_fraction": sorted(thirds)[1],
                "late_fraction_thirds": thirds,
                "frames_per_call_s": frames / (calls * wall),
                "cpu_share": (after["cpu"] - before["cpu"]) / wall,
                "cpu_ms_per_call_s": (after["cpu"] - before["cpu"]) * 1000 / (wall * calls),
                "rss_mb_per_call": (after["rss"] - idle["rss"]) / calls / 2**20,
                "rss_mb": after["rss"] / 2**20,
                "load_cpu_share": (after["load_cpu"] - before["load_cpu"]) / wall,
                "machine_cpu_share": (after["machine_cpu"] - before["machine_cpu"]) / wall,  # in cores
                "stolen_cpu_share": (after["stolen_cpu"] - before["stolen_cpu"]) / wall,
            }
            steps.append(step)
            print(f"  [{target.name}] {calls} calls: late {step['late_fraction'] * 100:.2f} % "
                  f"({' '.join(f'{t * 100:.2f}' for t in thirds)}), "
                  f"{step['cpu_ms_per_call_s']:.1f} CPU ms per call-second ({step['cpu_share'] * 100:.0f} % CPU), "
                  f"RSS {step['rss_mb_per_call']:.2f} MB per call, load generator {step['load_cpu_share'] * 100:.0f} %"
                  f" CPU, whole machine {step['machine_cpu_share'] * 100:.0f} % of {len(ALL_CPUS) * 100} % "
                  f"(stolen {step['stolen_cpu_share'] * 100:.0f} %), {step['frames_per_call_s']:.1f} frames/s per call",
                  flush=True)
            if step["late_fraction"] > LATE_LIMIT:
                break
    finally:
        for load in loads:
            load.stop()
    passed = [s for s in steps if "late_fraction" in s and s["late_fraction"] <= LATE_LIMIT]
    return {"steps": steps, "capacity": passed[-1]["calls"] if passed else 0,
            "idle_rss_mb": idle["rss"] / 2**20, "reached_max": bool(steps) and steps[-1] in passed}


# (label, target, workers, CPU share per worker process). Every target is pinned to CPU 0, the load to the others.
# Scaling on a 2-core machine whose second core the load generator needs: 1 and then 2 workers, each worker held
# to half a core (cgroup CPU quota), so 2 workers have twice the CPU of 1, as N workers have N cores in production.
RAMPS = (
    ("relay, 1 worker, 1 core", "relay", 1, None),
    ("pipecat, 1 core", "pipecat", 1, None),
    ("relay, 1 worker, half a core", "relay", 1, 0.5),
    ("relay, 2 workers, half a core each", "relay", 2, 0.5),
)
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")  # cgroup v1's cpu controller (this machine's); v2 would need cpu.max


def cap_cpu(pids: list[int], share: float) -> list[Path]:
    """Each process in its own cgroup, allowed `share` of a core. The period is 10 ms, so a process that has used
    its share waits at most ~5 ms (a 100 ms period would stall it for 50 ms: every frame late)."""
    groups = []
    for pid in pids:
        group = CGROUP_CPU / f"relay-bench-{pid}"
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("10000")
        (group / "cpu.cfs_quota_us").write_text(str(int(10000 * share)))
        (group / "cgroup.procs").write_text(str(pid))
        groups.append(group)
    return groups


def remove_groups(groups: list[Path]) -> None:
    for group in groups:
        try:
            group.rmdir()  # empty once its process has exited
        except OSError as exc:
            print(f"  could not remove {group}: {exc}", flush=True)


async def ramps(stack: Stack, echo: str, args: argparse.Namespace) -> dict:
    out = {}
    for name, kind, workers, share in RAMPS:
        if share is not None and not os.access(CGROUP_CPU, os.W_OK):
            print(f"[{name}] skipped: needs a writable cgroup v1 cpu controller at {CGROUP_CPU} (root)", flush=True)
            continue
        print(f"[{name}] capacity ramp ...", flush=True)
        target = stack.target(kind, echo, cpus="0", workers=workers)
        pids = target.pids()
        groups = cap_cpu(pids[1:] if workers > 1 else pids[:1], share) if share is not None else []
        try:
            out[name] = await asyncio.to_thread(ramp, stack, target, args, other_cpus())
            out[name]["workers"], out[name]["cpu_share_per_worker"] = workers, share
        finally:
            stack.stop(target.process)
            remove_groups(groups)
    return out


def report(results: dict) -> str:
    rows = ["| capacity (≤ 0.5 % of frames > 20 ms late) | calls | CPU ms per call-second | RSS per call | "
            "load generator CPU | whole machine |", "| --- | --- | --- | --- | --- | --- |"]
    for name, ramp_result in results.items():
        passed = [s for s in ramp_result["steps"] if s.get("calls") == ramp_result["capacity"]]
        step = passed[0] if passed else None
        more = " (the ramp's limit)" if ramp_result["reached_max"] else ""
        if step:
            rows.append(f"| {name} | {ramp_result['capacity']}{more} | {step['cpu_ms_per_call_s']:.1f} | "
                        f"{step['rss_mb_per_call']:.2f} MB | {step['load_cpu_share'] * 100:.0f} % | "
                        f"{step['machine_cpu_share'] * 100:.0f} % of {len(ALL_CPUS) * 100} % |")
        else:
            rows.append(f"| {name} | 0 | — | — | — | — |")
    return "\n".join(rows)


def count_received_rtp_only() -> None:
    """Load processes only: after decryption, received RTP is counted and dropped, not parsed and routed to a
    receiver (aiortc's Python path for it costs the load generator about as much CPU as the relay spends on a
    packet). RTCP and DTLS keep aiortc's own handling."""
    from aiortc.rtcdtlstransport import RTCDtlsTransport

    async def _handle_rtp_data(self, data: bytes, arrival_time_ms: int) -> None:
        log = getattr(self, "bench_log", None)
        if log is not None:
            log.times.append(time.monotonic())

    RTCDtlsTransport._handle_rtp_data = _handle_rtp_data


async def run_load(url: str, calls: int, max_s: float = MAX_LOAD_S) -> None:
    """A load process: `calls` peers sending pre-encoded speech until standard input closes."""
    import aiohttp
    import numpy as np

    from bench.analysis import speech
    from bench.peers import PrecodedVoice, connect, encode_opus
    from relay.webrtc.aiortc_internals import restrict_host_addresses

    restrict_host_addresses(["127.0.0.1"])
    count_received_rtp_only()
    packets = encode_opus(np.concatenate([speech(), np.zeros(24000, "<i2")]))
    # A connection per offer, as separate clients have: with several relay workers, the kernel spreads
    # connections (SO_REUSEPORT), so one kept-alive connection would put every call on one worker.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http, asyncio.timeout(90):
        peers = await asyncio.gather(*(connect(url, PrecodedVoice(packets), decode=False, http=http)
                                       for _ in range(calls)))
        for peer in peers:
            peer.pc.getTransceivers()[0].receiver.transport.bench_log = peer.log
        while not all(peer.log.times for peer in peers):
            await asyncio.sleep(0.05)
    async with aiohttp.ClientSession():
        print("up", flush=True)
        stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        try:
            await asyncio.wait_for(stdin_closed, max_s)
        except TimeoutError:
            pass
        print(json.dumps({"packets": [len(peer.log.times) for peer in peers]}), flush=True)
        await asyncio.gather(*(peer.close() for peer in peers), return_exceptions=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", required=True)
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--max-s", type=float, default=MAX_LOAD_S)
    options = parser.parse_args()
    asyncio.run(run_load(options.load, options.calls, options.max_s))

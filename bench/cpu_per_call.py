"""The relay's CPU cost per call, in separate processes on loopback.

    python bench/cpu_per_call.py [--calls 10] [--seconds 20] [--client-processes 2]

Processes: the simulator in echo mode (every appended chunk comes straight back as audio), `relay serve` pinned to
CPU 0 (taskset), and client processes pinned to the other CPUs, each running aiortc peers that send speech
continuously (a real call's full duplex). After the calls are up and warm, the relay's CPU time (utime + stime from
/proc) is read over a window. Printed: CPU ms per call-second, and the share of one core.
Every loop is bounded: the clients end their calls and exit after --seconds plus warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import clean_env, stop_all, wait_for_line  # noqa: E402
TICKS = os.sysconf("SC_CLK_TCK")
WARMUP_S = 4.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def pinned(cpus: str, command: list[str]) -> list[str]:
    return (["taskset", "-c", cpus] if shutil.which("taskset") else []) + command


async def run_clients(url: str, calls: int, seconds: float) -> dict:
    """One client process: `calls` peers talking continuously for WARMUP_S + seconds."""
    import numpy as np

    from relay.webrtc.aiortc_internals import restrict_host_addresses
    from tests.webrtc_client import call_relay, load_pcm48

    restrict_host_addresses(["127.0.0.1"])
    speech = load_pcm48("speech_hello_48k.wav")
    clips = np.concatenate([speech, np.zeros(24000, "<i2")] * int((WARMUP_S + seconds) / 2.4 + 2))
    clients = []
    for _ in range(calls):
        client = await call_relay(url)
        client.mic.say(clips)
        clients.append(client)
    await asyncio.sleep(WARMUP_S + seconds)
    received = [len(c.audio) for c in clients]
    for client in clients:
        await client.close()
    return {"calls": calls, "frames_received": received}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)  # the relay is pinned to one core
    parser.add_argument("--client", help=argparse.SUPPRESS)  # internal: run as a client process for this URL
    args = parser.parse_args()
    if args.client:
        result = asyncio.run(run_clients(args.client, args.calls, args.seconds))
        print(json.dumps(result))
        return

    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"relay-bench-{os.getpid()}"
    logs.mkdir(exist_ok=True)
    sim_port, relay_port = free_port(), free_port()
    env = clean_env()
    others = ",".join(str(c) for c in range(1, os.cpu_count() or 2)) or "0"
    processes = []
    try:
        processes.append(subprocess.Popen(
            pinned(others, [sys.executable, "-m", "relay", "simulator", "--port", str(sim_port), "--echo-appends",
                            "--log-level", "warning"]),
            stderr=(logs / "sim.log").open("w"), env=env, cwd=ROOT))
        time.sleep(1.5)
        relay_env = env | {"RELAY_UPSTREAM_URL": f"ws://127.0.0.1:{sim_port}/v1/realtime?model=gpt-realtime",
                           "RELAY_ICE_ADDRESSES": "127.0.0.1"}
        relay = subprocess.Popen(
            pinned("0", [sys.executable, "-m", "relay", "serve", "--port", str(relay_port), "--workers", "1"]),
            stderr=(logs / "relay.log").open("w"), env=relay_env, cwd=ROOT)
        processes.append(relay)
        wait_for_line(logs / "relay.log", "relay listening", relay)
        per_process = [args.calls // args.client_processes + (i < args.calls % args.client_processes)
                       for i in range(args.client_processes)]
        clients = [subprocess.Popen(
            pinned(others, [sys.executable, __file__, "--client", f"http://127.0.0.1:{relay_port}",
                            "--calls", str(n), "--seconds", str(args.seconds)]),
            stdout=subprocess.PIPE, stderr=(logs / f"client{i}.log").open("w"), cwd=ROOT)
            for i, n in enumerate(per_process) if n]
        processes += clients
        time.sleep(WARMUP_S + 2.0)  # calls set up and warm
        cpu_before, wall_before = cpu_seconds(relay.pid), time.monotonic()
        window = args.seconds - 3.0
        time.sleep(window)
        cpu_used, wall = cpu_seconds(relay.pid) - cpu_before, time.monotonic() - wall_before
        outcomes = [json.loads(c.communicate(timeout=120)[0] or "{}") for c in clients]
        started = len(re.findall(r"call \S+ started", (logs / "relay.log").read_text()))
        print(f"calls: {args.calls} requested, {started} started by the relay")
        print(f"relay CPU: {cpu_used / wall * 100:.1f} % of one core over {wall:.1f} s")
        print(f"relay CPU per call: {cpu_used * 1000 / (wall * args.calls):.1f} ms per call-second")
        frames = [f for o in outcomes for f in o.get("frames_received", [])]
        expected = (WARMUP_S + args.seconds) * 50
        print(f"frames received per call: min {min(frames)}, max {max(frames)} (about {expected:.0f} expected)")
    finally:
        stop_all(processes, timeout=15)


if __name__ == "__main__":
    main()

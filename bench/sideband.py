"""What an attached backend (the control socket, `GET /v1/realtime?call_id=`) costs: the delay it adds on a turn,
and the relay's CPU per call-second with and without backends.

    python bench/sideband.py [--calls 20] [--load-calls 8] [--window-s 12] [--json results.json]

Loopback only: the simulator in this process, `relay serve` (one worker) as a process, aiortc peers and the official
`openai` SDK's `client.realtime.connect(call_id=…)` here.
- Delay: `--calls` calls one after the other, each with a backend attached; the peer speaks one turn. From the
  simulator sending `input_audio_buffer.speech_stopped` (the relay has it a loopback hop later) to the backend
  receiving it, and, for comparison, to the peer's data channel receiving it (monotonic clock, one machine).
- CPU: `--load-calls` calls at once, each peer speaking a turn every 3 s, for `--window-s`; the relay's utime +
  stime over the window per call-second, first without backends, then with one backend on each call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.analysis import percentile, run, summary  # noqa: E402
from bench.stack import cpu_seconds, process_tree  # noqa: E402
from relay.simulator.config import SimConfig  # noqa: E402
from relay.simulator.server import start_simulator  # noqa: E402
from tests.integration.test_openai_sdk import HELLO48, KEY, sdk  # noqa: E402
from tests.integration.test_sideband import Backend, a_call  # noqa: E402
from tests.processes import clean_env, relay_logged  # noqa: E402

STOPPED = "input_audio_buffer.speech_stopped"
TURN_EVERY_S = 3.0


async def one_turn(base: str, simulator: Any) -> tuple[float, float]:
    """(speech_stopped sent → at the backend, → at the peer), seconds."""
    call = await a_call(base)
    try:
        async with sdk(base, KEY) as client, client.realtime.connect(call_id=call.call_id) as connection:
            watcher = Backend(connection)
            call.mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)
            stopped = await call.wait_for(STOPPED, timeout=20)
            async with asyncio.timeout(10):
                while watcher.first(STOPPED) is None:
                    await asyncio.sleep(0.005)
            record = simulator.recorder.sessions[-1]
            sent = record.sent_at[record.sent_types.index(STOPPED)]
            peer_at = call.event_times[call.events.index(stopped)]
            watcher.reader.cancel()
            return watcher.first(STOPPED) - sent, peer_at - sent
    finally:
        await call.close()


async def cpu_per_call_second(relay: Any, calls: int, window_s: float, backends: bool) -> float:
    """The relay's CPU ms per call-second while `calls` peers take turns (each with a backend, if `backends`)."""
    peers = [await a_call(relay.base) for _ in range(calls)]
    clients, connections, watchers = [], [], []
    try:
        if backends:
            for peer in peers:
                client = sdk(relay.base, KEY)
                connection = await client.realtime.connect(call_id=peer.call_id).enter()
                clients.append(client), connections.append(connection), watchers.append(Backend(connection))
        pids = process_tree(relay.process.pid)
        started, cpu_before = time.monotonic(), cpu_seconds(pids)
        while time.monotonic() - started < window_s:
            for peer in peers:
                peer.mic.say_between(HELLO48, lead_ms=100, tail_ms=600)
            await asyncio.sleep(TURN_EVERY_S)
        elapsed, cpu = time.monotonic() - started, cpu_seconds(pids) - cpu_before
        if backends:
            assert all(w.first(STOPPED) for w in watchers), "a backend saw no turn"
        return cpu * 1000 / (elapsed * calls)
    finally:
        for watcher, connection, client in zip(watchers, connections, clients):
            watcher.reader.cancel()
            await connection.close()
            await client.close()
        for peer in peers:
            await peer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--load-calls", type=int, default=8)
    parser.add_argument("--window-s", type=float, default=12.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    simulator = await start_simulator(SimConfig(), "127.0.0.1", 0)
    env = clean_env(RELAY_UPSTREAM_URL=simulator.url + "?model=gpt-realtime", RELAY_ICE_ADDRESSES="127.0.0.1",
                    RELAY_API_KEYS=KEY, RELAY_CALLS_PER_IP_PER_S="1000", RELAY_WORKERS="1")
    try:
        async with relay_logged(env=env, timeout=60) as relay:
            delays = [await asyncio.wait_for(one_turn(relay.base, simulator), 60) for _ in range(args.calls)]
            without = await cpu_per_call_second(relay, args.load_calls, args.window_s, backends=False)
            with_backends = await cpu_per_call_second(relay, args.load_calls, args.window_s, backends=True)
    finally:
        await simulator.stop()
    backend, peer = [d[0] for d in delays], [d[1] for d in delays]
    figures = {"calls": len(delays), "backend_p50_ms": percentile([d * 1000 for d in backend], 50),
               "backend_p99_ms": percentile([d * 1000 for d in backend], 99),
               "peer_p50_ms": percentile([d * 1000 for d in peer], 50),
               "peer_p99_ms": percentile([d * 1000 for d in peer], 99),
               "cpu_ms_per_call_s_without": round(without, 2), "cpu_ms_per_call_s_with": round(with_backends, 2),
               "load_calls": args.load_calls}
    print(f"speech_stopped sent by the upstream -> at the backend: {summary(backend)}")
    print(f"                                    -> at the peer's data channel: {summary(peer)}")
    print(f"relay CPU per call-second, {args.load_calls} calls: {without:.1f} ms without backends, "
          f"{with_backends:.1f} ms with one on each call")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    run(main())

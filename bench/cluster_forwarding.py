"""The latency a relay adds by forwarding a request about a call to the relay that owns it (cluster mode).

    python bench/cluster_forwarding.py [--requests 300] [--workers 1] [--json results.json]

Set-up (tests/cluster/stack.py, without nginx): Redis from Debian's redis-server, one simulator, three relays in
cluster mode (node ids 0, 1, 2) on 127.0.0.11, .12 and .13. One live call is made at node 0 (an aiortc client; a
typed message puts an entry in its transcript). Then, in the same run, N requests each way, interleaved:

- direct:    GET /v1/realtime/calls/{id}/transcript at node 0, the owner;
- forwarded: the same request at node 1 and at node 2, which forward it to node 0 (signed with
  RELAY_CLUSTER_SECRET, the owner found in the Redis registry);

and, after the call is hung up, the same for POST .../hangup of the ended call (a small answer: 404 from the owner).
Each client keeps one HTTP connection per relay (keep-alive), as a backend would; with --workers 1 (the default) a
request to the owner is never passed between workers, so the difference is the forwarding alone. Printed: a table
of p50/p90/p99/max per way and the added latency (forwarded - direct, p50 and p99), then the same as JSON.

Bounded (--timeout, default 300 s) and self-stopping: every process it starts is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from tests.cluster.stack import KEY, Cluster  # noqa: E402
from tests.webrtc_client import call_relay  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values_ms: list[float]) -> dict[str, float]:
    return {"n": len(values_ms), "p50_ms": percentile(values_ms, 50), "p90_ms": percentile(values_ms, 90),
            "p99_ms": percentile(values_ms, 99), "mean_ms": statistics.fmean(values_ms) if values_ms else float("nan"),
            "max_ms": max(values_ms, default=float("nan"))}


async def timed(http: aiohttp.ClientSession, method: str, url: str, expect: int) -> float:
    started = time.perf_counter()
    async with http.request(method, url, headers=AUTH) as response:
        await response.read()
        elapsed = time.perf_counter() - started
        if response.status != expect:
            raise RuntimeError(f"{method} {url}: {response.status} (expected {expect}): {await response.text()}")
    return elapsed * 1000


async def measure(sessions: dict[str, aiohttp.ClientSession], bases: dict[str, str], method: str, path: str,
                  expect: int, count: int, warmup: int) -> dict[str, list[float]]:
    """`count` requests per way, interleaved in a rotating order (no way always goes first), after `warmup`."""
    ways = list(bases)
    results: dict[str, list[float]] = {way: [] for way in ways}
    for round_ in range(warmup + count):
        order = ways[round_ % len(ways):] + ways[:round_ % len(ways)]
        for way in order:
            elapsed = await timed(sessions[way], method, bases[way] + path, expect)
            if round_ >= warmup:
                results[way].append(elapsed)
    return results


def metric_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "forward" in line and not line.startswith("#")]


async def run(args: argparse.Namespace, root: Path) -> dict:
    cluster = Cluster(root, nodes=3, workers=args.workers, front=False,
                      calls_per_key_per_s="1000")
    starting = asyncio.ensure_future(asyncio.to_thread(cluster.start))
    try:
        await asyncio.shield(starting)
        owner, *others = cluster.nodes
        call = await call_relay(owner.base, headers=AUTH)
        try:
            await call.wait_for("session.created")
            call.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Measure me."}]}})
            await call.wait_for("conversation.item.done")
            bases = {"direct (owner, node 0)": owner.base,
                     **{f"forwarded (node {n.index} -> 0)": n.base for n in others}}
            sessions = {way: aiohttp.ClientSession() for way in bases}
            try:
                transcript = await measure(sessions, bases, "GET", f"{call.location}/transcript", 200,
                                           args.requests, args.warmup)
                async with aiohttp.ClientSession() as http:
                    await timed(http, "POST", f"{owner.base}{call.location}/hangup", 200)
                hangup = await measure(sessions, bases, "POST", f"{call.location}/hangup", 404,
                                       args.requests, args.warmup)
                metrics = {}
                for node in cluster.nodes:
                    async with sessions[next(iter(bases))].get(node.base + "/metrics") as response:
                        metrics[node.index] = metric_lines(await response.text())
            finally:
                for session in sessions.values():
                    await session.close()
        finally:
            await call.close()
    finally:
        with contextlib.suppress(BaseException):
            await starting  # a start cut short by --timeout ends first (its own waits are bounded), then all stop
        await asyncio.to_thread(cluster.stop)
    return {"transcript": transcript, "hangup_ended": hangup, "metrics": metrics}


def report(raw: dict, args: argparse.Namespace) -> dict:
    result = {"requests": args.requests, "warmup": args.warmup, "workers_per_relay": args.workers,
              "cpus": len(os.sched_getaffinity(0)), "kinds": {}}
    lines = [f"{'request':<34}{'way':<28}{'n':>5}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}  (ms)"]
    for kind, label in (("transcript", "GET transcript (live call, 200)"),
                        ("hangup_ended", "POST hangup (ended call, 404)")):
        ways = {way: summary(values) for way, values in raw[kind].items()}
        direct_name = next(iter(ways))
        direct = ways[direct_name]
        forwarded_all = [v for way, values in raw[kind].items() if way != direct_name for v in values]
        ways["forwarded (both nodes)"] = summary(forwarded_all)
        added = {"p50_ms": ways["forwarded (both nodes)"]["p50_ms"] - direct["p50_ms"],
                 "p99_ms": ways["forwarded (both nodes)"]["p99_ms"] - direct["p99_ms"]}
        result["kinds"][kind] = {"ways": ways, "added_by_forwarding": added}
        for way, s in ways.items():
            lines.append(f"{label:<34}{way:<28}{s['n']:>5}{s['p50_ms']:>9.2f}{s['p90_ms']:>9.2f}{s['p99_ms']:>9.2f}"
                         f"{s['max_ms']:>9.2f}")
            label = ""
        lines.append(f"{'':<34}{'added by forwarding':<28}{'':>5}{added['p50_ms']:>9.2f}{'':>9}"
                     f"{added['p99_ms']:>9.2f}")
    result["forwarding_metrics"] = raw["metrics"]
    print("\n".join(lines))
    print(json.dumps(result, indent=1))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per way and kind (default 300)")
    parser.add_argument("--warmup", type=int, default=20, help="requests per way first, not counted")
    parser.add_argument("--workers", type=int, default=1, help="workers per relay (default 1: no worker hop)")
    parser.add_argument("--timeout", type=float, default=300, help="give up after this long (s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    async def bounded() -> dict:
        with tempfile.TemporaryDirectory(prefix="cluster-forwarding-") as root:
            async with asyncio.timeout(args.timeout):
                return await run(args, Path(root))

    result = report(asyncio.run(bounded()), args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

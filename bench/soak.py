"""Soak: N full-duplex calls held for a long time against one `relay serve` process, watched for leaks.

The relay (one worker, pinned like the capacity ramp's) talks to a simulator process; a load process keeps `--calls`
peers sending pre-encoded speech in a loop (bench/capacity.py's load). Every `--every` seconds the relay is
sampled: resident memory and open file descriptors (/proc), asyncio tasks, event-loop lag and calls (its
/metrics and /readyz). After the warm-up (the first fifth of the run, at least 70 s: bounded buffers, such as each
call's last minute of frame timings, fill until then), the run passes when:

- resident memory grew less than --rss-limit-mb (10 MB) from the end of the warm-up to the end;
- tasks and file descriptors did not grow (their lowest value over the last minute is at most their value at the
  end of the warm-up: a turn's short-lived tasks come and go);
- the event loop's lag p99 over the run is under 20 ms (a timing target: here, not in the test suite);
- no call was lost: the relay carried every call at every sample, ended none, and every peer still received audio
  in the last window.

`python bench/soak.py --minutes 30` writes results.json and a summary into --out (default bench-results/soak); the
test suite runs a 2-minute version (tests/integration/test_soak.py) with the timing criterion left out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.capacity import Load  # noqa: E402
from bench.stack import ROOT, Stack, other_cpus, rss_bytes  # noqa: E402

# Bounded buffers fill during the first minute (e.g. each call's last 3000 frame timings): RSS rises until then.
WARM_UP_S = 70.0
LAG_BUCKET = re.compile(r'relay_event_loop_lag_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)')


def scrape(base: str) -> dict:
    """The relay's own view: tasks, lag histogram buckets (cumulative), calls ended, calls carried."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        text = response.read().decode()
    with urllib.request.urlopen(f"{base}/readyz", timeout=5) as response:
        ready = json.loads(response.read())
    value = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(relay_\w+(?:\{[^}]*\})?) ([0-9.e+]+)$", text, re.M)}
    return {
        "tasks": int(value.get("relay_asyncio_tasks", -1)),
        "ended": sum(v for k, v in value.items() if k.startswith("relay_calls_ended_total")),
        "calls": ready.get("calls"),
        "lag_buckets": {float(le) if le != "+Inf" else float("inf"): float(n) for le, n in LAG_BUCKET.findall(text)},
    }


def open_fds(pids: list[int]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids if os.path.exists(f"/proc/{pid}/fd"))


def lag_p99_ms(first: dict[float, float], last: dict[float, float]) -> float:
    """The lag p99 over the run, from the difference of two cumulative histograms: the smallest bucket bound that
    holds 99 % of the samples (an upper bound on the p99)."""
    counts = {le: last[le] - first.get(le, 0.0) for le in last}
    total = counts.get(float("inf"), 0.0)
    if total <= 0:
        return float("nan")
    for le in sorted(counts):
        if counts[le] >= 0.99 * total:
            return le * 1000
    return float("inf")


def soak(calls: int, seconds: float, every: float, work: Path, rss_limit_mb: float) -> dict:
    stack = Stack(work)
    try:
        upstream = stack.simulator("simulator")
        target = stack.target("relay", upstream)
        base = target.offer_url.rsplit("/v1/", 1)[0]
        load = Load(target.offer_url, calls, other_cpus(), work, "load", max_s=seconds + 300)
        if not load.wait_up(timeout=120):
            return {"passed": False, "failed": "the calls did not come up"}
        samples = []
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            pids = target.pids()
            samples.append({"t": round(time.monotonic() - started, 1), "rss_mb": round(rss_bytes(pids) / 2**20, 2),
                            "fds": open_fds(pids), **scrape(base)})
            time.sleep(every)
        load.stop()
        received = json.loads(load.process.stdout.read().strip().splitlines()[-1])["packets"] \
            if load.process.stdout else []
    finally:
        stack.stop()
    return judge(samples, calls, seconds, every, rss_limit_mb, received)


def judge(samples: list[dict], calls: int, seconds: float, every: float, rss_limit_mb: float,
          received: list[int]) -> dict:
    warm_s = max(WARM_UP_S, seconds / 5)
    warm = next((i for i, s in enumerate(samples) if s["t"] >= warm_s), 0)
    at_warm, last = samples[warm], samples[-1]
    # Tasks and descriptors come and go with each turn: a leak raises their floor, so the last minute's lowest
    # value is compared (a single sample may catch a turn's short-lived tasks).
    tail = samples[max(warm + 1, len(samples) - int(60 / every)):] or samples[-1:]  # after the warm-up
    floor = {key: min(s[key] for s in tail) for key in ("tasks", "fds")}
    lag = lag_p99_ms(samples[0]["lag_buckets"], last["lag_buckets"])
    expected_packets = seconds * 50 * 0.9  # 50 packets a second each, with slack for the start and the end
    checks = {
        "rss_growth_mb": (round(last["rss_mb"] - at_warm["rss_mb"], 2), last["rss_mb"] - at_warm["rss_mb"] < rss_limit_mb),
        "tasks": ((at_warm["tasks"], max(s["tasks"] for s in samples[warm:]), floor["tasks"]),
                  floor["tasks"] <= at_warm["tasks"]),
        "fds": ((at_warm["fds"], max(s["fds"] for s in samples[warm:]), floor["fds"]), floor["fds"] <= at_warm["fds"]),
        "lag_p99_ms": (lag, lag <= 20),  # a bucket bound: 20 means the p99 is within (10, 20] ms
        "calls_lost": (sum(1 for s in samples if s["calls"] != calls) + int(last["ended"] - samples[0]["ended"]),
                       all(s["calls"] == calls for s in samples) and last["ended"] == samples[0]["ended"]),
        "peers_heard_to_the_end": (min(received) if received else 0,
                                   len(received) == calls and min(received) >= expected_packets),
    }
    return {"calls": calls, "seconds": seconds, "every_s": every, "warm_up_s": at_warm["t"],
            "checks": {name: {"value": value, "passed": ok} for name, (value, ok) in checks.items()},
            "passed": all(ok for _, ok in checks.values()),
            "samples": [{k: v for k, v in s.items() if k != "lag_buckets"} for s in samples]}


def summary(result: dict) -> str:
    if "checks" not in result:
        return f"soak failed: {result.get('failed')}"
    lines = [f"soak: {result['calls']} calls for {result['seconds'] / 60:g} min (warm-up {result['warm_up_s']:g} s)"]
    for name, check in result["checks"].items():
        lines.append(f"  {name}: {check['value']} {'ok' if check['passed'] else 'FAILED'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--rss-limit-mb", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "soak")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    result = soak(args.calls, args.minutes * 60, args.every, work, args.rss_limit_mb)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(summary(result))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()

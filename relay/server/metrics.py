"""Prometheus metrics (prometheus-client), served at `GET /metrics`: the endpoint, the process-wide gauges (draining,
event-loop lag, tasks) and the monitor that once a second adds the live calls' counts to the metrics.

The calls' own metrics (started, ended, turn latency, bytes, frames…) and how a call's counts reach them are
relay/call/meter.py's.

Workers: `relay serve --workers N` runs N processes and a scrape reaches any one of them, so the master points
PROMETHEUS_MULTIPROC_DIR at a fresh directory before starting them (prometheus-client's multiprocess mode: each
process writes its values to memory-mapped files there) and every worker's /metrics adds up all the files. The
master removes a dead worker's live gauges (mark_process_dead); its counters stay counted.

No label carries a call id, a client address or anything a client sends: every label has a small fixed set of
values, and nothing here is a secret.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Gauge, Histogram
from prometheus_client import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LAG_INTERVAL_S = 0.25  # how often the event loop's lag is sampled
FLUSH_EVERY = 4  # lag samples between two additions of the calls' counts (once a second)

DRAINING = Gauge("relay_draining", "1 while the relay drains on SIGTERM (new calls refused)",
                 multiprocess_mode="livemax")
LOOP_LAG = Histogram("relay_event_loop_lag_seconds", f"How late the event loop woke from a {LAG_INTERVAL_S} s sleep",
                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
TASKS = Gauge("relay_asyncio_tasks", "asyncio tasks alive in the process (a count that only grows is a leak)",
              multiprocess_mode="livesum")


def set_draining(draining: bool) -> None:
    DRAINING.set(1 if draining else 0)


def registry() -> Any:
    """What /metrics shows: this process's metrics, or with workers every worker's, added up."""
    if os.environ.get(MULTIPROC_ENV):
        collected = CollectorRegistry()
        MultiProcessCollector(collected)
        return collected
    return REGISTRY


async def metrics_handler(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(generate_latest, registry())  # reads the workers' files: off the event loop
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})


async def monitor(calls: dict[str, Any]) -> None:
    """Sample the event loop's lag (how late a sleep wakes: time the loop spent on something else), and once a
    second add the live calls' counts to the metrics. Runs until cancelled (the app's cleanup)."""
    ticks = 0
    while True:
        started = time.monotonic()
        await asyncio.sleep(LAG_INTERVAL_S)
        LOOP_LAG.observe(max(0.0, time.monotonic() - started - LAG_INTERVAL_S))
        ticks += 1
        if ticks % FLUSH_EVERY == 0:
            for call in list(calls.values()):
                call.flush_metrics()
            TASKS.set(len(asyncio.all_tasks()))


def add_metrics(app: web.Application, serve_route: bool, calls_key: web.AppKey) -> None:
    """The /metrics route (unless turned off) and the monitor task, owned by the app."""
    if serve_route:
        app.router.add_get("/metrics", metrics_handler)

    async def run_monitor(app: web.Application):
        task = asyncio.ensure_future(monitor(app[calls_key]))
        task.set_name("metrics-monitor")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    app.cleanup_ctx.append(run_monitor)

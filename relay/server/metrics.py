"""Prometheus metrics (prometheus-client), served at `GET /metrics`.

The audio path never touches a metric: a call counts in plain ints (its core's stats, its track, its byte counts),
and once a second, and when it ends, what grew is added to the process's counters (CallMeter). Coarse events
(a call starting, ending) update metrics directly.

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
from typing import Any, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LAG_INTERVAL_S = 0.25  # how often the event loop's lag is sampled
FLUSH_EVERY = 4  # lag samples between two additions of the calls' counts (once a second)

CALLS_ACTIVE = Gauge("relay_calls_active", "Calls in progress (answered, not yet ended)",
                     multiprocess_mode="livesum")
DRAINING = Gauge("relay_draining", "1 while the relay drains on SIGTERM (new calls refused)",
                 multiprocess_mode="livemax")
CALLS_STARTED = Counter("relay_calls_started", "Calls answered (201)")
CALLS_ENDED = Counter("relay_calls_ended", "Answered calls that ended, by why", ["reason"])
SETUPS_FAILED = Counter("relay_call_setups_failed", "Calls that ended before being answered, by why", ["reason"])
TURN_LATENCY = Histogram(
    "relay_turn_latency_seconds",
    "From the upstream's input_audio_buffer.speech_stopped reaching the relay to the first frame of the reply's "
    "audio leaving it", buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0))
BARGE_INS = Counter("relay_barge_ins", "The model's audio flushed because the user spoke")
TRUNCATIONS = Counter("relay_truncations", "conversation.item.truncate sent upstream after a barge-in")
POLICY_REFUSALS = Counter("relay_policy_refusals", "Client events the event policy refused (items a client may not "
                          "add: system messages, forged tool calls and outputs)")
FIELDS_KEPT = Counter("relay_policy_fields_kept", "Client events (and offered sessions) whose locked session fields "
                      "were kept at the operator's values while the rest was applied")
RECONNECTS = Counter("relay_upstream_reconnects", "Upstream sessions replaced after a drop")
ROLLOVERS = Counter("relay_upstream_rollovers", "Upstream sessions replaced ahead of their expiry")
FRAMES = Counter("relay_outbound_frames", "20 ms frames sent to clients (silence included)")
FRAMES_LATE = Counter("relay_outbound_frames_late", "Outbound frames that left more than 20 ms after their time "
                      "(the playout clock fell behind its schedule)")
FRAMES_DROPPED = Counter("relay_outbound_frames_dropped", "Model audio frames dropped: the playout queue was full")
LOOP_LAG = Histogram("relay_event_loop_lag_seconds", f"How late the event loop woke from a {LAG_INTERVAL_S} s sleep",
                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
TASKS = Gauge("relay_asyncio_tasks", "asyncio tasks alive in the process (a count that only grows is a leak)",
              multiprocess_mode="livesum")
RECEIVED = Counter("relay_received_bytes", "Bytes received: rtp (audio payloads from clients), datachannel "
                   "(client events), upstream (model service events)", ["path"])
SENT = Counter("relay_sent_bytes", "Bytes sent: rtp (audio payloads to clients), datachannel (events to clients), "
               "upstream (events to the model service)", ["path"])

# A call's counts (Call.meter_counts) -> the counter each one adds to.
_COUNTERS: dict[str, Any] = {
    "barge_ins": BARGE_INS, "truncations": TRUNCATIONS, "policy_refusals": POLICY_REFUSALS,
    "fields_kept": FIELDS_KEPT,
    "reconnects": RECONNECTS, "rollovers": ROLLOVERS,
    "frames": FRAMES, "frames_late": FRAMES_LATE, "frames_dropped": FRAMES_DROPPED,
    "rtp_in": RECEIVED.labels("rtp"), "datachannel_in": RECEIVED.labels("datachannel"),
    "upstream_in": RECEIVED.labels("upstream"),
    "rtp_out": SENT.labels("rtp"), "datachannel_out": SENT.labels("datachannel"),
    "upstream_out": SENT.labels("upstream"),
}

# Why a call ended (Call.close_reason, free text) -> a label value, first match wins.
OUTCOMES = ("hangup", "client_gone", "idle", "upstream", "shutdown", "tool", "limit", "invalid_offer", "error", "other")
_REASON_WORDS = (
    ("internal error", "error"),
    ("hangup", "hangup"), ("deleted", "hangup"),
    ("peer connection", "client_gone"), ("client not reading", "client_gone"), ("interrupted", "client_gone"),
    ("idle", "idle"),
    ("upstream", "upstream"),
    ("shutdown", "shutdown"),
    ("tool", "tool"),
    ("duration", "limit"), ("limit", "limit"), ("too long", "limit"), ("too many", "limit"),
    ("setup failed", "invalid_offer"),
)


def outcome(reason: str | None) -> str:
    """A call's close reason as one of OUTCOMES (a label must have few values; reasons are free text)."""
    text = (reason or "").lower()
    for word, label in _REASON_WORDS:
        if word in text:
            return label
    return "other"


for _label in OUTCOMES:  # every outcome shows (at 0) from the start: a rate() needs the series to exist
    CALLS_ENDED.labels(_label)
for _path in ("rtp", "datachannel", "upstream"):
    RECEIVED.labels(_path)
    SENT.labels(_path)


class CallMeter:
    """What of one call's counts has been added to the process's counters."""

    __slots__ = ("_reported",)

    def __init__(self) -> None:
        self._reported: dict[str, int] = {}

    def flush(self, counts: dict[str, int], turn_latencies: Iterable[float] = ()) -> None:
        for name, value in counts.items():
            grown = value - self._reported.get(name, 0)
            if grown > 0:
                _COUNTERS[name].inc(grown)
                self._reported[name] = value
        for seconds in turn_latencies:
            TURN_LATENCY.observe(seconds)


def call_started() -> None:
    CALLS_STARTED.inc()
    CALLS_ACTIVE.inc()


def call_ended(answered: bool, reason: str | None) -> None:
    if answered:
        CALLS_ACTIVE.dec()
        CALLS_ENDED.labels(outcome(reason)).inc()
    else:
        SETUPS_FAILED.labels(outcome(reason)).inc()


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

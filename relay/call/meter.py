"""A call's counts, added to the process's Prometheus counters (prometheus-client).

Owns: the per-call metrics (calls started and ended, turn latency, barge-ins, truncations, policy, reconnects,
rollovers, frames, bytes by path) and CallMeter, which adds what a call's plain-int counts grew by. The audio path
never touches a metric: a call counts in plain ints (its core's stats, its track, its byte counts) and once a second
(the server's monitor), and when it ends, what grew is added here. Coarse events (a call starting, ending) update
metrics directly.
Must not touch: HTTP (the /metrics endpoint, the registry it reads and the process-wide gauges are
relay/server/metrics.py's), or anything on the audio path.

No label carries a call id, a client address or anything a client sends: every label has a small fixed set of
values, and nothing here is a secret.
"""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import Counter, Gauge, Histogram

CALLS_ACTIVE = Gauge("relay_calls_active", "Calls in progress (answered, not yet ended)",
                     multiprocess_mode="livesum")
CALLS_STARTED = Counter("relay_calls_started", "Calls answered (201)")
CALLS_BY_CODEC = Counter("relay_calls_by_codec", "Calls answered, by the audio codec negotiated (opus, pcmu, pcma)",
                         ["codec"])
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
RECEIVED = Counter("relay_received_bytes", "Bytes received: rtp (audio payloads from clients), datachannel "
                   "(client events), upstream (model service events)", ["path"])
SENT = Counter("relay_sent_bytes", "Bytes sent: rtp (audio payloads to clients), datachannel (events to clients), "
               "upstream (events to the model service)", ["path"])
BACKENDS = Gauge("relay_backends_attached", "Backends attached to calls over the control socket "
                 "(GET /v1/realtime?call_id=)", multiprocess_mode="livesum")
BACKEND_EVENTS = Counter("relay_backend_events", "Events over the backends' control sockets: in (from backends), "
                         "out (to backends)", ["direction"])

# A call's counts (counts()) -> the counter each one adds to.
_COUNTERS: dict[str, Any] = {
    "barge_ins": BARGE_INS, "truncations": TRUNCATIONS, "policy_refusals": POLICY_REFUSALS,
    "fields_kept": FIELDS_KEPT,
    "reconnects": RECONNECTS, "rollovers": ROLLOVERS,
    "frames": FRAMES, "frames_late": FRAMES_LATE, "frames_dropped": FRAMES_DROPPED,
    "rtp_in": RECEIVED.labels("rtp"), "datachannel_in": RECEIVED.labels("datachannel"),
    "upstream_in": RECEIVED.labels("upstream"),
    "rtp_out": SENT.labels("rtp"), "datachannel_out": SENT.labels("datachannel"),
    "upstream_out": SENT.labels("upstream"),
    "backend_in": RECEIVED.labels("backend"), "backend_out": SENT.labels("backend"),
    "backend_events_in": BACKEND_EVENTS.labels("in"), "backend_events_out": BACKEND_EVENTS.labels("out"),
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


for _direction in ("in", "out"):
    BACKEND_EVENTS.labels(_direction)
for _label in OUTCOMES:  # every outcome shows (at 0) from the start: a rate() needs the series to exist
    CALLS_ENDED.labels(_label)
for _path in ("rtp", "datachannel", "upstream", "backend"):
    RECEIVED.labels(_path)
    SENT.labels(_path)
for _codec in ("opus", "pcmu", "pcma"):
    CALLS_BY_CODEC.labels(_codec)


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


def call_started(codec: str) -> None:
    CALLS_STARTED.inc()
    CALLS_BY_CODEC.labels(codec).inc()
    CALLS_ACTIVE.inc()


def backend_attached() -> None:
    BACKENDS.inc()


def backend_detached() -> None:
    BACKENDS.dec()


def call_ended(answered: bool, reason: str | None) -> None:
    if answered:
        CALLS_ACTIVE.dec()
        CALLS_ENDED.labels(outcome(reason)).inc()
    else:
        SETUPS_FAILED.labels(outcome(reason)).inc()


def counts(call: Any) -> dict[str, int]:
    """A call's counts so far (relay.call.call.Call), each named as in _COUNTERS."""
    stats, peer, upstream, backends = call.core.stats, call.peer, call.upstream, call.backends.traffic
    return {
        "barge_ins": stats.barge_ins, "truncations": stats.truncations, "policy_refusals": stats.policy_refusals,
        "fields_kept": stats.fields_kept, "reconnects": upstream.reconnects, "rollovers": upstream.rollovers,
        "frames": peer.track.frames_sent, "frames_late": peer.track.late_frames,
        "frames_dropped": stats.frames_dropped,
        "rtp_in": peer.inbound.stats.payload_bytes, "rtp_out": peer.rtp_bytes_sent,
        "datachannel_in": peer.bytes_in, "datachannel_out": peer.bytes_out,
        "upstream_in": upstream.bytes_in, "upstream_out": upstream.bytes_out,
        "backend_in": backends.bytes_in, "backend_out": backends.bytes_out,
        "backend_events_in": backends.events_in, "backend_events_out": backends.events_out,
    }

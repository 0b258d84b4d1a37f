"""The cluster's Prometheus metrics. No label carries a call id, a node id or an address: each has a small fixed
set of values."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REDIS_WHAT = ("registry", "limits", "secrets", "transcripts")
REDIS_ERRORS = Counter("relay_redis_errors", "Redis operations that failed, by what they were for: registry "
                       "(heartbeat, owner lookup), limits (failed open), secrets (single-use check, failed closed), "
                       "transcripts", ["what"])
FORWARD_OUTCOMES = ("answered", "owner_gone", "owner_unavailable", "refused")
FORWARDED = Counter("relay_forwarded_requests", "Requests about a call forwarded to the relay that owns it, by "
                    "outcome: answered (whatever the owner said), owner_gone (404 call_not_found: no address, or no "
                    "connection within 1 s), owner_unavailable (503: connected and no answer, or Redis down and no "
                    "other way to find the node), refused (the owner refused the signature: RELAY_CLUSTER_SECRET or "
                    "the clocks differ)", ["outcome"])
FORWARD_SECONDS = Histogram("relay_forwarded_request_seconds", "Time to forward a request about a call to its "
                            "relay and get the answer (a backend's socket: its handshake), by outcome", ["outcome"],
                            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0))
SIGNATURES_REFUSED = Counter("relay_cluster_signatures_refused", "Requests carrying a cluster signature that was "
                             "wrong, stale or incomplete (refused 401)")

for _what in REDIS_WHAT:  # every label shows from the start, at 0
    REDIS_ERRORS.labels(_what)
for _outcome in FORWARD_OUTCOMES:
    FORWARDED.labels(_outcome)

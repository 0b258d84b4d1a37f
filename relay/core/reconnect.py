"""What to do when an upstream session ends under a live call, and when to replace one before it expires, sans-I/O.

A call outlives its upstream sessions: the network drops, a server restarts, and the service ends every session at
its `expires_at` (60 minutes). The relay then opens a new session and gives it what the old one knew: the session
configuration and the conversation as text items (see History.replay_items). These functions decide:
- whether an ending is worth retrying (a refused key is not: the next attempt would be refused the same way);
- how long to wait before each attempt;
- when a session is old enough to be replaced at the next quiet moment (rollover);
- which of the events still waiting for the old session go to the new one.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable, Iterable

from relay.core.call import RELAY_EVENT_PREFIX
from relay.core.history import replayable

# Error codes that mean "this account, key or request will be refused again": retrying cannot help.
FATAL_ERROR_CODES = frozenset({
    "invalid_api_key", "insufficient_quota", "account_deactivated", "billing_hard_limit_reached",
    "model_not_found", "beta_api_shape_disabled", "permission_denied", "organization_deactivated",
    "unsupported_country_region_territory",
})
# Close codes with the same meaning: 1008 policy violation; 3000 and 4000 are what the Realtime service uses for a
# refused key and a refused request (PROTOCOL.md). Every other ending (1006 network loss, 1011 server error, 1001
# going away, 1000 after session_expired, a failed handshake) is retried.
FATAL_CLOSE_CODES = frozenset({1008, 3000, 4000})
BACKOFF_CAP_S = 10.0
# A session is replaced no earlier than half-way through its life, whatever the setting says: a short-lived session
# (a test's, or a service with short limits) would otherwise be replaced as soon as it opened.
EARLIEST_ROLLOVER_FRACTION = 0.5
# Set by the server only: a session.update carrying them is refused.
READ_ONLY_SESSION_KEYS = ("id", "object", "expires_at", "client_secret")
# The relay's own events that concern the old session's items and mean nothing to a new one.
_OLD_SESSION_EVENTS = ("response.cancel", "conversation.item.truncate", "conversation.item.delete")


def is_fatal(close_code: int | None, error_code: str | None) -> bool:
    """Will a new session be refused the way this one ended? `error_code`: the last `error` the upstream sent."""
    return close_code in FATAL_CLOSE_CODES or error_code in FATAL_ERROR_CODES


def backoff_delays(retries: int, first_s: float, rng: Callable[[], float] = random.random) -> list[float]:
    """The wait before each attempt: the first at once (most drops are a blip), then `first_s` doubling up to
    BACKOFF_CAP_S, each drawn between half and all of that so that calls dropped together do not come back
    together."""
    delays = [0.0]
    for attempt in range(1, retries):
        ceiling = min(BACKOFF_CAP_S, first_s * 2 ** (attempt - 1))
        delays.append(ceiling * (0.5 + rng() / 2))
    return delays[:retries]


def rollover_at(opened_at: float, expires_at: Any, before_s: float) -> float | None:
    """When (wall-clock seconds) to start looking for a quiet moment to replace a session opened at `opened_at`
    that the service ends at `expires_at`; None: never (no expiry given, or rollover off)."""
    if before_s <= 0 or not isinstance(expires_at, (int, float)) or isinstance(expires_at, bool):
        return None
    earliest = opened_at + (expires_at - opened_at) * EARLIEST_ROLLOVER_FRACTION
    return max(earliest, expires_at - before_s)


def session_to_replay(session: Any) -> dict[str, Any] | None:
    """The effective session as the last `session.updated` reported it, as a `session.update` for a new one.
    Top-level nulls (`prompt`, `tracing`, `include`…) are a new session's defaults already, and are left out;
    nested ones stay (`audio.input.turn_detection: null` means manual turns, not the default)."""
    if not isinstance(session, dict):
        return None
    return {key: value for key, value in session.items() if key not in READ_ONLY_SESSION_KEYS and value is not None}


def still_to_send(pending: Iterable[str]) -> list[str]:
    """Of the events queued for an upstream session that ended, those a new session should still get.

    Dropped: audio (stale once the session it belonged to is gone: the new session hears the user from now on),
    created items the history replays (it holds them already; an item with no text, an image say, is kept), and
    the relay's own cancels, truncations and deletions (of the old session's items). Kept: everything else, in order (a client's session.update or
    response.create, the relay's response.create after a tool's output)."""
    kept = []
    for text in pending:
        if text.startswith('{"type":"input_audio_buffer.append"'):
            continue
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):
            continue  # the relay only queues what it has parsed; nothing lost
        kind = event.get("type") if isinstance(event, dict) else None
        own = str(event.get("event_id", "")).startswith(RELAY_EVENT_PREFIX) if isinstance(event, dict) else False
        if kind == "input_audio_buffer.append" or (own and kind in _OLD_SESSION_EVENTS):
            continue
        if kind == "conversation.item.create" and replayable(event.get("item")):
            continue
        kept.append(text)
    return kept

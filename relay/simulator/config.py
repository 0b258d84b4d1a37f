"""The simulator's knobs: timing, limits and the faults tests inject.

Server-wide values come from `relay simulator` flags (or env RELAY_SIM_*). Every knob in PER_SESSION can also be set
for one connection by a query parameter `sim_<name>` on the WebSocket URL, e.g.
`ws://127.0.0.1:8090/v1/realtime?model=gpt-realtime&sim_close_after_events=20`, so one simulator serves many test
scenarios, and a relay given that URL as its upstream meets the fault without knowing about it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class SimConfig:
    # How the voice sounds in time: the real service answers after a few hundred ms, then faster than real time.
    first_delta_delay_ms: int = 300
    speed: float = 4.0  # audio is generated this many times faster than real time
    delta_ms: int = 100  # audio per response.output_audio.delta
    transcription_delay_ms: int = 200  # user transcription arrives this long after the commit
    echo_appends: bool = False  # benchmarks: every appended chunk comes straight back as audio (no VAD, no turns)
    # Limits.
    max_session_s: float = 3600.0  # then `session_expired` and close, like the 60-minute limit of the service
    max_message_bytes: int = 16 * 1024 * 1024
    max_buffer_s: float = 300.0  # input audio buffer cap; the oldest audio is dropped beyond it
    max_items: int = 1000  # conversation items kept; the oldest leave first, as with the service's truncation
    max_conversation_audio_s: float = 1800.0  # audio kept in the conversation (user and assistant)
    # Auth: when set, `Authorization: Bearer <key>` (or `api-key: <key>`) must match.
    api_key: str | None = None
    reject_auth: bool = False  # refuse every connection as the service refuses a bad key
    # Faults.
    close_after_events: int | None = None  # close after sending this many server events
    close_after_event_type: str | None = None  # close right after sending the first event of this type
    close_after_s: float | None = None  # close this long after connecting
    close_code: int = 1011
    close_abruptly: bool = False  # drop the TCP connection with no close frame (the client sees 1006)
    stall_after_events: int | None = None  # after this many server events, send nothing for stall_s
    stall_s: float = 5.0
    garbage_after_events: int | None = None  # after this many server events, send GARBAGE (bad frames), then go on
    # Records of what sessions received, for tests to assert on.
    record_sessions: int = 100
    record_audio_s: float = 600.0
    default_model: str = "gpt-realtime"

    def __post_init__(self) -> None:
        for name, low, high in _RANGES:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise KnobError(f"{name}: must be a finite number, got {value}")
            if not low <= value <= high:
                raise KnobError(f"{name}: must be between {low} and {high}, got {value}")


# (knob, lowest, highest): a value outside would stall, crash or hang the simulator.
_RANGES = [
    ("first_delta_delay_ms", 0, 60_000), ("speed", 0.01, 1000.0), ("delta_ms", 10, 10_000),
    ("transcription_delay_ms", 0, 60_000), ("max_session_s", 0.01, 86_400.0), ("max_message_bytes", 1024, 2**30),
    ("max_buffer_s", 0.1, 3600.0), ("max_items", 1, 100_000), ("max_conversation_audio_s", 1.0, 86_400.0),
    ("close_after_events", 0, 10**9), ("close_after_s", 0.0, 86_400.0), ("close_code", 1000, 4999),
    ("stall_after_events", 0, 10**9), ("stall_s", 0.0, 3600.0), ("garbage_after_events", 0, 10**9), ("record_sessions", 1, 100_000),
    ("record_audio_s", 0.0, 86_400.0),
]


HELP = {
    "first_delta_delay_ms": "delay from response.created to the first audio delta",
    "speed": "how many times faster than real time response audio is generated",
    "delta_ms": "milliseconds of audio per response.output_audio.delta",
    "transcription_delay_ms": "delay from a commit to its input transcription",
    "echo_appends": "benchmark mode: return every appended chunk at once as audio of one endless response (the "
    "same bytes when the input and output formats match, else converted)",
    "max_session_s": "session lifetime; then error session_expired and close",
    "max_message_bytes": "largest WebSocket message accepted",
    "max_buffer_s": "input audio buffer cap in seconds (oldest audio dropped beyond it)",
    "max_items": "conversation items kept (the oldest leave first)",
    "max_conversation_audio_s": "seconds of audio kept in the conversation (the oldest items leave first)",
    "api_key": "expected key (Authorization: Bearer, api-key header, or subprotocol); none = any",
    "reject_auth": "refuse every connection with invalid_api_key and close code 3000",
    "close_after_events": "fault: close after sending this many server events",
    "close_after_event_type": "fault: close right after sending the first event of this type (e.g. response.output_audio.delta)",
    "close_after_s": "fault: close this many seconds after connecting",
    "close_code": "fault: WebSocket close code used by the close faults",
    "close_abruptly": "fault: drop TCP without a close frame (clients see 1006)",
    "stall_after_events": "fault: after this many server events, send nothing for --stall-s",
    "stall_s": "fault: length of the stall in seconds",
    "garbage_after_events": "fault: after this many server events, send malformed frames (not JSON, not an object, "
    "binary, no type, unknown type, a 2 MB event, a bad audio delta), then carry on",
    "record_sessions": "how many sessions' records to keep",
    "record_audio_s": "seconds of received audio kept per session record",
    "default_model": "model used when the URL names none",
}

SERVER_ONLY = {"api_key", "max_message_bytes", "record_sessions", "record_audio_s", "default_model"}
PER_SESSION = [f.name for f in dataclasses.fields(SimConfig) if f.name not in SERVER_ONLY]


class KnobError(ValueError):
    pass


def _convert(field: dataclasses.Field, raw: str) -> object:
    kind = str(field.type)
    if raw.lower() in {"", "none", "null"} and "None" in kind:
        return None
    if kind.startswith("bool"):
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise KnobError(f"{field.name}: expected a boolean, got {raw!r}")
    try:
        return float(raw) if kind.startswith("float") else int(raw) if kind.startswith("int") else raw
    except ValueError:
        raise KnobError(f"{field.name}: expected a number, got {raw!r}") from None


ALL_KNOBS = [f.name for f in dataclasses.fields(SimConfig)]


def with_overrides(
    base: SimConfig, values: Mapping[str, str], prefix: str = "sim_", knobs: list[str] = PER_SESSION
) -> SimConfig:
    """`base` with the `sim_*` knobs of a query string applied. Unknown knobs are an error, not silently ignored."""
    fields = {f.name: f for f in dataclasses.fields(SimConfig)}
    changes = {}
    for key, raw in values.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name not in knobs:
            raise KnobError(f"unknown simulator knob {key!r}; knobs: {', '.join(knobs)}")
        changes[name] = _convert(fields[name], raw)
    return dataclasses.replace(base, **changes)

"""The conformance oracle: the official `openai` package's GA Realtime types, applied strictly.

`openai`'s models accept unknown keys, so validation alone would let a misspelt field through; we also walk the
validated model and fail on any key its types do not declare. The only keys allowed beyond the types are the ones
the GA service itself sends and the types lack (the session's id, object and expires_at).
"""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

import typing_extensions
from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent, RealtimeSessionCreateRequestParam
from pydantic import TypeAdapter

from relay.protocol import UnknownServerEvent, parse_server_event, unknown_fields

SERVER_EVENTS = TypeAdapter(RealtimeServerEvent)
CLIENT_EVENTS = TypeAdapter(RealtimeClientEvent)
SENT_BY_SERVICE_NOT_IN_TYPES = {"session.id", "session.object", "session.expires_at"}
# The model names the realtime session type lists (its `model` is `str | Literal[...]`).
SESSION_MODELS: tuple[str, ...] = next(
    get_args(arm) for arm in get_args(typing_extensions.get_type_hints(RealtimeSessionCreateRequestParam)["model"])
    if get_origin(arm) is Literal
)


def check_server_event(event: dict[str, Any]) -> None:
    model = SERVER_EVENTS.validate_python(event)
    undeclared = [p for p in unknown_fields(model) if p not in SENT_BY_SERVICE_NOT_IN_TYPES]
    assert not undeclared, f"{event['type']}: keys the GA types do not declare: {undeclared}"
    ours = parse_server_event(event)
    assert not isinstance(ours, UnknownServerEvent), f"relay.protocol does not model {event['type']}: {ours}"


def check_client_event(event: dict[str, Any]) -> None:
    model = CLIENT_EVENTS.validate_python(event)
    undeclared = unknown_fields(model)
    assert not undeclared, f"{event['type']}: keys the GA types do not declare: {undeclared}"

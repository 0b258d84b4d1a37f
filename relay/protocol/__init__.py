"""The Realtime API vocabulary: event models, parsing, error events and ids."""

from relay.protocol.ids import new_id
from relay.protocol.parse import (
    CLIENT_EVENT_TYPES,
    SERVER_EVENT_TYPES,
    ProtocolError,
    UnknownServerEvent,
    client_event_envelope,
    dumps,
    event_id_of,
    loads,
    parse_client_event,
    parse_server_event,
    unknown_fields,
)

__all__ = [
    "CLIENT_EVENT_TYPES",
    "SERVER_EVENT_TYPES",
    "ProtocolError",
    "UnknownServerEvent",
    "client_event_envelope",
    "dumps",
    "event_id_of",
    "loads",
    "new_id",
    "parse_client_event",
    "parse_server_event",
    "unknown_fields",
]

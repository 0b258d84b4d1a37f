"""What a client may do to its call's session over the data channel, sans-I/O.

The operator sets the agent (instructions, tools, model...) and the client talks to it: by default a client may
change how it hears and is heard (`audio`, output modalities, limits) and nothing that makes the model someone
else. A refused event is refused whole: nothing of it reaches the upstream, and the client gets an `error` naming
what it may not change. Re-sending a value already in force is no change (SDKs re-send the whole session).

Refused:
- a session.update or response.create setting a field the client may not change (`field_locked`): the fields
  outside `client_fields`, and the fields of the call's client secret;
- a system message, unless the client may change `instructions` (a system message is instructions by another
  name), as a conversation item or in a response's `input` (`item_not_allowed`);
- a `function_call` naming one of the relay's own tools, or a `function_call_output` for a call the relay runs
  (`item_not_allowed`): the model must see what the relay's tools really answered.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

# The GA session's top-level fields, and those a client may change by default.
SESSION_FIELDS = ("audio", "include", "instructions", "max_output_tokens", "model", "output_modalities", "prompt",
                  "tool_choice", "tools", "tracing", "truncation")
DEFAULT_CLIENT_FIELDS = ("audio", "include", "max_output_tokens", "output_modalities", "truncation")
ALWAYS_ALLOWED = {"type"}  # the session's kind: SDKs always send it, and the upstream refuses a change
RESPONSE_ONLY = {"conversation", "input", "metadata"}  # response.create fields that are not session fields
AUDIO_CONTROLS = ("voice", "turn_detection", "transcription")  # what `audio` holds, as the bundled page names them
KEPT_CALL_IDS = 1024


@dataclass(frozen=True)
class Refusal:
    code: str
    message: str
    param: str


class EventPolicy:
    def __init__(self, client_fields: list[str] | tuple[str, ...] = DEFAULT_CLIENT_FIELDS,
                 locked: dict[str, Any] | None = None, server_tools: list[str] | None = None) -> None:
        self.all_fields = "*" in client_fields
        self.client_fields = set(client_fields) | ALWAYS_ALLOWED
        self.locked = locked or {}  # a client secret's session: these fields keep these values
        self.server_tools = set(server_tools or [])
        self._server_call_ids: deque[str] = deque(maxlen=KEPT_CALL_IDS)  # calls the relay's tools answer

    def may_change(self, field: str) -> bool:
        return field not in self.locked and (self.all_fields or field in self.client_fields)

    def server_tool_called(self, call_id: str) -> None:
        self._server_call_ids.append(call_id)

    def check(self, event: dict[str, Any], session: dict[str, Any] | None) -> Refusal | None:
        """The first reason to refuse a client event (already known to be an object with a client event type),
        given the session in force (None until the upstream has said)."""
        kind = event.get("type")
        if kind == "session.update" and isinstance(event.get("session"), dict):
            return self.check_fields(event["session"], session, "session")
        if kind == "response.create" and isinstance(event.get("response"), dict):
            response = event["response"]
            items = response.get("input")
            for index, item in enumerate(items if isinstance(items, list) else []):
                refusal = self._check_item(item, f"response.input[{index}]")
                if refusal:
                    return refusal
            return self.check_fields({k: v for k, v in response.items() if k not in RESPONSE_ONLY}, session,
                                     "response")
        if kind == "conversation.item.create":
            return self._check_item(event.get("item"), "item")
        return None

    def check_fields(self, fields: dict[str, Any], session: dict[str, Any] | None, where: str) -> Refusal | None:
        """A field the client may not change, given a different value than the one in force."""
        for name, value in fields.items():
            if self.may_change(name):
                continue
            in_force = self.locked[name] if name in self.locked else (session or {}).get(name, _UNSET)
            if value != in_force:
                return Refusal("field_locked", f"'{name}' is set by the operator of this relay and cannot be changed "
                               "by the client; nothing of this event was applied.", f"{where}.{name}")
        return None

    def _check_item(self, item: Any, where: str) -> Refusal | None:
        if not isinstance(item, dict):
            return None  # malformed: the upstream's to refuse
        kind = item.get("type")
        if "role" in item and item["role"] not in CLIENT_ROLES and not self.may_change("instructions"):
            return Refusal("item_not_allowed", "System messages are set by the operator of this relay; the client "
                           "may add user (and assistant) messages only.", f"{where}.role")
        if kind == "function_call" and named(item, self.server_tools):
            return Refusal("item_not_allowed", f"'{item['name']}' is a tool the relay runs itself: only the model "
                           "calls it.", f"{where}.name")
        if kind == "function_call_output" and item.get("call_id") in self._server_call_ids:  # a deque: no hashing
            return Refusal("item_not_allowed", "That call is answered by the relay's own tool, not by the client.",
                           f"{where}.call_id")
        return None

    def locked_for_display(self) -> list[str]:
        """The session fields a client may not change, as GET /relay/client-config lists them (with `audio`'s
        parts under the bundled page's names when `audio` itself is locked)."""
        locked = [name for name in SESSION_FIELDS if not self.may_change(name)]
        if "audio" in locked:
            locked += AUDIO_CONTROLS
        return locked


_UNSET = object()
CLIENT_ROLES = ("user", "assistant")  # the message roles a client may add (system is the operator's)


def named(item: dict[str, Any], names: set[str]) -> bool:
    """Does the item (a tool, a function call) carry one of `names`? (A name that is not a string never does.)"""
    name = item.get("name")
    return isinstance(name, str) and name in names


def starting_session(operator: dict[str, Any], offered: dict[str, Any] | None, token: dict[str, Any] | None,
                     policy: EventPolicy, trusted: bool) -> dict[str, Any] | Refusal | None:
    """A new call's session: the operator's, then the creator's (a client's checked like a session.update against
    the operator's: a backend's taken as it is), then a client secret's, each replacing top-level fields. A client
    secret's fields win over the same client's offer without a refusal (they are the call's, by design)."""
    offered = {k: v for k, v in (offered or {}).items() if k not in (token or {})}
    if offered and not trusted:
        refusal = policy.check_fields(offered, operator, "session")
        if refusal is not None:
            return refusal
    session = {**operator, **offered, **(token or {})}
    return session or None

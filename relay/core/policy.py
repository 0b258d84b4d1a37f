"""What a client may do to its call's session over the data channel, sans-I/O.

The operator sets the agent (instructions, tools, model...) and the client talks to it: by default a client may
change how it hears and is heard (`audio`, output modalities, limits) and nothing that makes the model someone
else. Locked fields never cost the client an event: official SDKs re-send their whole session (instructions,
tracing...) in every `session.update` and wait for its `session.updated`, so a locked field a client tries to change
is taken out of the event, the rest goes upstream, and the client is told what was kept (`relay.policy.fields_kept`).
Re-sending a value already in force is no change.

Kept at the operator's values:
- the session fields outside `client_fields`, wherever a client sets them (`session.update`, `response.create`, the
  session posted with an offer);
- what the call's client secret set (its values, down to `audio.input.*`/`audio.output.*`: the client may still
  change what the secret left out).

Refused whole (an `error`, nothing upstream), as these are not settings but words put in someone's mouth:
- a system message, unless the client may change `instructions` (a system message is instructions by another
  name), as a conversation item or in a response's `input` (`item_not_allowed`);
- a `function_call` naming one of the relay's own tools, or a `function_call_output` for a call the relay runs
  (`item_not_allowed`): the model must see what the relay's tools really answered.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from relay.protocol.session import MERGED, MODEL_NAME, merge

# The GA session's top-level fields, and those a client may change by default.
SESSION_FIELDS = ("audio", "include", "instructions", "max_output_tokens", "model", "output_modalities",
                  "parallel_tool_calls", "prompt", "reasoning", "tool_choice", "tools", "tracing", "truncation")
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
        self.locked = locked or {}  # a client secret's session: these values stay
        self.server_tools = set(server_tools or [])
        self._server_call_ids: deque[str] = deque(maxlen=KEPT_CALL_IDS)  # calls the relay's tools answer

    def may_change(self, field: str) -> bool:
        """May the client change this top-level field at all (parts of it may still be a client secret's)?"""
        return field not in self.locked and self._client_field(field)

    def _client_field(self, field: str) -> bool:
        return self.all_fields or field in self.client_fields

    def server_tool_called(self, call_id: str) -> None:
        self._server_call_ids.append(call_id)

    def check(self, event: dict[str, Any]) -> Refusal | None:
        """The reason to refuse a client event whole (already known to be an object with a client event type)."""
        kind = event.get("type")
        if kind == "response.create" and isinstance(event.get("response"), dict):
            items = event["response"].get("input")
            for index, item in enumerate(items if isinstance(items, list) else []):
                refusal = self._check_item(item, f"response.input[{index}]")
                if refusal:
                    return refusal
        if kind == "conversation.item.create":
            return self._check_item(event.get("item"), "item")
        return None

    def keep_locked(self, event: dict[str, Any], session: dict[str, Any] | None) -> list[str]:
        """Take out of a session.update or response.create what would change a locked value, given the session in
        force (None until the upstream has said); the params taken out (`session.instructions`, …)."""
        kind = event.get("type")
        if kind == "session.update" and isinstance(event.get("session"), dict):
            return self.keep_locked_fields(event["session"], session, "session")
        if kind == "response.create" and isinstance(event.get("response"), dict):
            return self.keep_locked_fields(event["response"], session, "response", skip=RESPONSE_ONLY)
        return []

    def keep_locked_fields(self, fields: dict[str, Any], session: dict[str, Any] | None, where: str,
                           skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Remove from `fields` (in place) each value that would change a locked one; the params removed."""
        kept: list[str] = []
        for name in [n for n in fields if n not in skip]:
            if not self._client_field(name):
                in_force = self.locked[name] if name in self.locked else (session or {}).get(name, _UNSET)
                if fields[name] != in_force:
                    del fields[name]
                    kept.append(f"{where}.{name}")
            elif name in self.locked:
                kept += _keep(fields, name, self.locked[name], where, MERGED.get(name))
        return kept

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


def _keep(container: dict[str, Any], name: str, locked: Any, where: str, tree: dict[str, Any] | None) -> list[str]:
    """Remove container[name] where it differs from `locked`, looking inside the objects a session.update merges
    (`tree`: which of their parts merge in turn), where a client may change what the lock leaves out; the params
    removed."""
    value = container[name]
    if tree is not None and isinstance(value, dict) and isinstance(locked, dict):
        kept: list[str] = []
        for key in [k for k in value if k in locked]:
            kept += _keep(value, key, locked[key], f"{where}.{name}", tree.get(key))
        return kept
    if value == locked:
        return []
    del container[name]
    return [f"{where}.{name}"]


_UNSET = object()
CLIENT_ROLES = ("user", "assistant")  # the message roles a client may add (system is the operator's)


def named(item: dict[str, Any], names: set[str]) -> bool:
    """Does the item (a tool, a function call) carry one of `names`? (A name that is not a string never does.)"""
    name = item.get("name")
    return isinstance(name, str) and name in names


def kept_message(params: list[str]) -> str:
    """What a `relay.policy.fields_kept` event says."""
    one = len(params) == 1
    return (f"{', '.join(params)} {'is' if one else 'are'} set by the operator of this relay and stayed as "
            f"{'it was' if one else 'they were'}; the rest of the event was applied.")


def starting_session(operator: dict[str, Any], offered: dict[str, Any] | None, token: dict[str, Any] | None,
                     policy: EventPolicy, trusted: bool) -> tuple[dict[str, Any] | None, list[str]]:
    """A new call's session and what was kept of its creator's: the operator's, a client secret's merged on top,
    then the creator's offer merged on top of both — a backend's (API key) as it is, a client's less what would
    change a locked value (as for a session.update). `model` is left out: the call's model is chosen apart."""
    base = merge(operator, {k: v for k, v in (token or {}).items() if k != "model"})
    offered = dict(offered or {})
    model = offered.pop("model", None)
    kept = [] if trusted else policy.keep_locked_fields(offered, base, "session")
    if model is not None and "model" in (token or {}) and model != token["model"]:
        kept.insert(0, "session.model")  # see call_model
    return (merge(base, offered) or None), kept



def call_model(offered: dict[str, Any] | None, token: dict[str, Any] | None, allowed: list[str]) -> str | None | Refusal:
    """The model a new call asks for: its client secret's `session.model` (the backend's choice, kept like the
    secret's other settings), else its offer's, else None (the relay's default); a Refusal when that is not one of
    `allowed` (`*`: any)."""
    model = next((s["model"] for s in (token, offered) if s and s.get("model") is not None), None)
    if model is None:
        return None
    if isinstance(model, str) and ("*" in allowed and MODEL_NAME.fullmatch(model) or model in allowed):
        return model
    shown = "any model name" if "*" in allowed else ", ".join(dict.fromkeys(allowed))
    return Refusal("invalid_value", f"Invalid value: {str(model)[:128]!r}. Supported values are: {shown}.",
                   "session.model")

"""One simulated Realtime session, sans-I/O: client events and timestamps in, server events out.

The adapter (`relay.simulator.server`) calls `receive()` for every WebSocket message and `advance()` whenever
`next_deadline()` passes, then sends what `take_outgoing()` returns. Tests can drive it with a virtual clock.
Times (`now`) are seconds on a monotonic clock; audio positions are milliseconds of appended audio.

Inside, all audio is 24 kHz PCM16 (VAD, buffers, items, replies). A session in G.711 (`audio/pcmu`, `audio/pcma`)
is converted at the edges: the audio a client sends is decoded and upsampled as it arrives (input format), the
audio the simulator sends is downsampled and encoded as it leaves (a response's output format, fixed when the
response is created; item audio retrieved: the session's output format).
"""

from __future__ import annotations

import base64
import binascii
import copy
import heapq
import itertools
import json
import math
import re
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from relay.audio import g711
from relay.protocol import ProtocolError, new_id, parse_client_event
from relay.protocol import models as m
from relay.protocol.session import MODEL_NAME, SERVER_VAD_DEFAULTS, merge
from relay.protocol.session import default_session as service_default_session
from relay.simulator import voice
from relay.simulator.config import SimConfig
from relay.simulator.vad import EnergyVad, SpeechStarted, VadSettings

SEMANTIC_VAD_DEFAULTS = {"type": "semantic_vad", "eagerness": "auto", "create_response": True, "interrupt_response": True}
# Semantic VAD has no model here: its eagerness only sets how much silence ends a turn.
SEMANTIC_SILENCE_MS = {"low": 1000, "medium": 600, "auto": 600, "high": 300}
log = logging.getLogger("relay.simulator")
MIN_COMMIT_MS = 100
# An MCP entry names its server by one of these.
_MCP_SERVER_KEYS = ("server_url", "connector_id", "tunnel_id")
G711_TYPES = (g711.PCMU, g711.PCMA)
PCM_BYTES_PER_G711_BYTE = voice.SAMPLE_RATE // g711.RATE * 2  # one 8 kHz byte is three 24 kHz PCM16 samples
# Context either side of a slice of reply audio sent in G.711, so that slices filtered apart join seamlessly.
_SLICE_MARGIN = 64 * PCM_BYTES_PER_G711_BYTE
VAD_IDLE_KEEP_MS = 5000  # with VAD on and nobody speaking, older buffered audio is dropped
# The item types whose GA form has `object` and `status` (MCP items have neither).
_ITEMS_WITH_STATUS = {"message", "function_call", "function_call_output"}
# Fields that may be left out of a session.update but not set to null.
_NOT_NULL = {
    "model", "instructions", "output_modalities", "audio", "audio.input", "audio.output", "audio.input.format",
    "audio.output.format", "audio.output.voice", "audio.output.speed", "tools", "tool_choice", "max_output_tokens",
    "truncation", "audio.input.format.rate", "audio.output.format.rate", "parallel_tool_calls", "reasoning",
    "reasoning.effort",
    *(f"audio.input.turn_detection.{k}" for k in (
        "threshold", "prefix_padding_ms", "silence_duration_ms", "create_response", "interrupt_response", "eagerness")),
}


def default_session(session_id: str, model: str, expires_at: int) -> dict[str, Any]:
    """The service's defaults, with the simulator's own instructions."""
    session = service_default_session(model, "You are the relay's Realtime simulator. You echo what you hear.")
    return {**session, "id": session_id, "expires_at": expires_at}


def model_refusal(model: str) -> str | None:
    """The service's model_not_found message for a name the simulator cannot serve; None when it can. It serves any
    well-formed name: every one the SDK types list, and the ones to come."""
    if MODEL_NAME.fullmatch(model):
        return None
    return f"The model `{model[:64]}` does not exist or you do not have access to it."


def tokens(text: str | None) -> int:
    return math.ceil(len(text or "") / 4)


@dataclass
class SimItem:
    """A conversation item: its API form, plus the audio and transcript plan the simulator keeps beside it."""

    data: dict[str, Any]
    audio: bytes | None = None
    transcript_kind: str = ""  # "echo" (transcript states the duration) or "words" (cut by the audio heard)
    full_transcript: str = ""  # the whole planned transcript, for truncation
    planned_audio_ms: int = 0

    @property
    def id(self) -> str:
        return self.data["id"]

    def audio_part(self) -> dict[str, Any] | None:
        for part in self.data.get("content", []):
            if part.get("type") in {"input_audio", "output_audio"}:
                return part
        return None

    def public(self, encode: Callable[[bytes], bytes] | None = None) -> dict[str, Any]:
        """The API form; with `encode`, its audio too, as `encode` turns the 24 kHz PCM16 kept into the wire's."""
        item = copy.deepcopy(self.data)
        if encode is not None and self.audio is not None:
            part = next(p for p in item["content"] if p.get("type") in {"input_audio", "output_audio"})
            part["audio"] = base64.b64encode(encode(self.audio)).decode()
        return item


@dataclass
class Reply:
    """What a response will say, decided when it is created."""

    kind: str  # "message" or "function_call"
    text: str = ""  # transcript (audio) or text (text modality)
    audio: bytes = b""
    transcript_kind: str = "words"
    tool_name: str = ""
    arguments: str = ""


@dataclass
class ActiveResponse:
    id: str
    reply: Reply
    modality: str  # "audio" or "text"
    in_conversation: bool
    metadata: dict[str, str] | None
    started_at: float
    max_output_tokens: int | None
    output_format: dict[str, Any] = field(default_factory=lambda: {"type": "audio/pcm", "rate": 24000})
    item: SimItem | None = None
    output_begun: bool = False
    sent_audio: int = 0  # bytes of audio delivered
    sent_words: int = 0
    sent_args: int = 0
    steps: int = 0
    words: list[str] = field(default_factory=list)
    limited: bool = False  # cut by max_output_tokens


class SimSession:
    def __init__(self, config: SimConfig, model: str, now: float, wall_time: float | None = None) -> None:
        self.config = config
        self.id = new_id("sess")
        started = time.time() if wall_time is None else wall_time
        self.session = default_session(self.id, model, int(started + config.max_session_s))
        self.items: list[SimItem] = []
        self.closing: tuple[int, str] | None = None  # set when the session wants its socket closed
        self.response: ActiveResponse | None = None
        self._now = now
        self._out: list[dict[str, Any]] = []
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._buffer = bytearray()  # input audio not yet committed
        self._buffer_start = 0  # absolute byte offset of _buffer[0] in all audio appended
        self._speech_item_id: str | None = None
        self._speech_start_ms = 0
        self._vad = self._new_vad()
        self._prev_input_tokens = (0, 0)  # (text, audio) of the last response: the cacheable prefix
        self._assistant_audio_sent = False
        self._turns = 0  # user turns so far: an idle timeout armed before a new turn is void
        self._mcp_listed: dict[str, dict[str, Any]] = {}  # server_label -> the MCP entry whose tools were listed
        self._at(now + config.max_session_s, self._expire)
        self._emit("session.created", session=copy.deepcopy(self.session))

    # --- adapter interface ---------------------------------------------------------------------------------------

    def receive(self, text: str, now: float) -> None:
        self.advance(now)
        event_id = None
        try:
            event = parse_client_event(text)
            event_id = event.event_id
            getattr(self, "_on_" + event.type.replace(".", "_"))(event)
        except ProtocolError as error:
            error.event_id = error.event_id or event_id
            self._error(error)
        except RecursionError:
            self._error(ProtocolError("invalid_value", "The event is nested too deeply.", None, event_id))
        except Exception:  # a defect must cost one error event, never the session
            log.exception("simulator session %s failed on a client event", self.id)
            self._error(ProtocolError("server_error", "The simulator failed on this event.", None, event_id, "server_error"))

    def receive_binary(self, now: float) -> None:
        self.advance(now)
        self._error(ProtocolError("invalid_event", "Binary frames are not supported: send events as JSON text."))

    def advance(self, now: float) -> None:
        """Run every timer due by `now`, in order."""
        while self._timers and self._timers[0][0] <= now:
            due, _, action = heapq.heappop(self._timers)
            self._now = due
            try:
                action()
            except Exception:
                log.exception("simulator session %s failed in a timer", self.id)
                self.response = None
                self._error(ProtocolError("server_error", "The simulator failed.", error_type="server_error"))
        self._now = now

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    @property
    def backlog(self) -> int:
        """Events produced but not yet taken by the adapter."""
        return len(self._out)

    def take_outgoing(self) -> list[dict[str, Any]]:
        out, self._out = self._out, []
        return out

    def input_pcm(self, data: bytes) -> bytes | None:
        """The 24 kHz PCM16 that appending `data` (decoded from base64) adds under the session's input format; None
        if the session refuses it (PCM16 of an odd length)."""
        law = _law(self.session["audio"]["input"]["format"])
        if law is None:
            return None if len(data) % 2 else data
        return g711.upsample_to_24k(g711.decode(data, law))

    # --- plumbing ------------------------------------------------------------------------------------------------

    def _at(self, due: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (due, next(self._seq), action))

    def _emit(self, event_type: str, **fields: Any) -> None:
        self._out.append({"type": event_type, "event_id": new_id("event"), **fields})

    def _error(self, error: ProtocolError) -> None:
        self._emit("error", error=error.detail())

    def _item(self, item_id: str) -> SimItem | None:
        return next((item for item in self.items if item.id == item_id), None)

    def _last_item_id(self) -> str | None:
        return self.items[-1].id if self.items else None

    def _add_item(self, item: SimItem, previous_item_id: str | None = None) -> None:
        previous = self._insert_item(item, previous_item_id)
        self._emit("conversation.item.added", previous_item_id=previous, item=item.public())
        self._emit("conversation.item.done", previous_item_id=previous, item=item.public())

    def _insert_item(self, item: SimItem, previous_item_id: str | None = None) -> str | None:
        """Put `item` in the conversation (last, first for "root", or after `previous_item_id`); returns the id of
        the item before it."""
        if previous_item_id is None:
            previous = self._last_item_id()
            self.items.append(item)
        elif previous_item_id == "root":
            previous = None
            self.items.insert(0, item)
        else:
            previous = previous_item_id
            index = next(i for i, it in enumerate(self.items) if it.id == previous_item_id)
            self.items.insert(index + 1, item)
        self._evict_old_items()
        return previous

    @property
    def _turn_detection(self) -> dict[str, Any] | None:
        return self.session["audio"]["input"]["turn_detection"]

    def _vad_settings(self) -> VadSettings:
        td = self._turn_detection
        if td["type"] == "semantic_vad":
            return VadSettings(silence_duration_ms=SEMANTIC_SILENCE_MS[td.get("eagerness") or "auto"])
        return VadSettings(td["threshold"], td["prefix_padding_ms"], td["silence_duration_ms"])

    def _new_vad(self) -> EnergyVad | None:
        if self._turn_detection is None:
            return None
        return EnergyVad(self._vad_settings(), start_ms=self._appended_ms)  # one timeline across reconfigurations

    @property
    def _appended_ms(self) -> int:
        return voice.audio_ms(self._buffer_start + len(self._buffer))

    # --- session.update ------------------------------------------------------------------------------------------

    def _on_session_update(self, event: m.SessionUpdate) -> None:
        changes = event.session.model_dump(exclude_unset=True)
        for key in ("id", "object", "expires_at"):
            if key in changes:
                raise ProtocolError("invalid_value", f"'session.{key}' is set by the server.", f"session.{key}")
        for path in _null_paths(changes):
            if path in _NOT_NULL:
                raise ProtocolError(
                    "invalid_type", f"Invalid type for 'session.{path}': expected a value, but got null instead.",
                    f"session.{path}",
                )
        refused = model_refusal(changes["model"]) if "model" in changes else None
        if refused is not None:
            raise ProtocolError("model_not_found", refused, "session.model")
        updated = merge(copy.deepcopy(self.session), changes)  # a copy: nothing changes unless all is well
        for tool in updated["tools"]:
            tool.setdefault("type", "function")
        self._check_session(updated, changes)
        self.session = updated
        self._reconfigure_vad()
        self._emit("session.updated", session=copy.deepcopy(self.session))
        self._list_new_mcp_servers()

    def _list_new_mcp_servers(self) -> None:
        servers = {tool["server_label"]: tool for tool in self.session["tools"] if tool["type"] == "mcp"}
        for label, tool in servers.items():
            if self._mcp_listed.get(label) != tool:  # a new or changed entry; the SDKs resend the same ones
                self._list_mcp_tools(tool)
        self._mcp_listed = copy.deepcopy(servers)

    def _list_mcp_tools(self, tool: dict[str, Any]) -> None:
        """What the service does for a new MCP entry, without calling its server: an `mcp_list_tools` item holding
        the tools the entry names (its `allowed_tools`), announced by `mcp_list_tools.in_progress|completed`."""
        label = tool["server_label"]
        item = SimItem({"id": new_id("item"), "type": "mcp_list_tools", "server_label": label, "tools": []})
        previous = self._insert_item(item)
        self._emit("conversation.item.added", previous_item_id=previous, item=item.public())
        self._emit("mcp_list_tools.in_progress", item_id=item.id)
        item.data["tools"] = [
            {"name": name, "description": f"{name} on {label} (simulated)", "input_schema": {"type": "object"}}
            for name in _mcp_tool_names(tool.get("allowed_tools"))
        ]
        self._emit("mcp_list_tools.completed", item_id=item.id)
        self._emit("conversation.item.done", previous_item_id=previous, item=item.public())

    def _reconfigure_vad(self) -> None:
        """Follow turn_detection without losing a turn in progress."""
        if self._turn_detection is None:
            self._vad = None
            self._speech_item_id = None
        elif self._vad is None:
            self._vad = self._new_vad()
        else:
            self._vad.settings = self._vad_settings()

    def _check_session(self, updated: dict[str, Any], changes: dict[str, Any]) -> None:
        for index, tool in enumerate(updated["tools"]):
            if tool["type"] == "mcp" and not any(tool.get(key) for key in _MCP_SERVER_KEYS):
                raise ProtocolError(
                    "missing_required_parameter",
                    f"Missing required parameter: 'session.tools[{index}].server_url' (or connector_id, or tunnel_id).",
                    f"session.tools[{index}].server_url",
                )
        for direction in ("input", "output"):
            fmt = updated["audio"][direction]["format"]
            fmt.setdefault("type", "audio/pcm")
            if fmt["type"] == "audio/pcm":
                fmt.setdefault("rate", 24000)
            elif fmt["type"] not in G711_TYPES:  # the parser refuses these first; this guards the audio path
                raise ProtocolError(
                    "invalid_value",
                    f"The simulator speaks audio/pcm at 24000 Hz, audio/pcmu and audio/pcma, not {fmt['type']}.",
                    f"session.audio.{direction}.format.type",
                )
        td = updated["audio"]["input"].get("turn_detection")
        if td is not None:
            defaults = SERVER_VAD_DEFAULTS if td["type"] == "server_vad" else SEMANTIC_VAD_DEFAULTS
            updated["audio"]["input"]["turn_detection"] = {**defaults, **td}
        modalities = updated["output_modalities"]
        if len(modalities) != 1:
            raise ProtocolError(
                "invalid_value", "output_modalities must be ['audio'] or ['text'].", "session.output_modalities"
            )
        new_voice = changes.get("audio", {}).get("output", {}).get("voice")
        if new_voice is not None and new_voice != self.session["audio"]["output"]["voice"] and self._assistant_audio_sent:
            raise ProtocolError(
                "cannot_update_voice",
                "Cannot update a conversation's voice if assistant audio is present.",
                "session.audio.output.voice",
            )

    # --- input audio buffer --------------------------------------------------------------------------------------

    def _on_input_audio_buffer_append(self, event: m.InputAudioBufferAppend) -> None:
        law = _law(self.session["audio"]["input"]["format"])
        try:
            data = base64.b64decode(event.audio, validate=True)
        except (binascii.Error, ValueError):
            kind = "PCM16" if law is None else "G.711"
            raise ProtocolError("invalid_value", f"Invalid 'audio': expected base64-encoded {kind} audio.", "audio") from None
        if self.config.echo_appends:
            self._echo(data)
            return
        pcm = self.input_pcm(data)
        if pcm is None:
            raise ProtocolError("invalid_value", "Invalid 'audio': PCM16 audio has an even number of bytes.", "audio")
        floor_ms = voice.audio_ms(self._buffer_start)
        self._buffer += pcm
        if self._vad is None:
            self._cap_buffer(int(self.config.max_buffer_s * 1000))
            return
        for vad_event in self._vad.feed(pcm, floor_ms=floor_ms):
            if isinstance(vad_event, SpeechStarted):
                self._speech_started(vad_event.audio_start_ms)
            else:
                self._speech_stopped(vad_event.audio_end_ms)
        if not self._vad.in_speech:
            self._cap_buffer(VAD_IDLE_KEEP_MS)
        else:
            self._cap_buffer(int(self.config.max_buffer_s * 1000))

    def _echo(self, data: bytes) -> None:
        """Benchmark mode: the chunk comes straight back, as audio of one response that never ends: as it came if
        the response's output format is the session's input format, else converted."""
        in_format = self.session["audio"]["input"]["format"]
        in_law = _law(in_format)
        if in_law is None and len(data) % 2:
            raise ProtocolError("invalid_value", "Invalid 'audio': PCM16 audio has an even number of bytes.", "audio")
        if self.response is None:
            self._start_response(None, streamed=False)
            self.response.reply = Reply("message", "", b"", "echo")
            self._begin_output(self.response)
        r = self.response
        out_law = _law(r.output_format)
        if in_format["type"] == r.output_format["type"]:
            out = data
        elif in_law is not None and out_law is not None:
            out = g711.encode(g711.decode(data, in_law), out_law)
        else:
            out = _to_wire(self.input_pcm(data), r.output_format)
        r.sent_audio += len(data) * (1 if in_law is None else PCM_BYTES_PER_G711_BYTE)  # as 24 kHz PCM16
        self._emit("response.output_audio.delta", **self._content_ids(), delta=base64.b64encode(out).decode())

    def _cap_buffer(self, keep_ms: int) -> None:
        excess = len(self._buffer) - keep_ms * voice.BYTES_PER_MS
        if excess > 0:
            excess -= excess % 2
            del self._buffer[:excess]
            self._buffer_start += excess

    def _drop_buffer_before(self, ms: int) -> None:
        cut = max(0, ms * voice.BYTES_PER_MS - self._buffer_start)
        del self._buffer[:cut]
        self._buffer_start += cut

    def _speech_started(self, audio_start_ms: int) -> None:
        audio_start_ms = max(audio_start_ms, voice.audio_ms(self._buffer_start))  # not inside the previous turn
        self._drop_buffer_before(audio_start_ms)
        self._speech_item_id = new_id("item")
        self._speech_start_ms = audio_start_ms
        self._turns += 1
        self._emit("input_audio_buffer.speech_started", audio_start_ms=audio_start_ms, item_id=self._speech_item_id)
        if self.response is not None and self._turn_detection.get("interrupt_response", True):
            self._finish_response("cancelled", reason="turn_detected")

    def _speech_stopped(self, audio_end_ms: int) -> None:
        item_id = self._speech_item_id or new_id("item")
        self._speech_item_id = None
        self._emit("input_audio_buffer.speech_stopped", audio_end_ms=audio_end_ms, item_id=item_id)
        length = audio_end_ms * voice.BYTES_PER_MS - self._buffer_start
        audio = bytes(self._buffer[:length])
        del self._buffer[:length]
        self._buffer_start += length
        self._commit(audio, item_id)
        if self._turn_detection.get("create_response", True) and self.response is None:
            self._start_response(None)

    def _on_input_audio_buffer_commit(self, event: m.InputAudioBufferCommit) -> None:
        buffered_ms = len(self._buffer) / voice.BYTES_PER_MS
        if buffered_ms < MIN_COMMIT_MS:
            raise ProtocolError(
                "input_audio_buffer_commit_empty",
                f"Error committing input audio buffer: buffer too small. Expected at least {MIN_COMMIT_MS}ms of "
                f"audio, but buffer only has {buffered_ms:.2f}ms of audio.",
            )
        audio = bytes(self._buffer)
        self._buffer_start += len(self._buffer)
        self._buffer.clear()
        item_id = self._speech_item_id or new_id("item")
        self._speech_item_id = None
        if self._vad is not None:
            self._vad.reset()
        self._commit(audio, item_id)

    def _on_input_audio_buffer_clear(self, event: m.InputAudioBufferClear) -> None:
        self._buffer_start += len(self._buffer)
        self._buffer.clear()
        self._speech_item_id = None
        if self._vad is not None:
            self._vad.reset()
        self._emit("input_audio_buffer.cleared")

    def _commit(self, audio: bytes, item_id: str) -> None:
        previous = self._last_item_id()
        self._emit("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        item = SimItem(
            {
                "id": item_id,
                "type": "message",
                "object": "realtime.item",
                "status": "completed",
                "role": "user",
                "content": [{"type": "input_audio", "transcript": None}],
            },
            audio=audio,
        )
        self._add_item(item)
        if self.session["audio"]["input"].get("transcription") is not None:
            self._at(self._now + self.config.transcription_delay_ms / 1000, lambda: self._transcribe(item))

    def _transcribe(self, item: SimItem) -> None:
        if self._item(item.id) is None:
            return  # deleted meanwhile
        duration = voice.audio_ms(len(item.audio or b""))
        transcript = voice.user_speech_transcript(duration)
        item.audio_part()["transcript"] = transcript
        self._emit("conversation.item.input_audio_transcription.delta", item_id=item.id, content_index=0, delta=transcript)
        audio_tokens = duration // 100
        self._emit(
            "conversation.item.input_audio_transcription.completed",
            item_id=item.id,
            content_index=0,
            transcript=transcript,
            usage={
                "type": "tokens",
                "input_tokens": audio_tokens,
                "output_tokens": tokens(transcript),
                "total_tokens": audio_tokens + tokens(transcript),
                "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
            },
        )

    # --- conversation items --------------------------------------------------------------------------------------

    def _on_conversation_item_create(self, event: m.ConversationItemCreate) -> None:
        data = event.item.model_dump(exclude_unset=True)
        data.setdefault("id", new_id("item"))
        if self._item(data["id"]) is not None:
            raise ProtocolError("invalid_value", f"Item with id '{data['id']}' already exists.", "item.id")
        if event.previous_item_id not in (None, "root") and self._item(event.previous_item_id) is None:
            raise ProtocolError(
                "invalid_value",
                f"Previous item with id '{event.previous_item_id}' not found.",
                "previous_item_id",
            )
        if data["type"] in _ITEMS_WITH_STATUS:
            data["object"] = "realtime.item"
            data["status"] = "completed"
        if data["type"] == "function_call":
            data.setdefault("call_id", new_id("call"))
        item = SimItem(data)
        for part in data.get("content", []):
            if part.get("type") in {"input_audio", "output_audio"}:
                encoded = part.pop("audio", None)
                part.setdefault("transcript", None)
                try:
                    audio = base64.b64decode(encoded or "", validate=True)
                except (binascii.Error, ValueError):
                    raise ProtocolError("invalid_value", "Invalid audio: expected base64.", "item.content.audio") from None
                law = _law(self.session["audio"]["input"]["format"])  # audio from the client: its input format
                item.audio = audio if law is None else g711.upsample_to_24k(g711.decode(audio, law))
                item.full_transcript = part.get("transcript") or ""
                item.planned_audio_ms = voice.audio_ms(len(item.audio))
        self._add_item(item, event.previous_item_id)

    def _on_conversation_item_retrieve(self, event: m.ConversationItemRetrieve) -> None:
        item = self._item(event.item_id)
        if item is None:
            raise ProtocolError(
                "item_retrieve_invalid_item_id", f"Item with item_id '{event.item_id}' not found.", "item_id"
            )
        out_format = self.session["audio"]["output"]["format"]
        self._emit("conversation.item.retrieved", item=item.public(lambda pcm: _to_wire(pcm, out_format)))

    def _on_conversation_item_delete(self, event: m.ConversationItemDelete) -> None:
        item = self._item(event.item_id)
        if item is None:
            raise ProtocolError("item_delete_invalid_item_id", f"Item with item_id '{event.item_id}' not found.", "item_id")
        self.items.remove(item)
        self._emit("conversation.item.deleted", item_id=event.item_id)

    def _on_conversation_item_truncate(self, event: m.ConversationItemTruncate) -> None:
        item = self._item(event.item_id)
        if item is None:
            raise ProtocolError(
                "item_truncate_invalid_item_id", f"Item with item_id '{event.item_id}' not found.", "item_id"
            )
        part = item.audio_part()
        if part is None or item.audio is None:
            raise ProtocolError(
                "unsupported_content_type", "Only audio content of assistant messages can be truncated.", "item_id"
            )
        if item.data.get("role") != "assistant":
            raise ProtocolError("invalid_value", "Only assistant messages can be truncated.", "item_id")
        if self.response is not None and self.response.item is item:
            raise ProtocolError(
                "invalid_value", "The item is still being generated: cancel its response before truncating it.", "item_id"
            )
        if event.content_index != 0:
            raise ProtocolError("invalid_value", "Invalid 'content_index': the item has one content part.", "content_index")
        length_ms = voice.audio_ms(len(item.audio))
        if event.audio_end_ms > length_ms:
            raise ProtocolError(
                "invalid_value",
                f"Audio content of {length_ms}ms is already shorter than {event.audio_end_ms}ms",
                "audio_end_ms",
            )
        if event.audio_end_ms == 0:
            raise ProtocolError(
                "invalid_value", "audio_end_ms must be greater than 0: delete the item instead.", "audio_end_ms"
            )
        item.audio = item.audio[: event.audio_end_ms * voice.BYTES_PER_MS]
        if item.transcript_kind == "echo":
            part["transcript"] = voice.echo_transcript(event.audio_end_ms)
        else:
            fraction = event.audio_end_ms / max(1, item.planned_audio_ms)
            part["transcript"] = voice.cut_words(item.full_transcript, fraction)
        self._emit(
            "conversation.item.truncated",
            item_id=item.id,
            content_index=event.content_index,
            audio_end_ms=event.audio_end_ms,
        )

    # --- responses -----------------------------------------------------------------------------------------------

    def _on_response_create(self, event: m.ResponseCreate) -> None:
        if self.response is not None:
            raise ProtocolError(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {self.response.id}. "
                "Wait until the response is finished before creating a new one.",
            )
        self._start_response(event.response)

    def _on_response_cancel(self, event: m.ResponseCancel) -> None:
        if self.response is None or (event.response_id and event.response_id != self.response.id):
            raise ProtocolError(
                "response_cancel_not_active", "Cancellation failed: no active response found."
            )
        self._finish_response("cancelled", reason="client_cancelled")

    def _on_output_audio_buffer_clear(self, event: m.OutputAudioBufferClear) -> None:
        # Over a WebSocket there is no output buffer: the service answers this WebRTC-only event with an error.
        raise ProtocolError(
            "invalid_value", "output_audio_buffer.clear is only supported for WebRTC connections.", "type"
        )

    def _start_response(self, params: m.ResponseCreateParams | None, streamed: bool = True) -> None:
        params = params or m.ResponseCreateParams()
        in_conversation = params.conversation in (None, "auto")
        context = self.items
        if params.input is not None:
            context = [SimItem(item.model_dump(exclude_unset=True)) for item in params.input]
        elif not in_conversation:
            context = []
        modalities = params.output_modalities if params.output_modalities is not None else self.session["output_modalities"]
        if len(modalities) != 1:
            raise ProtocolError(
                "invalid_value", "output_modalities must be ['audio'] or ['text'].", "response.output_modalities"
            )
        modality = modalities[0]
        tools = [t.model_dump() for t in params.tools] if params.tools is not None else self.session["tools"]
        tool_choice = params.tool_choice if params.tool_choice is not None else self.session["tool_choice"]
        if isinstance(tool_choice, m.RealtimeModel):
            tool_choice = tool_choice.model_dump()
        max_tokens = params.max_output_tokens or self.session["max_output_tokens"]
        output_format = copy.deepcopy(self.session["audio"]["output"]["format"])
        if params.audio is not None and params.audio.output is not None and params.audio.output.format is not None:
            output_format = params.audio.output.format.model_dump(exclude_unset=True)
            output_format.setdefault("type", "audio/pcm")
            if output_format["type"] == "audio/pcm":
                output_format.setdefault("rate", 24000)
        self.response = ActiveResponse(
            id=new_id("resp"),
            reply=_plan_reply(context, tools, tool_choice),
            modality=modality,
            in_conversation=in_conversation,
            metadata=params.metadata,
            started_at=self._now,
            max_output_tokens=None if max_tokens == "inf" else int(max_tokens),
            output_format=output_format,
        )
        self._emit("response.created", response=self._response_object("in_progress"))
        response = self.response
        if streamed:
            self._at(self._now + self.config.first_delta_delay_ms / 1000, lambda: self._step(response))

    def _response_object(self, status: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
        r = self.response
        assert r is not None
        body: dict[str, Any] = {
            "object": "realtime.response",
            "id": r.id,
            "status": status,
            "status_details": details,
            "output": [r.item.public()] if r.item is not None and status != "in_progress" else [],
            "conversation_id": self.id.replace("sess_", "conv_") if r.in_conversation else None,
            "output_modalities": [r.modality],
            "max_output_tokens": r.max_output_tokens if r.max_output_tokens is not None else "inf",
            "audio": {"output": {"format": copy.deepcopy(r.output_format), "voice": self.session["audio"]["output"]["voice"]}},
            "usage": None,
            "metadata": r.metadata,
        }
        return body

    def _content_ids(self) -> dict[str, Any]:
        r = self.response
        assert r is not None and r.item is not None
        return {"response_id": r.id, "item_id": r.item.id, "output_index": 0, "content_index": 0}

    def _begin_output(self, r: ActiveResponse) -> None:
        r.output_begun = True
        reply = r.reply
        if reply.kind == "function_call":
            data = {
                "id": new_id("item"),
                "type": "function_call",
                "object": "realtime.item",
                "status": "in_progress",
                "name": reply.tool_name,
                "call_id": new_id("call"),
                "arguments": "",
            }
        else:
            part = {"type": "output_audio", "transcript": ""} if r.modality == "audio" else {"type": "output_text", "text": ""}
            data = {
                "id": new_id("item"),
                "type": "message",
                "object": "realtime.item",
                "status": "in_progress",
                "role": "assistant",
                "content": [part],
            }
        r.item = SimItem(data, transcript_kind=reply.transcript_kind, full_transcript=reply.text)
        r.words = reply.text.split(" ") if reply.text else []
        if reply.kind == "message":
            self._apply_token_budget(r)
        self._emit("response.output_item.added", response_id=r.id, output_index=0, item=r.item.public())
        if r.in_conversation:
            previous = self._insert_item(r.item)
            self._emit("conversation.item.added", previous_item_id=previous, item=r.item.public())
        if reply.kind == "message":
            kind = "audio" if r.modality == "audio" else "text"
            part = {"type": kind, "transcript": ""} if kind == "audio" else {"type": kind, "text": ""}
            self._emit("response.content_part.added", **self._content_ids(), part=part)

    def _apply_token_budget(self, r: ActiveResponse) -> None:
        """max_output_tokens: audio is cut at 50 ms a token (its transcript in proportion), text by its tokens."""
        limit = r.max_output_tokens
        if r.modality == "audio":
            audio = r.reply.audio
            r.item.audio = b""
            r.item.planned_audio_ms = voice.audio_ms(len(audio))
            if limit is not None and len(audio) > limit * 50 * voice.BYTES_PER_MS:
                r.reply = Reply(r.reply.kind, r.reply.text, audio[: limit * 50 * voice.BYTES_PER_MS], r.reply.transcript_kind)
                r.words = r.words[: math.ceil(len(r.words) * len(r.reply.audio) / len(audio))]
                r.limited = True
        elif limit is not None and tokens(" ".join(r.words)) > limit:
            while r.words and tokens(" ".join(r.words)) > limit:
                r.words.pop()
            r.limited = True

    def _evict_old_items(self) -> None:
        """Like the service's context truncation: the oldest items leave when the conversation outgrows its limits."""
        cap = int(self.config.max_conversation_audio_s * 1000) * voice.BYTES_PER_MS
        audio = sum(len(item.audio or b"") for item in self.items)
        while len(self.items) > self.config.max_items or audio > cap:
            oldest = self.items[0]
            if self.response is not None and oldest is self.response.item:
                break
            self.items.pop(0)
            audio -= len(oldest.audio or b"")

    def _step(self, r: ActiveResponse) -> None:
        """Deliver the next slice of the reply; schedule the following one, or finish."""
        if self.response is not r:
            return  # cancelled meanwhile
        if not r.output_begun:
            self._begin_output(r)
        if r.reply.kind == "function_call":
            done = self._step_arguments(r)
        elif r.modality == "audio":
            done = self._step_audio(r)
        else:
            done = self._step_text(r)
        if done:
            self._finish_response("incomplete" if r.limited else "completed")
            return
        r.steps += 1
        interval = self.config.delta_ms / 1000 / self.config.speed
        self._at(r.started_at + self.config.first_delta_delay_ms / 1000 + r.steps * interval, lambda: self._step(r))

    def _step_audio(self, r: ActiveResponse) -> bool:
        chunk = self.config.delta_ms * voice.BYTES_PER_MS
        audio = r.reply.audio
        start = r.sent_audio
        piece = audio[start : start + chunk]
        if piece:
            r.sent_audio += len(piece)
            r.item.audio += piece
            self._assistant_audio_sent = True
            law = _law(r.output_format)
            wire = piece if law is None else _g711_slice(audio, start, start + len(piece), law)
            self._emit("response.output_audio.delta", **self._content_ids(), delta=base64.b64encode(wire).decode())
        # The transcript runs slightly ahead of the audio, as the service's does.
        due_words = len(r.words) if not audio else math.ceil(len(r.words) * min(1.0, (r.sent_audio + chunk) / len(audio)))
        self._send_words(r, due_words, "response.output_audio_transcript.delta")
        return r.sent_audio >= len(audio) and r.sent_words >= len(r.words)

    def _step_text(self, r: ActiveResponse) -> bool:
        self._send_words(r, r.sent_words + 1, "response.output_text.delta")
        return r.sent_words >= len(r.words)

    def _send_words(self, r: ActiveResponse, upto: int, event_type: str) -> None:
        while r.sent_words < min(upto, len(r.words)):
            word = r.words[r.sent_words]
            delta = word if r.sent_words == 0 else " " + word
            r.sent_words += 1
            self._emit(event_type, **self._content_ids(), delta=delta)

    def _step_arguments(self, r: ActiveResponse) -> bool:
        args = r.reply.arguments
        half = max(1, len(args) // 2)
        piece = args[r.sent_args : r.sent_args + half]
        if piece:
            r.sent_args += len(piece)
            r.item.data["arguments"] += piece
            self._emit(
                "response.function_call_arguments.delta",
                response_id=r.id,
                item_id=r.item.id,
                output_index=0,
                call_id=r.item.data["call_id"],
                delta=piece,
            )
        return r.sent_args >= len(args)

    def _finish_response(self, status: str, reason: str | None = None) -> None:
        """Close the active response: the *.done events with what was delivered, then response.done."""
        r = self.response
        assert r is not None
        item = r.item
        if item is not None:
            item.data["status"] = "completed" if status == "completed" else "incomplete"
            ids = self._content_ids()
            if r.reply.kind == "function_call":
                self._emit(
                    "response.function_call_arguments.done",
                    response_id=r.id,
                    item_id=item.id,
                    output_index=0,
                    call_id=item.data["call_id"],
                    name=item.data["name"],
                    arguments=item.data["arguments"],
                )
            else:
                said = " ".join(r.words[: r.sent_words])
                if r.modality == "audio":
                    item.audio_part()["transcript"] = said
                    self._emit("response.output_audio.done", **ids)
                    self._emit("response.output_audio_transcript.done", **ids, transcript=said)
                    part = {"type": "audio", "transcript": said}
                else:
                    item.data["content"][0]["text"] = said
                    self._emit("response.output_text.done", **ids, text=said)
                    part = {"type": "text", "text": said}
                self._emit("response.content_part.done", **ids, part=part)
            if r.in_conversation:
                previous = self._previous_of(item.id)
                self._emit("conversation.item.done", previous_item_id=previous, item=item.public())
            self._emit("response.output_item.done", response_id=r.id, output_index=0, item=item.public())
        details: dict[str, Any] | None = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": reason}
        elif status == "incomplete":
            details = {"type": "incomplete", "reason": "max_output_tokens"}
        body = self._response_object(status, details)
        body["usage"] = self._usage(r)
        self._emit("response.done", response=body)
        self._emit("rate_limits.updated", rate_limits=_rate_limits(body["usage"]["total_tokens"]))
        self.response = None
        self._arm_idle_timeout(r)

    def _arm_idle_timeout(self, r: ActiveResponse) -> None:
        """With idle_timeout_ms, the timeout starts when the reply's audio has finished playing (assumed to play
        in real time from its first delta); if the user says nothing by then, the service nudges a response."""
        td = self._turn_detection
        if not td or not td.get("idle_timeout_ms") or not r.sent_audio:
            return
        played_at = r.started_at + self.config.first_delta_delay_ms / 1000 + r.sent_audio / voice.BYTES_PER_MS / 1000
        turn = self._turns
        self._at(max(self._now, played_at) + td["idle_timeout_ms"] / 1000, lambda: self._idle_timeout(turn))

    def _idle_timeout(self, turn: int) -> None:
        if turn != self._turns or self.response is not None or self._turn_detection is None:
            return  # the user spoke, or a response is under way, or turn detection went off
        item_id = new_id("item")
        self._emit(
            "input_audio_buffer.timeout_triggered",
            audio_start_ms=voice.audio_ms(self._buffer_start),
            audio_end_ms=self._appended_ms,
            item_id=item_id,
        )
        audio = bytes(self._buffer)
        self._buffer_start += len(self._buffer)
        self._buffer.clear()
        self._commit(audio, item_id)
        self._start_response(None)

    def _previous_of(self, item_id: str) -> str | None:
        ids = [item.id for item in self.items]
        if item_id not in ids:
            return None
        index = ids.index(item_id)
        return ids[index - 1] if index > 0 else None

    def _usage(self, r: ActiveResponse) -> dict[str, Any]:
        text_in = tokens(self.session["instructions"])
        audio_in = 0
        for item in self.items:
            if item is r.item:
                continue
            for part in item.data.get("content", []):
                if part.get("type") != "input_audio":  # user audio counts as audio tokens below
                    text_in += tokens(part.get("text") or part.get("transcript"))
            if item.audio is not None:
                per_token_ms = 100 if item.data.get("role") == "user" else 50
                audio_in += voice.audio_ms(len(item.audio)) // per_token_ms
            text_in += tokens(item.data.get("arguments")) + tokens(item.data.get("output"))
        cached_text = min(text_in, self._prev_input_tokens[0])
        cached_audio = min(audio_in, self._prev_input_tokens[1])
        self._prev_input_tokens = (text_in, audio_in)
        audio_out = voice.audio_ms(r.sent_audio) // 50
        text_out = tokens(" ".join(r.words[: r.sent_words])) + tokens(r.item.data.get("arguments") if r.item else None)
        return {
            "total_tokens": text_in + audio_in + audio_out + text_out,
            "input_tokens": text_in + audio_in,
            "output_tokens": audio_out + text_out,
            "input_token_details": {
                "text_tokens": text_in,
                "audio_tokens": audio_in,
                "image_tokens": 0,
                "cached_tokens": cached_text + cached_audio,
                "cached_tokens_details": {"text_tokens": cached_text, "audio_tokens": cached_audio, "image_tokens": 0},
            },
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
        }

    # --- expiry --------------------------------------------------------------------------------------------------

    def _expire(self) -> None:
        minutes = self.config.max_session_s / 60
        self._error(
            ProtocolError(
                "session_expired",
                f"Your session hit the maximum duration of {minutes:g} minutes.",
            )
        )
        self._timers.clear()
        self.response = None
        self.closing = (1000, "session expired")


# --- helpers ---------------------------------------------------------------------------------------------------------


def _null_paths(changes: dict[str, Any], prefix: str = ""):
    """Dotted paths of the keys set to null in a (nested) change."""
    for key, value in changes.items():
        if value is None:
            yield prefix + key
        elif isinstance(value, dict):
            yield from _null_paths(value, f"{prefix}{key}.")


def _law(fmt: dict[str, Any]) -> str | None:
    """The G.711 law of an audio format, None for PCM."""
    return fmt["type"] if fmt["type"] in G711_TYPES else None


def _to_wire(pcm: bytes, fmt: dict[str, Any]) -> bytes:
    """24 kHz PCM16 as audio of the format `fmt`."""
    law = _law(fmt)
    return pcm if law is None else g711.encode(g711.downsample_to_8k(pcm), law)


def _g711_slice(pcm: bytes, start: int, end: int, law: str) -> bytes:
    """G.711 of pcm[start:end] (byte offsets; `start` a multiple of 6, one 8 kHz sample), filtered with the audio
    around it: consecutive slices join as if the whole had been converted at once."""
    low, high = max(0, start - _SLICE_MARGIN), min(len(pcm), end + _SLICE_MARGIN)
    pcm8 = g711.downsample_to_8k(pcm[low:high])  # sample k is pcm[low:high]'s sample 3k
    skip = (start - low) // PCM_BYTES_PER_G711_BYTE
    count = -(-(end - start) // PCM_BYTES_PER_G711_BYTE)
    return g711.encode(pcm8[2 * skip : 2 * (skip + count)], law)


def _plan_reply(context: list[SimItem], tools: list[dict[str, Any]], tool_choice: Any) -> Reply:
    """Decide what the simulator answers to the last thing said in `context`."""
    last = next(
        (item for item in reversed(context) if item.data.get("role") == "user" or item.data["type"] == "function_call_output"),
        None,
    )
    if last is None:
        return _spoken("I have not heard anything yet.")
    if last.data["type"] == "function_call_output":
        return _spoken(f"The tool returned: {last.data['output']}")
    text = " ".join(part.get("text", "") for part in last.data["content"] if part.get("type") == "input_text").strip()
    tool = _tool_to_call(text, tools, tool_choice)
    if tool is not None:
        return Reply("function_call", tool_name=tool, arguments=_arguments_in(text))
    if text:
        return _spoken(f"You said: {text}")
    if last.audio:
        duration = voice.audio_ms(len(last.audio))
        return Reply("message", voice.echo_transcript(duration), last.audio, "echo")
    return _spoken("I have not heard anything yet.")


def _spoken(text: str) -> Reply:
    return Reply("message", text, voice.synthesize(text), "words")


def _tool_to_call(text: str, tools: list[dict[str, Any]], tool_choice: Any) -> str | None:
    names = [t["name"] for t in tools if t.get("type", "function") == "function"]
    if not names or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):  # a named function; a named MCP tool is the service's to call, never ours
        return tool_choice["name"] if tool_choice["type"] == "function" and tool_choice["name"] in names else None
    mentioned = [n for n in names if re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", text, re.IGNORECASE)]
    if mentioned:
        return mentioned[0]
    return names[0] if tool_choice == "required" else None


def _mcp_tool_names(allowed: list[str] | dict[str, Any] | None) -> list[str]:
    """The tool names an MCP entry's `allowed_tools` gives (a list, or a filter's `tool_names`), each once."""
    names = allowed.get("tool_names") if isinstance(allowed, dict) else allowed
    return list(dict.fromkeys(names or []))


def _arguments_in(text: str) -> str:
    """The first JSON object written in the message, as the call's arguments; `{}` if there is none."""
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            value, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            return json.dumps(value)
    return "{}"


def _rate_limits(used_tokens: int) -> list[dict[str, Any]]:
    return [
        {"name": "requests", "limit": 5000, "remaining": 4999, "reset_seconds": 0.012},
        {"name": "tokens", "limit": 400000, "remaining": max(0, 400000 - used_tokens), "reset_seconds": 0.3},
    ]

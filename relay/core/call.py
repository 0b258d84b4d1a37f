"""One call's logic, sans-I/O: what to play, what the user heard, what to tell the model and the client.

The adapter feeds it the upstream's events, the model's audio (already cut into 20 ms frames), the client's
data-channel messages and the playout clock's ticks; it returns actions: events for the client's data channel and
events for the upstream. Tested on a virtual clock (tests/unit/test_call_core.py).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Any

from relay.audio.formats import OPUS, CallAudio
from relay.core.policy import EventPolicy, kept_message, named
from relay.protocol import ProtocolError, client_event_envelope, event_id_of, new_id

FRAME_MS = 20
RELAY_EVENT_PREFIX = "relay_"
SILENCE_PEAK = 100  # a frame whose samples all stay below this (about -50 dBFS) is silence
# A stream the model sends at about real time (not faster) turns any burst into lasting delay: the queue can never
# drain. When audio has been arriving at LIVE_RATES times real time over the last LIVE_WINDOW_TICKS and more than
# LIVE_TARGET_FRAMES are queued, silent frames are skipped until the queue is back at target. A reply generated
# faster than real time (the queue is simply the rest of it) never qualifies: its pauses are kept.
LIVE_WINDOW_TICKS = 50
LIVE_RATES = (0.5, 1.25)
LIVE_TARGET_FRAMES = 2


@dataclass
class ToClient:
    event: dict[str, Any]


@dataclass
class ToUpstream:
    event: dict[str, Any]


@dataclass
class RunTools:
    """Run these calls to the relay's own tools (call_id, name, arguments), then hand the outputs to tool_outputs.
    `respond`: ask for the model's reply after them (not when the same response also called a client's tool: the
    client answers that one and asks for the reply itself, as on OpenAI's interface)."""

    calls: list[tuple[str, str, str]]
    respond: bool = True


Action = ToClient | ToUpstream | RunTools


@dataclass
class ItemPlayout:
    """Playout accounting for one assistant audio item, in the item's own time."""

    response_id: str
    item_id: str
    received_ms: float = 0.0  # audio the model sent for it
    queued_frames: int = 0
    emitted_frames: int = 0  # frames handed to the encoder, or skipped as leading silence
    sound_queued: bool = False  # a frame that is not silence has been queued

    @property
    def heard_ms(self) -> int:
        """What the user heard of the model's audio: frames sent, clamped to what was received (the last frame
        may be padding)."""
        return int(min(self.emitted_frames * FRAME_MS, self.received_ms))


@dataclass
class CallStats:
    responses_created: int = 0
    frames_played: int = 0
    silence_frames: int = 0
    leading_silence_skipped: int = 0
    live_silence_skipped: int = 0
    frames_dropped: int = 0  # the playout queue was full
    barge_ins: int = 0
    truncations: int = 0
    deletions: int = 0
    client_errors: int = 0
    policy_refusals: int = 0  # client events the event policy refused (also counted in client_errors)
    fields_kept: int = 0  # client events (and offered sessions) whose locked fields were kept, the rest applied


def _response_id(event: dict[str, Any]) -> str | None:
    """The response id of a response.created/done, or None when the upstream sent something malformed."""
    response = event.get("response")
    value = response.get("id") if isinstance(response, dict) else None
    return value if isinstance(value, str) else None


class CallCore:
    def __init__(self, interruptions: bool = True, max_playout_frames: int = 30_000,
                 server_tools: list[dict[str, Any]] | None = None, policy: EventPolicy | None = None,
                 audio: CallAudio = OPUS) -> None:
        self.interruptions = interruptions  # the operator's setting
        # The upstream audio format is the relay's business, whatever a client asks for (as on OpenAI's own WebRTC
        # endpoint): PCM16 at 24 kHz for an Opus call, the call's own G.711 law for a PCMU or PCMA one.
        self.audio = audio
        self.server_tools = server_tools or []  # definitions of the tools the relay runs itself
        # What the client may change (default here: anything; the server builds it from the settings).
        self.policy = policy or EventPolicy(["*"], server_tools=[t["name"] for t in self.server_tools])
        self.max_playout_frames = max_playout_frames
        self.stats = CallStats()
        self._interrupt_response = True  # the session's own turn_detection.interrupt_response, as upstream says
        self._queue: deque[tuple[ItemPlayout, bytes]] = deque()
        self._items: dict[str, ItemPlayout] = {}  # audio items of responses not yet finished playing
        self._queued_by_response: dict[str, int] = {}
        self._active_response: str | None = None  # between response.created and response.done
        # The response the client's own response.cancel went up for (SDKs send it before output_audio_buffer.clear):
        # a second cancel from the relay could only be refused.
        self._client_cancelled: str | None = None
        self._done: set[str] = set()  # responses whose response.done has come
        self._playing: str | None = None  # response whose output_audio_buffer.started went out
        self._flushed: set[str] = set()  # responses whose late audio must be dropped
        self._own_event_ids: deque[str] = deque(maxlen=256)
        self._respond_when_done = False  # server tools answered while a response was under way
        self.user_speaking = False  # between the upstream's speech_started and the end of that turn
        self.session: dict[str, Any] | None = None  # the upstream session as its last session.created/updated said
        self._ticks = 0  # the playout clock: 20 ms a tick
        self._arrivals: deque[tuple[int, float]] = deque()  # (tick, ms of audio) over the last window
        # Turn latency, when the adapter passes timestamps: from the upstream's speech_stopped to the first frame of
        # the response created after it. The adapter takes the measurements (seconds) from turn_latencies.
        self.turn_latencies: deque[float] = deque(maxlen=100)
        self._speech_stopped_at: float | None = None
        self._turn_response: str | None = None

    @property
    def idle(self) -> bool:
        """No reply being generated or played."""
        return not self._queue and self._playing is None and self._active_response is None

    @property
    def quiet(self) -> bool:
        """Nobody talking: no reply generated or played, and the user not speaking (a moment to change sessions)."""
        return self.idle and not self.user_speaking and not self._respond_when_done

    # --- upstream -> relay -------------------------------------------------------------------------------------

    def on_server_event(self, event: dict[str, Any], now: float | None = None) -> list[Action]:
        """Any upstream event but audio deltas (see on_audio). Returns what to send where. Malformed events are
        forwarded as they are; they only fail to change the call's state. `now` (seconds, any clock that tick()
        gets too): when the event arrived, for the turn latency."""
        kind = event.get("type")
        if kind == "error" and self._is_own(event):
            return []  # our own cancel/truncate/delete lost a race: harmless by design
        actions: list[Action] = [ToClient(event)]
        self._note_server_tool_call(event.get("item"))
        if kind == "response.created":
            self._active_response = _response_id(event)
            self.stats.responses_created += 1
            if self._speech_stopped_at is not None and self._turn_response is None:
                self._turn_response = self._active_response  # the answer to the user's turn
        elif kind == "response.done":
            actions += self._response_done(_response_id(event))
            actions += self._server_tool_calls(event.get("response"))
        elif kind in ("session.created", "session.updated"):
            self.follow_session(event.get("session"))
        elif kind == "input_audio_buffer.speech_started":
            self.user_speaking = True
            self._speech_stopped_at = self._turn_response = None
            if self.interruptions and self._interrupt_response:
                flushed = self.flush()
                if flushed:
                    self.stats.barge_ins += 1
                actions += flushed
        elif kind in ("input_audio_buffer.speech_stopped", "input_audio_buffer.cleared",
                      "input_audio_buffer.timeout_triggered"):
            self.user_speaking = False
            if kind == "input_audio_buffer.speech_stopped":
                self._speech_stopped_at, self._turn_response = now, None
        return actions

    def upstream_lost(self) -> list[Action]:
        """The upstream session ended under the call (a new one will take over, or the call ends). The response it
        was generating will never finish: the client gets its `response.done` (failed) so that it does not wait
        for one; its audio already here still plays out, and counts as heard."""
        actions: list[Action] = []
        lost = self._active_response
        self._active_response = None
        if self._respond_when_done:  # tool outputs were waiting for that response to end: ask the new session
            self._respond_when_done = False
            actions.append(ToUpstream(self.own_event("response.create")))
        self.user_speaking = False
        self._flushed.clear()  # their late events cannot come any more
        if lost is not None:
            actions.append(ToClient(new_event("response.done", response={
                "id": lost, "object": "realtime.response", "status": "failed", "output": [],
                "status_details": {"type": "failed", "error": {
                    "type": "server_error", "code": "upstream_lost",
                    "message": "The connection to the model service was lost during this response."}},
            })))
            actions += self._response_done_playout(lost)
        return actions

    def _response_done(self, response_id: str | None) -> list[Action]:
        if response_id is None:
            return []
        actions: list[Action] = []
        if self._active_response == response_id:
            self._active_response = None
            if self._respond_when_done:  # tool outputs waited for this response to end
                self._respond_when_done = False
                actions.append(ToUpstream(self.own_event("response.create")))
        return actions + self._response_done_playout(response_id)

    def _response_done_playout(self, response_id: str) -> list[Action]:
        if response_id in self._flushed:
            self._flushed.discard(response_id)  # response.done is its last event: no more audio to drop
            return []
        if response_id in self._queued_by_response:  # it had audio; text-only responses need no tracking
            self._done.add(response_id)
            return self._maybe_stopped(response_id)
        return []

    def _server_tool_calls(self, response: Any) -> list[Action]:
        """The finished calls in this response to tools the relay runs (the others are the client's)."""
        names = {t["name"] for t in self.server_tools}
        output = response.get("output") if isinstance(response, dict) else None
        function_calls = [item for item in (output if isinstance(output, list) else [])
                          if isinstance(item, dict) and item.get("type") == "function_call"]
        for item in function_calls:
            self._note_server_tool_call(item)
        calls = [
            (item["call_id"], item["name"], item.get("arguments") if isinstance(item.get("arguments"), str) else "")
            for item in function_calls
            if named(item, names) and isinstance(item.get("call_id"), str)
            and item.get("status", "completed") == "completed"
        ]
        clients_too = any(not named(item, names) for item in function_calls)
        return [RunTools(calls, respond=not clients_too)] if calls else []

    def _note_server_tool_call(self, item: Any) -> None:
        """A call to one of the relay's tools, seen as soon as the model makes it: only the relay answers it (a
        client's output for it would be forged)."""
        if isinstance(item, dict) and item.get("type") == "function_call" and isinstance(item.get("call_id"), str) \
                and named(item, self.policy.server_tools):
            self.policy.server_tool_called(item["call_id"])

    def tool_outputs(self, outputs: list[tuple[str, str]], respond: bool = True) -> list[Action]:
        """The relay's tools have answered (call_id, output): give the model their outputs, then ask it to go on
        (once the response under way, if any, is done: a second one would be refused)."""
        actions: list[Action] = [
            ToUpstream(self.own_event("conversation.item.create",
                                      item={"type": "function_call_output", "call_id": call_id, "output": output}))
            for call_id, output in outputs
        ]
        if respond and self._active_response is None:
            actions.append(ToUpstream(self.own_event("response.create")))
        elif respond:
            self._respond_when_done = True
        return actions

    def follow_session(self, session: Any) -> None:
        """Keep the upstream's effective session (replayed to a new one after a reconnect). Over WebRTC the server
        owns playout: it flushes on speech only when the session says so."""
        if not isinstance(session, dict):
            return
        self.session = session
        audio = session.get("audio") if isinstance(session.get("audio"), dict) else {}
        audio_in = audio.get("input") if isinstance(audio.get("input"), dict) else {}
        turn_detection = audio_in.get("turn_detection")
        if isinstance(turn_detection, dict):
            self._interrupt_response = turn_detection.get("interrupt_response") is not False

    def on_audio(self, response_id: str, item_id: str, frames: list[bytes], source_ms: float) -> list[Action]:
        """The model's audio for an item, as 20 ms frames ready for the encoder (`source_ms` of it arrived).

        Silence at the start of an item is skipped rather than played: the reply starts sooner, and a backlog
        left in the queue by a burst is won back. Skipped frames count as played (the item's timeline moves on,
        so truncation stays exact); pauses inside speech are never cut."""
        if response_id in self._flushed:
            return []
        item = self._items.get(item_id)
        if item is None:
            item = self._items[item_id] = ItemPlayout(response_id, item_id)
        item.received_ms += source_ms
        self._arrivals.append((self._ticks, source_ms))
        for frame in frames:
            if not item.sound_queued and not item.queued_frames and self._is_silence(frame):
                item.emitted_frames += 1
                self.stats.leading_silence_skipped += 1
                continue
            if len(self._queue) >= self.max_playout_frames:
                self.stats.frames_dropped += 1
                continue
            item.sound_queued = True
            self._queue.append((item, frame))
            item.queued_frames += 1
            self._queued_by_response[response_id] = self._queued_by_response.get(response_id, 0) + 1
        return []

    # --- the playout clock -------------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> tuple[bytes | None, list[Action]]:
        """One 20 ms tick: the frame to send now (None: silence), and the events it causes. `now`: as for
        on_server_event."""
        self._ticks += 1
        if not self._queue:
            self.stats.silence_frames += 1
            return None, []
        while len(self._queue) > LIVE_TARGET_FRAMES and self._live() and self._is_silence(self._queue[0][1]):
            self._dequeue()  # counted as played: the item's timeline moves on
            self.stats.live_silence_skipped += 1
        item, frame = self._dequeue()
        self.stats.frames_played += 1
        response_id = item.response_id
        actions: list[Action] = []
        if self._playing != response_id:
            self._playing = response_id
            if response_id == self._turn_response and now is not None and self._speech_stopped_at is not None:
                self.turn_latencies.append(now - self._speech_stopped_at)
                self._speech_stopped_at = self._turn_response = None
            actions.append(ToClient(new_event("output_audio_buffer.started", response_id=response_id)))
        actions += self._maybe_stopped(response_id)
        return frame, actions

    def _dequeue(self) -> tuple[ItemPlayout, bytes]:
        item, frame = self._queue.popleft()
        item.queued_frames -= 1
        item.emitted_frames += 1
        self._queued_by_response[item.response_id] -= 1
        return item, frame

    def _live(self) -> bool:
        """Has the model's audio been arriving at about real time for a whole window (not faster)?"""
        while self._arrivals and self._arrivals[0][0] <= self._ticks - LIVE_WINDOW_TICKS:
            self._arrivals.popleft()
        if self._ticks < LIVE_WINDOW_TICKS:
            return False
        rate = sum(ms for _, ms in self._arrivals) / (LIVE_WINDOW_TICKS * FRAME_MS)
        return LIVE_RATES[0] <= rate <= LIVE_RATES[1]

    def _maybe_stopped(self, response_id: str) -> list[Action]:
        """output_audio_buffer.stopped once a finished response's audio has all been played."""
        if self._playing != response_id or response_id not in self._done:
            return []
        if self._queued_by_response.get(response_id, 0) > 0:
            return []
        self._forget(response_id)
        self._playing = None
        return [ToClient(new_event("output_audio_buffer.stopped", response_id=response_id))]

    def _forget(self, response_id: str) -> None:
        self._done.discard(response_id)
        self._queued_by_response.pop(response_id, None)
        for item_id in [i for i, item in self._items.items() if item.response_id == response_id]:
            del self._items[item_id]

    # --- barge-in ----------------------------------------------------------------------------------------------

    def flush(self) -> list[Action]:
        """Stop the model's audio now; cancel its response if still generating; tell the model what was heard."""
        responses = {r for r in (self._playing, self._active_response) if r is not None}
        responses |= {item.response_id for item, _ in self._queue}
        if not responses:
            return []
        had_audio = bool(self._queue) or self._playing is not None
        self._queue.clear()
        actions: list[Action] = []
        if self._active_response is not None and self._active_response != self._client_cancelled:
            actions.append(ToUpstream(self.own_event("response.cancel")))
        for item in [i for i in self._items.values() if i.response_id in responses]:
            if item.response_id in self._done and item.queued_frames == 0 and item.heard_ms >= item.received_ms:
                continue  # fully heard: nothing to correct
            if item.heard_ms > 0:
                self.stats.truncations += 1
                actions.append(ToUpstream(self.own_event(
                    "conversation.item.truncate", item_id=item.item_id, content_index=0, audio_end_ms=item.heard_ms
                )))
                # OpenAI drops a truncated item's transcript; only the relay knows how much of the audio it has
                # (so far) was heard, which lets a client mark the unheard part of the transcript it received.
                actions.append(ToClient(new_event(
                    "relay.item.truncated", item_id=item.item_id, audio_end_ms=item.heard_ms,
                    audio_received_ms=int(item.received_ms),
                )))
            else:
                self.stats.deletions += 1
                actions.append(ToUpstream(self.own_event("conversation.item.delete", item_id=item.item_id)))
        if had_audio:
            cleared = self._playing or self._active_response or next(iter(responses))
            actions.append(ToClient(new_event("output_audio_buffer.cleared", response_id=cleared)))
        for response_id in responses:
            self._forget(response_id)
            if response_id == self._active_response:
                self._flushed.add(response_id)
        self._playing = None
        return actions

    # --- client -> relay ---------------------------------------------------------------------------------------

    def on_client_event(self, text: str, trusted: bool = False) -> tuple[list[Action], str | None]:
        """A data-channel message from the client: the actions, and the text to forward upstream (the client's
        own, untouched, unless the relay had to change it; None when nothing goes upstream). `trusted`: from a
        backend attached with an API key: the envelope checks apply, the event policy does not (its `error`
        actions are its own; the caller sends them back to it).

        The relay checks only what it acts on: JSON, a known event type, and the fields it must control. Anything
        else (new fields included) is the upstream's to accept or refuse, as on OpenAI's own endpoint."""
        try:
            event = client_event_envelope(text)
        except ProtocolError as error:
            self.stats.client_errors += 1
            return [ToClient(_error_event(error))], None
        kind = event["type"]
        if kind == "input_audio_buffer.append":
            self.stats.client_errors += 1
            return [ToClient(_error_event(ProtocolError(
                "invalid_value",
                "input_audio_buffer.append is not supported over WebRTC: the audio goes by the RTP track.",
                "type",
                event_id_of(event),
            )))], None
        if kind == "output_audio_buffer.clear":
            return self.flush(), None
        if kind == "response.cancel" and event.get("response_id") in (None, self._active_response):
            self._client_cancelled = self._active_response
        refusal = None if trusted else self.policy.check(event)
        if refusal is not None:
            self.stats.client_errors += 1
            self.stats.policy_refusals += 1
            return [ToClient(_error_event(ProtocolError(
                refusal.code, refusal.message, refusal.param, event_id_of(event))))], None
        kept = [] if trusted else self.policy.keep_locked(event, self.session)
        actions = [ToClient(self.fields_kept(kept, event_id_of(event)))] if kept else []
        changed = bool(kept)
        if kind == "session.update":
            changed |= self._adapt_session(event.get("session"))
        response = event.get("response")
        if kind == "response.create" and isinstance(response, dict):
            changed |= _force_formats(response, self.audio.session_format())
        return actions, (json.dumps(event, separators=(",", ":")) if changed else text)

    def fields_kept(self, params: list[str], client_event_id: str | None) -> dict[str, Any]:
        """The client's `relay.policy.fields_kept`: the locked values its event (or its offer's session) would
        have changed, which stayed as they were while the rest was applied."""
        self.stats.fields_kept += 1
        return new_event("relay.policy.fields_kept", client_event_id=client_event_id, params=params,
                         message=kept_message(params))

    def _adapt_session(self, session: Any) -> bool:
        """The fields the relay controls in a session.update; True when it changed something."""
        if not isinstance(session, dict):
            return False
        changed = _force_formats(session, self.audio.session_format())
        if self.server_tools and "tools" in session:
            session["tools"] = with_tools(session["tools"], self.server_tools)  # the client's list replaces all
            changed = True
        turn_detection = _path(session, "audio", "input").get("turn_detection")
        if not self.interruptions and isinstance(turn_detection, dict) and turn_detection.get("interrupt_response") is not False:
            turn_detection["interrupt_response"] = False
            changed = True
        return changed

    def upstream_session(self, session: dict[str, Any] | None) -> dict[str, Any] | None:
        """The session a new upstream session is opened with: the call's audio format wherever one is named, and
        for a G.711 call both ways always (the service's default is PCM). None stays None for an Opus call: the
        default is its format, and no session.update is needed."""
        if session is None and not self.audio.passthrough:
            return None
        session = json.loads(json.dumps(session or {}))  # a copy: the caller's stays as it was
        if self.audio.passthrough:
            session.setdefault("type", "realtime")
            audio = _child(session, "audio")
            for direction in ("input", "output"):
                _child(audio, direction)["format"] = self.audio.session_format()
        else:
            _force_formats(session, self.audio.session_format())
        return session

    def format_mismatch(self, session: Any) -> str | None:
        """Why an upstream session whose effective configuration is `session` cannot carry the call's audio (it
        reports another format than the one the relay set), or None. A format it does not report is taken on trust."""
        wanted = self.audio.session_format()
        for direction in ("input", "output"):
            fmt = _path(session, "audio", direction).get("format") if isinstance(session, dict) else None
            if isinstance(fmt, dict) and any(fmt.get(key, value) != value for key, value in wanted.items()):
                return (f"The model service did not take the call's audio format ({wanted['type']}) for "
                        f"audio.{direction}.format: it reports {json.dumps(fmt)[:100]}.")
        return None

    def _is_silence(self, frame: bytes) -> bool:
        return self.audio.peak(frame) < SILENCE_PEAK

    # --- relay-originated upstream events ----------------------------------------------------------------------

    def own_event(self, event_type: str, **fields: Any) -> dict[str, Any]:
        """An event the relay sends upstream on its own; errors it causes are not passed to the client."""
        event_id = new_id(RELAY_EVENT_PREFIX + "evt")
        self._own_event_ids.append(event_id)
        return {"type": event_type, "event_id": event_id, **fields}

    def _is_own(self, error_event: dict[str, Any]) -> bool:
        error = error_event.get("error")
        return isinstance(error, dict) and error.get("event_id") in self._own_event_ids


def with_tools(session_tools: Any, own: list[dict[str, Any]]) -> list[Any]:
    """A session's tools with the relay's own added; where a name clashes, the relay's definition stays (the relay
    runs the calls to that name)."""
    names = {t["name"] for t in own}
    kept = [t for t in session_tools if not (isinstance(t, dict) and named(t, names))] \
        if isinstance(session_tools, list) else []
    return kept + own


def _path(container: dict[str, Any], *keys: str) -> dict[str, Any]:
    """container[k1][k2]... when each is a dict; {} otherwise (a detached dict: writes to it go nowhere)."""
    for key in keys:
        value = container.get(key)
        if not isinstance(value, dict):
            return {}
        container = value
    return container


def _child(container: dict[str, Any], key: str) -> dict[str, Any]:
    """container[key], made a dict if it is not one."""
    if not isinstance(container.get(key), dict):
        container[key] = {}
    return container[key]


def _force_formats(config: dict[str, Any], upstream_format: dict[str, Any]) -> bool:
    """Put the call's own upstream audio format wherever a client named one; True when something changed."""
    changed = False
    for direction in ("input", "output"):
        section = _path(config, "audio", direction)
        if "format" in section and section["format"] != upstream_format:
            section["format"] = dict(upstream_format)
            changed = True
    return changed


def new_event(event_type: str, **fields: Any) -> dict[str, Any]:
    """An event the relay itself sends the client (its own `relay.*` ones, and those it speaks for the service)."""
    return {"type": event_type, "event_id": new_id("event"), **fields}


def _error_event(error: ProtocolError) -> dict[str, Any]:
    return new_event("error", error=error.detail())


def error_event(code: str, message: str, error_type: str = "invalid_request_error") -> dict[str, Any]:
    """An `error` event the relay itself sends to the client."""
    return _error_event(ProtocolError(code, message, error_type=error_type))

"""The Call: one client's peer connection tied to one upstream conversation, from the offer to the last byte.

Owns: the story of a call. It composes one owner per connection (peer.py: the client's peer connection and data
channel; upstream.py: the session with the model; records.py: transcript and recording), feeds the sans-I/O core
(relay/core/call.py) what they bring, carries out the core's actions, fans the call's events out to whoever listens
(fanout.py), hands the relay's tools their runs (tools.py), watches for idleness and the duration limit, counts, and ends everything it
started. The audio path (50 times a second each way) is two plain methods here: on_user_audio and next_frame.
Must not touch: HTTP (requests, responses, routes and limits are relay/server's), sockets or aiortc objects
directly (the links own them), or any decision the core makes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from typing import Any, Callable

from relay.audio.convert import Chunker
from relay.audio.formats import OPUS, CallAudio
from relay.call import meter
from relay.call.backend import BackendLink, Backends
from relay.call.fanout import Fanout
from relay.call.peer import PeerLink, SetupError
from relay.call.records import Records
from relay.call.tasks import Tasks
from relay.call.tools import ToolRunner
from relay.call.upstream import UpstreamLink
from relay.config import Settings
from relay.core.call import Action, CallCore, RunTools, ToClient, error_event, new_event
from relay.core.history import History
from relay.core.policy import EventPolicy
from relay.protocol import new_id
from relay.tools import Toolbox
from relay.upstream.target import UpstreamTarget

log = logging.getLogger("relay.call")


class Call:
    def __init__(self, settings: Settings, target: UpstreamTarget, on_closed: Callable[["Call"], None],
                 call_id: str | None = None, toolbox: Toolbox | None = None, policy: EventPolicy | None = None,
                 token_nonce: str | None = None, history: History | None = None, audio: CallAudio = OPUS) -> None:
        self.id = call_id or new_id("rtc")
        self.settings = settings
        self.audio = audio  # what the client's codec carries to the model and back (relay/audio/formats.py)
        self.token_nonce = token_nonce  # the client secret it was created with: good for ending it
        self._on_closed = on_closed
        toolbox = toolbox or Toolbox([])
        self.core = CallCore(interruptions=settings.interruptions, server_tools=toolbox.definitions(),
                             policy=policy or EventPolicy(settings.client_session_fields, server_tools=[
                                 t["name"] for t in toolbox.definitions()]), audio=audio)
        self.started_at = time.monotonic()
        self.closed = asyncio.Event()
        self.close_reason: str | None = None
        self.answered = False  # the client got its 201: the call counts as started
        self.tasks = Tasks(f"call-{self.id}", self._task_failed)
        self.events = Fanout()
        self.records = Records(self.id, settings, history, tell=self.tell, rate=audio.rate)
        self.peer = PeerLink(self.id, settings, self.started_at, on_audio=self.on_user_audio,
                             next_frame=self.next_frame, on_text=self.on_client_text, on_gone=self.close_soon,
                             audio=audio)
        self.upstream = UpstreamLink(self.id, settings, target, owner=self, spawn=self.tasks.spawn)
        self.tools = ToolRunner(self.id, toolbox, settings.tool_timeout_s, self.core, carry_out=self._dispatch,
                                spawn=self.tasks.spawn, end_call=self.close_soon)
        self.events.listen(self.records)  # first: a truncation cuts the transcript before the client hears of it
        self.events.listen(self.peer)
        self.backends = Backends(self.id, self.events, settings.max_backends_per_call)  # listeners from attach on
        self._framer = self._new_framer()  # the current item's audio, cut into 20 ms frames
        self._framing_item: str | None = None
        self._closer: asyncio.Task | None = None
        self._meter = meter.CallMeter()

    @property
    def history(self) -> History:
        return self.records.history

    # --- setup -------------------------------------------------------------------------------------------------

    async def start(self, offer_sdp: str, session: dict[str, Any] | None, kept: list[str] | None = None) -> str:
        """Negotiate with the client and open the upstream, concurrently; return the answer SDP. `kept`: what the
        policy kept of the creator's session (the client is told after `session.created`, its first event)."""
        # A resumed call's session starts with the earlier conversation, as text, before the user speaks.
        opening = asyncio.create_task(self.upstream.open(session, self.history.replay_items(), from_client=True))
        try:
            answer = await self.peer.negotiate(offer_sdp)
            ws, initial_events = await opening
        except BaseException:
            opening.cancel()
            with contextlib.suppress(BaseException):
                ws, _ = await opening
                await ws.close()
            raise
        if self.close_reason is not None:  # ended while the upstream opened (its peer connection failed at once)
            await ws.close()
            raise SetupError("call_ended", f"The call ended while it was set up: {self.close_reason}.")
        self.upstream.adopt(ws, initial_events, first=True)
        if kept:
            self.tell(self.core.fields_kept(kept, None))
        self.upstream.start()
        self.tasks.spawn(self._watch(), "watchdog")
        if self.records.recording is not None:
            self.tasks.spawn(self.records.keep_recording(), "recording")
        self.answered = True
        meter.call_started(self.audio.codec)
        log.info("call %s started (%s)", self.id, self.audio.codec, extra={
            "call_id": self.id, "event": "started", "codec": self.audio.codec})
        return answer

    # --- audio, 50 times a second each way ---------------------------------------------------------------------

    def on_user_audio(self, audio: bytes) -> None:
        """~20 ms of the client's audio in the upstream's format, straight from the inbound tap."""
        self.upstream.send_audio(audio)
        recording = self.records.recording
        if recording is not None:
            recording.on_user_audio(self.audio.to_pcm16(audio), time.monotonic())

    def next_frame(self) -> bytes | None:
        """The playout clock's tick: the frame to send now (None: silence)."""
        frame, actions = self.core.tick(time.monotonic())
        if actions:
            self._dispatch(actions)
        recording = self.records.recording
        if recording is not None:
            recording.on_model_frame(None if frame is None else self.audio.to_pcm16(frame), time.monotonic(),
                                     self.audio.rate // 50)
        return frame

    # --- events ------------------------------------------------------------------------------------------------

    def tell(self, event: dict[str, Any]) -> None:
        """An event for the call's clients (held for the data channel until it opens)."""
        self.events.tell(event)

    def on_client_text(self, text: str, backend: BackendLink | None = None) -> None:
        """A client's event (the peer link has checked its size and kind), or an attached backend's: trusted (no
        event policy), its errors back to it alone."""
        actions, upstream_text = self.core.on_client_event(text, trusted=backend is not None)
        reply = self.tell if backend is None else backend.reply
        for action in actions:
            if backend is not None and isinstance(action, ToClient) and action.event["type"] == "error":
                reply(action.event)
            else:
                self._dispatch([action])
        if upstream_text is not None and '"conversation.item.create"' in upstream_text:
            self.events.added(json.loads(upstream_text))  # the core has checked it is JSON
        if upstream_text is not None and not self.upstream.send(upstream_text):
            reply(error_event("relay_backlog_full", "The model service is not keeping up: event refused."))

    def on_server_event(self, event: dict[str, Any], text: str) -> None:
        """An upstream event other than audio: the core decides, the listeners hear it."""
        kind = event["type"]
        if kind == "response.output_audio.done" and event.get("item_id") == self._framing_item:
            last = self._framer.flush()
            self._dispatch(self.core.on_audio(event.get("response_id", ""), self._framing_item,
                                              [last] if last else [], 0.0))
        if kind == "conversation.item.retrieved" and _drop_item_audio(event):
            text = json.dumps(event, separators=(",", ":"))  # the client heard it by RTP; it may not fit the channel
        for action in self.core.on_server_event(event, time.monotonic()):
            if isinstance(action, ToClient) and action.event is event:
                self.events.tell(event, text)  # forwarded as received: no re-serialising
            else:
                self._dispatch([action])
        self.events.heard(event)

    def on_audio_delta(self, event: dict[str, Any]) -> None:
        response_id, item_id = event.get("response_id"), event.get("item_id")
        try:
            if not (isinstance(response_id, str) and isinstance(item_id, str)):
                raise ValueError("ids must be strings")
            audio = base64.b64decode(event["delta"], validate=True)
        except (KeyError, TypeError, binascii.Error, ValueError):
            log.warning("call %s: malformed audio delta dropped", self.id, extra={"call_id": self.id})
            return
        if item_id != self._framing_item:
            self._framer = self._new_framer()  # a new item starts on a frame boundary
            self._framing_item = item_id
        frames = self._framer.push(self.audio.whole_samples(audio))
        self._dispatch(self.core.on_audio(response_id, item_id, frames, len(audio) / self.audio.bytes_per_ms))

    def _new_framer(self) -> Chunker:
        return Chunker(self.audio.frame_bytes, pad=self.audio.silence(self.audio.frame_bytes))

    def session_lost(self) -> None:
        """A reply under way dies with its upstream session: what the user has of it still plays and joins the
        history (replayed to the new session); the client gets its response.done."""
        self._framer, self._framing_item = self._new_framer(), None  # less than a frame is left: dropped
        self.records.upstream_lost()
        self._dispatch(self.core.upstream_lost())

    def quiet(self) -> bool:
        return self.core.quiet and not self.tools.running

    def _dispatch(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, ToClient):
                self.events.tell(action.event)
            elif isinstance(action, RunTools):
                self.tools.run(action)
            else:
                if action.event["type"] == "conversation.item.create":
                    self.events.added(action.event)  # a tool's output, in the transcript
                self.upstream.send(json.dumps(action.event, separators=(",", ":")), budgeted=False)

    # --- lifetime ----------------------------------------------------------------------------------------------

    async def _watch(self) -> None:
        """End the call when both sides of the client have been silent too long, or at its maximum duration."""
        idle, longest = self.settings.call_idle_timeout_s, self.settings.max_call_duration_s
        while True:
            left = self.started_at + longest - time.monotonic()
            await asyncio.sleep(max(0.0, min(1.0, idle / 4, left)))  # a vanished client is freed within ~1 s of it
            now = time.monotonic()
            heard = [t for t in (self.started_at, self.peer.inbound.last_packet_at, self.peer.last_message_at) if t]
            if now - max(heard) > idle:
                self.close_soon("idle: no media or messages")
                return
            if now - self.started_at >= longest:
                self.tell(error_event("call_duration_exceeded", f"Calls last at most {longest:g} s on this relay "
                                      "(RELAY_MAX_CALL_DURATION_S); the call is ending."))
                self.close_soon("maximum duration")
                return

    def _task_failed(self, task: asyncio.Task) -> None:
        log.error("call %s: task %s failed", self.id, task.get_name(), exc_info=task.exception(),
                  extra={"call_id": self.id})
        self.tell(error_event("server_error", "The relay failed; the call is ending.", "server_error"))
        self.close_soon("internal error")

    def flush_metrics(self, counts: dict[str, int] | None = None) -> None:
        """Add what the call counted since the last time to the process's metrics (once a second, and at the end)."""
        latencies = list(self.core.turn_latencies)
        self.core.turn_latencies.clear()
        self._meter.flush(meter.counts(self) if counts is None else counts, latencies)

    async def shut_down(self, flush_s: float = 1.0) -> None:
        """The relay is going away: tell the client (`relay.shutdown`: connect again, to another relay, where the
        conversation can be resumed), give the event up to `flush_s` to be acknowledged, then end the call."""
        if self.close_reason is None:
            self.tell(new_event(
                "relay.shutdown", reason="server_shutdown", reconnect=True, resume_call_id=self.id,
                message="This relay is shutting down and ends the call. Connect again to continue; "
                "POST /v1/realtime/calls?resume=<resume_call_id> continues this conversation where its transcript "
                "is kept."))
            deadline = time.monotonic() + flush_s
            while not self.peer.flushed() and time.monotonic() < deadline and self.close_reason is None:
                await asyncio.sleep(0.02)
        await self.close("server shutdown")

    def close_soon(self, reason: str) -> None:
        """End the call from inside one of its own callbacks or tasks."""
        if self._closer is None:
            self._closer = asyncio.ensure_future(self.close(reason))

    async def close(self, reason: str) -> None:
        """End the call and free everything it holds. Safe to call more than once, from anywhere."""
        if self.close_reason is not None:
            await self.closed.wait()
            return
        self.close_reason = reason
        counts = meter.counts(self)
        self.flush_metrics(counts)
        meter.call_ended(self.answered, reason)
        log.info("call %s ended: %s", self.id, reason, extra={
            "call_id": self.id, "event": "ended", "reason": reason, "outcome": meter.outcome(reason),
            "answered": self.answered, "duration_s": round(time.monotonic() - self.started_at, 3), **counts})
        try:
            self._on_closed(self)
            self.backends.end_all(reason)
            await self.tasks.cancel_all()
            await self.records.finish()
            await self.peer.close()
            await self.upstream.close()
        finally:
            self.closed.set()


def _drop_item_audio(event: dict[str, Any]) -> bool:
    """Remove the audio of a retrieved item's content (True if there was some)."""
    item = event.get("item")
    dropped = False
    if isinstance(item, dict) and isinstance(item.get("content"), list):
        for part in item["content"]:
            if isinstance(part, dict) and "audio" in part:
                del part["audio"]
                dropped = True
    return dropped

"""Signaling (`POST /v1/realtime/calls`, hangup) and the Call: one peer connection tied to one upstream session.

The Call is a thin adapter. aiortc hands it RTP packets (through the inbound tap) and data-channel messages,
websockets hands it upstream events, the playout track asks it for a frame every 20 ms; the decisions are
CallCore's. Every task a call starts is owned by it and cancelled when it ends.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import time
import wave
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import websockets
from aiohttp import BodyPartReader, web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.exceptions import InvalidStateError
from aiortc import sdp as aiortc_sdp
from aiohttp.http_exceptions import HttpProcessingError

from relay.audio.convert import FRAME_BYTES_24K, Chunker
from relay.config import Settings
from relay.core.call import Action, CallCore, RunTools, ToClient, error_event, new_event
from relay.core.history import History
from relay.core.reconnect import backoff_delays, is_fatal, rollover_at, session_to_replay, still_to_send
from relay.core.recording import RATE as RECORDING_RATE, StereoTimeline
from relay.tools import ToolContext, Toolbox
from relay.core.policy import EventPolicy, Refusal, call_model, starting_session
from relay.server.auth import BACKEND, TOKEN_NONCE, TOKEN_SESSION
from relay.server.errors import error_response
from relay.server.limits import Networks, RateLimiter, client_address, networks, rate_key, retry_after
from relay.protocol import new_id
from relay.upstream.client import UpstreamError, open_upstream
from relay.server.workers import Worker, ask_worker, peer_address, routing_middleware
from relay.upstream.target import UpstreamTarget
from relay.server import metrics
from relay.webrtc.aiortc_internals import data_channel_flushed, install_packet_tap, rtp_bytes_sent
from relay.webrtc.ice import announce_address, relay_ice_servers
from relay.webrtc.inbound import InboundAudio
from relay.webrtc.playout import PlayoutTrack

log = logging.getLogger("relay.call")

EVENTS_CHANNEL = "oai-events"
MAX_PENDING_CLIENT_EVENTS = 1000  # held until the data channel opens; beyond it, the newest are dropped
MAX_UPSTREAM_BACKLOG_BYTES = 4 * 1024 * 1024  # waiting for the upstream; beyond it audio is dropped, events refused
MAX_CHANNEL_BUFFER_BYTES = 8 * 1024 * 1024  # unacknowledged data-channel bytes: beyond it the client is not reading
# The user's last 500 ms of audio go to a rollover's new session first: a word begun just before the switch (before
# the old session's VAD reported it) is heard whole by the new one.
RECENT_AUDIO_CHUNKS = 25
ROLLOVER_RETRY_S = 2.0  # a rollover that found the conversation moving on tries again this much later
ROLLOVER_SETTLE_S = 1.0  # the old session's answer to the last event sent to it has had time to come back


class SignalingError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Call:
    def __init__(self, settings: Settings, target: UpstreamTarget, on_closed: Callable[["Call"], None],
                 call_id: str | None = None, toolbox: Toolbox | None = None, policy: EventPolicy | None = None,
                 token_nonce: str | None = None) -> None:
        self.id = call_id or new_id("rtc")
        self.settings = settings
        self.target = target
        self._on_closed = on_closed
        self.toolbox = toolbox or Toolbox([])
        self.token_nonce = token_nonce  # the client secret it was created with: good for ending it
        self.core = CallCore(interruptions=settings.interruptions, server_tools=self.toolbox.definitions(),
                             policy=policy or call_policy(settings, self.toolbox, None))
        self.history = History(settings.prices)
        self._history_log = Path(settings.history_dir) / f"{self.id}.jsonl" if settings.history_dir else None
        self.recording = StereoTimeline(time.monotonic()) if settings.recordings_dir else None
        self._wav: wave.Wave_write | None = None
        self._wav_write: asyncio.Future | None = None
        self.inbound = InboundAudio(self._to_upstream_audio, reorder_window=settings.reorder_window)
        self.track = PlayoutTrack(self._next_frame)
        self.pc: RTCPeerConnection | None = None
        self.ws: websockets.ClientConnection | None = None
        self.channel: Any = None
        self.started_at = time.monotonic()
        self.last_client_message_at: float | None = None
        self.closed = asyncio.Event()
        self.close_reason: str | None = None
        self.dropped_audio_chunks = 0
        self.dropped_client_events = 0
        self._tasks: set[asyncio.Task] = set()
        self._closer: asyncio.Task | None = None
        self._client_pending: deque[str] = deque()
        self._upstream_outbox: deque[str] = deque()
        self._upstream_outbox_bytes = 0
        self._upstream_ready = asyncio.Event()  # something is in the outbox
        self._upstream_live = asyncio.Event()  # a session is connected: the writer may send
        self._reconnecting = False  # a session was lost and its replacement is not there yet: audio is dropped
        self._recent_audio: deque[str] = deque(maxlen=RECENT_AUDIO_CHUNKS)  # given to a rollover's new session
        self._last_upstream_error: str | None = None  # the code, when the upstream's last event was an error
        self._fatal_error: str | None = None  # a fatal code the upstream sent (a refused key): no reconnect
        self._switched = asyncio.Event()  # a new session replaced the one being read
        self._events_sent = 0  # events other than audio written upstream, and when the last one was
        self._event_sent_at = 0.0
        self._session_opened_at = 0.0  # wall clock, like expires_at
        self._expires_at: Any = None  # the upstream session's, from its session.created
        self._tools_running = 0
        self.reconnects = 0
        self.rollovers = 0
        # Counted in plain ints on the way (cheap: no metric is touched per frame or per event); the metrics get
        # what grew once a second and at the end (flush_metrics).
        self.answered = False  # the client got its 201: the call counts as started
        self.datachannel_bytes_in = self.datachannel_bytes_out = 0
        self.upstream_bytes_in = self.upstream_bytes_out = 0  # JSON text of the upstream's events and ours
        self._sender: RTCRtpSender | None = None
        self._meter = metrics.CallMeter()
        self._framer = Chunker(FRAME_BYTES_24K)  # the current item's audio, cut into 20 ms frames
        self._framing_item: str | None = None

    # --- setup -------------------------------------------------------------------------------------------------

    async def start(self, offer_sdp: str, session: dict[str, Any] | None) -> str:
        """Negotiate with the client and open the upstream, concurrently; return the answer SDP."""
        # A resumed call's session starts with the earlier conversation, as text, before the user speaks.
        upstream = asyncio.create_task(self._open_upstream(session, self.history.replay_items(), from_client=True))
        try:
            answer = await self._negotiate(offer_sdp)
            ws, initial_events = await upstream
        except BaseException:
            upstream.cancel()
            with contextlib.suppress(BaseException):
                ws, _ = await upstream
                await ws.close()
            raise
        if self.close_reason is not None:  # ended while the upstream opened (its peer connection failed at once)
            await ws.close()
            raise SignalingError(400, "call_ended", f"The call ended while it was set up: {self.close_reason}.")
        self._adopt(ws, initial_events, first=True)
        self._spawn(self._keep_upstream(), "upstream-reader")
        self._spawn(self._write_upstream(), "upstream-writer")
        self._spawn(self._roll_over(), "rollover")
        self._spawn(self._watch(), "watchdog")
        if self.recording is not None:
            self._spawn(self._keep_recording(), "recording")
        self.answered = True
        metrics.call_started()
        log.info("call %s started", self.id, extra={"call_id": self.id, "event": "started"})
        return answer

    async def _negotiate(self, offer_sdp: str) -> str:
        servers = [RTCIceServer(**server) for server in relay_ice_servers(self.settings, self.id, time.time())]
        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))  # [] means none, not Google's
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)
        try:
            check_media_ids(offer_sdp)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc reports bad SDP with several exception types
            raise SignalingError(400, "invalid_offer", f"The SDP offer could not be used: {exc}"[:300]) from None
        audio = [t for t in pc.getTransceivers() if t.kind == "audio"]
        if not audio:
            raise SignalingError(400, "invalid_offer", "The SDP offer has no audio m-line.")
        opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"]
        audio[0].setCodecPreferences(opus)  # the inbound tap decodes Opus only
        install_packet_tap(audio[0].receiver, self.inbound)
        self._sender = pc.addTrack(self.track)  # takes the offer's audio transceiver: sendrecv
        try:
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            raise SignalingError(400, "invalid_offer", f"No answer can be made to this offer: {exc}"[:300]) from None
        if "opus/48000" not in pc.localDescription.sdp.lower():
            raise SignalingError(400, "invalid_offer", "The SDP offer does not offer Opus audio.")
        if self.settings.announced_ip:  # the address clients reach through the NAT in front (ports kept)
            return announce_address(pc.localDescription.sdp, self.settings.announced_ip)
        return pc.localDescription.sdp

    # --- client side -------------------------------------------------------------------------------------------

    def _on_datachannel(self, channel: Any) -> None:
        if channel.label != EVENTS_CHANNEL or self.channel is not None:
            return  # OpenAI's interface has one channel; others are ignored
        self.channel = channel
        channel.on("message", self._on_client_message)
        while self._client_pending:
            self._send_to_channel(self._client_pending.popleft())

    def _on_client_message(self, message: str | bytes) -> None:
        """Runs inside aiortc's SCTP loop: nothing may escape from here."""
        try:
            self.last_client_message_at = time.monotonic()
            self.datachannel_bytes_in += len(message)
            if isinstance(message, bytes):
                self._to_client(error_event("invalid_event", "Binary messages are not supported: send events as JSON text."))
            elif _utf8_size(message) > self.settings.max_message_bytes:
                self._to_client(error_event(
                    "message_too_large", f"Data-channel messages are limited to {self.settings.max_message_bytes} "
                    "bytes (RELAY_MAX_MESSAGE_BYTES)."))
            else:
                actions, upstream_text = self.core.on_client_event(message)
                self._dispatch(actions)
                if upstream_text is not None and '"conversation.item.create"' in upstream_text:
                    self.history.on_client_event(json.loads(upstream_text))  # the core has checked it is JSON
                    self._save_history()
                if upstream_text is not None and not self._to_upstream(upstream_text):
                    self._to_client(error_event("relay_backlog_full", "The model service is not keeping up: event refused."))
        except Exception:
            log.exception("call %s: failed on a client message", self.id, extra={"call_id": self.id})
            self._to_client(error_event("server_error", "The relay failed on this event.", "server_error"))

    def tell_client(self, event: dict[str, Any]) -> None:
        """An event for the client, from outside the call (held until the data channel opens)."""
        self._to_client(event)

    def _to_client(self, event: dict[str, Any]) -> None:
        self._to_client_text(json.dumps(event, separators=(",", ":")))

    def _to_client_text(self, text: str) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self._send_to_channel(text)
        elif len(self._client_pending) < MAX_PENDING_CLIENT_EVENTS:
            self._client_pending.append(text)  # the first events (session.created) are never the ones dropped
        else:
            self.dropped_client_events += 1

    def _send_to_channel(self, text: str) -> None:
        try:
            try:
                self.channel.send(text)
                self.datachannel_bytes_out += len(text)
            except ValueError:  # larger than the client's max-message-size
                self.dropped_client_events += 1
                self.channel.send(json.dumps(error_event(
                    "event_too_large", f"An event of {len(text)} bytes was too large for the data channel and was "
                    "dropped.", "server_error")))
        except InvalidStateError:
            return  # the channel closed: the call is ending
        if self.channel.bufferedAmount > MAX_CHANNEL_BUFFER_BYTES:
            self.close_soon("client not reading its data channel")

    async def _on_connection_state(self) -> None:
        if self.pc is not None and self.pc.connectionState in ("failed", "closed"):
            self.close_soon(f"peer connection {self.pc.connectionState}")
        elif self.pc is not None and self.pc.connectionState == "connected":
            log.info("call %s connected", self.id, extra={
                "call_id": self.id, "event": "connected",
                "setup_ms": round((time.monotonic() - self.started_at) * 1000)})

    # --- media -------------------------------------------------------------------------------------------------

    def _to_upstream_audio(self, pcm24: bytes) -> None:
        """~20 ms of the client's audio, straight from the inbound tap."""
        text = '{"type":"input_audio_buffer.append","audio":"' + base64.b64encode(pcm24).decode() + '"}'
        self._recent_audio.append(text)
        if self._reconnecting or not self._to_upstream(text):
            self.dropped_audio_chunks += 1
        if self.recording is not None:
            self.recording.on_user_audio(pcm24, time.monotonic())

    def _to_upstream(self, text: str, budgeted: bool = True) -> bool:
        """Queue for the upstream writer. The client's audio and events must fit the byte budget (False: refused);
        the relay's own control events (cancel, truncate) always go."""
        if budgeted and self._upstream_outbox_bytes + len(text) > MAX_UPSTREAM_BACKLOG_BYTES:
            return False
        self._upstream_outbox.append(text)
        self._upstream_outbox_bytes += len(text)
        self._upstream_ready.set()
        return True

    def _next_frame(self) -> bytes | None:
        """The playout clock's tick."""
        frame, actions = self.core.tick(time.monotonic())
        if actions:
            self._dispatch(actions)
        if self.recording is not None:
            self.recording.on_model_frame(frame, time.monotonic())
        return frame

    # --- upstream side -----------------------------------------------------------------------------------------

    async def _open_upstream(self, session: dict[str, Any] | None, replay: list[dict[str, Any]],
                             from_client: bool = False) -> tuple[websockets.ClientConnection, list[str]]:
        return await open_upstream(
            self.target, session, self.settings.upstream_timeout_s, keep_talking=not self.settings.interruptions,
            tools=self.core.server_tools, replay=replay, from_client=from_client,
        )

    async def _open_next_session(self) -> tuple[websockets.ClientConnection, list[str], int, int]:
        """A session to take over from the current one, given its configuration and the conversation so far:
        (socket, its first events, history entries it has had, items replayed)."""
        said = self.history.next_seq
        replay = self.history.replay_items()
        ws, events = await self._open_upstream(session_to_replay(self.core.session), replay)
        return ws, events, said, len(replay)

    def _adopt(self, ws: websockets.ClientConnection, events: list[str], first: bool = False) -> None:
        """Make `ws` the call's upstream session. `events` are its first (session.created with the effective
        session, then what its set-up caused): the client gets them for the call's first session only; for a
        later one it has had them already, and the conversation it knows is the same."""
        self.ws = ws
        self._last_upstream_error = self._fatal_error = None
        created = json.loads(events[0])  # open_upstream's own serialisation of session.created
        session = created.get("session") if isinstance(created.get("session"), dict) else {}
        self._session_opened_at, self._expires_at = time.time(), session.get("expires_at")
        if first:
            for text in events:
                self._on_upstream_text(text)  # through the core, which learns the session from them
        else:
            self.core.follow_session(session)
        self._upstream_live.set()

    async def _keep_upstream(self) -> None:
        """Read the upstream session; when it ends under the call, replace it, or end the call."""
        while True:
            ws = self.ws
            assert ws is not None
            self._switched.clear()
            # Replaced (a rollover), the old session is dropped at once, not after its close handshake.
            reader, switched = asyncio.ensure_future(self._read_session(ws)), asyncio.ensure_future(self._switched.wait())
            try:
                await asyncio.wait({reader, switched}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (reader, switched):
                    task.cancel()
                await asyncio.gather(reader, switched, return_exceptions=True)
            if ws is self.ws and not await self._reconnect(ws):
                return

    async def _read_session(self, ws: websockets.ClientConnection) -> None:
        with contextlib.suppress(websockets.ConnectionClosedError):
            async for text in ws:
                self.upstream_bytes_in += len(text)
                if ws is not self.ws:
                    return  # replaced: the rest of the old session's events are not wanted
                if isinstance(text, str):
                    try:
                        self._on_upstream_text(text)
                    except Exception:  # a bug met by one odd event costs that event, not the session
                        log.exception("call %s: failed on an upstream event; dropped", self.id,
                                      extra={"call_id": self.id})

    async def _reconnect(self, lost: websockets.ClientConnection) -> bool:
        """The upstream session `lost` ended: open a new one with the session configuration and the conversation,
        trying again with backoff; False when there is no point (a refused key) or the retries are spent, and the
        call is ending."""
        expired = self._last_upstream_error == "session_expired"
        if is_fatal(lost.close_code, self._fatal_error) or self.settings.upstream_retries == 0:
            detail = self._fatal_error or self._last_upstream_error or f"close code {lost.close_code}"
            self._give_up("upstream_closed", f"The connection to the model service ended ({detail}).")
            return False
        reason = "session_expired" if expired else f"connection closed ({lost.close_code})"
        log.info("call %s: upstream session lost (%s), reconnecting", self.id, reason,
                 extra={"call_id": self.id, "event": "upstream_reconnecting", "reason": reason})
        self._upstream_live.clear()
        self._reconnecting = True
        self._to_client(new_event("relay.upstream.reconnecting", reason=reason))
        self._end_lost_reply()
        for attempt, delay in enumerate(backoff_delays(self.settings.upstream_retries,
                                                       self.settings.upstream_retry_backoff_s), start=1):
            await asyncio.sleep(delay)
            try:
                ws, events, said, replayed = await self._open_next_session()
            except UpstreamError as exc:
                log.warning("call %s: reconnect attempt %d failed: %s", self.id, attempt, exc.code,
                            extra={"call_id": self.id})
                if exc.fatal:
                    self._give_up(exc.code, exc.message)
                    return False
                continue
            self._switch_to(ws, events, recent_audio=False, since=said)
            self._reconnecting = False
            self.reconnects += 1
            log.info("call %s: upstream reconnected (attempt %d, %d items replayed)", self.id, attempt, replayed,
                     extra={"call_id": self.id, "event": "upstream_reconnected", "attempt": attempt,
                            "replayed_items": replayed})
            self._to_client(new_event("relay.upstream.reconnected", attempt=attempt, replayed_items=replayed,
                                      expires_at=self._expires_at))
            return True
        self._give_up("upstream_unavailable", "The connection to the model service was lost and could not be made "
                      f"again ({self.settings.upstream_retries} attempts).")
        return False

    def _end_lost_reply(self) -> None:
        """A reply under way dies with its session: what the user has of it still plays and joins the history
        (replayed to the new session); the client gets its response.done."""
        self._framer, self._framing_item = Chunker(FRAME_BYTES_24K), None  # less than a frame is left: dropped
        self.history.on_upstream_lost()
        self._dispatch(self.core.upstream_lost())
        self._save_history()

    def _give_up(self, code: str, message: str) -> None:
        """The upstream is gone for good: the client is told why, and the call ends."""
        log.warning("call %s: upstream gone: %s", self.id, message, extra={"call_id": self.id})
        self._to_client(error_event(code, message, "server_error"))
        self.close_soon("upstream lost")

    def _switch_to(self, ws: websockets.ClientConnection, events: list[str], recent_audio: bool, since: int) -> None:
        """Send from now on to the new session `ws`, which has had the history's entries before `since`. Then
        it gets: the entries added while it was opened (a tool's output, a client's message), for a rollover the
        user's last half second, and what was still waiting for the old session if it still means something
        (see still_to_send)."""
        old = self.ws
        added = [json.dumps(self.core.own_event("conversation.item.create", item=item), separators=(",", ":"))
                 for item in self.history.replay_items(since)]
        pending = added + (list(self._recent_audio) if recent_audio else []) + still_to_send(self._upstream_outbox)
        self._upstream_outbox = deque(pending)
        self._upstream_outbox_bytes = sum(map(len, pending))
        self._adopt(ws, events)
        self._upstream_ready.set()
        self._switched.set()
        if old is not None and old is not ws:
            self._spawn(old.close(), "old-upstream-close")

    async def _roll_over(self) -> None:
        """Replace the upstream session before the service ends it (rollover_before_s ahead of its expires_at),
        at a moment when nobody speaks, so that a long call never meets the limit. The new session is made ready
        beside the old one; the switch itself is instant and the outbound audio never pauses."""
        while True:
            old = self.ws
            due = rollover_at(self._session_opened_at, self._expires_at, self.settings.rollover_before_s)
            if due is None:
                return
            if time.time() < due:  # the session may change meanwhile (a reconnect): look again at least each minute
                await asyncio.sleep(min(60.0, due - time.time()))
                continue
            while not self._quiet():
                await asyncio.sleep(0.1)
            if self.ws is not old:
                continue  # replaced meanwhile (it expired and was reconnected): a new session, a new due time
            revision, sent = self.history.revision, self._events_sent
            try:
                ws, events, said, replayed = await self._open_next_session()
            except UpstreamError as exc:
                log.warning("call %s: rollover failed: %s", self.id, exc.code, extra={"call_id": self.id})
                if exc.fatal:
                    return  # a refused key: the session ends at its expiry, and the call with it
                await asyncio.sleep(ROLLOVER_RETRY_S)
                continue
            # Switch only if the old session has had nothing since the replay was taken (no correction of the
            # history, no event a client or the relay sent: a session.update, a response.create whose answer is
            # still on its way) and nothing sent to it lately either.
            unchanged = self.history.revision == revision and self._events_sent == sent
            settled = time.monotonic() - self._event_sent_at > ROLLOVER_SETTLE_S
            if self.ws is old and self._quiet() and unchanged and settled:
                self._switch_to(ws, events, recent_audio=True, since=said)
                self.rollovers += 1
                log.info("call %s: upstream session rolled over (%d items replayed)", self.id, replayed,
                         extra={"call_id": self.id, "event": "upstream_rolled_over", "replayed_items": replayed})
                self._to_client(new_event("relay.upstream.rolled_over", replayed_items=replayed,
                                          expires_at=self._expires_at))
            else:  # the conversation moved on while the new session was prepared: its replay is out of date
                await ws.close()
                await asyncio.sleep(ROLLOVER_RETRY_S)

    def _quiet(self) -> bool:
        return self.core.quiet and not self._reconnecting and not self._tools_running

    def _on_upstream_text(self, text: str) -> None:
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):
            log.warning("call %s: unreadable upstream event dropped", self.id, extra={"call_id": self.id})
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            # Clients dispatch on the type: an event without one would be garbage to them too.
            log.warning("call %s: upstream event without a type dropped", self.id, extra={"call_id": self.id})
            return
        kind = event["type"]
        if kind == "response.output_audio.delta":
            self._on_audio_delta(event)
            return
        self._last_upstream_error = _error_code(event) if kind == "error" else None
        if self._last_upstream_error is not None and is_fatal(None, self._last_upstream_error):
            self._fatal_error = self._last_upstream_error
        if self._last_upstream_error == "session_expired" and self.settings.upstream_retries and self.ws is not None:
            self._spawn(self.ws.close(), "expired-upstream-close")  # do not wait for the service to close it
            return  # the relay opens a new session: for the client, the conversation goes on
        if kind == "response.output_audio.done" and event.get("item_id") == self._framing_item:
            last = self._framer.flush()
            self._dispatch(self.core.on_audio(event.get("response_id", ""), self._framing_item,
                                              [last] if last else [], 0.0))
        if kind == "conversation.item.retrieved" and _drop_item_audio(event):
            text = json.dumps(event, separators=(",", ":"))  # the client heard it by RTP; it may not fit the channel
        actions = self.core.on_server_event(event, time.monotonic())
        for action in actions:
            if isinstance(action, ToClient) and action.event is event:
                self._to_client_text(text)  # forwarded as received: no re-serialising
            else:
                self._dispatch([action])
        usage = self.history.on_server_event(event)
        if usage is not None:
            self._to_client(usage)
        self._save_history()

    def _on_audio_delta(self, event: dict[str, Any]) -> None:
        response_id, item_id = event.get("response_id"), event.get("item_id")
        try:
            if not (isinstance(response_id, str) and isinstance(item_id, str)):
                raise ValueError("ids must be strings")
            pcm = base64.b64decode(event["delta"], validate=True)
        except (KeyError, TypeError, binascii.Error, ValueError):
            log.warning("call %s: malformed audio delta dropped", self.id, extra={"call_id": self.id})
            return
        if item_id != self._framing_item:
            self._framer = Chunker(FRAME_BYTES_24K)  # a new item starts on a frame boundary
            self._framing_item = item_id
        frames = self._framer.push(pcm[: len(pcm) // 2 * 2])
        self._dispatch(self.core.on_audio(response_id, item_id, frames, len(pcm) / 48))

    async def _write_upstream(self) -> None:
        while True:
            await self._upstream_ready.wait()
            self._upstream_ready.clear()
            while self._upstream_outbox:
                if not self._upstream_live.is_set():
                    await self._upstream_live.wait()
                    continue  # a new session: the outbox has been sorted out for it (maybe emptied)
                ws = self.ws
                text = self._upstream_outbox.popleft()
                self._upstream_outbox_bytes -= len(text)
                if not text.startswith('{"type":"input_audio_buffer.append"'):
                    self._events_sent += 1
                    self._event_sent_at = time.monotonic()
                try:
                    await ws.send(text)
                    self.upstream_bytes_out += len(text)
                except websockets.ConnectionClosed:
                    if ws is self.ws:  # lost: the reader replaces the session, then decides what is still sent
                        self._upstream_live.clear()
                        self._upstream_outbox.appendleft(text)
                        self._upstream_outbox_bytes += len(text)

    def _dispatch(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, ToClient):
                if action.event["type"] == "relay.item.truncated":
                    event = action.event
                    self.history.on_truncated(event["item_id"], event["audio_end_ms"], event["audio_received_ms"])
                    self._save_history()
                self._to_client(action.event)
            elif isinstance(action, RunTools):
                self._spawn(self._run_tools(action), "tools")
            else:
                if action.event["type"] == "conversation.item.create":
                    self.history.on_client_event(action.event)  # a tool's output, in the transcript
                    self._save_history()
                self._dispatch_upstream(action.event)

    def _dispatch_upstream(self, event: dict[str, Any]) -> None:
        self._to_upstream(json.dumps(event, separators=(",", ":")), budgeted=False)

    async def _run_tools(self, run: RunTools) -> None:
        context = ToolContext(self.id, self._end_after_reply)
        timeout = self.settings.tool_timeout_s
        self._tools_running += 1
        try:
            outputs = await asyncio.gather(*(self.toolbox.call(name, arguments, context, timeout)
                                             for _, name, arguments in run.calls))
        finally:
            self._tools_running -= 1
        answered = [(call_id, output) for (call_id, _, _), output in zip(run.calls, outputs)]
        self._dispatch(self.core.tool_outputs(answered, respond=run.respond))

    def _end_after_reply(self) -> None:
        """A tool asked to end the call: let the model's next reply (its goodbye) play out first."""
        async def end() -> None:
            # The reply to the tool's output is a response that starts after this (the one that called the tool has
            # already had its response.done); wait for it to be created and then heard.
            responses, started = self.core.stats.responses_created, time.monotonic()
            while time.monotonic() - started < 30:
                await asyncio.sleep(0.1)
                replied = self.core.stats.responses_created > responses
                if self.core.idle and (replied or time.monotonic() - started > 5):
                    break
            self.close_soon("ended by a tool")

        self._spawn(end(), "end-call")

    def _save_history(self) -> None:
        """Append new transcript entries to the call's log file, if there is one. A failing disk costs the log,
        never the call."""
        entries = self.history.take_new()
        if not entries or self._history_log is None:
            return
        try:
            with self._history_log.open("a", encoding="utf-8") as log_file:
                log_file.write("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries))
        except OSError as exc:
            log.warning("call %s: transcript log disabled: %s", self.id, exc, extra={"call_id": self.id})
            self._history_log = None

    async def _keep_recording(self) -> None:
        """Write the recording out once a second (off the event loop); a failing disk costs the recording only."""
        path = Path(self.settings.recordings_dir) / f"{self.id}.wav"
        try:
            self._wav = await asyncio.to_thread(_open_stereo_wav, path)
            while True:
                await asyncio.sleep(1.0)
                # Shielded: cancelling this task must not leave a write running while close() finishes the file.
                self._wav_write = asyncio.ensure_future(
                    asyncio.to_thread(self._wav.writeframes, self.recording.take(time.monotonic())))
                await asyncio.shield(self._wav_write)
        except OSError as exc:
            log.warning("call %s: recording stopped: %s", self.id, exc, extra={"call_id": self.id})
            self.recording = None

    async def _finish_recording(self) -> None:
        if self._wav is None:
            return
        wav, self._wav = self._wav, None
        if self._wav_write is not None:
            with contextlib.suppress(OSError):
                await self._wav_write  # the last periodic write, if it is still running
        rest = self.recording.take(time.monotonic(), final=True) if self.recording is not None else b""

        def finish() -> None:
            wav.writeframes(rest)
            wav.close()  # writes the final sizes into the header

        try:
            await asyncio.to_thread(finish)
        except OSError as exc:
            log.warning("call %s: recording not finished: %s", self.id, exc, extra={"call_id": self.id})

    # --- lifetime ----------------------------------------------------------------------------------------------

    async def _watch(self) -> None:
        """End the call when both sides of the client have been silent too long, or at its maximum duration."""
        idle, longest = self.settings.call_idle_timeout_s, self.settings.max_call_duration_s
        while True:
            left = self.started_at + longest - time.monotonic()
            await asyncio.sleep(max(0.0, min(1.0, idle / 4, left)))  # a vanished client is freed within ~1 s of it
            now = time.monotonic()
            heard = [t for t in (self.started_at, self.inbound.last_packet_at, self.last_client_message_at) if t]
            if now - max(heard) > idle:
                self.close_soon("idle: no media or messages")
                return
            if now - self.started_at >= longest:
                self._to_client(error_event("call_duration_exceeded", f"Calls last at most {longest:g} s on this "
                                            "relay (RELAY_MAX_CALL_DURATION_S); the call is ending."))
                self.close_soon("maximum duration")
                return

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"call-{self.id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("call %s: task %s failed", self.id, task.get_name(), exc_info=task.exception(),
                      extra={"call_id": self.id})
            self._to_client(error_event("server_error", "The relay failed; the call is ending.", "server_error"))
            self.close_soon("internal error")

    # --- metrics and shutdown ----------------------------------------------------------------------------------

    def meter_counts(self) -> dict[str, int]:
        """The call's counts so far (see relay.server.metrics for what each adds to)."""
        stats = self.core.stats
        return {
            "barge_ins": stats.barge_ins, "truncations": stats.truncations, "policy_refusals": stats.policy_refusals,
            "fields_kept": stats.fields_kept,
            "reconnects": self.reconnects, "rollovers": self.rollovers,
            "frames": self.track.frames_sent, "frames_late": self.track.late_frames,
            "frames_dropped": stats.frames_dropped,
            "rtp_in": self.inbound.stats.payload_bytes, "rtp_out": rtp_bytes_sent(self._sender),
            "datachannel_in": self.datachannel_bytes_in, "datachannel_out": self.datachannel_bytes_out,
            "upstream_in": self.upstream_bytes_in, "upstream_out": self.upstream_bytes_out,
        }

    def flush_metrics(self, counts: dict[str, int] | None = None) -> None:
        """Add what the call counted since the last time to the process's metrics (once a second, and at the end)."""
        latencies = list(self.core.turn_latencies)
        self.core.turn_latencies.clear()
        self._meter.flush(self.meter_counts() if counts is None else counts, latencies)

    async def shut_down(self, flush_s: float = 1.0) -> None:
        """The relay is going away: tell the client (`relay.shutdown`: connect again, to another relay, where the
        conversation can be resumed), give the event up to `flush_s` to be acknowledged, then end the call."""
        if self.close_reason is None:
            self._to_client(new_event(
                "relay.shutdown", reason="server_shutdown", reconnect=True, resume_call_id=self.id,
                message="This relay is shutting down and ends the call. Connect again to continue; "
                "POST /v1/realtime/calls?resume=<resume_call_id> continues this conversation where its transcript "
                "is kept."))
            deadline = time.monotonic() + flush_s
            while self.channel is not None and not data_channel_flushed(self.channel) \
                    and time.monotonic() < deadline and self.close_reason is None:
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
        counts = self.meter_counts()
        self.flush_metrics(counts)
        metrics.call_ended(self.answered, reason)
        log.info("call %s ended: %s", self.id, reason, extra={
            "call_id": self.id, "event": "ended", "reason": reason, "outcome": metrics.outcome(reason),
            "answered": self.answered, "duration_s": round(time.monotonic() - self.started_at, 3), **counts})
        try:
            self._on_closed(self)
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._finish_recording()
            self.track.stop()
            if self.pc is not None:
                try:
                    await self.pc.close()
                except Exception:  # aiortc may fail half-way on a peer it did not finish setting up
                    log.warning("call %s: the peer connection did not close cleanly", self.id, exc_info=True,
                                extra={"call_id": self.id})
            if self.ws is not None:
                await self.ws.close()
        finally:
            self.closed.set()


# --- signaling routes --------------------------------------------------------------------------------------------

CALLS: web.AppKey[dict[str, Call]] = web.AppKey("calls")
SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
TARGET: web.AppKey[UpstreamTarget] = web.AppKey("upstream")
SHUTTING_DOWN: web.AppKey[asyncio.Event] = web.AppKey("shutting_down")
ENDED: web.AppKey["OrderedDict[str, History]"] = web.AppKey("ended")  # the last calls' transcripts, newest last
ENDED_KEPT = 1000
TOOLBOX: web.AppKey[Toolbox] = web.AppKey("toolbox")
CALL_ID = re.compile(r"rtc_[A-Za-z0-9]{1,64}")
WORKER: web.AppKey[Worker] = web.AppKey("worker")
STARTING: web.AppKey[set[str]] = web.AppKey("starting")  # calls being set up: they count against the limit
LIMITER: web.AppKey[RateLimiter] = web.AppKey("limiter")  # per client address, for callers without an API key
KEY_LIMITER: web.AppKey[RateLimiter] = web.AppKey("key_limiter")  # per API key
KEY_BURST = 100.0  # call creations an API key may make at once before its per-second rate applies
PROXIES: web.AppKey[Networks] = web.AppKey("proxies")
RETRY_AFTER_FULL_S = "2"  # a new call refused at capacity: long enough for a call to end, short for a user
RETRY_AFTER_SHUTDOWN_S = "1"  # a new call refused while draining: the load balancer sends the retry elsewhere
FLUSH_ON_SHUTDOWN_S = 1.0  # how long a call's relay.shutdown event may take to be acknowledged, draining
FLUSH_IN_A_HURRY_S = 0.2  # and after a second SIGTERM


async def _read_limited(stream: Any, limit: int) -> bytes:
    """Read a request body (StreamReader) or a multipart part (BodyPartReader), refusing more than `limit`."""
    read = stream.read_chunk if hasattr(stream, "read_chunk") else stream.read
    body = bytearray()
    while chunk := await read(65536):
        body += chunk
        if len(body) > limit:
            raise SignalingError(413, "request_too_large", f"The request body is limited to {limit} bytes.")
    return bytes(body)


async def read_offer(request: web.Request, limit: int) -> tuple[str, dict[str, Any] | None]:
    """The SDP offer and the optional session of a `POST /v1/realtime/calls`."""
    if request.content_length is not None and request.content_length > limit:
        raise SignalingError(413, "request_too_large", f"The request body is limited to {limit} bytes.")
    session: dict[str, Any] | None = None
    if request.content_type == "application/sdp":
        raw = await _read_limited(request.content, limit)
    elif request.content_type == "multipart/form-data":
        raw, session = await _read_multipart(request, limit)
    else:
        raise SignalingError(415, "unsupported_media_type",
                             "Send the SDP offer as application/sdp, or multipart/form-data with 'sdp' and 'session'.")
    try:
        sdp = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SignalingError(400, "invalid_offer", "The SDP offer is not UTF-8 text.") from None
    if not sdp.lstrip().startswith("v=0"):
        raise SignalingError(400, "invalid_offer", "The body is not an SDP offer (it must start with v=0).")
    if "\nm=audio " not in sdp.replace("\r\n", "\n"):  # checked again after parsing; this saves an upstream
        raise SignalingError(400, "invalid_offer", "The SDP offer has no audio m-line.")
    return sdp, session


async def _read_multipart(request: web.Request, limit: int) -> tuple[bytes, dict[str, Any] | None]:
    raw: bytes | None = None
    session: dict[str, Any] | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise SignalingError(400, "invalid_multipart", "Nested multipart bodies are not supported.")
            data = await _read_limited(part, limit)
            if part.name == "sdp":
                raw = data
            elif part.name == "session":
                session = _session_part(data)
    except (ValueError, AssertionError, LookupError, HttpProcessingError) as exc:  # aiohttp's words for a malformed body
        raise SignalingError(400, "invalid_multipart", f"The multipart body could not be read: {exc}"[:200]) from None
    if raw is None:
        raise SignalingError(400, "missing_sdp", "The multipart body has no 'sdp' part.")
    return raw, session


def _session_part(data: bytes) -> dict[str, Any]:
    try:
        session = json.loads(data)
    except (ValueError, RecursionError):
        raise SignalingError(400, "invalid_session", "The 'session' part is not valid JSON.") from None
    if not isinstance(session, dict):
        raise SignalingError(400, "invalid_session", "The 'session' part must be a JSON object.")
    return session


def shutting_down_response() -> web.Response:
    """503 for a new call while the relay drains: another relay (behind the same load balancer) takes it."""
    return error_response(503, "shutting_down", "The relay is shutting down; try again (another relay will answer).",
                          "server_error", headers={"Retry-After": RETRY_AFTER_SHUTDOWN_S})


async def create_call(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    calls = request.app[CALLS]
    if request.app[SHUTTING_DOWN].is_set():
        return shutting_down_response()
    refused = _over_limits(request)
    if refused is not None:
        return refused
    call_id = request.app[WORKER].call_id(new_id("rtc"))  # says which worker owns it
    starting = request.app[STARTING]
    starting.add(call_id)
    try:
        return await _create_call(request, settings, calls, call_id)
    finally:
        starting.discard(call_id)


def _over_limits(request: web.Request) -> web.Response | None:
    """429 when this caller creates calls too fast (a backend by its API key, anyone else by address), 503 when
    the relay carries all the calls it may."""
    app = request.app
    key = request.get(BACKEND)
    if key is None:
        # Every X-Forwarded-For line: a proxy may append its own line after one the client wrote.
        forwarded_for = ",".join(request.headers.getall("X-Forwarded-For", ()))
        limiter, who = app[LIMITER], rate_key(client_address(peer_address(request), forwarded_for, app[PROXIES]))
    else:
        limiter, who = app[KEY_LIMITER], key
    wait = limiter.take(who, time.monotonic())
    if wait:
        source = "address; try again later (RELAY_CALLS_PER_IP_PER_S)" if key is None else \
            "API key; try again later (RELAY_CALLS_PER_KEY_PER_S)"
        return error_response(429, "rate_limit_exceeded", f"Too many calls from this {source}.", "rate_limit_error",
                              headers={"Retry-After": retry_after(wait)})
    if call_capacity(app).full:
        return error_response(503, "too_many_calls", "The relay carries all the calls it can; try again shortly "
                              "(RELAY_MAX_CALLS).", "server_error", headers={"Retry-After": RETRY_AFTER_FULL_S})
    return None


async def _create_call(request: web.Request, settings: Settings, calls: dict[str, "Call"], call_id: str
                       ) -> web.Response:
    try:
        offer, session = await read_offer(request, settings.max_sdp_bytes)
    except SignalingError as exc:
        return error_response(exc.status, exc.code, exc.message)
    resume = request.query.get("resume")
    earlier = await _history_to_resume(request.app, resume) if resume is not None else None
    if resume is not None and earlier is None:
        return error_response(404, "call_not_found", "No conversation is kept for that call id, so it cannot be "
                              "resumed (transcripts outlive a call in memory for the last calls only; set "
                              "RELAY_HISTORY_DIR to keep them).", param="resume")
    locked = request.get(TOKEN_SESSION)  # a client secret's session: its settings win, and stay
    model = call_model(session, locked, [*settings.models, settings.model])
    if isinstance(model, Refusal):
        return error_response(400, model.code, model.message, param=model.param)
    policy = call_policy(settings, request.app[TOOLBOX], locked)
    session, kept = starting_session(settings.session, session, locked, policy, trusted=BACKEND in request)
    target = request.app[TARGET]
    call = Call(settings, target.for_model(model) if model else target, on_closed=lambda c: _ended(request.app, c),
                call_id=call_id, toolbox=request.app[TOOLBOX], policy=policy, token_nonce=request.get(TOKEN_NONCE))
    if kept:
        call.tell_client(call.core.fields_kept(kept, None))  # held until its data channel opens
    if earlier is not None:
        call.history = History.resuming(earlier, resume, settings.prices)
    try:
        answer = await call.start(offer, session)
    except SignalingError as exc:
        await call.close("setup failed")
        return error_response(exc.status, exc.code, exc.message)
    except UpstreamError as exc:
        await call.close("upstream unavailable")
        error_type = "invalid_request_error" if exc.status == 400 else "upstream_error"
        return error_response(exc.status, exc.code, exc.message, error_type, exc.param)
    except Exception:
        log.exception("call %s: setup failed", call.id, extra={"call_id": call.id})
        await call.close("setup failed: internal error")
        return error_response(500, "internal_error", "The relay failed to set up the call.", "server_error")
    except BaseException:
        await asyncio.shield(call.close("setup interrupted"))
        raise
    if request.app[SHUTTING_DOWN].is_set():
        await call.close("server shutdown")
        return shutting_down_response()
    calls[call.id] = call
    return web.Response(
        status=201, text=answer, content_type="application/sdp",
        headers={"Location": f"/v1/realtime/calls/{call.id}"},
    )


def call_policy(settings: Settings, toolbox: Toolbox, locked: dict[str, Any] | None) -> EventPolicy:
    """What a call's client may change: the operator's choice of fields, less its client secret's settings (its
    model is the call's choice at creation, not a lock)."""
    return EventPolicy(settings.client_session_fields,
                       locked={k: v for k, v in (locked or {}).items() if k not in ("type", "model")},
                       server_tools=[t["name"] for t in toolbox.definitions()])


def _ended(app: web.Application, call: Call) -> None:
    app[CALLS].pop(call.id, None)
    ended = app[ENDED]
    ended[call.id] = call.history
    while len(ended) > ENDED_KEPT:
        ended.popitem(last=False)


def _kept_history(app: web.Application, call_id: str) -> tuple[History | None, str]:
    """This worker's history of a call, live or ended, else the one in RELAY_HISTORY_DIR: (history, status)."""
    call = app[CALLS].get(call_id)
    if call is not None:
        return call.history, "active"
    history = app[ENDED].get(call_id)
    directory = app[SETTINGS].history_dir
    if history is None and directory and CALL_ID.fullmatch(call_id):
        try:
            lines = (Path(directory) / f"{call_id}.jsonl").read_text(encoding="utf-8").splitlines()
        except OSError:
            lines = []
        records = []
        for line in lines:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        if records:
            history = History.from_log(records, app[SETTINGS].prices)
    return history, "ended"


async def transcript(request: web.Request) -> web.Response:
    """The call's conversation as text, with its usage: live while it runs, then from memory (the last
    ENDED_KEPT calls) or from its JSON Lines log."""
    call_id = request.match_info["call_id"]
    history, status = _kept_history(request.app, call_id)
    if history is None:
        return error_response(404, "call_not_found", "No such call, or its transcript is no longer kept.")
    return web.json_response({"call_id": call_id, "status": status, **history.snapshot()})


async def _history_to_resume(app: web.Application, call_id: str) -> History | None:
    """The history a new call resumes: this worker's, the log's, or the owning worker's (asked over its socket)."""
    if not CALL_ID.fullmatch(call_id):
        return None
    history, _ = _kept_history(app, call_id)
    owner = app[WORKER].other_owner(call_id)
    if history is None and owner is not None:
        answer = await ask_worker(app[WORKER], owner, f"/v1/realtime/calls/{call_id}/transcript")
        if answer is not None and answer[0] == 200:
            with contextlib.suppress(ValueError, AttributeError):
                history = History.from_snapshot(json.loads(answer[2]), app[SETTINGS].prices)
    return history


def _call_or_404(request: web.Request) -> Call | web.Response:
    call = request.app[CALLS].get(request.match_info["call_id"])
    if call is None:
        return error_response(404, "call_not_found", "No such call.")
    return call


async def hangup(request: web.Request) -> web.Response:
    call = _call_or_404(request)
    if isinstance(call, web.Response):
        return call
    await asyncio.shield(call.close("hangup"))
    return web.json_response({"id": call.id, "status": "ended"})


async def delete_call(request: web.Request) -> web.Response:
    call = _call_or_404(request)
    if isinstance(call, web.Response):
        return call
    await asyncio.shield(call.close("deleted"))
    return web.Response(status=204)


@dataclass(frozen=True)
class Capacity:
    calls: int  # this worker's calls in progress
    limit: int  # its share of RELAY_MAX_CALLS

    @property
    def full(self) -> bool:
        return self.calls >= self.limit


def worker_share(max_calls: int, workers: int) -> int:
    """Each worker's share of max_calls: ceil(max_calls / workers) (the kernel spreads calls about evenly)."""
    return -(-max_calls // max(1, workers))


def call_capacity(app: web.Application) -> Capacity:
    """This worker's calls (those being set up included) against its share of RELAY_MAX_CALLS. `full`: new calls
    must be refused (503 with Retry-After) and /readyz answers 503."""
    return Capacity(len(app[CALLS]) + len(app[STARTING]),
                    worker_share(app[SETTINGS].max_calls, app[WORKER].count))


async def end_calls(app: web.Application, flush_s: float = FLUSH_ON_SHUTDOWN_S) -> None:
    """End every call now, each with a relay.shutdown event first. New calls are refused from here on."""
    start_draining(app)
    await asyncio.gather(*(call.shut_down(flush_s) for call in list(app[CALLS].values())))


async def close_all_calls(app: web.Application) -> None:
    """The app's shutdown (after a drain there are none left)."""
    await end_calls(app)


def start_draining(app: web.Application) -> None:
    """New calls get 503 shutting_down and /readyz 503 from now on; live calls go on."""
    if not app[SHUTTING_DOWN].is_set():
        app[SHUTTING_DOWN].set()
        metrics.set_draining(True)


async def drain(app: web.Application, timeout_s: float, hurry: asyncio.Event) -> None:
    """SIGTERM: refuse new calls at once, let the live ones go on until they end, for `timeout_s` at most or until
    `hurry` is set (a second SIGTERM), then end those left, each with a relay.shutdown event."""
    start_draining(app)
    calls = app[CALLS]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    if calls:
        log.info("relay draining: %d calls may go on for up to %g s", len(calls), timeout_s,
                 extra={"event": "draining", "calls": len(calls), "drain_timeout_s": timeout_s})
    while calls and not hurry.is_set() and loop.time() < deadline:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(hurry.wait(), min(0.1, max(0.0, deadline - loop.time())))
    if calls:
        log.info("relay ending %d calls (%s)", len(calls), "second signal" if hurry.is_set() else "drain timeout",
                 extra={"event": "drain_ended", "calls": len(calls)})
    await end_calls(app, FLUSH_IN_A_HURRY_S if hurry.is_set() else FLUSH_ON_SHUTDOWN_S)


def add_call_routes(app: web.Application, settings: Settings, target: UpstreamTarget, worker: Worker) -> None:
    app[SETTINGS] = settings
    app[TARGET] = target
    app[WORKER] = worker
    app.middlewares.append(routing_middleware(worker, CALLS))
    app[CALLS] = {}
    app[SHUTTING_DOWN] = asyncio.Event()
    app[STARTING] = set()
    app[LIMITER] = RateLimiter(settings.calls_per_ip_per_s)
    app[KEY_LIMITER] = RateLimiter(settings.calls_per_key_per_s, burst=KEY_BURST)
    app[PROXIES] = networks(settings.trusted_proxies)
    app[ENDED] = OrderedDict()
    app[TOOLBOX] = Toolbox.load(settings.tools)
    for directory in (settings.history_dir, settings.recordings_dir):
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
    app.router.add_post("/v1/realtime/calls", create_call)
    app.router.add_get("/v1/realtime/calls/{call_id}/transcript", transcript)
    app.router.add_post("/v1/realtime/calls/{call_id}/hangup", hangup)
    app.router.add_delete("/v1/realtime/calls/{call_id}", delete_call)
    app.on_shutdown.append(close_all_calls)


def _open_stereo_wav(path: Path) -> wave.Wave_write:
    wav = wave.open(str(path), "wb")
    wav.setnchannels(2)
    wav.setsampwidth(2)
    wav.setframerate(RECORDING_RATE)
    return wav


def check_media_ids(offer_sdp: str) -> None:
    """Every m-section has its own a=mid and a BUNDLE group names only those (browsers always do so): aiortc takes
    an offer without them, then fails inside its own tasks, and even in RTCPeerConnection.close()."""
    description = aiortc_sdp.SessionDescription.parse(offer_sdp)
    mids = [media.rtp.muxId for media in description.media]
    if not all(mids) or len(set(mids)) != len(mids):
        raise ValueError("every m-section needs an a=mid of its own")
    for group in description.group:
        if not set(group.items) <= set(mids):
            raise ValueError(f"a=group:{group.semantic} names a mid that no m-section has")


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _error_code(event: dict[str, Any]) -> str | None:
    error = event.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


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

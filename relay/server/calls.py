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
import time
from collections import deque
from typing import Any, Awaitable, Callable

import websockets
from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from relay.audio.convert import Upsampler
from relay.config import Settings
from relay.core.call import Action, CallCore, ToClient
from relay.protocol import new_id
from relay.upstream.client import UpstreamError, open_upstream
from relay.upstream.target import UpstreamTarget
from relay.webrtc.aiortc_internals import install_packet_tap
from relay.webrtc.inbound import InboundAudio
from relay.webrtc.playout import PlayoutTrack

log = logging.getLogger("relay.call")

EVENTS_CHANNEL = "oai-events"
MAX_PENDING_CLIENT_EVENTS = 1000  # held until the data channel opens
MAX_UPSTREAM_BACKLOG = 500  # 10 s of audio: beyond it, new audio is dropped rather than queued without bound
MAX_CLIENT_MESSAGE_BYTES = 256 * 1024


class SignalingError(Exception):
    def __init__(self, status: int, code: str, message: str, error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.error_type = status, code, message, error_type


def error_response(status: int, code: str, message: str, error_type: str = "invalid_request_error",
                   param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": error_type, "code": code, "param": param}}
    return web.json_response(body, status=status)


def _event(event_type: str, **fields: Any) -> dict[str, Any]:
    return {"type": event_type, "event_id": new_id("event"), **fields}


class Call:
    def __init__(self, settings: Settings, target: UpstreamTarget, on_closed: Callable[["Call"], None]) -> None:
        self.id = new_id("rtc")
        self.settings = settings
        self.target = target
        self._on_closed = on_closed
        self.core = CallCore(interruptions=settings.interruptions)
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
        self._tasks: set[asyncio.Task] = set()
        self._closer: asyncio.Task | None = None
        self._client_pending: deque[str] = deque(maxlen=MAX_PENDING_CLIENT_EVENTS)
        self._upstream_outbox: deque[str] = deque()
        self._upstream_ready = asyncio.Event()
        self._upsampler = Upsampler()
        self._upsampling_item: str | None = None

    # --- setup -------------------------------------------------------------------------------------------------

    async def start(self, offer_sdp: str, session: dict[str, Any] | None) -> str:
        """Negotiate with the client and open the upstream, concurrently; return the answer SDP."""
        upstream = asyncio.create_task(open_upstream(
            self.target, session, self.settings.upstream_timeout_s, keep_talking=not self.settings.interruptions
        ))
        try:
            answer = await self._negotiate(offer_sdp)
            self.ws, initial_events = await upstream
        except BaseException:
            upstream.cancel()
            with contextlib.suppress(BaseException):
                ws, _ = await upstream
                await ws.close()
            raise
        for text in initial_events:
            self._to_client_text(text)
        self._spawn(self._read_upstream(), "upstream-reader")
        self._spawn(self._write_upstream(), "upstream-writer")
        self._spawn(self._watch(), "watchdog")
        return answer

    async def _negotiate(self, offer_sdp: str) -> str:
        servers = [RTCIceServer(**server) for server in self.settings.ice_servers]
        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))  # [] means none, not Google's
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc reports bad SDP with several exception types
            raise SignalingError(400, "invalid_offer", f"The SDP offer could not be used: {exc}"[:300]) from None
        audio = [t for t in pc.getTransceivers() if t.kind == "audio"]
        if not audio:
            raise SignalingError(400, "invalid_offer", "The SDP offer has no audio m-line.")
        install_packet_tap(audio[0].receiver, self.inbound)
        pc.addTrack(self.track)  # takes the offer's audio transceiver: sendrecv
        try:
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            raise SignalingError(400, "invalid_offer", f"No answer can be made to this offer: {exc}"[:300]) from None
        return pc.localDescription.sdp

    # --- client side -------------------------------------------------------------------------------------------

    def _on_datachannel(self, channel: Any) -> None:
        if channel.label != EVENTS_CHANNEL or self.channel is not None:
            return  # OpenAI's interface has one channel; others are ignored
        self.channel = channel
        channel.on("message", self._on_client_message)
        while self._client_pending:
            channel.send(self._client_pending.popleft())

    def _on_client_message(self, message: str | bytes) -> None:
        self.last_client_message_at = time.monotonic()
        if isinstance(message, bytes):
            self._to_client(_event("error", error={
                "type": "invalid_request_error", "code": "invalid_event", "param": None, "event_id": None,
                "message": "Binary messages are not supported: send events as JSON text."}))
            return
        if len(message) > MAX_CLIENT_MESSAGE_BYTES:
            self._to_client(_event("error", error={
                "type": "invalid_request_error", "code": "message_too_large", "param": None, "event_id": None,
                "message": f"Data-channel messages are limited to {MAX_CLIENT_MESSAGE_BYTES} bytes."}))
            return
        self._dispatch(self.core.on_client_event(message))

    def _to_client(self, event: dict[str, Any]) -> None:
        self._to_client_text(json.dumps(event, separators=(",", ":")))

    def _to_client_text(self, text: str) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(text)
        else:
            self._client_pending.append(text)

    async def _on_connection_state(self) -> None:
        if self.pc is not None and self.pc.connectionState in ("failed", "closed"):
            self.close_soon(f"peer connection {self.pc.connectionState}")

    # --- media -------------------------------------------------------------------------------------------------

    def _to_upstream_audio(self, pcm24: bytes) -> None:
        """20 ms of the client's audio, straight from the inbound tap."""
        if len(self._upstream_outbox) >= MAX_UPSTREAM_BACKLOG:
            self.dropped_audio_chunks += 1
            return
        self._upstream_outbox.append(
            '{"type":"input_audio_buffer.append","audio":"' + base64.b64encode(pcm24).decode() + '"}'
        )
        self._upstream_ready.set()

    def _next_frame(self) -> bytes | None:
        """The playout clock's tick."""
        frame, actions = self.core.tick()
        if actions:
            self._dispatch(actions)
        return frame

    # --- upstream side -----------------------------------------------------------------------------------------

    async def _read_upstream(self) -> None:
        assert self.ws is not None
        try:
            async for text in self.ws:
                if isinstance(text, str):
                    self._on_upstream_text(text)
            reason = "upstream closed"
        except websockets.ConnectionClosedError:
            reason = "upstream connection lost"
        self._to_client(_event("error", error={
            "type": "server_error", "code": "upstream_closed", "param": None, "event_id": None,
            "message": "The connection to the model service ended."}))
        self.close_soon(reason)

    def _on_upstream_text(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            log.warning("call %s: unreadable upstream event dropped", self.id)
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "response.output_audio.delta":
            self._on_audio_delta(event)
            return
        if kind == "response.output_audio.done" and event.get("item_id") == self._upsampling_item:
            self._dispatch(self.core.on_audio(event.get("response_id", ""), self._upsampling_item,
                                              self._upsampler.flush(), 0.0))
        actions = self.core.on_server_event(event)
        for action in actions:
            if isinstance(action, ToClient) and action.event is event:
                self._to_client_text(text)  # forwarded as received: no re-serialising
            else:
                self._dispatch([action])

    def _on_audio_delta(self, event: dict[str, Any]) -> None:
        try:
            pcm = base64.b64decode(event["delta"], validate=True)
            response_id, item_id = event["response_id"], event["item_id"]
        except (KeyError, TypeError, binascii.Error, ValueError):
            log.warning("call %s: malformed audio delta dropped", self.id)
            return
        if item_id != self._upsampling_item:
            self._upsampler = Upsampler()  # a new item starts from clean resampler state
            self._upsampling_item = item_id
        frames = self._upsampler.push(pcm[: len(pcm) // 2 * 2])
        self._dispatch(self.core.on_audio(response_id, item_id, frames, len(pcm) / 48, self._upsampler.lead_ms))

    async def _write_upstream(self) -> None:
        assert self.ws is not None
        while True:
            await self._upstream_ready.wait()
            self._upstream_ready.clear()
            while self._upstream_outbox:
                await self.ws.send(self._upstream_outbox.popleft())

    def _dispatch(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, ToClient):
                self._to_client(action.event)
            else:
                self._upstream_outbox.append(json.dumps(action.event, separators=(",", ":")))
                self._upstream_ready.set()

    # --- lifetime ----------------------------------------------------------------------------------------------

    async def _watch(self) -> None:
        idle = self.settings.call_idle_timeout_s
        while True:
            await asyncio.sleep(min(5.0, idle / 4))
            heard = [t for t in (self.started_at, self.inbound.last_packet_at, self.last_client_message_at) if t]
            if time.monotonic() - max(heard) > idle:
                self.close_soon("idle: no media or messages")
                return

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"call-{self.id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("call %s: task %s failed", self.id, task.get_name(), exc_info=task.exception())
            self.close_soon("internal error")

    def close_soon(self, reason: str) -> None:
        """End the call from inside one of its own callbacks or tasks."""
        if self._closer is None:
            self._closer = asyncio.ensure_future(self.close(reason))

    async def close(self, reason: str) -> None:
        if self.close_reason is not None:
            await self.closed.wait()
            return
        self.close_reason = reason
        log.info("call %s ended: %s", self.id, reason)
        self._on_closed(self)
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.track.stop()
        if self.pc is not None:
            await self.pc.close()
        if self.ws is not None:
            await self.ws.close()
        self.closed.set()


# --- signaling routes --------------------------------------------------------------------------------------------

CALLS: web.AppKey[dict[str, Call]] = web.AppKey("calls")
SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
TARGET: web.AppKey[UpstreamTarget] = web.AppKey("upstream")


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
        raw = None
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            data = await _read_limited(part, limit)
            if part.name == "sdp":
                raw = data
            elif part.name == "session":
                try:
                    session = json.loads(data)
                except ValueError:
                    raise SignalingError(400, "invalid_session", "The 'session' part is not valid JSON.") from None
                if not isinstance(session, dict):
                    raise SignalingError(400, "invalid_session", "The 'session' part must be a JSON object.")
        if raw is None:
            raise SignalingError(400, "missing_sdp", "The multipart body has no 'sdp' part.")
    else:
        raise SignalingError(415, "unsupported_media_type",
                             "Send the SDP offer as application/sdp, or multipart/form-data with 'sdp' and 'session'.")
    try:
        sdp = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SignalingError(400, "invalid_offer", "The SDP offer is not UTF-8 text.") from None
    if not sdp.lstrip().startswith("v=0"):
        raise SignalingError(400, "invalid_offer", "The body is not an SDP offer (it must start with v=0).")
    if "\nm=audio " not in sdp.replace("\r\n", "\n"):
        raise SignalingError(400, "invalid_offer", "The SDP offer has no audio m-line.")
    return sdp, session


async def create_call(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    calls = request.app[CALLS]
    try:
        offer, session = await read_offer(request, settings.max_sdp_bytes)
    except SignalingError as exc:
        return error_response(exc.status, exc.code, exc.message)
    call = Call(settings, request.app[TARGET], on_closed=lambda c: calls.pop(c.id, None))
    try:
        answer = await call.start(offer, session)
    except SignalingError as exc:
        await call.close("setup failed")
        return error_response(exc.status, exc.code, exc.message)
    except UpstreamError as exc:
        await call.close("upstream unavailable")
        error_type = "invalid_request_error" if exc.status == 400 else "upstream_error"
        return error_response(exc.status, exc.code, exc.message, error_type, exc.param)
    calls[call.id] = call
    log.info("call %s started", call.id)
    return web.Response(
        status=201, text=answer, content_type="application/sdp",
        headers={"Location": f"/v1/realtime/calls/{call.id}"},
    )


def _call_or_404(request: web.Request) -> Call | web.Response:
    call = request.app[CALLS].get(request.match_info["call_id"])
    if call is None:
        return error_response(404, "call_not_found", "No such call.")
    return call


async def hangup(request: web.Request) -> web.Response:
    call = _call_or_404(request)
    if isinstance(call, web.Response):
        return call
    await call.close("hangup")
    return web.json_response({"id": call.id, "status": "ended"})


async def delete_call(request: web.Request) -> web.Response:
    call = _call_or_404(request)
    if isinstance(call, web.Response):
        return call
    await call.close("deleted")
    return web.Response(status=204)


async def close_all_calls(app: web.Application) -> None:
    await asyncio.gather(*(call.close("server shutdown") for call in list(app[CALLS].values())))


def add_call_routes(app: web.Application, settings: Settings, target: UpstreamTarget) -> None:
    app[SETTINGS] = settings
    app[TARGET] = target
    app[CALLS] = {}
    app.router.add_post("/v1/realtime/calls", create_call)
    app.router.add_post("/v1/realtime/calls/{call_id}/hangup", hangup)
    app.router.add_delete("/v1/realtime/calls/{call_id}", delete_call)
    app.on_shutdown.append(close_all_calls)

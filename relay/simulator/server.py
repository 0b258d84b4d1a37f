"""The simulator's network adapter: an aiohttp app serving `ws://HOST:PORT/v1/realtime?model=...`.

It moves messages between the socket and a `SimSession`, applies the fault knobs (which concern the connection, not
the protocol), and records what every session received. Tests read the records in-process (`app[RECORDER]`) or over
HTTP:

- `GET /v1/simulator/sessions`: one summary per session, newest last
- `GET /v1/simulator/sessions/{id}`: the summary plus every event received (appended audio shown by its size)
- `GET /v1/simulator/sessions/{id}/input_audio.wav`: all audio the session received (capped by record_audio_s), as
  24 kHz PCM16 (G.711 appends decoded and upsampled, as the session hears them)
- `DELETE /v1/simulator/sessions`: forget the records
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import io
import json
import logging
import time
import wave
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import WSMsgType, web

from relay.protocol import dumps, new_id
from relay.simulator import voice
from relay.simulator.config import KnobError, SimConfig, with_overrides
from relay.simulator.session import SimSession, model_refusal

log = logging.getLogger("relay.simulator")

RECORDER: web.AppKey["Recorder"] = web.AppKey("recorder")
# What the garbage fault sends: everything a broken or hostile service could, one frame each.
GARBAGE: list[str | bytes] = [
    "not json", "[1, 2]", '"a string"', "null", b"\x00\x01binary", '{"no_type": true}', '{"type": 42}',
    '{"type": "simulator.unknown_event", "event_id": "event_garbage"}',
    '{"type": "response.output_audio.delta", "response_id": "resp_x", "item_id": "item_x", "delta": "%%%"}',
    '{"type": "response.output_audio.delta", "response_id": ["x"], "item_id": {}, "delta": 5}',
    '{"type": "error", "error": null}', '{"type": "response.done", "response": "done"}',
    '{"type": "conversation.item.added", "item": {"id": [], "role": "user", "content": [{"type": "input_audio"}]}}',
    '{"type": "response.output_text.delta", "item_id": "item_big", "delta": "' + "x" * (2 * 1024 * 1024) + '"}',
    "{" * 100_000,
]
CONFIG: web.AppKey["LiveConfig"] = web.AppKey("config")
_MAX_EVENTS_RECORDED = 100_000
_MAX_RECORDED_EVENT_CHARS = 64 * 1024  # a larger event is recorded by its type and size only
_MAX_BACKLOG_EVENTS = 1000  # a client that stops reading stops being read
_KEY_PROTOCOL = "openai-insecure-api-key."
SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("sockets")


@dataclass
class LiveConfig:
    """The server-wide knobs. A test may change them between connections (RunningSimulator.reconfigure), e.g. to
    refuse the reconnection that follows a dropped session; a connection keeps the knobs it started with."""

    value: SimConfig


@dataclass
class SessionRecord:
    """What one connection presented and received."""

    connection_id: str
    model: str
    query: dict[str, str]
    started_at: float
    max_audio_bytes: int
    session_id: str | None = None
    authorized: bool = False
    ended_at: float | None = None
    close_code: int | None = None
    received: list[Any] = field(default_factory=list)
    sent_types: list[str] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)  # monotonic time each sent event left, for cross-process timing
    input_audio: bytearray = field(default_factory=bytearray)
    # (monotonic arrival time, bytes of audio received so far) per append: when each piece of audio got here
    append_arrivals: list[tuple[float, int]] = field(default_factory=list)

    def on_received(self, text: str, input_pcm: Callable[[bytes], bytes | None] = lambda data: data) -> None:
        """Record one client message: appended audio the session accepts joins input_audio, as the 24 kHz PCM16
        `input_pcm` makes of it (None: refused); other audio, and any event over 64 KiB once its appended audio is
        set aside, is kept by its size only."""
        if len(self.received) >= _MAX_EVENTS_RECORDED:
            return
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):
            event = None
        if not isinstance(event, dict):
            self.received.append({"unparsed": text[:200]})
            return
        size = len(text)
        if event.get("type") == "input_audio_buffer.append" and isinstance(event.get("audio"), str):
            encoded = event.pop("audio")
            size -= len(encoded)
            try:
                data = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                data = b""
            pcm = input_pcm(data)
            if pcm is not None:  # what the session accepts (PCM16 of an odd length it refuses)
                room = self.max_audio_bytes - len(self.input_audio)
                self.input_audio += pcm[: max(0, room)]
                self.append_arrivals.append((time.monotonic(), len(self.input_audio)))
            event["audio_bytes"] = len(data)
        if size > _MAX_RECORDED_EVENT_CHARS:
            event = {"type": event.get("type"), "event_id": event.get("event_id"), "oversized_chars": len(text)}
        else:
            _strip_item_audio(event)
        self.received.append(event)

    def on_sent(self, event_type: str) -> None:
        if len(self.sent_types) < _MAX_EVENTS_RECORDED:
            self.sent_types.append(event_type)
            self.sent_at.append(time.monotonic())

    def received_types(self) -> list[str]:
        return [e.get("type") if isinstance(e, dict) else None for e in self.received]

    def summary(self) -> dict[str, Any]:
        return {
            "connection_id": self.connection_id,
            "session_id": self.session_id,
            "model": self.model,
            "query": self.query,
            "authorized": self.authorized,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "close_code": self.close_code,
            "received_count": len(self.received),
            "sent_count": len(self.sent_types),
            "input_audio_ms": voice.audio_ms(len(self.input_audio)),
        }


def _strip_item_audio(event: dict[str, Any]) -> None:
    item = event.get("item")
    if isinstance(item, dict) and isinstance(item.get("content"), list):
        for part in item["content"]:
            if isinstance(part, dict) and isinstance(part.get("audio"), str):
                part["audio_chars"] = len(part.pop("audio"))


class Recorder:
    """The last `capacity` sessions' records."""

    def __init__(self, capacity: int, max_audio_s: float) -> None:
        self.sessions: deque[SessionRecord] = deque(maxlen=max(1, capacity))
        self._max_audio_bytes = int(max_audio_s * 1000) * voice.BYTES_PER_MS
        self.changed = asyncio.Condition()

    def start(self, model: str, query: dict[str, str]) -> SessionRecord:
        record = SessionRecord(new_id("conn"), model, query, time.time(), self._max_audio_bytes)
        self.sessions.append(record)
        return record

    def find(self, any_id: str) -> SessionRecord | None:
        return next((r for r in self.sessions if any_id in (r.connection_id, r.session_id)), None)

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, predicate, timeout: float = 10.0) -> Any:
        """Wait until `predicate()` returns something truthy (re-checked after every event); return it."""
        async def check():
            async with self.changed:
                while not (result := predicate()):
                    await self.changed.wait()
                return result
        return await asyncio.wait_for(check(), timeout)


def _presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    if "api-key" in request.headers:
        return request.headers["api-key"]
    for proto in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(_KEY_PROTOCOL):
            return proto[len(_KEY_PROTOCOL):]
    return None


def _refusal(config: SimConfig, request: web.Request, model: str) -> tuple[dict[str, Any], int] | None:
    """The error and close code with which the real service refuses this connection, or None."""
    if "realtime=v1" in request.headers.get("OpenAI-Beta", ""):
        return {
            "type": "invalid_request_error",
            "code": "beta_api_shape_disabled",
            "message": "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API.",
        }, 4000
    if config.reject_auth or (
        config.api_key is not None and not hmac.compare_digest(_presented_key(request) or "", config.api_key)
    ):
        return {
            "type": "invalid_request_error",
            "code": "invalid_api_key",
            "message": "Incorrect API key provided. You can find your API key in your account settings.",
        }, 3000
    refused = model_refusal(model)
    if refused is not None:
        return {"type": "invalid_request_error", "code": "model_not_found", "message": refused}, 4000
    return None


async def realtime_endpoint(request: web.Request) -> web.StreamResponse:
    try:
        config = with_overrides(request.app[CONFIG].value, request.query)
    except KnobError as exc:
        return web.json_response({"error": {"type": "invalid_request_error", "message": str(exc)}}, status=400)
    model = request.query.get("model", config.default_model)
    ws = web.WebSocketResponse(protocols=("realtime",), heartbeat=20.0, max_msg_size=config.max_message_bytes)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    recorder = request.app[RECORDER]
    query = {k: v for k, v in request.query.items()}
    record = recorder.start(model, query)
    try:
        refusal = _refusal(config, request, model)
        if refusal is not None:
            error, code = refusal
            await ws.send_str(dumps({"type": "error", "event_id": new_id("event"), "error": {**error, "param": None, "event_id": None}}))
            await ws.close(code=code, message=error["code"].encode())
            return ws
        record.authorized = True
        await _run_session(ws, request, config, model, record, recorder)
    finally:
        request.app[SOCKETS].discard(ws)
        record.ended_at = time.time()
        record.close_code = ws.close_code
        await recorder.notify()
    return ws


async def _run_session(
    ws: web.WebSocketResponse, request: web.Request, config: SimConfig, model: str, record: SessionRecord, recorder: Recorder
) -> None:
    loop = asyncio.get_running_loop()
    session = SimSession(config, model, loop.time())
    record.session_id = session.id
    wake = asyncio.Event()  # something to send, or the reader ended
    drained = asyncio.Event()  # the writer caught up: the reader may go on
    drained.set()

    async def read() -> None:
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    record.on_received(msg.data, session.input_pcm)
                    session.receive(msg.data, loop.time())
                elif msg.type == WSMsgType.BINARY:
                    session.receive_binary(loop.time())
                wake.set()
                await recorder.notify()
                if session.backlog > _MAX_BACKLOG_EVENTS:
                    drained.clear()
                    await drained.wait()
        finally:
            wake.set()

    reader = asyncio.create_task(read(), name=f"sim-read-{session.id}")
    close_at = loop.time() + config.close_after_s if config.close_after_s is not None else None
    sent = 0
    stalled = False
    try:
        while not reader.done():
            wake.clear()
            session.advance(loop.time())
            for event in session.take_outgoing():
                if not stalled and config.stall_after_events is not None and sent >= config.stall_after_events:
                    stalled = True
                    await asyncio.sleep(config.stall_s)
                if sent == config.garbage_after_events:
                    for frame in GARBAGE:
                        await (ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame))
                await ws.send_str(dumps(event))
                record.on_sent(event["type"])
                sent += 1
                if (config.close_after_events is not None and sent >= config.close_after_events) or \
                        event["type"] == config.close_after_event_type:
                    await _fault_close(ws, request, config)
                    return
            drained.set()
            if session.closing is not None:
                code, reason = session.closing
                await ws.close(code=code, message=reason.encode())
                return
            if close_at is not None and loop.time() >= close_at:
                await _fault_close(ws, request, config)
                return
            deadlines = [d for d in (session.next_deadline(), close_at) if d is not None]
            timeout = max(0.0, min(deadlines) - loop.time()) if deadlines else None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)
    except ConnectionError:
        pass  # the client went away while we were sending
    finally:
        reader.cancel()
        (outcome,) = await asyncio.gather(reader, return_exceptions=True)
        if isinstance(outcome, Exception) and not isinstance(outcome, ConnectionError):
            log.error("simulator session %s: reader failed", session.id, exc_info=outcome)


async def _fault_close(ws: web.WebSocketResponse, request: web.Request, config: SimConfig) -> None:
    if config.close_abruptly and request.transport is not None:
        request.transport.abort()  # no close frame: the client sees 1006
        return
    await ws.close(code=config.close_code, message=b"simulated fault")


# --- record endpoints --------------------------------------------------------------------------------------------


@web.middleware
async def _records_need_the_key(request: web.Request, handler):
    config = request.app[CONFIG].value
    if request.path.startswith("/v1/simulator/") and config.api_key is not None:
        if not hmac.compare_digest(_presented_key(request) or "", config.api_key):
            return web.json_response(
                {"error": {"type": "invalid_request_error", "code": "invalid_api_key", "message": "A valid key is needed."}},
                status=401,
            )
    return await handler(request)


async def _close_sockets(app: web.Application) -> None:
    await asyncio.gather(*(ws.close(code=1001, message=b"server shutdown") for ws in list(app[SOCKETS])),
                         return_exceptions=True)


def _record_or_404(request: web.Request) -> SessionRecord:
    record = request.app[RECORDER].find(request.match_info["id"])
    if record is None:
        raise web.HTTPNotFound(
            text=json.dumps({"error": {"type": "not_found", "message": "no such session"}}), content_type="application/json"
        )
    return record


async def list_sessions(request: web.Request) -> web.Response:
    return web.json_response([r.summary() for r in request.app[RECORDER].sessions])


async def show_session(request: web.Request) -> web.Response:
    record = _record_or_404(request)
    # Times are CLOCK_MONOTONIC seconds: comparable across the processes of one machine (benchmarks use them).
    return web.json_response(record.summary() | {
        "received": record.received, "sent_types": record.sent_types, "sent_at": record.sent_at,
        "append_arrivals": record.append_arrivals})


async def session_audio(request: web.Request) -> web.Response:
    record = _record_or_404(request)
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(voice.SAMPLE_RATE)
        wav.writeframes(bytes(record.input_audio))
    return web.Response(body=out.getvalue(), content_type="audio/wav")


async def clear_sessions(request: web.Request) -> web.Response:
    request.app[RECORDER].sessions.clear()
    return web.json_response({"cleared": True})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(config: SimConfig) -> web.Application:
    app = web.Application(client_max_size=config.max_message_bytes, middlewares=[_records_need_the_key])
    app[CONFIG] = LiveConfig(config)
    app[RECORDER] = Recorder(config.record_sessions, config.record_audio_s)
    app[SOCKETS] = set()
    app.on_shutdown.append(_close_sockets)
    app.router.add_get("/v1/realtime", realtime_endpoint)
    app.router.add_get("/v1/simulator/sessions", list_sessions)
    app.router.add_delete("/v1/simulator/sessions", clear_sessions)
    app.router.add_get("/v1/simulator/sessions/{id}", show_session)
    app.router.add_get("/v1/simulator/sessions/{id}/input_audio.wav", session_audio)
    app.router.add_get("/healthz", healthz)
    return app


@dataclass
class RunningSimulator:
    """A simulator served on a socket of this process."""

    app: web.Application
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}/v1/realtime"

    @property
    def recorder(self) -> Recorder:
        return self.app[RECORDER]

    def reconfigure(self, **knobs: Any) -> None:
        """Change server-wide knobs for the connections that come next."""
        self.app[CONFIG].value = dataclasses.replace(self.app[CONFIG].value, **knobs)

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_simulator(config: SimConfig, host: str = "127.0.0.1", port: int = 0) -> RunningSimulator:
    """Serve a simulator on host:port (port 0: any free port) and return where it listens."""
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    return RunningSimulator(app, runner, host, bound[1])

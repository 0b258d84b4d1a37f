"""The call routes: `POST /v1/realtime/calls` (signaling), hangup, `DELETE`, the transcript; this worker's calls,
its limits on them (rate per address or API key, cluster-wide through Redis when there is one; capacity), and
draining them on shutdown. Another node's calls are relay/server/cluster.py's.

HTTP only: the request is read and checked here (body size, SDP or multipart, the session part, resume, the model,
the client secret's locked settings), then a Call (relay/call/) is made and started, and the answer or the error
goes back. The call itself knows nothing of requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from relay.call.call import Call
from relay.call.peer import SetupError, offered_audio, with_static_rtpmaps
from relay.cluster.ids import owner_of
from relay.cluster.store import SharedStateError
from relay.cluster.transcripts import answer as stored_answer
from relay.config import Settings
from relay.core.history import History
from relay.core.policy import EventPolicy, Refusal, call_model, starting_session
from relay.protocol import new_id
from relay.server import metrics
from relay.server.auth import BACKEND, MODELS, TOKEN_NONCE, TOKEN_SESSION
from relay.server.cluster import CLUSTER, history_elsewhere
from relay.server.errors import error_response
from relay.server.limits import Networks, RateLimiter, client_address, networks, rate_key, retry_after
from relay.server.workers import Worker, ask_worker, peer_address, routing_middleware
from relay.tools import Toolbox
from relay.upstream.client import UpstreamError
from relay.upstream.target import UpstreamTarget

log = logging.getLogger("relay.call")


class SignalingError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# --- signaling routes --------------------------------------------------------------------------------------------

CALLS: web.AppKey[dict[str, Call]] = web.AppKey("calls")
SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
TARGET: web.AppKey[UpstreamTarget] = web.AppKey("upstream")
SHUTTING_DOWN: web.AppKey[asyncio.Event] = web.AppKey("shutting_down")
ENDED: web.AppKey["OrderedDict[str, History]"] = web.AppKey("ended")  # the last calls' transcripts, newest last
ENDED_KEPT = 1000
TOOLBOX: web.AppKey[Toolbox] = web.AppKey("toolbox")
CALL_ID = re.compile(r"rtc_[A-Za-z0-9_]{1,64}")  # `_`: a cluster's ids name the node (relay/cluster/ids.py)
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
    refused = await _over_limits(request)
    if refused is not None:
        return refused
    call_id = request.app[WORKER].call_id(new_id("rtc"))  # says which worker owns it
    starting = request.app[STARTING]
    starting.add(call_id)
    try:
        return await _create_call(request, settings, calls, call_id)
    finally:
        starting.discard(call_id)


async def _over_limits(request: web.Request) -> web.Response | None:
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
    wait = await _wait_for_token(app, key is None, limiter, who)
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
    offer = with_static_rtpmaps(offer)
    audio = offered_audio(offer)
    if audio is None:
        return error_response(400, "invalid_offer", "The SDP offer's audio offers none of the codecs the relay "
                              "answers: Opus, PCMU or PCMA.")
    resume = request.query.get("resume")
    earlier = await _history_to_resume(request.app, resume) if resume is not None else None
    if resume is not None and earlier is None:
        return error_response(404, "call_not_found", "No conversation is kept for that call id, so it cannot be "
                              "resumed (transcripts outlive a call in memory for the last calls only; set "
                              "RELAY_HISTORY_DIR or RELAY_REDIS_URL to keep them).", param="resume")
    locked = request.get(TOKEN_SESSION)  # a client secret's session: its settings win, and stay
    model = call_model(session, locked, request.app[MODELS].allowed)
    if isinstance(model, Refusal):
        return error_response(400, model.code, model.message, param=model.param)
    policy = call_policy(settings, request.app[TOOLBOX], locked)
    session, kept = starting_session(settings.session, session, locked, policy, trusted=BACKEND in request)
    target = request.app[TARGET]
    call = Call(settings, target.for_model(model) if model else target, on_closed=lambda c: _ended(request.app, c),
                call_id=call_id, toolbox=request.app[TOOLBOX], policy=policy, token_nonce=request.get(TOKEN_NONCE),
                history=History.resuming(earlier, resume, settings.prices) if earlier is not None else None,
                audio=audio)
    try:
        answer = await call.start(offer, session, kept)
    except SetupError as exc:
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


async def _wait_for_token(app: web.Application, by_address: bool, limiter: RateLimiter, who: str) -> float:
    """The cluster-wide bucket in Redis if there is one; Redis down: this process's own (the limits fail open to
    per-process ones, counted in relay_redis_errors_total{what="limits"})."""
    cluster = app[CLUSTER]
    shared = cluster.ip_limits if by_address else cluster.key_limits
    if shared is not None:
        with contextlib.suppress(SharedStateError):
            return await shared.take(who)
    return limiter.take(who, time.monotonic())


def call_policy(settings: Settings, toolbox: Toolbox, locked: dict[str, Any] | None) -> EventPolicy:
    """What a call's client may change: the operator's choice of fields, less its client secret's settings (its
    model is the call's choice at creation, and the audio formats the relay's for the codec: neither is a lock)."""
    return EventPolicy(settings.client_session_fields, locked=_locks(locked or {}),
                       server_tools=[t["name"] for t in toolbox.definitions()])


def _locks(secret_session: dict[str, Any]) -> dict[str, Any]:
    locks = {k: v for k, v in secret_session.items() if k not in ("type", "model")}
    if isinstance(locks.get("audio"), dict):
        locks["audio"] = {direction: {k: v for k, v in part.items() if k != "format"} if isinstance(part, dict)
                          else part for direction, part in locks["audio"].items()}
    return locks


def _ended(app: web.Application, call: Call) -> None:
    app[CALLS].pop(call.id, None)
    ended = app[ENDED]
    ended[call.id] = call.history
    while len(ended) > ENDED_KEPT:
        ended.popitem(last=False)
    app[CLUSTER].call_ended(call.id, call.history)  # with Redis: any relay will serve its transcript


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
    ENDED_KEPT calls), from its JSON Lines log, or from Redis (as the call's relay last wrote it)."""
    call_id = request.match_info["call_id"]
    history, status = _kept_history(request.app, call_id)
    if history is None:
        stored = await request.app[CLUSTER].stored_transcript(call_id)
        if stored is not None:
            return web.json_response(stored_answer(stored, status=_stored_status(request.app, call_id)))
        return error_response(404, "call_not_found", "No such call, or its transcript is no longer kept.")
    return web.json_response({"call_id": call_id, "status": status, **history.snapshot()})


def _stored_status(app: web.Application, call_id: str) -> str | None:
    """"ended" for a call of this node's that it does not carry (its worker, now restarted, lost it; Redis may
    last have heard of it live); else the stored status stands."""
    owner = owner_of(call_id)
    return "ended" if owner is not None and owner.node is not None and owner.node == app[WORKER].node else None


async def _history_to_resume(app: web.Application, call_id: str) -> History | None:
    """The history a new call resumes: this worker's, the log's, the owning worker's (asked over its socket), the
    owning node's (asked over HTTP), or what Redis last got."""
    if not CALL_ID.fullmatch(call_id):
        return None
    history, _ = _kept_history(app, call_id)
    owner = app[WORKER].other_owner(call_id)
    if history is None and owner is not None:
        answer = await ask_worker(app[WORKER], owner, f"/v1/realtime/calls/{call_id}/transcript")
        if answer is not None and answer[0] == 200:
            with contextlib.suppress(ValueError, AttributeError):
                history = History.from_snapshot(json.loads(answer[2]), app[SETTINGS].prices)
    if history is None:
        history = await history_elsewhere(app[CLUSTER], call_id, app[SETTINGS].prices)
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

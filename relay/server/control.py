"""The backend's control socket: `GET /v1/realtime?call_id=rtc_…`, a WebSocket to a live call (OpenAI's "sideband").

HTTP only: who may attach (an API key, as `Authorization: Bearer` or the `openai-insecure-api-key.<key>`
subprotocol; never a client secret), to which call (live, on this worker, or forwarded to the worker that owns it,
whose id names it), how many at once (RELAY_MAX_BACKENDS_PER_CALL); refusals before the upgrade are OpenAI's JSON
errors. Once upgraded the socket is the call's BackendLink's (relay/call/backend.py); this route reads its messages
until it closes. Across workers the socket is relayed frame by frame over the owner's Unix socket, and across the
relays of a cluster over HTTP to the node that owns the call, signed (relay/server/cluster.py) with the key's index
in place of the key; the owner applies the same checks and bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiohttp import ClientError, ClientSession, UnixConnector, WSMsgType, WSServerHandshakeError, web
from yarl import URL

from relay.call.backend import CLOSE_POLICY, CLOSE_TIMEOUT_S, BackendLink
from relay.cluster.signing import HEADERS as CLUSTER_HEADERS
from relay.server.auth import FORWARDED_FOR, TOKEN_PREFIX, api_key_index, bearer, is_api_key, origin_allowed, refusal
from relay.server.calls import CALLS, ENDED, SETTINGS, WORKER
from relay.server.cluster import (ANSWER_TIMEOUT_S, CLUSTER, GONE, REFUSED, NodeAnswer, as_response, client_of,
                                 counted, may_vouch, node_url, signature_refused_by)
from relay.server.errors import error_response
from relay.server.workers import FORWARDED, PEER, path_qs, peer_address

log = logging.getLogger("relay.call")
KEY_SUBPROTOCOL = "openai-insecure-api-key."  # a browser's way of sending a key; OpenAI takes it
PROTOCOLS = ("realtime",)
HEARTBEAT_S = 20.0
# What a refusal from the owner worker (its body is not carried by the handshake error) becomes here.
OWNER_REFUSALS = {404: ("call_not_found", "No such call."),
                  429: ("too_many_backends", "The call has as many backends attached as it may have.")}


def offered_protocols(request: web.Request) -> list[str]:
    """The WebSocket subprotocols the client offers."""
    return [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]


def presented_key(request: web.Request) -> str | None:
    """The key in `Authorization: Bearer`, else in the `openai-insecure-api-key.<key>` subprotocol."""
    key = bearer(request.headers.get("Authorization"))
    offered = offered_protocols(request)
    return key or next((p[len(KEY_SUBPROTOCOL):] for p in offered if p.startswith(KEY_SUBPROTOCOL)), None)


def who_refused(request: web.Request) -> web.Response | None:
    """The answer to a request that may not attach (the origin, the call id, the key), else None."""
    settings = request.app[SETTINGS]
    if not origin_allowed(request, settings.allowed_origins):
        return refusal(403, "origin_not_allowed", "Requests from this page's origin are not allowed "
                       "(RELAY_ALLOWED_ORIGINS).")
    if not request.query.get("call_id"):
        return error_response(400, "missing_required_parameter", "Missing required parameter: 'call_id'. Clients "
                              "connect over WebRTC; this socket attaches a backend to a call.", param="call_id")
    keys = [key.get_secret_value() for key in settings.api_keys]
    key = presented_key(request)
    forwarded = request.get(FORWARDED_FOR)
    if forwarded is not None:  # another relay checked the key, and says so, signed
        if not keys or forwarded.caller.startswith("backend:"):
            return None
        return refusal(401, "missing_api_key", "Send an API key as 'Authorization: Bearer'.")
    if not keys:
        return None  # open access
    if key is None:
        return refusal(401, "missing_api_key", "Send an API key as 'Authorization: Bearer'.")
    if key.startswith(TOKEN_PREFIX):
        return refusal(401, "invalid_api_key", "A client secret cannot attach to a call: a backend uses an API key.")
    if not is_api_key(key, keys):
        return refusal(401, "invalid_api_key", "The API key is not valid.")
    return None


async def control_socket(request: web.Request) -> web.StreamResponse:
    refused = who_refused(request)
    if refused is not None:
        return refused
    call_id = request.query["call_id"]
    call = request.app[CALLS].get(call_id)
    owner = request.app[WORKER].other_owner(call_id)
    node = request.app[CLUSTER].other_node(call_id) if FORWARDED_FOR not in request else None
    if call is None and node is not None:
        return await relay_to_node(request, node)
    if call is None and owner is not None and FORWARDED not in request.headers:
        return await relay_to_owner(request, owner)
    if call is None or call.close_reason is not None:
        ended = call is not None or call_id in request.app[ENDED]
        return error_response(404, "call_not_found", "The call has ended." if ended else "No such call.")
    if call.backends.full():
        return error_response(429, "too_many_backends", f"The call has {call.backends.limit} backends attached, as "
                              "many as it may have (RELAY_MAX_BACKENDS_PER_CALL).", "rate_limit_error")
    ws = _socket(request)
    await ws.prepare(request)
    if call.close_reason is not None or call.backends.full():  # it ended, or filled up, during the upgrade
        await ws.close(code=CLOSE_POLICY, message=b"call ended" if call.close_reason else b"too many backends")
        return ws
    settings = request.app[SETTINGS]
    transport = request.transport
    link = BackendLink(call.id, ws, abort=transport.abort if transport else lambda: None, on_text=call.on_client_text,
                       queue_bytes=settings.backend_queue_bytes, max_message_bytes=settings.max_message_bytes,
                       traffic=call.backends.traffic)
    call.backends.attach(link)
    try:
        async for message in ws:
            if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                link.on_message(message.data)
    finally:
        await link.closed()
        call.backends.detach(link)
    return ws


def _socket(request: web.Request) -> web.WebSocketResponse:
    # Up to 4 bytes a character: a message over RELAY_MAX_MESSAGE_BYTES gets an error event (the link checks it),
    # one far over it closes the socket (1009).
    return web.WebSocketResponse(protocols=PROTOCOLS, heartbeat=HEARTBEAT_S, timeout=CLOSE_TIMEOUT_S,
                                 max_msg_size=4 * request.app[SETTINGS].max_message_bytes)


# --- across workers ----------------------------------------------------------------------------------------------


async def relay_to_owner(request: web.Request, owner: int) -> web.StreamResponse:
    """The call is another worker's: open the same socket there (over its Unix socket) and relay the frames both
    ways until either side closes; a refusal there is answered here, before the upgrade."""
    worker = request.app[WORKER]
    passed = {"authorization", "origin"} | {name.lower() for name in CLUSTER_HEADERS}  # a node's signed request too
    headers = {k: v for k, v in request.headers.items() if k.lower() in passed}
    headers |= {FORWARDED: "1", PEER: peer_address(request) or ""}
    offered = offered_protocols(request)
    session = ClientSession(connector=UnixConnector(path=str(worker.socket_path(owner))))
    try:
        inner = await session.ws_connect(URL(f"http://worker{path_qs(request)}", encoded=True), headers=headers,
                                         protocols=offered, max_msg_size=0, autoping=True)
    except WSServerHandshakeError as exc:
        await session.close()
        code, message = OWNER_REFUSALS.get(exc.status, ("worker_unavailable", "The worker that owns this call "
                                                        "did not take the socket."))
        return error_response(exc.status if exc.status in OWNER_REFUSALS else 503, code, message)
    except (OSError, ClientError, asyncio.TimeoutError, ValueError):  # ValueError: a path that makes no URL
        await session.close()
        return error_response(503, "worker_unavailable", "The worker that owns this call is not available.",
                              "server_error")
    log.info("call %s: backend socket relayed to worker %d", request.query["call_id"], owner,
             extra={"call_id": request.query["call_id"], "event": "backend_relayed", "worker": owner})
    try:
        return await _bridge(request, inner)
    finally:
        await session.close()


async def relay_to_node(request: web.Request, node: str) -> web.StreamResponse:
    """The call is another relay's: open the same socket there, signed (the key's index, never the key), and relay
    the frames both ways; a refusal there is answered here, before the upgrade; a node gone is a prompt 404."""
    cluster = request.app[CLUSTER]
    assert cluster.http is not None
    caller = _caller(request)
    if not may_vouch(cluster, caller):  # who_refused let nobody through; this is the last word before signing
        return refusal(401, "missing_api_key", "Send an API key as 'Authorization: Bearer'.")
    started = time.monotonic()
    target = await node_url(cluster, node, path_qs(request))
    inner, refused = None, None
    if isinstance(target, str):
        outcome = target
    else:
        headers = cluster.signed("GET", path_qs(request), caller, client_of(request, cluster))
        protocols = [p for p in offered_protocols(request) if not p.startswith(KEY_SUBPROTOCOL)]  # never the key
        inner, outcome, refused = await _open_at_node(cluster.http, target, headers, protocols)
    counted(outcome, started)
    if outcome == "refused":
        signature_refused_by(node)
    if inner is None:
        return refused or as_response(NodeAnswer(outcome))
    log.info("call %s: backend socket relayed to node %s", request.query["call_id"], node,
             extra={"call_id": request.query["call_id"], "event": "backend_relayed", "node": node})
    return await _bridge(request, inner)


def _caller(request: web.Request) -> str:
    """The key's index (as auth.py names it), or anyone on an open relay."""
    keys = [key.get_secret_value() for key in request.app[SETTINGS].api_keys]
    index = api_key_index(presented_key(request) or "", keys) if keys else None
    return f"backend:key{index}" if index is not None else "anyone"


async def _open_at_node(http: ClientSession, url: URL, headers: dict[str, str], protocols: list[str]
                        ) -> tuple[Any, str, web.Response | None]:
    """(the socket, the outcome, the owner's refusal as this relay answers it). The socket pings the owner every
    HEARTBEAT_S: an owner gone dark (no FIN, no RST) is noticed, and the backend's socket closed, in 1.5 times that."""
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            inner = await http.ws_connect(url, headers=headers, protocols=protocols, max_msg_size=0, autoping=True,
                                          heartbeat=HEARTBEAT_S)
        return inner, "answered", None
    except WSServerHandshakeError as exc:
        if exc.status == 401 and exc.headers is not None and REFUSED in exc.headers:
            return None, "refused", None
        if exc.status in OWNER_REFUSALS:
            return None, "answered", error_response(exc.status, *OWNER_REFUSALS[exc.status])
        return None, "answered", error_response(503, "owner_unavailable", "The relay that carries this call did not "
                                                "take the socket.", "server_error")
    except GONE:
        return None, "owner_gone", None
    except (OSError, ClientError, asyncio.TimeoutError):
        return None, "owner_unavailable", None


async def _bridge(request: web.Request, inner: Any) -> web.StreamResponse:
    """Upgrade the client's socket and relay frames between it and `inner` until either closes; `inner` is closed
    on the way out."""
    try:
        outer = web.WebSocketResponse(protocols=PROTOCOLS, heartbeat=HEARTBEAT_S, timeout=CLOSE_TIMEOUT_S,
                                      max_msg_size=0)  # the owner enforces the limits
        await outer.prepare(request)
        pumps = [asyncio.ensure_future(_pump(inner, outer)), asyncio.ensure_future(_pump(outer, inner))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        return outer
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(inner.close(), CLOSE_TIMEOUT_S)


async def _pump(source: Any, sink: Any) -> None:
    """Frames from one socket to the other (each send awaited: the owner's queue bound holds), then its close."""
    while True:
        message = await source.receive()
        if message.type == WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type not in (WSMsgType.PING, WSMsgType.PONG):
            break
    reason = message.extra if message.type == WSMsgType.CLOSE and isinstance(message.extra, str) else ""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(sink.close(code=source.close_code or 1000, message=reason.encode()[:123]),
                               CLOSE_TIMEOUT_S)


def add_control_route(app: web.Application) -> None:
    app.router.add_get("/v1/realtime", control_socket)

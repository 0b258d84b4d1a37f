"""The cluster's HTTP side (issue 19); what can be sans-I/O, and Redis, is relay/cluster/'s.

- A request about a call (hangup, DELETE, transcript here; the backend's control socket in control.py) whose id
  names another node is checked here as any other (auth.py), then forwarded to that node, signed
  (relay/cluster/signing.py) with who the caller is and the client's address, never the client's credentials. The
  owner's answer goes back as it came.
- A signed request is trusted only when its signature is right and fresh (401 otherwise), and only for those
  routes; it is never forwarded again (the owner's own workers still pass it on, workers.py).
- A node that cannot be found (not in the registry, no template) or connected to within CONNECT_TIMEOUT_S is gone:
  a request about its calls gets `404 call_not_found` at once, never a hanging request. One that cannot be looked
  up (Redis down, nothing else to go by) may be up: `503 owner_unavailable`, to be tried again.
- Only what auth established is vouched for: on a relay with API keys, a request from nobody in particular is never
  forwarded. The body of a forwarded request is not (no forwarded route reads one), and its path is the request's
  relative URL, %-encoded as received, on both sides (an absolute-form request target names another host).
- The tasks that keep the registry and the transcripts in Redis, and the cluster's place in the app, are
  cluster_tasks.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from aiohttp import (ClientConnectorError, ClientError, ClientSession, ClientTimeout, ConnectionTimeoutError,
                     ServerDisconnectedError, web)
from yarl import URL

from relay.cluster.ids import owner_of
from relay.cluster.limits import SharedRateLimiter
from relay.cluster.metrics import FORWARD_SECONDS, FORWARDED, SIGNATURES_REFUSED
from relay.cluster.peers import Peers, RegistryDown, template_url
from relay.cluster.registry import Registry
from relay.cluster.signing import SIGNATURE, Forwarded, SignatureError, sign, verify
from relay.cluster.single_use import SingleUse
from relay.cluster.store import SharedStateError, Store, connect
from relay.cluster.transcripts import Transcripts
from relay.cluster.transcripts import answer as stored_answer
from relay.config import Settings
from relay.core.history import History
from relay.server.auth import FORWARDED_FOR, caller_of, refusal
from relay.server.errors import error_response
from relay.server.limits import Networks, client_address, networks
from relay.server.workers import Worker, path_qs, peer_address

log = logging.getLogger("relay.cluster")
CONNECT_TIMEOUT_S = 1.0  # no connection to a node by then: it is gone, its calls are 404
ANSWER_TIMEOUT_S = 10.0  # connected, no answer by then: 503 (a hangup waits for its call to close)
FORWARD_TIMEOUT = ClientTimeout(total=ANSWER_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
MAX_UNSAVED_ENDED = 1000  # ended calls' transcripts waiting for Redis to come back; beyond it the oldest are lost
LOG_EVERY_S = 10.0
_logged: dict[str, float] = {}
REFUSED = "X-Relay-Cluster-Refused"  # on a 401 for a bad signature: the forwarding relay's configuration is wrong
GONE = (ClientConnectorError, ConnectionTimeoutError, ServerDisconnectedError)  # refused, unresolvable, timed out
TRANSCRIPT_ROUTE = "/v1/realtime/calls/{call_id}/transcript"
FORWARDABLE = {("POST", "/v1/realtime/calls/{call_id}/hangup"), ("DELETE", "/v1/realtime/calls/{call_id}"),
               ("GET", TRANSCRIPT_ROUTE), ("GET", "/v1/realtime")}
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", REFUSED.lower()}


@dataclass(frozen=True)
class NodeAnswer:
    """What came of asking another node: its answer, or why there is none (metrics.FORWARD_OUTCOMES)."""

    outcome: str
    status: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class Cluster:
    """This worker's part in a cluster. Every field is optional: no node id, no forwarding; no Redis, nothing
    shared (a relay on its own has neither)."""

    node: str | None = None
    secret: bytes = b""
    peers: Peers | None = None
    advertise_url: str | None = None
    proxies: Networks = field(default_factory=list)
    store: Store | None = None
    registry: Registry | None = None
    transcripts: Transcripts | None = None
    single_use: SingleUse | None = None
    ip_limits: SharedRateLimiter | None = None
    key_limits: SharedRateLimiter | None = None
    http: ClientSession | None = None  # to the other nodes, while the app runs
    keys_required: bool = False  # RELAY_API_KEYS set: a request from nobody in particular is never vouched for
    _ended: dict[str, History] = field(default_factory=dict)  # transcripts to write as ended
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def of(cls, settings: Settings, worker: Worker, ip_burst: float, key_burst: float) -> "Cluster":
        node = settings.node_id
        cluster = cls(node=node, proxies=networks(settings.trusted_proxies), keys_required=bool(settings.api_keys))
        if node:
            cluster.secret = settings.cluster_secret.get_secret_value().encode() if settings.cluster_secret else b""
            cluster.advertise_url = settings.advertise_url or template_url(settings.peer_url_template, node)
        if settings.redis_url:
            cluster._share(connect(settings.redis_url), settings, worker, ip_burst, key_burst)
        cluster.peers = Peers(cluster.registry, settings.peer_url_template) if node else None
        return cluster

    def _share(self, store: Store, settings: Settings, worker: Worker, ip_burst: float, key_burst: float) -> None:
        """What the relays share through Redis."""
        self.store = store
        self.registry = Registry(store, self.node, worker.index) if self.node else None
        # A client of their own (RELAY_TRANSCRIPT_REDIS_URL, or the same Redis): a slow transcript write leaves
        # Redis quiet for transcripts only, not for single-use secrets (which fail closed) and the rest.
        self.transcripts = Transcripts(connect(settings.transcript_redis_url or settings.redis_url),
                                       settings.transcript_ttl_s)
        self.single_use = SingleUse(store)
        self.ip_limits = SharedRateLimiter(store, "ip", settings.calls_per_ip_per_s, ip_burst)
        self.key_limits = SharedRateLimiter(store, "key", settings.calls_per_key_per_s, key_burst)

    def other_node(self, call_id: str) -> str | None:
        """The node that owns the call, if it is another one (and this relay is in a cluster)."""
        owner = owner_of(call_id) if self.node else None
        return owner.node if owner is not None and owner.node and owner.node != self.node else None

    def call_ended(self, call_id: str, history: History) -> None:
        """A call of this worker ended: its transcript is written as ended, soon (by keep_publishing)."""
        if self.transcripts is None:
            return
        self._ended[call_id] = history
        while len(self._ended) > MAX_UNSAVED_ENDED:
            self._ended.pop(next(iter(self._ended)))
        self._wake.set()

    def take_ended(self) -> dict[str, History]:
        ended, self._ended = self._ended, {}
        return ended

    def ended_again(self, ended: dict[str, History]) -> None:
        """Ended calls whose transcripts could not be written: tried again next time."""
        self._ended = ended | self._ended

    async def woken(self, timeout: float) -> None:
        """Until a call ends, or `timeout`."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()

    async def stored_transcript(self, call_id: str) -> dict[str, Any] | None:
        """The call's transcript as last written to Redis; None without one (or without Redis, or it down)."""
        if self.transcripts is None:
            return None
        with contextlib.suppress(SharedStateError):
            return await self.transcripts.load(call_id)
        return None

    def signed(self, method: str, path: str, caller: str, client: str) -> dict[str, str]:
        """Headers for a request to another node, which carries no body (no forwarded route reads one)."""
        return sign(self.secret, method, path, b"", Forwarded(self.node or "", caller, client), time.time())

    async def aclose(self) -> None:
        for store in {id(s): s for s in (self.store, self.transcripts and self.transcripts.store) if s}.values():
            await store.aclose()


CLUSTER: web.AppKey[Cluster] = web.AppKey("cluster")


# --- asking another node ------------------------------------------------------------------------------------------


def client_of(request: web.Request, cluster: Cluster) -> str:
    """The client's address as the per-address limit sees it (through RELAY_TRUSTED_PROXIES)."""
    forwarded_for = ",".join(request.headers.getall("X-Forwarded-For", ()))
    return client_address(peer_address(request), forwarded_for, cluster.proxies)


def counted(outcome: str, started: float) -> None:
    FORWARDED.labels(outcome).inc()
    FORWARD_SECONDS.labels(outcome).observe(time.monotonic() - started)


async def ask_node(cluster: Cluster, node: str, method: str, path: str, caller: str, client: str) -> NodeAnswer:
    """Send a signed request without a body to `node` (`path` with its query, %-encoded as received)."""
    started = time.monotonic()
    reply = await _ask(cluster, node, method, path, caller, client)
    counted(reply.outcome, started)
    return reply


async def node_url(cluster: Cluster, node: str, path: str) -> URL | str:
    """Where to send `path` at `node`, or why nowhere (an outcome: owner_gone or owner_unavailable)."""
    assert cluster.peers is not None
    try:
        url = await cluster.peers.url_of(node)
    except RegistryDown:
        return "owner_unavailable"  # the node may be up: not to be called gone
    if url is None:
        return "owner_gone"
    try:
        return URL(url + path, encoded=True)
    except ValueError:  # a registered address that is not one
        return "owner_unavailable"


async def _ask(cluster: Cluster, node: str, method: str, path: str, caller: str, client: str) -> NodeAnswer:
    target = await node_url(cluster, node, path)
    if isinstance(target, str):
        return NodeAnswer(target)
    headers = cluster.signed(method, path, caller, client)
    try:
        return await _send(cluster, node, method, target, headers)
    except ServerDisconnectedError:
        pass  # a pooled keep-alive connection the owner had closed (aiohttp retries those for GET and DELETE only)
    try:
        return await _send(cluster, node, method, target, headers)
    except ServerDisconnectedError:
        return NodeAnswer("owner_gone")


async def _send(cluster: Cluster, node: str, method: str, target: URL, headers: dict[str, str]) -> NodeAnswer:
    assert cluster.http is not None
    try:
        async with cluster.http.request(method, target, headers=headers, timeout=FORWARD_TIMEOUT,
                                        allow_redirects=False) as response:
            payload = await response.read()
    except ServerDisconnectedError:
        raise
    except GONE:
        return NodeAnswer("owner_gone")
    except (ClientError, asyncio.TimeoutError, ValueError):
        return NodeAnswer("owner_unavailable")
    if response.status == 401 and REFUSED in response.headers:
        signature_refused_by(node)
        return NodeAnswer("refused")
    return NodeAnswer("answered", response.status, response.headers, payload)


def now_and_then(what: str) -> bool:
    """Whether to log `what` now: at most once per LOG_EVERY_S (a misconfigured or probed relay would flood)."""
    now = time.monotonic()
    if now - _logged.get(what, -LOG_EVERY_S) < LOG_EVERY_S:
        return False
    _logged[what] = now
    return True


def signature_refused_by(node: str) -> None:
    if now_and_then("refused by a node"):
        log.error("node %s refused this relay's signature: RELAY_CLUSTER_SECRET differs, or the clocks do", node,
                  extra={"event": "signature_refused", "node": node})


def as_response(reply: NodeAnswer) -> web.Response:
    if reply.outcome == "owner_gone":
        return error_response(404, "call_not_found", "No such call (the relay that carried it is gone).")
    if reply.outcome != "answered":
        return error_response(503, "owner_unavailable", "The relay that carries this call did not answer; try "
                              "again.", "server_error", headers={"Retry-After": "1"})
    kept = {k: v for k, v in reply.headers.items()
            if k.lower() not in _HOP_HEADERS and not k.lower().startswith("access-control-")}
    return web.Response(status=reply.status, body=reply.body, headers=kept)


async def forward(request: web.Request, cluster: Cluster, node: str) -> web.Response:
    reply = await ask_node(cluster, node, request.method, path_qs(request), caller_of(request),
                           client_of(request, cluster))
    return as_response(reply)


async def transcript_elsewhere(request: web.Request, cluster: Cluster, call_id: str, node: str) -> web.Response:
    """Another node's call: an ended call's transcript from Redis; else the owner's word (the freshest); the owner
    gone (or not knowing it, restarted): what Redis last got."""
    stored = await cluster.stored_transcript(call_id)
    if stored is not None and stored.get("status") == "ended":
        return web.json_response(stored_answer(stored))
    reply = await ask_node(cluster, node, "GET", path_qs(request), caller_of(request), client_of(request, cluster))
    if stored is not None and (reply.outcome == "owner_gone" or (reply.outcome == "answered" and reply.status == 404)):
        return web.json_response(stored_answer(stored, status="ended"))
    return as_response(reply)


async def history_elsewhere(cluster: Cluster, call_id: str, prices: dict[str, float]) -> History | None:
    """The transcript of a call to resume that this relay does not hold: Redis' if the call ended; else its
    node's, if another holds it (asked as "relay", good for a transcript only); else what Redis last got."""
    stored = await cluster.stored_transcript(call_id)
    node = cluster.other_node(call_id)
    if node is not None and (stored is None or stored.get("status") != "ended"):
        reply = await ask_node(cluster, node, "GET", f"/v1/realtime/calls/{call_id}/transcript", "relay", "")
        if reply.outcome == "answered" and reply.status == 200:
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                return History.from_snapshot(json.loads(reply.body), prices)
    return History.from_snapshot(stored, prices) if stored is not None else None


# --- middlewares ------------------------------------------------------------------------------------------------


def _route_of(request: web.Request) -> tuple[str, str | None]:
    resource = request.match_info.route.resource
    return request.method, resource.canonical if resource is not None else None


def trust_signed(cluster: Cluster):
    """A request that carries a cluster signature: trusted (auth.py then takes the caller it names) when the
    signature is right, fresh and for a route that is forwarded; else 401, whatever else it carries."""

    @web.middleware
    async def check(request: web.Request, handler):
        if SIGNATURE not in request.headers:
            return await handler(request)
        try:
            if _route_of(request) not in FORWARDABLE:
                raise SignatureError(f"{request.method} {request.path} is not forwarded between relays")
            request[FORWARDED_FOR] = verify(cluster.secret, request.method, path_qs(request), await request.read(),
                                            request.headers, time.time())
        except SignatureError as exc:
            SIGNATURES_REFUSED.inc()
            if now_and_then("refused here"):
                log.warning("cluster signature refused: %s", exc, extra={"event": "signature_refused"})
            return error_response(401, "invalid_cluster_signature", "The request's cluster signature is not valid.",
                                  headers={REFUSED: "1"})
        return await handler(request)

    return check


def may_vouch(cluster: Cluster, caller: str) -> bool:
    """Whether a request whose caller auth found to be `caller` may go to another node: not a request from nobody
    in particular to relays with API keys (auth lets none through; this is the last word before the signature)."""
    return caller != "anyone" or not cluster.keys_required


def route_to_owner(cluster: Cluster):
    """After auth: a request about another node's call goes there (a signed one was meant for this node)."""

    @web.middleware
    async def route(request: web.Request, handler):
        call_id = request.match_info.get("call_id")
        node = cluster.other_node(call_id) if call_id and FORWARDED_FOR not in request else None
        if node is None:
            return await handler(request)
        if not may_vouch(cluster, caller_of(request)):
            return refusal(401, "missing_api_key", "Send an API key (or a client secret) as 'Authorization: Bearer'.")
        if _route_of(request)[1] == TRANSCRIPT_ROUTE:
            return await transcript_elsewhere(request, cluster, call_id, node)
        return await forward(request, cluster, node)

    return route

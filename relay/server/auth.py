"""Who may use the relay: server-side API keys, ephemeral client secrets, and browser origins.

- Backends authenticate with a key of `RELAY_API_KEYS`, sent as `Authorization: Bearer <key>`.
- A backend mints a client secret (`POST /v1/realtime/client_secrets`, OpenAI's shape) for one app or browser: an
  `ek_…` token valid for a while (default 600 s) and, as OpenAI's, for any number of calls until then, optionally
  carrying a session configuration those calls start with and their client cannot change.
- Browsers: a request carrying an `Origin` must come from the relay's own page or an origin of
  `RELAY_ALLOWED_ORIGINS`.

With no key configured the relay is open; it starts that way only on loopback, or with `--insecure`.

Tokens are `ek_<base64url(iv + AES-GCM(zlib(JSON claims)))>`, sealed with a key derived from the token secret: the
claims (expiry, nonce, minting worker, session) travel inside the token, unreadable to its holder (a session's
instructions are the operator's) and unforgeable, so any relay process sharing `RELAY_TOKEN_SECRET` accepts it
without asking anyone. Only `RELAY_CLIENT_SECRET_SINGLE_USE` needs memory: then the minting worker keeps the
nonces not used yet, and a call with such a token is created by that worker; with RELAY_REDIS_URL, Redis remembers
which were used instead (relay/cluster/single_use.py), so any worker of any relay takes one, once, and refuses it
while Redis cannot say (fails closed). A single-use secret is taken before the call is checked and set up, and given
back when no call comes of it (refused, a bad offer, the model unreachable, the request cancelled).

In a cluster a request another relay forwarded carries no credentials: that relay checked them and says, signed,
who the caller is (relay/server/cluster.py checks the signature and puts it under FORWARDED_FOR): `backend:<key
index>`, `secret:<nonce>` (a client secret, good for ending the calls it created), `relay` (a relay reading a
transcript, to resume its call) or `anyone` (open access).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import json
import os
import secrets
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay.cluster.single_use import SingleUse
from relay.cluster.store import SharedStateError
from relay.config import Settings
from relay.core.call import with_tools
from relay.core.policy import EventPolicy, call_model
from relay.protocol import ProtocolError, new_id, parse_client_event
from relay.protocol.session import filled_in, merge
from relay.server.errors import error_response
from relay.server.workers import FORWARDED, Worker, forward, from_a_worker
from relay.upstream.target import ModelChoice

TOKEN_PREFIX = "ek_"
MIN_TTL_S, MAX_TTL_S = 10, 7200  # OpenAI's bounds for expires_after.seconds
MAX_UNUSED_TOKENS = 100_000  # single-use tokens minted and not yet used or expired; beyond it minting is refused
# A token goes in a header: within 8 KiB (aiohttp's, nginx's default limit for one header line) with room to spare.
MAX_TOKEN_CHARS = 7000
_AAD = b"relay ek v1"  # binds a sealed token to this format


class TokenError(Exception):
    """Why a token is refused; the message is safe to show the client."""


@dataclass(frozen=True)
class Claims:
    worker: int
    nonce: str
    expires_at: int
    session: dict[str, Any] | None = None
    single_use: bool = False  # minted so: used at most once, at the worker that minted it, whatever checks it


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Tokens:
    """Minting and checking client secrets, sans-I/O (times are passed in)."""

    secret: bytes
    worker: int = 0
    single_use: bool = False
    shared: bool = False  # single use remembered in Redis, not here
    _unused: dict[str, int] = field(default_factory=dict)  # single use: nonce -> expiry, of tokens not yet used

    def __post_init__(self) -> None:
        self._aead = AESGCM(hmac.new(self.secret, b"relay client secrets", hashlib.sha256).digest())

    def mint(self, session: dict[str, Any] | None, ttl_s: int, now: float) -> tuple[str, int]:
        """A new token and its expiry (unix seconds)."""
        remember = self.single_use and not self.shared
        if remember:
            self._forget_expired(now)
            if len(self._unused) >= MAX_UNUSED_TOKENS:
                raise TokenError("Too many client secrets are outstanding; try again later.")
        nonce = secrets.token_urlsafe(12)
        expires_at = int(now + ttl_s)
        claims = json.dumps({"w": self.worker, "n": nonce, "exp": expires_at, "s": session, "su": self.single_use},
                            separators=(",", ":"))
        iv = os.urandom(12)
        token = TOKEN_PREFIX + _b64(iv + self._aead.encrypt(iv, zlib.compress(claims.encode()), _AAD))
        if len(token) > MAX_TOKEN_CHARS:
            raise ValueError(f"the session makes a client secret longer than {MAX_TOKEN_CHARS} characters (it "
                             "travels in a header); put what every call shares in RELAY_SESSION")
        if remember:
            self._unused[nonce] = expires_at
        return token, expires_at

    def check(self, token: str, now: float) -> Claims:
        """The claims of a token this relay's secret sealed and that has not expired (any worker can check this)."""
        try:
            sealed = _unb64(token.removeprefix(TOKEN_PREFIX))
            claims = json.loads(zlib.decompress(self._aead.decrypt(sealed[:12], sealed[12:], _AAD)))
            session = claims["s"]
            result = Claims(int(claims["w"]), str(claims["n"]), int(claims["exp"]),
                            session if isinstance(session, dict) else None, claims.get("su") is True)
        except (ValueError, KeyError, TypeError, binascii.Error, InvalidTag, zlib.error):
            raise TokenError("The client secret is not valid.") from None
        if now >= result.expires_at:
            raise TokenError("The client secret has expired.")
        return result

    def signed_nonce(self, token: str) -> str | None:
        """The nonce of a token this relay sealed, expired or not (a call outlives its token); None otherwise."""
        try:
            return self.check(token, now=float("-inf")).nonce
        except TokenError:
            return None

    def redeem(self, claims: Claims, now: float) -> None:
        """Single use: use the token (by the worker that minted it); a second use is refused."""
        expiry = self._unused.pop(claims.nonce, None)
        if expiry is None or now >= expiry:
            raise TokenError("The client secret has already been used.")

    def give_back(self, claims: Claims) -> None:
        """A redeemed token whose call was not created: usable again."""
        self._unused[claims.nonce] = claims.expires_at

    def _forget_expired(self, now: float) -> None:
        if len(self._unused) >= 1000:
            for nonce in [n for n, expiry in self._unused.items() if now >= expiry]:
                del self._unused[nonce]


def bearer(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


def is_api_key(presented: str, keys: list[str]) -> bool:
    return api_key_index(presented, keys) is not None


def api_key_index(presented: str, keys: list[str]) -> int | None:
    """Which key was presented, compared in constant time against every key (the time taken does not say which
    one nearly matched)."""
    found = None
    for index, key in enumerate(keys):
        if hmac.compare_digest(presented.encode(), key.encode()):
            found = index
    return found


def ttl_of(body: Any, default_s: int) -> int:
    """`expires_after.seconds` of a client_secrets request (anchored at created_at, as OpenAI's), else the default."""
    expires_after = body.get("expires_after") if isinstance(body, dict) else None
    if expires_after is None:
        return default_s
    seconds = expires_after.get("seconds", default_s) if isinstance(expires_after, dict) else None
    anchor = expires_after.get("anchor", "created_at") if isinstance(expires_after, dict) else None
    if anchor != "created_at" or not isinstance(seconds, int) or isinstance(seconds, bool) \
            or not MIN_TTL_S <= seconds <= MAX_TTL_S:
        raise ValueError(f"expires_after must be {{\"anchor\": \"created_at\", \"seconds\": {MIN_TTL_S}..{MAX_TTL_S}}}")
    return seconds




# --- the aiohttp adapter -----------------------------------------------------------------------------------------

TOKENS: web.AppKey[Tokens] = web.AppKey("tokens")
# Request keys: the redeemed token's session and nonce (typed keys where aiohttp has them, ≥ 3.12).
_RequestKey = getattr(web, "RequestKey", None)
TOKEN_SESSION: Any = _RequestKey("token_session", object) if _RequestKey else "relay.token_session"
TOKEN_NONCE: Any = _RequestKey("token_nonce", object) if _RequestKey else "relay.token_nonce"
# Set when an API key was shown: which one ("key0", "key1"…, for its call-rate allowance).
BACKEND: Any = _RequestKey("backend", object) if _RequestKey else "relay.backend"
# Set on a request another relay forwarded, signed (relay/cluster/signing.Forwarded): who it says the caller is.
FORWARDED_FOR: Any = _RequestKey("forwarded_for", object) if _RequestKey else "relay.forwarded_for"
API_PREFIX = "/v1/realtime/"
# Every answer to an allowed origin: what the SDKs read (the call's Location) is exposed.
CORS_HEADERS = {"Access-Control-Expose-Headers": "Location", "Vary": "Origin"}
# A preflight's answer also allows the methods, and whatever headers the browser says the request carries (OpenAI's
# JavaScript SDK adds its own, X-OpenAI-Agents-SDK; others will come): the origin is what is checked, not headers.
PREFLIGHT_HEADERS = {"Access-Control-Allow-Methods": "GET, POST, DELETE", "Access-Control-Max-Age": "600",
                     "Vary": "Origin, Access-Control-Request-Headers"}


def refusal(status: int, code: str, message: str) -> web.Response:
    return error_response(status, code, message, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


def origin_allowed(request: web.Request, allowed: list[str]) -> bool:
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{request.scheme}://{request.host}" or "*" in allowed or origin in allowed


def auth_middleware(settings: Settings, worker: Worker, calls_key: web.AppKey):
    """Origins first (a browser on a foreign page is refused whatever it carries), then who is asking."""
    keys = [key.get_secret_value() for key in settings.api_keys]

    @web.middleware
    async def authenticate(request: web.Request, handler):
        if not request.path.startswith((API_PREFIX, "/relay/")):
            return await handler(request)  # the page, its files, health
        if not origin_allowed(request, settings.allowed_origins):
            return refusal(403, "origin_not_allowed", "Requests from this page's origin are not allowed "
                           "(RELAY_ALLOWED_ORIGINS).")
        cors = {"Access-Control-Allow-Origin": request.headers["Origin"], **CORS_HEADERS} \
            if "Origin" in request.headers else {}
        if request.method == "OPTIONS":
            return web.Response(status=204, headers=cors and _preflight(cors, request))
        if FORWARDED_FOR in request:
            response = await _as_forwarded(request, handler, keys, calls_key)
        else:
            response = await _authorised(request, handler, keys, worker, calls_key)
        response.headers.update(cors)
        return response

    return authenticate


def _preflight(cors: dict[str, str], request: web.Request) -> dict[str, str]:
    asked = request.headers.get("Access-Control-Request-Headers", "").strip()
    allowed = {"Access-Control-Allow-Headers": asked} if asked else {}
    return {**cors, **PREFLIGHT_HEADERS, **allowed}


async def _authorised(request: web.Request, handler, keys: list[str], worker: Worker, calls_key: web.AppKey):
    presented = bearer(request.headers.get("Authorization"))
    creating = request.method == "POST" and request.path == "/v1/realtime/calls"
    if presented is not None and presented.startswith(TOKEN_PREFIX) and (creating or not keys):
        return await _with_token(request, handler, presented, worker, creating)
    if not keys or not request.path.startswith(API_PREFIX):
        return await handler(request)  # open access; /relay/ (client config) is for any client
    if presented is None and _a_worker_resuming(request):
        return await handler(request)
    if presented is None:
        return refusal(401, "missing_api_key", "Send an API key (or a client secret) as 'Authorization: Bearer'.")
    index = api_key_index(presented, keys)
    if index is not None:
        request[BACKEND] = f"key{index}"  # trusted to set the whole session of the calls it creates
        return await handler(request)
    if presented.startswith(TOKEN_PREFIX):
        return await _token_on_its_call(request, handler, presented, calls_key)
    return refusal(401, "invalid_api_key", "The API key is not valid.")


def _a_worker_resuming(request: web.Request) -> bool:
    """Another worker reading a transcript, for a call that resumes this worker's call (calls.py asks with no
    credentials: its caller's were checked there, and they may be a client secret's, which reads no transcript)."""
    return (request.method == "GET" and request.path.endswith("/transcript") and FORWARDED in request.headers
            and from_a_worker(request))


async def _with_token(request: web.Request, handler, token: str, worker: Worker, creating: bool):
    tokens = request.app[TOKENS]
    try:
        claims = tokens.check(token, time.time())
    except TokenError as exc:
        return refusal(401, "invalid_client_secret", str(exc))
    if not creating:
        return await handler(request)  # open access: a token is as good as nothing
    # Single use as minted, whatever this relay's own setting (relays may differ during a change); without Redis
    # only its minting worker knows whether it was used.
    if claims.single_use and request.app[SINGLE_USE] is None and claims.worker != worker.index:
        if claims.worker >= worker.count or FORWARDED in request.headers:
            return refusal(401, "invalid_client_secret", "The client secret is not valid.")
        return await forward(request, worker, claims.worker)
    taken = await _take(request.app, claims)
    if isinstance(taken, web.StreamResponse):
        return taken
    request[TOKEN_SESSION] = claims.session
    request[TOKEN_NONCE] = claims.nonce
    return await _creating(request, handler, taken)


GiveBack = Callable[[], Awaitable[None]]


async def _take(app: web.Application, claims: Claims) -> GiveBack | web.Response | None:
    """A single-use secret taken (in Redis, else at this, its minting worker): what gives it back; or the refusal.
    None: the secret is not single-use."""
    if not claims.single_use:
        return None
    shared = app[SINGLE_USE]
    if shared is not None:
        taken = await _use_once(shared, claims)
        return taken if isinstance(taken, web.Response) else functools.partial(shared.release, claims.nonce, taken)
    try:
        app[TOKENS].redeem(claims, time.time())
    except TokenError as exc:
        return refusal(401, "invalid_client_secret", str(exc))
    return functools.partial(_give_back_here, app[TOKENS], claims)


async def _give_back_here(tokens: Tokens, claims: Claims) -> None:
    tokens.give_back(claims)


async def _creating(request: web.Request, handler, give_back: GiveBack | None) -> web.StreamResponse:
    """Create the call; a single-use secret taken for it is given back when no call comes of it (any answer but
    201, or the request failing or cancelled): the secret was not used, and its client may try again."""
    if give_back is None:
        return await handler(request)
    try:
        response = await handler(request)
    except BaseException:
        await _give_back(give_back)
        raise
    if response.status != 201:
        await _give_back(give_back)
    return response


async def _give_back(give_back: GiveBack) -> None:
    with contextlib.suppress(SharedStateError):  # Redis down: the secret stays used (failing closed, as taking it)
        await give_back()


async def _use_once(shared: SingleUse, claims: Claims) -> str | web.Response:
    """Single use across relays: the first use of the secret anywhere goes on (what names this use, to give it back
    with); a second is refused, and so is any while Redis cannot say (failing closed: a secret must not make two
    calls)."""
    try:
        taken = await shared.consume(claims.nonce, claims.expires_at, time.time())
    except SharedStateError:
        return error_response(503, "client_secret_unverifiable", "Single-use client secrets cannot be checked right "
                              "now (the relays' shared state, Redis, is unreachable); try again shortly.",
                              "server_error", headers={"Retry-After": "1"})
    return taken or refusal(401, "invalid_client_secret", "The client secret has already been used.")


async def _token_on_its_call(request: web.Request, handler, token: str, calls_key: web.AppKey):
    """A client secret ends the calls it created (hangup, DELETE), however long they last; nothing else (a
    transcript needs a key). One this relay did not seal is refused here, before anything is passed on."""
    nonce = request.app[TOKENS].signed_nonce(token)
    if nonce is None:
        return refusal(401, "invalid_client_secret", "The client secret is not valid.")
    return await _ends_its_own_call(request, handler, nonce, calls_key)


async def _ends_its_own_call(request: web.Request, handler, nonce: str, calls_key: web.AppKey):
    """The caller holds the client secret whose nonce is `nonce`."""
    call_id = request.match_info.get("call_id")
    ending = request.method == "DELETE" or (request.method == "POST" and request.path.endswith("/hangup"))
    if not ending:
        return refusal(401, "invalid_api_key", "A client secret is good for creating calls and ending them only.")
    call = request.app[calls_key].get(call_id) if call_id else None
    if call is None and call_id:
        # Another worker's or node's call (forwarded there with the nonce, and checked there) or none: 404.
        request[TOKEN_NONCE] = nonce
        return await handler(request)
    if call is not None and call.token_nonce is not None and call.token_nonce == nonce:
        return await handler(request)
    return refusal(401, "invalid_api_key", "A client secret ends the calls it created, and no other.")


async def _as_forwarded(request: web.Request, handler, keys: list[str], calls_key: web.AppKey):
    """A request another relay forwarded, signed: the caller is who it says (it checked the credentials)."""
    kind, _, value = request[FORWARDED_FOR].caller.partition(":")
    if kind == "backend" and value:
        request[BACKEND] = value
        return await handler(request)
    if kind == "relay" and request.method == "GET" and request.path.endswith("/transcript"):
        return await handler(request)  # a relay resuming the call elsewhere
    if not keys:
        return await handler(request)  # open access
    if kind == "secret" and value:
        return await _ends_its_own_call(request, handler, value, calls_key)
    return refusal(401, "missing_api_key", "Send an API key (or a client secret) as 'Authorization: Bearer'.")


def caller_of(request: web.Request) -> str:
    """Who auth found the caller of this request to be, as a forwarded request says it (see the module's doc)."""
    if request.get(BACKEND) is not None:
        return f"backend:{request[BACKEND]}"
    if request.get(TOKEN_NONCE) is not None:
        return f"secret:{request[TOKEN_NONCE]}"
    return "anyone"


def may_call(request: web.Request) -> bool:
    """Whether whoever sends `request` may create calls: always when the relay is open (no API keys), else when
    it carries one of the keys or a client secret this relay signed that has not expired (used or not: the worker
    that minted it knows, this one need not ask). Decides who gets what is worth stealing, e.g. TURN credentials."""
    keys = [key.get_secret_value() for key in request.app[SETTINGS_KEY].api_keys]
    presented = bearer(request.headers.get("Authorization"))
    if not keys:
        return True
    if presented is None:
        return False
    if presented.startswith(TOKEN_PREFIX):
        try:
            request.app[TOKENS].check(presented, time.time())
        except TokenError:
            return False
        return True
    return is_api_key(presented, keys)


async def client_secrets(request: web.Request) -> web.Response:
    """`POST /v1/realtime/client_secrets` `{"expires_after": {"anchor": "created_at", "seconds": N}, "session":
    {…}}` -> `{"value": "ek_…", "expires_at": …, "session": {the effective session}}`, as OpenAI's. The session's
    settings are its calls' and their clients cannot change them (see relay.core.policy)."""
    settings = request.app[SETTINGS_KEY]
    try:
        body = await request.json() if request.can_read_body else {}
    except (ValueError, RecursionError):
        return error_response(400, "invalid_json", "The body is not valid JSON.")
    if not isinstance(body, dict):
        return error_response(400, "invalid_type", "The body must be a JSON object.")
    try:
        ttl = ttl_of(body, settings.client_secret_ttl_s)
    except ValueError as exc:
        return error_response(400, "invalid_value", str(exc), param="expires_after")
    session = body.get("session")
    if session is not None and not isinstance(session, dict):
        return error_response(400, "invalid_type", "'session' must be a JSON object.", param="session")
    if session is not None and session.get("type", "realtime") != "realtime":
        return error_response(400, "invalid_value", "This relay makes realtime sessions only ('type': "
                              "'realtime'); transcription sessions are not supported.", param="session.type")
    try:  # refused now, as OpenAI does, rather than at every call made with it
        parse_client_event({"type": "session.update", "session": {"type": "realtime", **(session or {})}})
    except ProtocolError as exc:
        return error_response(400, exc.code, exc.message, param=exc.param)
    if session is not None and BACKEND not in request:  # open access: whoever mints is a client, not a backend
        EventPolicy(settings.client_session_fields).keep_locked_fields(session, settings.session, "session")
    model = call_model(None, session, request.app[MODELS].allowed)
    if not isinstance(model, (str, type(None))):
        return error_response(400, model.code, model.message, param=model.param)
    try:
        value, expires_at = request.app[TOKENS].mint(session, ttl, time.time())
    except TokenError as exc:
        return error_response(429, "too_many_client_secrets", str(exc), "rate_limit_error")
    except ValueError as exc:
        return error_response(400, "session_too_large", str(exc), param="session")
    effective = filled_in(merge(settings.session, session or {}), model or request.app[MODELS].default)
    tools = request.app[SERVER_TOOLS]
    effective.update(id=new_id("sess"), expires_at=expires_at,
                     **({"tools": with_tools(effective["tools"], tools)} if tools else {}))
    return web.json_response({"value": value, "expires_at": expires_at, "session": effective})


SETTINGS_KEY: web.AppKey[Settings] = web.AppKey("auth_settings")
MODELS: web.AppKey[ModelChoice] = web.AppKey("models")  # the default model, and those clients may ask for
SERVER_TOOLS: web.AppKey[list[dict[str, Any]]] = web.AppKey("server_tools")  # added to every call's tools
SINGLE_USE: web.AppKey[SingleUse | None] = web.AppKey("single_use")  # with Redis: single-use secrets' memory


def add_auth(app: web.Application, settings: Settings, worker: Worker, calls_key: web.AppKey,
             models: ModelChoice, server_tools: list[dict[str, Any]], single_use: SingleUse | None = None) -> None:
    """Install the checks in front of every other middleware, and the client_secrets route. `models` (which a
    client may ask for) and `server_tools` (the relay's own) shape the session a client secret reports;
    `single_use`: where single-use secrets' use is remembered, if not in the minting worker (Redis)."""
    secret = settings.token_secret.get_secret_value().encode() if settings.token_secret else secrets.token_bytes(32)
    app[TOKENS] = Tokens(secret, worker.index, single_use=settings.client_secret_single_use,
                         shared=single_use is not None)
    app[SINGLE_USE] = single_use
    app[SETTINGS_KEY] = settings
    app[MODELS] = models
    app[SERVER_TOOLS] = server_tools
    app.middlewares.insert(0, auth_middleware(settings, worker, calls_key))
    app.router.add_post("/v1/realtime/client_secrets", client_secrets)

"""The official `openai` Python SDK as the client, its `base_url` at the relay: client secrets, calls posted in the
SDK's own form with an aiortc peer's offer, hangups, and errors as the SDK's typed exceptions with OpenAI's codes.
(`client.realtime.connect(call_id=…)`, the backend's control socket: test_sideband.py.)"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any, Awaitable

import openai
import pytest
from openai import AsyncOpenAI
from openai.types.realtime import ClientSecretCreateResponse, RealtimeSessionCreateResponse

from relay.protocol.session import REALTIME_MODELS
from relay.server.auth import Tokens
from relay.server.workers import Worker
from tests.audio_checks import loud_ms
from tests.integration.test_webrtc_call import _serve, relay_settings
from tests.processes import clean_env, relay_logged
from tests.webrtc_client import ClientCall, Poster, call_relay, load_pcm48

KEY = "sk-relay-sdk-test"
TOKEN_SECRET = "the token secret of the in-process relay"
WEATHER = "Only talk about the weather."
SECRET_MODEL, OFFER_MODEL, NOT_ALLOWED = "gpt-realtime-mini", "gpt-realtime-2", "gpt-4o"  # not a realtime model
HELLO48 = load_pcm48("speech_hello_48k.wav")
# The simulator stands in for OpenAI behind RELAY_UPSTREAM_URL: clients may ask for OpenAI's models, as there.
OPENAI_MODELS = ",".join(REALTIME_MODELS)


def sdk(base: str, key: str) -> AsyncOpenAI:
    """The SDK as an app sets it up for the relay; no retries, so that a test sees the relay's first answer."""
    return AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)


def offer_through(client: AsyncOpenAI, **session: Any) -> Poster:
    """Posts the offer with `client.realtime.calls.create` (multipart: `sdp` and the `session`); the call id is in
    the answer's Location, which the SDK's binary response keeps with the HTTP response."""
    async def post(sdp: str) -> tuple[str, str]:
        answer = await client.realtime.calls.create(sdp=sdp, session={"type": "realtime", **session})
        assert answer.response.status_code == 201
        return answer.text, answer.response.headers["Location"]
    return post


async def call_as_app(base: str, secret: str, **session: Any) -> ClientCall:
    """A call from an app of its own (a fresh connection, so the kernel picks a worker afresh) holding `secret`."""
    async with sdk(base, secret) as app:
        return await call_relay(base, post=offer_through(app, **session))


async def mint(backend: AsyncOpenAI, ttl: int, **body: Any) -> ClientSecretCreateResponse:
    """A client secret as OpenAI defines it: the body valid as the SDK's type (validated: the SDK's own parsing
    is lenient), its session the effective one with the defaults filled in, expiring `ttl` s from now."""
    before = time.time()
    raw = await backend.realtime.client_secrets.with_raw_response.create(**body)
    after = time.time()
    secret = ClientSecretCreateResponse.model_validate(raw.http_response.json())
    assert secret.value.startswith("ek_") and int(before) + ttl - 1 <= secret.expires_at <= after + ttl + 1
    session = secret.session
    assert isinstance(session, RealtimeSessionCreateResponse) and session.model and session.audio.output.voice
    for audio in (session.audio.input, session.audio.output):
        assert (audio.format.type, audio.format.rate) == ("audio/pcm", 24000)
    return secret


async def refused(request: Awaitable[Any], error: type[openai.APIStatusError], code: str, param: str | None = None
                  ) -> None:
    """`request` fails as the SDK's `error` with OpenAI's `code` (and `param`, when given)."""
    with pytest.raises(error) as caught:
        await request
    assert caught.value.code == code, caught.value.body
    if param is not None:
        assert caught.value.param == param, caught.value.body


# --- a backend and its apps, at a relay of two workers -------------------------------------------------------------


@pytest.fixture
async def workers(simulator):
    """`relay serve --workers 2` with an API key and no RELAY_TOKEN_SECRET (the master picks one for its workers).
    Every call here comes from one address: the per-address limit (callers without an API key) is out of the way."""
    env = clean_env(RELAY_UPSTREAM_URL=simulator.url, RELAY_ICE_ADDRESSES="127.0.0.1", RELAY_API_KEYS=KEY,
                    RELAY_CALLS_PER_IP_PER_S="1000", RELAY_MODELS=OPENAI_MODELS)
    async with relay_logged("--workers", "2", env=env) as relay:
        yield relay.base
        relay.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(relay.process.wait(), 30) == 0, relay.output()


async def test_a_client_secret_makes_calls_at_every_worker_with_its_session(workers, simulator):
    async with sdk(workers, KEY) as backend:
        default = await mint(backend, ttl=600)  # no expiry asked: OpenAI's 600 s; no session: RELAY_MODEL's
        assert default.session.model == "gpt-realtime"
        secret = await mint(backend, ttl=300, expires_after={"anchor": "created_at", "seconds": 300},
                            session={"type": "realtime", "model": SECRET_MODEL, "instructions": WEATHER})
        assert (secret.session.model, secret.session.instructions) == (SECRET_MODEL, WEATHER)
        first = await call_as_app(workers, secret.value, audio={"output": {"voice": "cedar"}})
        try:
            created = (await first.wait_for("session.created"))["session"]
            assert (created["model"], created["instructions"]) == (SECRET_MODEL, WEATHER)
            assert created["audio"]["output"]["voice"] == "cedar"  # what the app's offer may set, it sets
            first.mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)
            done = await first.wait_for("response.done", timeout=20)
            assert done["response"]["status"] == "completed"
            await first.wait_for("output_audio_buffer.stopped", timeout=20)
            assert loud_ms(first.received())  # the reply was heard
            await backend.realtime.calls.hangup(first.call_id)
            await refused(backend.realtime.calls.hangup(first.call_id), openai.NotFoundError, "call_not_found")
        finally:
            await first.close()
        # Good for more calls, whichever worker takes them (one of the two did not mint it).
        owners = {Worker.owner(first.call_id)}
        for _ in range(12):  # each app's connection lands on a worker by a hash: a few are enough
            if len(owners) == 2:
                break
            call = await call_as_app(workers, secret.value)
            owners.add(Worker.owner(call.call_id))
            await backend.realtime.calls.hangup(call.call_id)  # by the backend's connection: maybe via the other
            await call.close()
        assert owners == {0, 1}
    assert {record.model for record in simulator.recorder.sessions} == {SECRET_MODEL}


# --- a backend's own calls, and what it is refused, at one relay in this process -----------------------------------


@pytest.fixture
async def relay(simulator):
    app, runner, url = await _serve(relay_settings(simulator.url, api_keys=KEY, token_secret=TOKEN_SECRET,
                                                   models=OPENAI_MODELS))
    yield url
    await runner.cleanup()


async def test_the_model_of_the_offer_is_the_model_of_the_call(relay, simulator):
    async with sdk(relay, KEY) as backend:
        call = await call_relay(relay, post=offer_through(backend, model=OFFER_MODEL))
        try:
            created = await call.wait_for("session.created")
            assert created["session"]["model"] == OFFER_MODEL and simulator.recorder.sessions[-1].model == OFFER_MODEL
            await backend.realtime.calls.hangup(call.call_id)
        finally:
            await call.close()


async def test_errors_are_the_sdks_with_openais_codes(relay):
    async with sdk(relay, KEY) as backend:
        stranger = backend.with_options(api_key="sk-not-a-key")
        await refused(stranger.realtime.client_secrets.create(), openai.AuthenticationError, "invalid_api_key")
        await refused(stranger.realtime.calls.create(sdp="v=0\r\n"), openai.AuthenticationError, "invalid_api_key")
        value = (await backend.realtime.client_secrets.create()).value
        forged = value[:20] + ("B" if value[20] == "A" else "A") + value[21:]
        # Sealed with this relay's secret: one still valid passes (to be refused for its offer), one expired not.
        fresh, _ = Tokens(TOKEN_SECRET.encode()).mint(None, 60, now=time.time())
        expired, _ = Tokens(TOKEN_SECRET.encode()).mint(None, 60, now=time.time() - 120)
        await refused(backend.with_options(api_key=fresh).realtime.calls.create(sdp="v=0\r\n"),
                      openai.BadRequestError, "invalid_offer")
        for secret in (forged, expired):
            await refused(backend.with_options(api_key=secret).realtime.calls.create(sdp="v=0\r\n"),
                          openai.AuthenticationError, "invalid_client_secret")
        await refused(backend.realtime.client_secrets.create(session={"type": "realtime", "model": NOT_ALLOWED}),
                      openai.BadRequestError, "invalid_value", "session.model")
        await refused(call_relay(relay, post=offer_through(backend, model=NOT_ALLOWED)),
                      openai.BadRequestError, "invalid_value", "session.model")
        await refused(backend.realtime.calls.hangup("rtc_" + "0" * 22), openai.NotFoundError, "call_not_found")
        for session in ({}, {"session": {"type": "realtime"}}):  # the SDK's two forms: raw SDP, and multipart
            await refused(backend.realtime.calls.create(sdp="not an offer", **session), openai.BadRequestError,
                          "invalid_offer")

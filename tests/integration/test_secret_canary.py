"""A canary in every secret setting: whatever a client does, it never shows in a log line, a response or /metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import signal

import aiohttp

from relay.config import Settings
from relay.simulator.server import start_simulator
from tests.conftest import FAST
from tests.processes import clean_env, relay_logged
from tests.webrtc_client import call_relay, load_pcm48

HELLO48 = load_pcm48("speech_hello_48k.wav")
SECRET_FIELDS = [name for name, info in Settings.model_fields.items() if "SecretStr" in str(info.annotation)]


async def test_no_secret_ever_shows_in_logs_responses_or_metrics():
    canary = "canary" + secrets.token_hex(12)
    values = {name: f"{canary}-{name}" for name in SECRET_FIELDS}  # each secret unique, all sharing the canary
    assert {"openai_api_key", "upstream_api_key", "api_keys", "token_secret"} <= values.keys()
    simulator = await start_simulator(dataclasses.replace(FAST, api_key=values["upstream_api_key"]), "127.0.0.1", 0)
    companions = {"RELAY_TURN_URLS": "turn:127.0.0.1:3478?transport=udp"} if "turn_secret" in values else {}
    if "calls_per_ip_per_s" in Settings.model_fields:
        companions["RELAY_CALLS_PER_IP_PER_S"] = "1000"  # many requests in a row from one address
    env = clean_env(**{Settings.env_name(name): value for name, value in values.items()}, **companions,
                    RELAY_UPSTREAM_URL=simulator.url + "?model=gpt-realtime", RELAY_ICE_ADDRESSES="127.0.0.1",
                    RELAY_LOG_LEVEL="debug")
    key = {"Authorization": f"Bearer {values['api_keys']}"}
    seen: list[str] = []  # every response: status, headers and body; every data-channel event

    async def request(http: aiohttp.ClientSession, method: str, url: str, **kwargs) -> tuple[int, str]:
        async with http.request(method, url, **kwargs) as response:
            body = await response.text()
            seen.append(f"{response.status} {dict(response.headers)} {body}")
            return response.status, body

    try:
        async with relay_logged(env=env) as relay, aiohttp.ClientSession() as http:
            base = relay.base
            for path in ("/healthz", "/readyz", "/metrics", "/relay/client-config", "/"):
                assert (await request(http, "GET", base + path, headers=key))[0] == 200, path
            # Refusals: no key, a wrong key (made of the canary), a forged token, a bad offer, bad JSON.
            sdp = {"Content-Type": "application/sdp"}
            assert (await request(http, "POST", f"{base}/v1/realtime/calls", data="v=0\r\n", headers=sdp))[0] == 401
            wrong = {"Authorization": f"Bearer {canary}-wrong", **sdp}
            assert (await request(http, "POST", f"{base}/v1/realtime/calls", data="v=0\r\n", headers=wrong))[0] == 401
            forged = {"Authorization": "Bearer ek_eyJ3IjowfQ.forged", **sdp}
            assert (await request(http, "POST", f"{base}/v1/realtime/calls", data="v=0\r\n", headers=forged))[0] == 401
            status, _ = await request(http, "POST", f"{base}/v1/realtime/calls", data="v=0\r\nm=audio junk\r\n",
                                      headers={**key, **sdp})
            assert status == 400
            status, _ = await request(http, "POST", f"{base}/v1/realtime/client_secrets", data="{",
                                      headers={**key, "Content-Type": "application/json"})
            assert status == 400
            # A client secret, a call made with it, the token used again.
            status, body = await request(http, "POST", f"{base}/v1/realtime/client_secrets", json={}, headers=key)
            assert status == 200
            token = {"Authorization": f"Bearer {json.loads(body)['value']}"}
            call = await call_relay(base, headers=token)
            try:
                await call.wait_for("session.created")
                call.mic.say_between(HELLO48, lead_ms=300, tail_ms=900)
                await call.wait_for("output_audio_buffer.stopped", timeout=20)
                call.send("not json")
                await call.wait_for("error")
                await request(http, "GET", f"{base}/v1/realtime/calls/{call.call_id}/transcript", headers=key)
                await request(http, "GET", base + "/metrics")
                assert (await request(http, "POST", f"{base}{call.location}/hangup", headers=token))[0] == 200
            finally:
                await call.close()
            seen.extend(json.dumps(event) for event in call.events)
            status, _ = await request(http, "POST", f"{base}/v1/realtime/calls", data="v=0\r\n",
                                      headers={**token, **sdp})
            assert status == 400  # good until it expires, as OpenAI's: past the check, refused for its offer
            # The model service refuses the relay's key: its error goes to the client, the key does not.
            simulator.reconfigure(api_key="another key")
            refused = await asyncio.gather(call_relay(base, headers=key), return_exceptions=True)
            assert isinstance(refused[0], AssertionError) and "50" in str(refused[0])
            seen.append(str(refused[0]))
            await request(http, "GET", base + "/metrics")
            relay.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(relay.process.wait(), 30) == 0
    finally:
        await simulator.stop()

    logs = relay.output()
    assert "DEBUG" in logs and f"call {call.call_id} ended" in logs  # the log did say things
    assert canary not in logs
    for text in seen:
        assert canary not in text, text

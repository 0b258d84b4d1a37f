"""The `relay serve` command itself, as a process, with a client peer calling it."""

from __future__ import annotations

import asyncio
import signal

import aiohttp

from tests.processes import clean_env, relay_serve
from tests.webrtc_client import call_relay, load_pcm48

HELLO48 = load_pcm48("speech_hello_48k.wav")


async def test_relay_serve_answers_a_call_with_the_simulator_upstream(simulator):
    env = clean_env(RELAY_UPSTREAM_URL=simulator.url + "?model=gpt-realtime", RELAY_ICE_ADDRESSES="127.0.0.1")
    async with relay_serve(env=env, timeout=20) as (process, base, _):
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/healthz") as response:
                assert response.status == 200
        call = await call_relay(base)
        try:
            await call.wait_for("session.created")
            call.mic.say_between(HELLO48, lead_ms=300, tail_ms=900)
            await call.wait_for("output_audio_buffer.stopped", timeout=20)
            assert len(call.received()) > 0
        finally:
            await call.close()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0

"""The `relay serve` command itself, as a process, with a client peer calling it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import aiohttp

from tests.webrtc_client import call_relay, load_pcm48

HELLO48 = load_pcm48("speech_hello_48k.wav")


async def test_relay_serve_answers_a_call_with_the_simulator_upstream(simulator):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") and k != "OPENAI_API_KEY"}
    env |= {"RELAY_UPSTREAM_URL": simulator.url + "?model=gpt-realtime", "RELAY_ICE_ADDRESSES": "127.0.0.1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--port", "0", env=env, stderr=subprocess.PIPE
    )
    try:
        base = None
        async with asyncio.timeout(20):
            while base is None:
                line = (await process.stderr.readline()).decode()
                assert line, "relay serve exited early"
                if found := re.search(r"relay listening on (http://127\.0\.0\.1:\d+)/", line):
                    base = found.group(1)
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
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

"""A spoken turn through a relay, timed: what the container and package tests call it with."""

from __future__ import annotations

import socket
import time

import numpy as np

from tests.webrtc_client import call_relay, load_pcm48, silence48

HELLO48 = load_pcm48("speech_hello_48k.wav")
SPEECH = 500  # peak of a received 20 ms frame that holds the model's speech, not silence


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def spoken_turn(base: str) -> float:
    """One call to `base`: the user says hello, the built-in simulator answers. The round trip in seconds: from the
    last frame of the user's speech leaving the client to the first frame of the model's speech arriving."""
    call = await call_relay(base)
    try:
        await call.wait_for("session.created", timeout=20)
        call.mic.say(silence48(300))
        call.mic.say(HELLO48)
        call.mic.say(silence48(900), mark="speech ended")
        await call.wait_for("output_audio_buffer.stopped", timeout=30)
        ended = call.mic.marks["speech ended"]
        spoken = [at for at, frame in zip(call.audio_times, call.audio)
                  if at > ended and frame.size and int(np.abs(frame.astype(np.int32)).max()) > SPEECH]
        assert spoken, "the model's answer never reached the client"
        return spoken[0] - ended
    finally:
        await call.close()


def median_ms(seconds: list[float]) -> int:
    return round(float(np.median(seconds)) * 1000)


def timed(since: float) -> float:
    return round(time.monotonic() - since, 2)

"""A recorded call: the stereo WAV the relay writes, checked against the relay's own clock, and `relay analyze`."""

from __future__ import annotations

import time
import wave

import numpy as np

from relay.core.recording import RATE, speech_windows, turns
from relay.call.call import Call
from tests.integration.test_webrtc_call import HELLO48, Relay, _ended, _serve, relay_settings
from tests.webrtc_client import call_relay


def _loud_windows(pcm: bytes) -> list[int]:
    """The 10 ms windows of 24 kHz PCM16 the analysis counts as speech."""
    return speech_windows(np.frombuffer(pcm, dtype="<i2"), RATE)


async def test_a_recorded_call_holds_both_sides_on_one_clock(simulator, tmp_path, monkeypatch):
    # The relay's own view, timed in the test: when user audio arrived and when model frames left.
    user_audio: list[tuple[float, bytes]] = []
    model_frames: list[tuple[float, bytes]] = []
    to_upstream, next_frame = Call.on_user_audio, Call.next_frame

    def spy_to_upstream(self, pcm24):
        user_audio.append((time.monotonic(), pcm24))
        return to_upstream(self, pcm24)

    def spy_next_frame(self):
        frame = next_frame(self)
        if frame is not None:
            model_frames.append((time.monotonic(), frame))
        return frame

    monkeypatch.setattr(Call, "on_user_audio", spy_to_upstream)
    monkeypatch.setattr(Call, "next_frame", spy_next_frame)
    settings = relay_settings(simulator.url + "?model=gpt-realtime", recordings_dir=str(tmp_path))
    app, runner, url = await _serve(settings)
    try:
        call = await call_relay(url)
        try:
            await call.wait_for("session.created")
            call.mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)
            await call.wait_for("output_audio_buffer.stopped", timeout=20)
        finally:
            await call.close()
        await _ended(Relay(app, url, simulator), call.call_id)
    finally:
        await runner.cleanup()

    with wave.open(str(tmp_path / f"{call.call_id}.wav")) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, RATE)
        stereo = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    (turn,) = turns(stereo)
    # The same gap from the spied times: the end of the last loud 10 ms of user audio (each piece ends when it
    # arrived), to the start of the first loud 10 ms of the model's reply (each frame starts when it left).
    last_time, last_pcm = [(t, pcm) for t, pcm in user_audio if _loud_windows(pcm)][-1]
    user_end = last_time - (len(last_pcm) // 2 - (_loud_windows(last_pcm)[-1] + 1) * RATE // 100) / RATE
    first_time, first_pcm = next((t, pcm) for t, pcm in model_frames if t > user_end and _loud_windows(pcm))
    model_start = first_time + _loud_windows(first_pcm)[0] / 100
    assert abs(turn.gap_ms - (model_start - user_end) * 1000) <= 20, (turn.gap_ms, (model_start - user_end) * 1000)
    # The right channel is the model as sent: its speech is the echo of the left channel's.
    right = stereo[1::2]
    assert np.abs(right).max() > 1000 and np.abs(stereo[0::2]).max() > 1000

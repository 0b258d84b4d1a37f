"""The call recording's timeline and the speech-to-speech gap measured on it."""

from __future__ import annotations

import subprocess
import sys
import wave

import numpy as np
import pytest

from relay.core.recording import RATE, StereoTimeline, turns
from tests.processes import clean_env


def tone(ms: int, level: int = 8000) -> bytes:
    t = np.arange(ms * RATE // 1000) / RATE
    return (np.sin(2 * np.pi * 300 * t) * level).astype("<i2").tobytes()


def silence(ms: int) -> bytes:
    return bytes(ms * RATE // 1000 * 2)


def record(user: list[tuple[float, bytes]], model_frames: list[tuple[float, bytes | None]]) -> np.ndarray:
    """Feed (arrival time, audio) and (send time, frame) in time order; the interleaved recording."""
    timeline = StereoTimeline(start=100.0)
    events = sorted([(t, 0, pcm) for t, pcm in user] + [(t, 1, pcm) for t, pcm in model_frames], key=lambda e: e[0])
    out = b""
    for t, channel, pcm in events:
        timeline.on_user_audio(pcm, t) if channel == 0 else timeline.on_model_frame(pcm, t)
        out += timeline.take(t)
    return np.frombuffer(out + timeline.take(t, final=True), dtype="<i2")


def chunks(audio: bytes, start: float, jitter_ms: float = 0.0, seed: int = 1) -> list[tuple[float, bytes]]:
    """20 ms pieces of `audio` arriving from `start` (each at the end of its 20 ms), with arrival jitter."""
    rng = np.random.default_rng(seed)
    size = RATE // 50 * 2
    return [(start + (i // size + 1) * 0.02 + rng.uniform(0, jitter_ms) / 1000, audio[i : i + size])
            for i in range(0, len(audio), size)]


@pytest.mark.parametrize("jitter_ms", [0.0, 15.0])
def test_a_known_gap_is_measured_within_20_ms(jitter_ms):
    # The user speaks 1 s (after 0.5 s of silence) and then is silent; the model starts 730 ms after the user ended.
    user = chunks(silence(500) + tone(1000) + silence(3000), 100.0, jitter_ms)
    reply = silence(500 + 1000 + 730) + tone(800) + silence(970)
    model = [(100.0 + i * 0.02, reply[i * 960 : (i + 1) * 960]) for i in range(len(reply) // 960)]
    stereo = record(user, model)
    (turn,) = turns(stereo)
    assert abs(turn.user_end_s - 1.5) <= 0.02
    assert abs(turn.gap_ms - 730) <= 20


def test_a_late_first_packet_does_not_shift_the_rest():
    user = chunks(silence(200) + tone(1000) + silence(3000), 100.3)  # the user's packets start 300 ms in
    # and the first arrive late (the loop was busy for 45 ms): in order, bunched, until the stream catches up.
    user = [(t + max(0.0, 0.045 - 0.02 * i), pcm) for i, (t, pcm) in enumerate(user)]
    reply = silence(500 + 1000 + 600) + tone(800) + silence(1100)
    stereo = record(user, [(100.0 + i * 0.02, reply[i * 960 : (i + 1) * 960]) for i in range(len(reply) // 960)])
    (turn,) = turns(stereo)
    assert abs(turn.user_end_s - 1.5) <= 0.01 and abs(turn.gap_ms - 600) <= 10


def test_a_pause_in_a_stream_is_kept_and_jitter_does_not_chop_the_audio():
    first, second = chunks(tone(400), 100.0, 10.0), chunks(tone(400), 101.0, 10.0, seed=2)  # 600 ms apart
    model = [(100.0 + i * 0.02, None) for i in range(75)]
    stereo = record(first + second, model)
    left = stereo[0::2]
    loud = np.abs(left.astype(np.int32)) > 100
    assert abs(np.argmax(loud) / RATE - 0.0) < 0.02  # the first piece starts at the call's start
    second_start = np.argmax(loud[int(0.45 * RATE):]) / RATE + 0.45
    assert abs(second_start - 1.0) < 0.03  # the second, after its real pause
    # No dropouts inside the first 400 ms despite the jitter: laid end to end.
    assert loud[int(0.01 * RATE):int(0.39 * RATE)].mean() > 0.9


def test_a_silent_side_does_not_hold_the_other_in_memory():
    timeline = StereoTimeline(start=0.0)
    written = b""
    for i in range(250):  # 5 s of the model's frames, and nothing from the user (a muted client)
        timeline.on_model_frame(bytes(960), i * 0.02)
        written += timeline.take(i * 0.02)
    assert len(written) // 4 >= int(4.7 * RATE)  # written out as it goes (less ~0.2 s held), the user's side silent


def test_relay_analyze_prints_each_turn_and_refuses_other_files(tmp_path):
    user = chunks(silence(300) + tone(700) + silence(2000), 100.0)
    reply = silence(300 + 700 + 450) + tone(500) + silence(1050)
    stereo = record(user, [(100.0 + i * 0.02, reply[i * 960 : (i + 1) * 960]) for i in range(len(reply) // 960)])
    path = tmp_path / "rtc_test.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2), wav.setsampwidth(2), wav.setframerate(RATE)
        wav.writeframes(stereo.tobytes())
    result = subprocess.run([sys.executable, "-m", "relay", "analyze", str(path)], capture_output=True, text=True,
                            env=clean_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "1 user turns" in result.stdout and "median gap" in result.stdout
    gap = float(result.stdout.split("median gap ")[1].split(" ms")[0])
    assert abs(gap - 450) <= 20
    mono = tmp_path / "mono.wav"
    with wave.open(str(mono), "wb") as wav:
        wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(RATE)
        wav.writeframes(bytes(100))
    for bad in (mono, tmp_path / "missing.wav"):
        result = subprocess.run([sys.executable, "-m", "relay", "analyze", str(bad)], capture_output=True, text=True,
                                env=clean_env(), timeout=60)
        assert result.returncode == 2 and "Traceback" not in result.stderr

"""Unit tests for the simulator's energy VAD (relay/simulator/vad.py), on synthetic 24 kHz PCM16 signals."""

from __future__ import annotations

import numpy as np
import pytest

from relay.simulator.vad import EnergyVad, SpeechStarted, SpeechStopped, VadSettings, threshold_dbfs

RATE = 24000


def tone(ms: int, dbfs: float = -20.0, freq: float = 200.0) -> np.ndarray:
    """A sine whose RMS level is `dbfs` (200 Hz: every 10 ms frame holds exactly two periods)."""
    t = np.arange(RATE * ms // 1000) / RATE
    amplitude = 32768.0 * 10 ** (dbfs / 20) * np.sqrt(2)
    return np.round(amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def silence(ms: int) -> np.ndarray:
    return np.zeros(RATE * ms // 1000, dtype=np.int16)


def noise(ms: int, dbfs: float = -70.0, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.round(rng.normal(0.0, 32768.0 * 10 ** (dbfs / 20), RATE * ms // 1000)).astype(np.int16)


def pcm(*parts: np.ndarray) -> bytes:
    return np.concatenate(parts).astype("<i2").tobytes()


def run(audio: bytes, settings: VadSettings = VadSettings(), chunk_bytes: int | None = None, floor_ms: int = 0):
    vad = EnergyVad(settings)
    step = chunk_bytes or len(audio)
    events = []
    for i in range(0, len(audio), step):
        events += vad.feed(audio[i : i + step], floor_ms=floor_ms)
    return events, vad


ONE_TURN = pcm(silence(500), tone(1000), silence(1000))


def test_threshold_dbfs():
    assert threshold_dbfs(0.5) == -40.0
    assert threshold_dbfs(0.0) == -70.0
    assert threshold_dbfs(1.0) == -10.0


def test_one_turn_with_defaults():
    events, vad = run(ONE_TURN)
    assert events == [SpeechStarted(200), SpeechStopped(2000)]
    assert vad.position_ms == 2500
    assert not vad.in_speech


def test_one_turn_over_low_noise():
    events, _ = run(pcm(noise(500, seed=1), tone(1000), noise(1000, seed=2)))
    assert events == [SpeechStarted(200), SpeechStopped(2000)]


@pytest.mark.parametrize(
    "chunk_bytes",
    [2 * 24 * 7, 2 * 333, 2 * 1, 2 * 240, 2 * 241, len(ONE_TURN) - 2],
    ids=["7ms", "333samples", "1sample", "one-frame", "frame+1", "all-but-one-sample"],
)
def test_odd_chunk_sizes_give_identical_events(chunk_bytes):
    events, vad = run(ONE_TURN, chunk_bytes=chunk_bytes)
    assert events == [SpeechStarted(200), SpeechStopped(2000)]
    assert vad.position_ms == 2500


def test_floor_ms_clamps_audio_start():
    events, _ = run(ONE_TURN, floor_ms=400)
    assert events == [SpeechStarted(400), SpeechStopped(2000)]


def test_floor_ms_after_onset_still_clamps():
    # The buffer's earliest audio may even be later than the onset (e.g. audio dropped by the buffer cap).
    events, _ = run(ONE_TURN, floor_ms=520)
    assert events[0] == SpeechStarted(520)


def test_prefix_padding_zero_gives_the_onset():
    events, _ = run(ONE_TURN, VadSettings(prefix_padding_ms=0))
    assert events == [SpeechStarted(500), SpeechStopped(2000)]


def test_prefix_padding_cannot_go_before_zero():
    events, _ = run(pcm(silence(100), tone(500), silence(800)))
    assert events == [SpeechStarted(0), SpeechStopped(1100)]


def test_silence_duration_sets_audio_end():
    events, _ = run(ONE_TURN, VadSettings(silence_duration_ms=200))
    assert events == [SpeechStarted(200), SpeechStopped(1700)]


def test_short_gap_does_not_split_the_turn():
    audio = pcm(silence(500), tone(500), silence(300), tone(500), silence(1000))
    events, _ = run(audio)
    assert events == [SpeechStarted(200), SpeechStopped(2300)]


def test_long_gap_splits_into_two_turns():
    audio = pcm(silence(500), tone(500), silence(800), tone(500), silence(1000))
    events, _ = run(audio)
    assert events == [SpeechStarted(200), SpeechStopped(1500), SpeechStarted(1500), SpeechStopped(2800)]


def test_20ms_click_is_not_speech():
    events, vad = run(pcm(silence(500), tone(20), silence(1000)))
    assert events == []
    assert not vad.in_speech


def test_30ms_burst_is_speech():
    events, _ = run(pcm(silence(500), tone(30), silence(1000)))
    assert events == [SpeechStarted(200), SpeechStopped(1030)]


@pytest.mark.parametrize(("threshold", "expected"), [
    (0.5, []),
    (0.3, [SpeechStarted(200), SpeechStopped(2000)]),
])
def test_quiet_tone_depends_on_threshold(threshold, expected):
    events, _ = run(pcm(silence(500), tone(1000, dbfs=-45.0), silence(1000)), VadSettings(threshold=threshold))
    assert events == expected


def test_hysteresis_keeps_speech_going_4db_below_threshold():
    # Onset at -20 dBFS, then 1 s at -44 dBFS: below the -40 dBFS start level, within the 6 dB hysteresis.
    audio = pcm(silence(500), tone(200), tone(1000, dbfs=-44.0), silence(1000))
    events, _ = run(audio)
    assert events == [SpeechStarted(200), SpeechStopped(2200)]


def test_below_hysteresis_ends_speech():
    # Control for the test above: 7 dB below the start level is silence.
    audio = pcm(silence(500), tone(200), tone(1000, dbfs=-47.0), silence(1000))
    events, _ = run(audio)
    assert events == [SpeechStarted(200), SpeechStopped(1200)]


def test_level_4db_below_threshold_does_not_start_speech():
    events, _ = run(pcm(silence(500), tone(1000, dbfs=-44.0), silence(500)))
    assert events == []


def test_reset_forgets_speech_in_progress():
    vad = EnergyVad(VadSettings())
    assert vad.feed(pcm(silence(500), tone(500))) == [SpeechStarted(200)]
    assert vad.in_speech
    vad.reset()
    assert not vad.in_speech
    assert vad.feed(pcm(silence(1500))) == []
    assert vad.position_ms == 2500
    # The detector keeps working on the same timeline afterwards.
    assert vad.feed(pcm(tone(500), silence(600))) == [SpeechStarted(2200), SpeechStopped(3500)]


def test_reset_mid_onset_needs_three_new_voiced_frames():
    vad = EnergyVad(VadSettings(prefix_padding_ms=0))
    assert vad.feed(pcm(silence(100), tone(20))) == []
    vad.reset()
    assert vad.feed(pcm(tone(20))) == []
    assert vad.feed(pcm(tone(10))) == [SpeechStarted(120)]


def test_position_counts_whole_frames_analysed():
    vad = EnergyVad(VadSettings())
    assert vad.position_ms == 0
    assert vad.feed(pcm(silence(1))) == []  # 24 samples: less than a 10 ms frame
    assert vad.position_ms == 0
    vad.feed(np.zeros(250, dtype="<i2").tobytes())  # 274 samples so far: one frame, 34 carried over
    assert vad.position_ms == 10
    vad.feed(np.zeros(206, dtype="<i2").tobytes())  # 240 carried + new: the second frame
    assert vad.position_ms == 20
    vad.feed(pcm(silence(1000)))
    assert vad.position_ms == 1020

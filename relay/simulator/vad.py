"""An energy-based voice activity detector on the audio timeline (sans-I/O: bytes in, events out).

Times are milliseconds of audio since the detector was created, which is how the service reports
`audio_start_ms` / `audio_end_ms`: from the start of all audio written to the buffer during the session.

`threshold` (0..1, as in the API) maps linearly to a level in dBFS: -70 + 60 * threshold, so the default 0.5 is
-40 dBFS (speech from a close microphone sits around -20 dBFS; a quiet room below -55). Once speech has started it
continues while frames stay within 6 dB below that level (hysteresis), so soft syllable ends do not split a turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME_MS = 10
ONSET_FRAMES = 3  # 30 ms of voiced frames in a row start speech: a click does not.
HYSTERESIS_DB = 6.0


@dataclass(frozen=True)
class VadSettings:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@dataclass(frozen=True)
class SpeechStarted:
    audio_start_ms: int  # onset minus prefix padding, not before `floor_ms`


@dataclass(frozen=True)
class SpeechStopped:
    audio_end_ms: int  # end of the last voiced frame plus the silence duration


def threshold_dbfs(threshold: float) -> float:
    return -70.0 + 60.0 * threshold


class EnergyVad:
    def __init__(self, settings: VadSettings, sample_rate: int = 24000, start_ms: int = 0) -> None:
        self.settings = settings  # may be replaced at any time: a turn in progress carries on
        self._frame = sample_rate * FRAME_MS // 1000
        self._pending = np.zeros(0, dtype=np.int16)
        self._position_ms = start_ms  # end of the audio analysed so far, on the session's timeline
        self._voiced_run = 0
        self.in_speech = False
        self._last_voiced_end_ms = 0

    @property
    def position_ms(self) -> int:
        return self._position_ms

    def reset(self) -> None:
        """Forget any speech in progress (the input buffer was cleared or committed by hand)."""
        self.in_speech = False
        self._voiced_run = 0

    def feed(self, pcm: bytes, floor_ms: int = 0) -> list[SpeechStarted | SpeechStopped]:
        """Analyse PCM16 mono audio; `floor_ms` is the earliest audio still in the input buffer."""
        samples = np.frombuffer(pcm, dtype="<i2")
        if self._pending.size:
            samples = np.concatenate((self._pending, samples))
        whole = samples.size // self._frame * self._frame
        self._pending = samples[whole:].copy()
        if not whole:
            return []
        frames = samples[:whole].astype(np.float32).reshape(-1, self._frame)
        power = np.mean(frames * frames, axis=1) / (32768.0 * 32768.0)
        levels = 10.0 * np.log10(power + 1e-12)
        events: list[SpeechStarted | SpeechStopped] = []
        start_db = threshold_dbfs(self.settings.threshold)
        for level in levels.tolist():
            self._position_ms += FRAME_MS
            event = self._step(level, start_db, floor_ms)
            if event is not None:
                events.append(event)
        return events

    def _step(self, level: float, start_db: float, floor_ms: int) -> SpeechStarted | SpeechStopped | None:
        if not self.in_speech:
            self._voiced_run = self._voiced_run + 1 if level >= start_db else 0
            if self._voiced_run < ONSET_FRAMES:
                return None
            self.in_speech = True
            self._last_voiced_end_ms = self._position_ms
            onset_ms = self._position_ms - ONSET_FRAMES * FRAME_MS
            return SpeechStarted(max(floor_ms, onset_ms - self.settings.prefix_padding_ms))
        if level >= start_db - HYSTERESIS_DB:
            self._last_voiced_end_ms = self._position_ms
            return None
        if self._position_ms - self._last_voiced_end_ms < self.settings.silence_duration_ms:
            return None
        self.in_speech = False
        self._voiced_run = 0
        return SpeechStopped(self._last_voiced_end_ms + self.settings.silence_duration_ms)

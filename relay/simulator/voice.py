"""What the simulator says: transcripts and audio for its replies.

A reply to user audio is the echo of that audio (so tests can follow the audio path end to end) with the transcript
"echo of 1.84 s". A reply to text is synthetic speech: one voiced tone burst per word (a hum with a syllable-like
envelope, 24 kHz PCM16), deterministic, so its length follows the text.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLE_RATE = 24000
BYTES_PER_MS = SAMPLE_RATE * 2 // 1000  # PCM16 mono: 48 bytes per millisecond
_WORD_MS = 220
_GAP_MS = 60


def audio_ms(pcm_len_bytes: int) -> int:
    return pcm_len_bytes // BYTES_PER_MS


def echo_transcript(duration_ms: int) -> str:
    return f"echo of {duration_ms / 1000:.2f} s"


def user_speech_transcript(duration_ms: int) -> str:
    return f"[speech {duration_ms / 1000:.2f} s]"


def synthesize(text: str) -> bytes:
    """Speech-like PCM16 for `text`: a 220 ms hum per word with a raised-cosine envelope, 60 ms gaps."""
    words = max(1, len(text.split()))
    word = _word_burst()
    gap = np.zeros(_GAP_MS * SAMPLE_RATE // 1000, dtype=np.int16)
    return np.concatenate([np.concatenate((word, gap)) for _ in range(words)]).tobytes()


def _word_burst() -> np.ndarray:
    n = _WORD_MS * SAMPLE_RATE // 1000
    t = np.arange(n) / SAMPLE_RATE
    pitch = 150.0 + 30.0 * np.sin(2 * math.pi * 3.0 * t)  # a gentle glide, like intonation
    phase = 2 * math.pi * np.cumsum(pitch) / SAMPLE_RATE
    tone = np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)
    envelope = 0.5 - 0.5 * np.cos(2 * math.pi * np.arange(n) / n)
    return (tone * envelope * 0.3 * 32767 / 1.75).astype(np.int16)


def cut_words(text: str, fraction: float) -> str:
    """The words of `text` heard when only `fraction` of its audio was played (for truncation)."""
    words = text.split()
    keep = math.floor(len(words) * max(0.0, min(1.0, fraction)) + 1e-9)
    return " ".join(words[:keep])

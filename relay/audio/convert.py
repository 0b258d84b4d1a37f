"""Stateful resampling (libswresample through PyAV: ~20-30 us per 20 ms, ~0.7 ms of delay, proper anti-aliasing)
and fixed-size framing. soxr's HQ mode would add ~24 ms of delay: not on a live path."""

from __future__ import annotations

import numpy as np
from av import AudioFrame, AudioResampler

UPSTREAM_RATE = 24000
WEBRTC_RATE = 48000
FRAME_SAMPLES_48K = 960  # samples per 20 ms at 48 kHz
FRAME_BYTES_48K = FRAME_SAMPLES_48K * 2  # mono s16


class Chunker:
    """Cuts a byte stream into chunks of exactly `size` bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pending = bytearray()

    def push(self, data: bytes) -> list[bytes]:
        self._pending += data
        whole = len(self._pending) // self.size * self.size
        if not whole:
            return []
        out = [bytes(self._pending[i : i + self.size]) for i in range(0, whole, self.size)]
        del self._pending[:whole]
        return out

    def flush(self) -> bytes:
        """The remainder, zero-padded to a whole chunk (b"" if none)."""
        if not self._pending:
            return b""
        out = bytes(self._pending) + bytes(self.size - len(self._pending))
        self._pending.clear()
        return out


class Downsampler:
    """Decoded WebRTC audio (48 kHz, any layout) to 24 kHz mono PCM16 (a stereo pair of equal channels keeps its
    level: the downmix is unity gain for identical channels)."""

    def __init__(self) -> None:
        self._resampler = AudioResampler(format="s16", layout="mono", rate=UPSTREAM_RATE)

    def convert(self, frame: AudioFrame) -> bytes:
        frame.pts = None  # the resampler needs no timing, and a pts jump after a gap must not confuse it
        return b"".join(bytes(out.planes[0])[: out.samples * 2] for out in self._resampler.resample(frame))


class Upsampler:
    """The model's 24 kHz mono PCM16 to 20 ms frames of 48 kHz mono s16 for the Opus encoder.

    48 kHz, because that is Opus's rate (an encoder fed 24 kHz resamples itself and holds an extra 20 ms frame);
    mono, because the relay's voice encoder (relay/webrtc/encoder.py) encodes a voice in mono.
    """

    def __init__(self) -> None:
        self._resampler = AudioResampler(format="s16", layout="mono", rate=WEBRTC_RATE)
        self._frames = Chunker(FRAME_BYTES_48K)
        self._started = False
        self.lead_ms = 0.0  # silence put before the item's audio to align frames (see push)

    def push(self, pcm24: bytes) -> list[bytes]:
        samples = np.frombuffer(pcm24, dtype="<i2")
        if samples.size == 0:
            return []
        frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = UPSTREAM_RATE
        mono = np.frombuffer(
            b"".join(bytes(out.planes[0])[: out.samples * 2] for out in self._resampler.resample(frame)), dtype="<i2"
        )
        if not self._started:
            # The resampler's delay makes its first output a few samples short of a whole number of frames; every
            # frame would then wait for the next delta. A little silence in front (under 1 ms when deltas are whole
            # 20 ms frames, as a real-time stream's are; under 20 ms always, and skipped as leading silence) lines
            # frame boundaries up with the deltas' instead.
            self._started = True
            lead = -mono.size % FRAME_SAMPLES_48K
            self.lead_ms = lead / 48
            mono = np.concatenate((np.zeros(lead, dtype="<i2"), mono))
        return self._frames.push(mono.tobytes())

    def flush(self) -> list[bytes]:
        """The end of an item: the last partial frame, padded with silence."""
        last = self._frames.flush()
        return [last] if last else []

"""Measurements on audio for tests: alignment by cross-correlation, and loud spans."""

from __future__ import annotations

import numpy as np


def best_alignment(received: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    """(offset of `reference` inside `received`, normalised correlation there, 0..1)."""
    r = received.astype(np.float64)
    x = reference.astype(np.float64)
    n = 1 << int(np.ceil(np.log2(r.size + x.size)))
    corr = np.fft.irfft(np.fft.rfft(r, n) * np.conj(np.fft.rfft(x, n)), n)[: r.size - x.size + 1]
    offset = int(np.argmax(corr))
    window = r[offset : offset + x.size]
    score = float(np.dot(window, x) / (np.linalg.norm(window) * np.linalg.norm(x) + 1e-9))
    return offset, score


def loud_ms(samples: np.ndarray, rate: int = 48000, window_ms: int = 5, threshold_db: float = -40.0) -> list[int]:
    """Start times (ms) of the `window_ms` windows louder than `threshold_db` dBFS."""
    size = rate * window_ms // 1000
    frames = samples[: samples.size // size * size].astype(np.float64).reshape(-1, size)
    level = 10 * np.log10(np.mean(frames**2, axis=1) / 32768**2 + 1e-12)
    return [i * window_ms for i in np.nonzero(level > threshold_db)[0]]


def tone(ms: int, rate: int = 48000, hz: float = 440.0, dbfs: float = -20.0) -> np.ndarray:
    t = np.arange(ms * rate // 1000) / rate
    amplitude = 32768 * 10 ** (dbfs / 20) * np.sqrt(2)
    return (np.sin(2 * np.pi * hz * t) * amplitude).astype("<i2")


def loud_span_ms(samples: np.ndarray, rate: int = 48000) -> int:
    """From the start of the first loud 5 ms window to the end of the last one (0 if none is loud)."""
    loud = loud_ms(samples, rate=rate)
    return loud[-1] + 5 - loud[0] if loud else 0


def resample(samples: np.ndarray, rate: int, to_rate: int) -> np.ndarray:
    """Mono PCM16 at `rate` to `to_rate` (libswresample, with its low-pass), e.g. a 48 kHz fixture as a G.711
    peer's 8 kHz."""
    import av

    resampler = av.AudioResampler(format="s16", layout="mono", rate=to_rate)
    frame = av.AudioFrame.from_ndarray(samples.astype("<i2").reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    out = [f.to_ndarray().ravel() for f in [*resampler.resample(frame), *resampler.resample(None)]]
    return np.concatenate(out).astype("<i2") if out else np.zeros(0, "<i2")


def decode_g711(data: bytes, law: str) -> np.ndarray:
    """G.711 bytes (law "pcmu"/"pcma", any case, "audio/" prefix or not) to PCM16 at 8 kHz, by FFmpeg's own
    decoders: a reference independent of the relay's."""
    import av

    name = {"pcmu": "pcm_mulaw", "pcma": "pcm_alaw"}[law.lower().removeprefix("audio/")]
    decoder = av.CodecContext.create(name, "r")
    decoder.sample_rate, decoder.layout, decoder.format = 8000, "mono", "s16"
    out = [f.to_ndarray().ravel() for f in decoder.decode(av.Packet(data))] if data else []
    return np.concatenate(out).astype("<i2") if out else np.zeros(0, "<i2")

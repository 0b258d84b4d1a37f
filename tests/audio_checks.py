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

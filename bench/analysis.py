"""Signals and measures shared by the benchmarks: marker sounds, onset detection, pairing, fidelity, summaries."""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine

import numpy as np

MARKER_MS = 60
ONSET_DB = -30.0


def marker() -> np.ndarray:
    """A 60 ms 1 kHz tone: easy to find again after any codec."""
    return tone(MARKER_MS, hz=1000.0, level=0.25)


def tone(ms: int, hz: float = 440.0, level: float = 0.1) -> np.ndarray:
    t = np.arange(ms * 48) / 48000
    return (np.sin(2 * np.pi * hz * t) * 32767 * level).astype("<i2")


def speech() -> np.ndarray:
    from tests.webrtc_client import load_pcm48

    return load_pcm48("speech_hello_48k.wav")


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if len(values) else float("nan")


def level_db(samples: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(samples.astype(np.float64) ** 2) / 32768**2 + 1e-12)) if samples.size else -120.0


def onsets(samples: np.ndarray, rate: int, window_ms: int = 5) -> list[int]:
    """Sample indexes where a loud run starts after at least 100 ms of quiet (window resolution)."""
    size = rate * window_ms // 1000
    frames = samples[: samples.size // size * size].astype(np.float64).reshape(-1, size)
    loud = 10 * np.log10(np.mean(frames**2, axis=1) / 32768**2 + 1e-12) > ONSET_DB
    starts, quiet_run = [], 100
    for index, is_loud in enumerate(loud):
        if is_loud and quiet_run >= 20:
            starts.append(index * size)
        quiet_run = 0 if is_loud else quiet_run + 1
    return starts


def pair_arrivals(sent: list[float], heard: list[float], limit_s: float = 0.8) -> list[float]:
    """Match each sent marker to the first later arrival within `limit_s`; the delays."""
    out, j = [], 0
    for t in sent:
        while j < len(heard) and heard[j] < t:
            j += 1
        if j < len(heard) and heard[j] - t < limit_s:
            out.append(heard[j] - t)
            j += 1
    return out


def fidelity_db(received: np.ndarray, sent: np.ndarray, window_ms: int = 200, slack_ms: int = 20) -> float:
    """Median signal-to-noise of `sent` as found in `received`, window by window.

    One global alignment is found first; each 200 ms window of speech is then realigned within +-20 ms and scored
    with a least-squares gain, so a single dropped or inserted frame costs one window, not the whole sentence."""
    from tests.audio_checks import best_alignment

    offset, _ = best_alignment(received, sent)
    size, slack = 48 * window_ms, 48 * slack_ms
    scores = []
    for start in range(0, sent.size - size, size):
        ref = sent[start : start + size].astype(np.float64)
        if level_db(ref) < -40:
            continue  # silence: nothing to compare
        lo = max(0, offset + start - slack)
        segment = received[lo : offset + start + size + slack]
        if segment.size < size:
            continue
        local, _ = best_alignment(segment, sent[start : start + size])
        got = segment[local : local + size].astype(np.float64)
        gain = np.dot(got, ref) / np.dot(ref, ref)
        noise = got - gain * ref
        scores.append(10 * np.log10(np.dot(gain * ref, gain * ref) / (np.dot(noise, noise) + 1e-9)))
    return float(np.median(scores)) if scores else float("nan")


def summary(values_s: list[float]) -> str:
    ms = [v * 1000 for v in values_s]
    if not ms:
        return "no samples"
    return f"p50 {percentile(ms, 50):7.2f} ms   p99 {percentile(ms, 99):7.2f} ms   (n={len(ms)})"


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run a benchmark's main coroutine on uvloop (as the relay runs), or asyncio's loop where there is none."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)

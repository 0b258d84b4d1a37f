"""relay.audio.g711: byte for byte what ffmpeg's pcm_mulaw / pcm_alaw codecs do (through PyAV), and the simulator's
resamplers keep speech-band audio and stop what 8 kHz cannot carry."""

from __future__ import annotations

import math

import av
import numpy as np
import pytest

from relay.audio import g711

LAWS = [(g711.PCMU, "pcm_mulaw"), (g711.PCMA, "pcm_alaw")]
EVERY_SAMPLE = np.arange(-32768, 32768, dtype="<i2").tobytes()
EVERY_CODE = bytes(range(256))


def ffmpeg_encode(pcm: bytes, codec: str) -> bytes:
    context = av.CodecContext.create(codec, "w")
    context.sample_rate, context.layout, context.format = 8000, "mono", "s16"
    frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, "<i2").reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = 8000
    return b"".join(bytes(packet) for packet in [*context.encode(frame), *context.encode(None)])


def ffmpeg_decode(data: bytes, codec: str) -> bytes:
    context = av.CodecContext.create(codec, "r")
    context.sample_rate, context.layout = 8000, "mono"
    frames = context.decode(av.Packet(data))
    assert all(frame.format.name == "s16" for frame in frames)
    return b"".join(frame.to_ndarray().astype("<i2").tobytes() for frame in frames)


def samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, "<i2").astype(np.float64)


def tone(hz: float, ms: int, rate: int, amplitude: float = 0.5) -> bytes:
    t = np.arange(ms * rate // 1000) / rate
    return np.rint(amplitude * 32767 * np.sin(2 * math.pi * hz * t)).astype("<i2").tobytes()


def level_db(pcm: bytes, trim: int = 0) -> float:
    x = samples(pcm)
    x = x[trim : len(x) - trim] if trim else x
    return 10 * math.log10(np.mean(x * x) / 32768**2 + 1e-20)


@pytest.mark.parametrize("law, codec", LAWS)
def test_every_sample_encodes_as_ffmpeg_encodes_it(law, codec):
    assert g711.encode(EVERY_SAMPLE, law) == ffmpeg_encode(EVERY_SAMPLE, codec)


@pytest.mark.parametrize("law, codec", LAWS)
def test_every_code_decodes_as_ffmpeg_decodes_it(law, codec):
    assert g711.decode(EVERY_CODE, law) == ffmpeg_decode(EVERY_CODE, codec)
    assert len(g711.decode(EVERY_CODE, law)) == 512  # PCM16: two bytes a sample


@pytest.mark.parametrize("law", [g711.PCMU, g711.PCMA])
def test_round_trips(law):
    decoded = g711.decode(EVERY_CODE, law)
    again = g711.encode(decoded, law)
    # Every code word comes back, but mu-law's "negative zero" (0x7F), which decodes to 0 as 0xFF does.
    assert [c for c in range(256) if again[c] != c] == ([0x7F] if law == g711.PCMU else [])
    assert g711.decode(again, law) == decoded
    # Any sample: the code word nearest to it (within the 14-bit grid the midpoints are rounded to).
    values = np.unique(samples(decoded))
    x = samples(EVERY_SAMPLE)
    error = np.abs(samples(g711.decode(g711.encode(EVERY_SAMPLE, law), law)) - x)
    above = np.clip(np.searchsorted(values, x), 1, len(values) - 1)
    nearest = np.minimum(np.abs(values[above] - x), np.abs(values[above - 1] - x))
    assert (error - nearest).max() < 8
    assert np.all(error <= np.maximum(16, np.abs(x) / 16))  # at most about 6 % off (1/16 of the segment)


@pytest.mark.parametrize("law", [g711.PCMU, g711.PCMA])
def test_silence_bytes(law):
    frame = bytes([g711.SILENCE[law]]) * g711.FRAME_BYTES
    decoded = samples(g711.decode(frame, law))
    assert np.all(decoded == (0 if law == g711.PCMU else 8))  # A-law has no zero: +8 is the nearest
    assert g711.encode(bytes(2 * g711.FRAME_BYTES), law) == frame
    assert g711.peak(frame, law) == (0 if law == g711.PCMU else 8)
    assert (g711.RATE, g711.FRAME_BYTES) == (8000, 160)  # 160 bytes are 20 ms


@pytest.mark.parametrize("law", [g711.PCMU, g711.PCMA])
def test_peak_is_the_largest_decoded_magnitude(law):
    assert g711.peak(b"", law) == 0
    assert g711.peak(EVERY_CODE, law) == int(np.abs(samples(g711.decode(EVERY_CODE, law))).max())
    speech = g711.encode(tone(440, 20, 8000, amplitude=0.25), law)
    assert g711.peak(speech, law) == int(np.abs(samples(g711.decode(speech, law))).max())
    assert 0.23 * 32768 < g711.peak(speech, law) < 0.27 * 32768


def test_resampler_lengths():
    assert len(g711.upsample_to_24k(b"")) == 0 and len(g711.downsample_to_8k(b"")) == 0
    assert len(g711.upsample_to_24k(bytes(320))) == 960  # 20 ms: 160 samples -> 480
    assert len(g711.upsample_to_24k(bytes(2))) == 6
    for n24, n8 in [(480, 160), (2400, 800), (1, 1), (481, 161), (482, 161), (483, 161), (484, 162)]:
        assert len(g711.downsample_to_8k(bytes(2 * n24))) == 2 * n8, n24  # ceil(n / 3): samples 0, 3, 6, ...


def test_upsampling_draws_the_band_limited_wave_between_the_samples():
    for hz in (300, 1000, 3000):  # the same tone generated at 24 kHz, to 0.1 % (away from the chunk's edges)
        error = np.abs(samples(g711.upsample_to_24k(tone(hz, 300, 8000))) - samples(tone(hz, 300, 24000)))[96:-96]
        assert error.max() <= 16, hz
    flat = samples(g711.upsample_to_24k(np.full(160, 10000, "<i2").tobytes()))
    assert np.abs(flat - 10000).max() <= 3  # constant in, constant out, edges included
    square = np.repeat(np.array([32767, -32768] * 20, "<i2"), 4)  # full scale: overshoot clips, never wraps
    out = samples(g711.upsample_to_24k(square.tobytes())).reshape(-1, 12)
    assert np.all(out[0::2, 3:9] > 20000) and np.all(out[1::2, 3:9] < -20000)
    assert out.max() == 32767 and out.min() == -32768


def test_a_1khz_tone_survives_24k_to_8k_to_24k():
    original = tone(1000, 500, 24000)
    pcm8 = g711.downsample_to_8k(original)
    back = g711.upsample_to_24k(pcm8)
    assert len(back) == len(original)
    trim = 24 * 20  # edges: 20 ms
    assert abs(level_db(pcm8, trim // 3) - level_db(original, trim)) < 0.5
    assert abs(level_db(back, trim) - level_db(original, trim)) < 1.0
    # Still the same tone: in phase with the original (no delay), not merely as loud.
    a, b = samples(original)[trim:-trim], samples(back)[trim:-trim]
    assert np.dot(a, b) / math.sqrt(np.dot(a, a) * np.dot(b, b)) > 0.99


def test_speech_band_passes_and_what_8khz_cannot_carry_is_stopped():
    for hz in (200, 1000, 3000):
        assert abs(level_db(g711.downsample_to_8k(tone(hz, 300, 24000)), 80) - level_db(tone(hz, 300, 24000))) < 1.0, hz
    for hz in (5000, 7000, 10000):  # would alias to 3, 1 and 2 kHz
        loss = level_db(tone(hz, 300, 24000)) - level_db(g711.downsample_to_8k(tone(hz, 300, 24000)), 80)
        assert loss > 40, (hz, loss)


def test_a_g711_frame_through_the_simulators_path_keeps_its_level():
    """8 kHz G.711 -> 24 kHz (what the simulator hears) -> 8 kHz G.711 (what it says back)."""
    speech = tone(700, 400, 8000, amplitude=0.3)
    for law in (g711.PCMU, g711.PCMA):
        wire = g711.encode(speech, law)
        back = g711.encode(g711.downsample_to_8k(g711.upsample_to_24k(g711.decode(wire, law))), law)
        assert len(back) == len(wire)
        assert abs(level_db(g711.decode(back, law), 80) - level_db(g711.decode(wire, law), 80)) < 1.0

"""The relay's Opus encoder, used in place of aiortc's by the faster audio sender (see aiortc_internals).

aiortc's encoder is fixed at stereo, 96 kb/s, `application=voip`, complexity 10, fed 48 kHz audio: ~270 us per
20 ms frame, in a thread pool. A voice needs none of that: mono, 48 kb/s, `application=audio` (CELT: cheaper than
SILK at this rate), complexity 5, encoded straight from the model's 24 kHz (relay/audio/opus.py): ~60 us, inline,
with packets about a third of the size. Each setting is checked by its effect on the bitstream (tests/unit/test_media.py).
"""

from __future__ import annotations

import math

import numpy as np
from aiortc.codecs.opus import OpusEncoder
from av import AudioFrame, AudioResampler

from relay.audio import opus

RTP_SAMPLES_PER_FRAME = 960  # Opus RTP timestamps count 48 kHz samples whatever the coded rate (RFC 7587)
# Digital silence is most of a call (the model listens while the user talks). Once the encoder has coded this many
# silent frames in a row to the same packet, its state has settled and the packet is reused instead of encoding.
SILENCE_SETTLE_FRAMES = 10


def pcm_level_dbov(pcm: bytes) -> int:
    """RFC 6465 audio level of PCM16 (0 loudest, -127 silence)."""
    if pcm.count(0) == len(pcm):
        return -127
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
    power = float(np.dot(samples, samples)) / (samples.size * 32767.0 * 32767.0)
    return round(max(-127.0, min(0.0, 10 * math.log10(power)))) if power > 0 else -127


def _direct_pcm(frame: AudioFrame) -> bytes | None:
    """The frame's audio as mono PCM16 when libopus can take it as it is: s16, 20 ms at an Opus rate, mono (or
    stereo, averaged to mono); else None."""
    rate, samples = frame.sample_rate, frame.samples
    if frame.format.name != "s16" or rate not in opus.RATES or samples != rate // 50:
        return None
    channels = len(frame.layout.channels)
    if channels == 1:
        return bytes(frame.planes[0])[: samples * 2]
    if channels == 2:
        pair = np.frombuffer(frame.planes[0], dtype="<i2", count=samples * 2).reshape(-1, 2).astype(np.int32)
        return ((pair[:, 0] + pair[:, 1]) // 2).astype("<i2").tobytes()
    return None


class VoiceOpusEncoder:
    """aiortc's Encoder interface: encode(frame, force_keyframe) -> (payloads, rtp timestamp)."""

    def __init__(self, bitrate: int = 48000, complexity: int = 5, application: str = "audio",
                 constrained_vbr: bool = True) -> None:
        # Constrained VBR: below complexity 7 libopus skips its analysis and plain VBR overshoots (~78 kb/s).
        self._settings = (bitrate, complexity, application, constrained_vbr)
        self._opus = opus.Encoder(*self._settings)  # 24 kHz; remade once for a track at another Opus rate
        self._resampler: AudioResampler | None = None  # only for frames libopus cannot take as they are
        self._packets = 0  # every packet is 20 ms: its RTP timestamp follows from the count
        self._silent_run = 0  # silent frames coded in a row, each to the packet below
        self._silent_packet = b""
        self.encoded = 0  # frames that went through libopus (the rest were settled silence)

    def encode(self, frame: AudioFrame, force_keyframe: bool = False) -> tuple[list[bytes], int | None]:
        payloads, timestamp, _ = self.encode_with_level(frame)
        return payloads, timestamp

    def encode_with_level(self, frame: AudioFrame) -> tuple[list[bytes], int | None, int | None]:
        """encode(), and the RFC 6465 level of the audio (None if nothing was encoded)."""
        direct = _direct_pcm(frame)
        if direct is not None:  # 20 ms at a rate libopus codes (the playout track's 24 kHz; a 48 kHz microphone)
            if frame.sample_rate != self._opus.rate:
                self._opus = opus.Encoder(*self._settings, rate=frame.sample_rate)
                self._resampler = None  # it produced frames for the old rate
            pcm = [direct]
        else:  # anything else is converted (a resampler holds audio back: avoid it where possible)
            if self._resampler is None:
                self._resampler = AudioResampler(format="s16", layout="mono", rate=self._opus.rate,
                                                 frame_size=self._opus.rate // 50)
            frame.pts = None  # the resampler needs no timing, and an input clock that jumps must not confuse it
            pcm = [bytes(f.planes[0])[: f.samples * 2] for f in self._resampler.resample(frame)]
        if not pcm:
            return [], None, None  # nothing yet (only while a resampler is filling its first frame)
        payloads = [self._encode_pcm(p) for p in pcm]
        timestamp = self._packets * RTP_SAMPLES_PER_FRAME
        self._packets += len(payloads)
        return payloads, timestamp, pcm_level_dbov(pcm[-1])

    def _encode_pcm(self, pcm: bytes) -> bytes:
        silent = pcm.count(0) == len(pcm)
        if silent and self._silent_run >= SILENCE_SETTLE_FRAMES:
            return self._silent_packet
        packet = self._opus.encode(pcm)
        self.encoded += 1
        if not silent:
            self._silent_run = 0
        elif self._silent_run == 0 or packet == self._silent_packet:
            self._silent_run += 1
            self._silent_packet = packet
        else:
            self._silent_run, self._silent_packet = 1, packet
        return packet

    def pack(self, packet):
        """Pre-encoded Opus packets pass as aiortc's own encoder passes them."""
        return OpusEncoder.pack(self, packet)

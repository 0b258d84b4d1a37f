"""The relay's Opus encoder, used in place of aiortc's by the faster audio sender (see aiortc_internals).

aiortc's encoder is fixed at stereo, 96 kb/s, `application=voip`, complexity 10: ~270 us per 20 ms frame. A voice
needs none of that: mono, 48 kb/s, `application=audio` (CELT: cheaper than SILK at this rate) and complexity 5
cost ~110-135 us, with packets about a third of the size. Each option is checked by its effect on the bitstream
(PyAV accepts unknown option names silently): tests/unit/test_media.py.
"""

from __future__ import annotations

import fractions

import av
from aiortc.codecs.opus import OpusEncoder
from av import AudioFrame, AudioResampler

SAMPLE_RATE = 48000
SAMPLES_PER_FRAME = 960
BITRATE = 48000
# Constrained VBR: below complexity 7 libopus skips its analysis and plain VBR overshoots the target (~78 kb/s).
OPTIONS = {"application": "audio", "compression_level": "5", "vbr": "constrained"}


class VoiceOpusEncoder:
    """aiortc's Encoder interface: encode(frame, force_keyframe) -> (payloads, rtp timestamp)."""

    def __init__(self, bitrate: int = BITRATE, options: dict[str, str] | None = None) -> None:
        self.codec = av.CodecContext.create("libopus", "w")
        self.codec.bit_rate = bitrate
        self.codec.format = "s16"
        self.codec.layout = "mono"
        self.codec.sample_rate = SAMPLE_RATE
        self.codec.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self.codec.options = dict(OPTIONS if options is None else options)
        self._resampler: AudioResampler | None = None  # only for frames that are not 20 ms of 48 kHz mono s16
        self._packets = 0  # every packet is 20 ms: its RTP timestamp follows from the count

    def encode(self, frame: AudioFrame, force_keyframe: bool = False) -> tuple[list[bytes], int | None]:
        if (frame.layout.name, frame.sample_rate, frame.samples, frame.format.name) == ("mono", SAMPLE_RATE,
                                                                                          SAMPLES_PER_FRAME, "s16"):
            frames = [frame]
        else:  # e.g. a stereo track: converted, as aiortc's encoder does
            if self._resampler is None:
                self._resampler = AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE,
                                                 frame_size=SAMPLES_PER_FRAME)
            frames = self._resampler.resample(frame)
        for f in frames:
            f.pts = None  # the encoder numbers its own output; an input clock that jumps must not confuse it
        packets = [packet for f in frames for packet in self.codec.encode(f)]
        if not packets:
            return [], None  # nothing yet (only while a resampler is filling its first frame)
        timestamp = self._packets * SAMPLES_PER_FRAME
        self._packets += len(packets)
        return [bytes(p) for p in packets], timestamp

    def pack(self, packet):
        """Pre-encoded Opus packets pass as aiortc's own encoder passes them."""
        return OpusEncoder.pack(self, packet)

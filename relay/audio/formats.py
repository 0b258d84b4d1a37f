"""A call's audio as the relay carries it to the model and back, one kind for each codec it answers.

Opus is decoded to PCM16 at 24 kHz on the way in and coded from it on the way out (the upstream format OpenAI's
own WebRTC endpoint uses). G.711 (PCMU, PCMA) is what the Realtime API takes natively (`audio/pcmu`,
`audio/pcma` at 8 kHz), so such a call's RTP payloads go upstream as they are and the model's bytes come back as
RTP payloads: no decoding, resampling or encoding on the call's path.

In both, one RTP clock tick is one byte of upstream audio (Opus's 48 kHz clock against PCM16's 2 bytes a 24 kHz
sample; G.711's 8 kHz clock against its byte a sample): relay/webrtc/inbound.py relies on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from relay.audio import g711

FRAME_MS = 20


@dataclass(frozen=True)
class CallAudio:
    codec: str  # the negotiated codec's name, lower case: "opus", "pcmu", "pcma" (metrics, logs)
    clock: str  # its rtpmap encoding/clock, lower case, as it must appear in the answer
    upstream_type: str  # the Realtime format type both ways
    rate: int  # samples a second of the upstream audio
    sample_bytes: int  # bytes a sample of the upstream audio

    @property
    def bytes_per_ms(self) -> int:
        return self.rate * self.sample_bytes // 1000

    @property
    def frame_bytes(self) -> int:
        """One 20 ms frame: what the playout track sends a tick."""
        return FRAME_MS * self.bytes_per_ms

    @property
    def passthrough(self) -> bool:
        """The RTP payloads are the upstream audio (G.711)."""
        return self.sample_bytes == 1

    def session_format(self) -> dict[str, Any]:
        """The format of the call's upstream session, for `audio.input.format` and `audio.output.format`."""
        if self.upstream_type == "audio/pcm":
            return {"type": "audio/pcm", "rate": self.rate}
        return {"type": self.upstream_type}

    def silence(self, n_bytes: int) -> bytes:
        return bytes([self._silent_byte]) * n_bytes if self._silent_byte else bytes(n_bytes)

    @property
    def _silent_byte(self) -> int:
        return g711.SILENCE.get(self.upstream_type, 0)

    def peak(self, frame: bytes) -> int:
        """The loudest sample of `frame` (PCM16 scale): how silence is told."""
        if self.passthrough:
            return g711.peak(frame, self.upstream_type)
        samples = np.frombuffer(frame, dtype="<i2")
        return max(int(samples.max()), -int(samples.min())) if samples.size else 0

    def to_pcm16(self, data: bytes) -> bytes:
        """The audio as PCM16 at `rate` (the recording's WAV)."""
        return g711.decode(data, self.upstream_type) if self.passthrough else data

    def whole_samples(self, data: bytes) -> bytes:
        return data[: len(data) // self.sample_bytes * self.sample_bytes]


OPUS = CallAudio("opus", "opus/48000", "audio/pcm", 24000, 2)
PCMU = CallAudio("pcmu", "pcmu/8000", g711.PCMU, g711.RATE, 1)
PCMA = CallAudio("pcma", "pcma/8000", g711.PCMA, g711.RATE, 1)
ANSWERED = {audio.codec: audio for audio in (OPUS, PCMU, PCMA)}  # by codec name

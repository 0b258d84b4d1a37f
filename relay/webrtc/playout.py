"""The outbound track: exactly one 20 ms frame per recv(), on a monotonic-clock schedule.

aiortc's sender awaits recv(), encodes and sends at once, so pacing is this track's job. The schedule is anchored
(frame k is due at start + k * 20 ms), so sleeps do not accumulate drift. After a stall (the loop was blocked) the
schedule is re-anchored instead of sending the missed frames in a burst. An Opus call's frames are the model's own
24 kHz mono (the voice encoder codes that rate directly; pts grow by exactly 480 a frame); a G.711 call's are the
model's own bytes, handed to the sender as a ready packet (aiortc's G.711 encoder packs it as it is; pts and the RTP
timestamp grow by 160 a frame on its 8 kHz clock).
When there is nothing to play the track sends silence: RTP never stops.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque
from typing import Awaitable, Callable

from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, Packet

from relay.audio.formats import OPUS, CallAudio

FRAME_S = 0.020
_MAX_LATE_S = 3 * FRAME_S  # later than this, re-anchor rather than catch up
LATE_S = FRAME_S  # a frame that leaves later than this after its due time counts as late


class PlayoutTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(
        self,
        next_frame: Callable[[], bytes | None],
        audio: CallAudio = OPUS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__()
        self._next_frame = next_frame
        self._silence = audio.silence(audio.frame_bytes)
        self._samples = audio.frame_bytes // audio.sample_bytes  # a frame's samples: its pts step
        self._rate = audio.rate
        self._time_base = fractions.Fraction(1, audio.rate)
        self._passthrough = audio.passthrough
        self._clock = clock
        self._sleep = sleep
        self._start: float | None = None
        self._index = 0
        self.lateness = deque(maxlen=3000)  # seconds each frame left after its due time (the last minute)
        self.reanchors = 0
        self.late_frames = 0  # frames that left more than LATE_S after their due time (re-anchors included)

    async def recv(self) -> AudioFrame | Packet:
        if self.readyState != "live":
            raise MediaStreamError  # aiortc's sender stops on this
        now = self._clock()
        if self._start is None:
            self._start = now
        due = self._start + self._index * FRAME_S
        if due > now:
            await self._sleep(due - now)
            now = self._clock()
        elif now - due > _MAX_LATE_S:
            self.reanchors += 1
            self.late_frames += 1
            self._start = now - self._index * FRAME_S
            due = now
        self.lateness.append(now - due)
        if now - due > LATE_S:
            self.late_frames += 1
        data = self._next_frame() or self._silence
        if self._passthrough:
            frame = Packet(data)
        else:
            frame = AudioFrame(format="s16", layout="mono", samples=self._samples)
            frame.planes[0].update(data)
            frame.sample_rate = self._rate
        frame.pts = self._index * self._samples
        frame.time_base = self._time_base
        self._index += 1
        return frame

    @property
    def frames_sent(self) -> int:
        """Frames handed to the encoder so far."""
        return self._index

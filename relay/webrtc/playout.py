"""The outbound track: exactly one 20 ms frame per recv(), on a monotonic-clock schedule.

aiortc's sender awaits recv(), encodes and sends at once, so pacing is this track's job. The schedule is anchored
(frame k is due at start + k * 20 ms), so sleeps do not accumulate drift. After a stall (the loop was blocked) the
schedule is re-anchored instead of sending the missed frames in a burst. Frames are the model's own 24 kHz mono
(the voice encoder codes that rate directly); pts grow by exactly 480 per frame.
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
from av import AudioFrame

from relay.audio.convert import FRAME_BYTES_24K, FRAME_SAMPLES_24K, UPSTREAM_RATE

FRAME_S = 0.020
TIME_BASE = fractions.Fraction(1, UPSTREAM_RATE)
_SILENCE = bytes(FRAME_BYTES_24K)
_MAX_LATE_S = 3 * FRAME_S  # later than this, re-anchor rather than catch up
LATE_S = FRAME_S  # a frame that leaves later than this after its due time counts as late


class PlayoutTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(
        self,
        next_frame: Callable[[], bytes | None],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__()
        self._next_frame = next_frame
        self._clock = clock
        self._sleep = sleep
        self._start: float | None = None
        self._index = 0
        self.lateness = deque(maxlen=3000)  # seconds each frame left after its due time (the last minute)
        self.reanchors = 0
        self.late_frames = 0  # frames that left more than LATE_S after their due time (re-anchors included)

    async def recv(self) -> AudioFrame:
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
        data = self._next_frame() or _SILENCE
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES_24K)
        frame.planes[0].update(data)
        frame.sample_rate = UPSTREAM_RATE
        frame.pts = self._index * FRAME_SAMPLES_24K
        frame.time_base = TIME_BASE
        self._index += 1
        return frame

    @property
    def frames_sent(self) -> int:
        """Frames handed to the encoder so far."""
        return self._index

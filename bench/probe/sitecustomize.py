"""Outbound RTP timing probe, loaded into a benchmarked server by putting this folder on PYTHONPATH.

Active only when BENCH_PROBE_DIR is set. It wraps aiortc's `RTCDtlsTransport._send_rtp` (the last step before
encryption and the socket), so it sees every RTP packet a server sends, whichever project built it: the relay and
Pipecat are judged by the same code.

A frame is *late* when it leaves more than 20 ms after its place in its stream's schedule. The schedule is the
packet's RTP timestamp (48 kHz for Opus) mapped to wall time through the best (smallest) send-time offset seen
over the last second: a listener's adaptive jitter buffer settles on that offset, so a stall, a burst or a slow
drift all show up as late frames. Counters are written, at most twice a second, to BENCH_PROBE_DIR/probe-PID.json.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque

WINDOW_S = 1.0
LATE_S = 0.020
CLOCK_RATE = 48000


class StreamTiming:
    """One RTP stream's schedule: the running minimum of (send time - media time) over the last second."""

    def __init__(self, timestamp: int) -> None:
        self.last_timestamp = timestamp
        self.media_s = 0.0
        self.offsets: deque[tuple[float, float]] = deque()  # (send time, offset), offsets increasing

    def lateness(self, now: float, timestamp: int) -> float:
        step = (timestamp - self.last_timestamp) & 0xFFFFFFFF
        if step >= 0x80000000:
            step -= 0x100000000  # an older timestamp (reordered or resent)
        self.last_timestamp = timestamp
        self.media_s += step / CLOCK_RATE
        offset = now - self.media_s
        while self.offsets and self.offsets[-1][1] >= offset:
            self.offsets.pop()
        self.offsets.append((now, offset))
        while self.offsets[0][0] < now - WINDOW_S:
            self.offsets.popleft()
        return offset - self.offsets[0][1]


def install(directory: str) -> None:
    from aiortc.rtcdtlstransport import RTCDtlsTransport
    from aiortc.rtp import is_rtcp

    path = os.path.join(directory, f"probe-{os.getpid()}.json")
    streams: dict[int, StreamTiming] = {}
    counters = {"pid": os.getpid(), "frames": 0, "late": 0, "max_late_ms": 0.0, "written_at": 0.0}
    original = RTCDtlsTransport._send_rtp

    async def _send_rtp(self, data: bytes) -> None:
        if len(data) >= 12 and not is_rtcp(data):
            now = time.monotonic()
            ssrc = int.from_bytes(data[8:12], "big")
            timestamp = int.from_bytes(data[4:8], "big")
            stream = streams.get(ssrc)
            if stream is None:
                stream = streams[ssrc] = StreamTiming(timestamp)
            late = stream.lateness(now, timestamp)
            counters["frames"] += 1
            if late > LATE_S:
                counters["late"] += 1
                counters["max_late_ms"] = max(counters["max_late_ms"], late * 1000)
            if now - counters["written_at"] >= 0.5:
                counters["written_at"] = now
                with open(path + ".tmp", "w") as out:
                    json.dump(counters, out)
                os.replace(path + ".tmp", path)
        await original(self, data)

    RTCDtlsTransport._send_rtp = _send_rtp


if os.environ.get("BENCH_PROBE_DIR"):
    install(os.environ["BENCH_PROBE_DIR"])

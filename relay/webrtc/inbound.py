"""The client's audio, from RTP packets to 20 ms chunks of 24 kHz PCM16, inline as each packet arrives.

Installed in place of aiortc's audio jitter buffer (see aiortc_internals). Per packet: in-order release with a small
reorder window, Opus decode straight to 24 kHz mono on the event loop (no thread handoff, no resampler), silence for
lost or missing audio so the upstream's audio timeline stays aligned with real time, and each packet's ~20 ms
handed to `sink`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from relay.audio import opus
from relay.core.reorder import ReorderBuffer


@dataclass
class InboundStats:
    packets: int = 0
    payload_bytes: int = 0  # RTP payloads received (Opus)
    lost: int = 0  # packets given up on (a gap the reorder window did not fill)
    late: int = 0  # packets that came after their turn, or twice
    decode_errors: int = 0
    recovered_ms: float = 0.0  # lost audio rebuilt by Opus (in-band FEC, else loss concealment)
    gap_fill_ms: float = 0.0  # longer gaps (the client paused) filled with silence
    over_budget_ms: float = 0.0  # audio not sent because it would run ahead of real time


BUDGET_SLACK_MS = 500.0
RECOVER_MAX_TICKS = 120 * 48  # gaps up to 120 ms are lost packets, rebuilt by Opus; longer ones are pauses
FEC_TICKS = 20 * 48  # the frame before a packet, which its in-band FEC may carry


def _timestamp_distance(a: int, b: int) -> int:
    """b - a on the 32-bit RTP timestamp circle."""
    return (b - a + 2**31) % 2**32 - 2**31


class InboundAudio:
    def __init__(
        self,
        sink: Callable[[bytes], None],
        reorder_window: int = 2,
        max_gap_fill_ms: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self._reorder: ReorderBuffer[Any] = ReorderBuffer(reorder_window)
        self._decoder = opus.Decoder()
        self._next_timestamp: int | None = None
        self._max_gap_samples = max_gap_fill_ms * 48
        self._clock = clock
        self.first_packet_at: float | None = None
        self.last_packet_at: float | None = None
        self._sent_ms = 0.0
        self.stats = InboundStats()

    # aiortc's JitterBuffer interface: called for every depayloaded RTP packet of the audio receiver.
    def add(self, packet: Any) -> tuple[bool, None]:
        self.last_packet_at = self._clock()
        if self.first_packet_at is None:
            self.first_packet_at = self.last_packet_at
        self.stats.packets += 1
        self.stats.payload_bytes += len(packet._data)
        for ready in self._reorder.push(packet.sequence_number, packet):
            self._decode(ready.timestamp, ready._data)
        self.stats.lost = self._reorder.lost
        self.stats.late = self._reorder.late
        return False, None

    def _decode(self, timestamp: int, payload: bytes) -> None:
        if self._next_timestamp is not None:
            missing = _timestamp_distance(self._next_timestamp, timestamp)
            if 0 < missing <= RECOVER_MAX_TICKS and payload:
                self._recover(missing, payload)
            elif missing > 0:
                self._fill(min(missing, self._max_gap_samples))
        if not payload:
            return
        try:
            pcm24 = self._decoder.decode(payload)
        except opus.OpusError:
            self.stats.decode_errors += 1
            return
        self._emit(pcm24)
        self._next_timestamp = (timestamp + len(pcm24)) % 2**32  # 2 bytes a 24 kHz sample: one byte a 48 kHz tick

    def _recover(self, ticks: int, payload: bytes) -> None:
        """Lost packets before this one: concealment for all but the last frame, and that one from this packet's
        FEC data (concealment again when it has none). Counted as lost audio, not as silence."""
        try:
            concealed = self._decoder.recover(max(0, ticks - FEC_TICKS) // 2, None)
            rebuilt = concealed + self._decoder.recover((ticks - len(concealed)) // 2, payload)
        except opus.OpusError:
            self.stats.decode_errors += 1
            self._fill(ticks)
            return
        self.stats.recovered_ms += len(rebuilt) / 48
        self._emit(rebuilt)
        if len(rebuilt) < ticks:  # not a multiple of 2.5 ms: the rest as silence keeps the timeline
            self._fill(ticks - len(rebuilt))

    def _fill(self, samples_48k: int) -> None:
        """Silence for audio that never came (a lost packet, or the client pausing)."""
        self.stats.gap_fill_ms += samples_48k / 48
        self._emit(bytes(samples_48k // 2 * 2))  # 24 kHz PCM16: 2 bytes a sample, half the 48 kHz count

    def _emit(self, pcm24: bytes) -> None:
        """Hand audio on, never more than real time since the first packet (plus slack for jitter): timestamps
        and Opus frame sizes are the client's to choose, and upstream audio is paid for."""
        allowed_ms = (self.last_packet_at - self.first_packet_at) * 1000 + BUDGET_SLACK_MS - self._sent_ms
        length_ms = len(pcm24) / 48
        if length_ms > allowed_ms:
            keep = max(0, int(allowed_ms * 48)) // 2 * 2
            self.stats.over_budget_ms += length_ms - keep / 48
            pcm24 = pcm24[:keep]
        # Each packet's audio goes out as it is: ~20 ms. Cutting exact 20 ms chunks would hold every chunk back
        # for the next packet, because the resampler's delay shifts the boundaries by a few samples.
        if pcm24:
            self._sent_ms += len(pcm24) / 48
            self._sink(pcm24)

"""The client's audio, from RTP packets to the upstream's audio, inline as each packet arrives.

Installed in place of aiortc's audio jitter buffer (see aiortc_internals). Per packet: in-order release with a small
reorder window, then (InboundAudio) Opus decoded straight to 24 kHz mono PCM16 on the event loop (no thread handoff,
no resampler), or (PassThroughInbound) a G.711 payload as it is; lost or missing audio is filled so that the
upstream's audio timeline stays aligned with real time, and each packet's ~20 ms is handed to `sink`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from relay.audio import opus
from relay.audio.formats import CallAudio
from relay.core.reorder import ReorderBuffer


@dataclass
class InboundStats:
    packets: int = 0
    payload_bytes: int = 0  # RTP payloads received
    lost: int = 0  # packets given up on (a gap the reorder window did not fill)
    late: int = 0  # packets that came after their turn, or twice
    decode_errors: int = 0
    recovered_ms: float = 0.0  # lost audio rebuilt by Opus (in-band FEC, else loss concealment)
    gap_fill_ms: float = 0.0  # gaps filled with silence (Opus: the client paused; G.711: any lost packet too)
    over_budget_ms: float = 0.0  # audio not sent because it would run ahead of real time


BUDGET_SLACK_MS = 500.0
RECOVER_MAX_TICKS = 120 * 48  # gaps up to 120 ms are lost packets, rebuilt by Opus; longer ones are pauses
FEC_TICKS = 20 * 48  # the frame before a packet, which its in-band FEC may carry


def _timestamp_distance(a: int, b: int) -> int:
    """b - a on the 32-bit RTP timestamp circle."""
    return (b - a + 2**31) % 2**32 - 2**31


class InboundAudio:
    """Opus in, 24 kHz PCM16 out."""

    TICKS_PER_MS = 48  # RTP clock ticks a millisecond, and bytes of upstream audio (see relay/audio/formats.py)
    SAMPLE_BYTES = 2

    def __init__(
        self,
        sink: Callable[[bytes], None],
        reorder_window: int = 2,
        max_gap_fill_ms: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self._reorder: ReorderBuffer[Any] = ReorderBuffer(reorder_window)
        self._decoder = self._new_decoder()
        self._next_timestamp: int | None = None
        self._max_gap_samples = max_gap_fill_ms * self.TICKS_PER_MS
        self._clock = clock
        self.first_packet_at: float | None = None
        self.last_packet_at: float | None = None
        self._sent_ms = 0.0
        self.stats = InboundStats()

    def _new_decoder(self) -> opus.Decoder | None:
        return opus.Decoder()

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

    def _emit(self, audio: bytes) -> None:
        """Hand audio on, never more than real time since the first packet (plus slack for jitter): timestamps
        and Opus frame sizes are the client's to choose, and upstream audio is paid for."""
        allowed_ms = (self.last_packet_at - self.first_packet_at) * 1000 + BUDGET_SLACK_MS - self._sent_ms
        per_ms = self.TICKS_PER_MS
        length_ms = len(audio) / per_ms
        if length_ms > allowed_ms:
            keep = max(0, int(allowed_ms * per_ms)) // self.SAMPLE_BYTES * self.SAMPLE_BYTES
            self.stats.over_budget_ms += length_ms - keep / per_ms
            audio = audio[:keep]
        # Each packet's audio goes out as it is: ~20 ms. Cutting exact 20 ms chunks would hold every chunk back
        # for the next packet, because the resampler's delay shifts the boundaries by a few samples.
        if audio:
            self._sent_ms += len(audio) / per_ms
            self._sink(audio)


class PassThroughInbound(InboundAudio):
    """G.711 in, the same bytes out (the upstream takes `audio/pcmu` and `audio/pcma` as they are). A lost packet
    is filled with the law's silence, a byte a tick: G.711 has nothing to conceal it with."""

    TICKS_PER_MS = 8
    SAMPLE_BYTES = 1

    def __init__(self, sink: Callable[[bytes], None], audio: CallAudio, reorder_window: int = 2,
                 max_gap_fill_ms: int = 1000, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(sink, reorder_window, max_gap_fill_ms, clock)
        self._silence = audio.silence(1)

    def _new_decoder(self) -> None:
        return None

    def _decode(self, timestamp: int, payload: bytes) -> None:
        if self._next_timestamp is not None:
            missing = _timestamp_distance(self._next_timestamp, timestamp)
            if missing > 0:
                self._fill(min(missing, self._max_gap_samples))
        if payload:
            self._emit(payload)
            self._next_timestamp = (timestamp + len(payload)) % 2**32  # a byte a tick

    def _fill(self, ticks: int) -> None:
        self.stats.gap_fill_ms += ticks / self.TICKS_PER_MS
        self._emit(self._silence * ticks)

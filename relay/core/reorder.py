"""In-order release of RTP packets with a small reorder window (replaces aiortc's audio jitter buffer logic).

aiortc's buffer holds 4 packets before releasing one and releases at most one per arrival, so it only grows. This
one releases a packet the moment it is next in sequence; a packet after a gap waits only until the gap fills or
`window` newer packets have arrived, and then everything ready goes out at once: no delay is kept after a loss.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")
_RESET_DISTANCE = 1000  # a jump this large is a new stream (or garbage), not reordering


def seq_distance(a: int, b: int) -> int:
    """b - a on the 16-bit sequence circle, in -32768..32767."""
    return (b - a + 32768) % 65536 - 32768


class ReorderBuffer(Generic[T]):
    def __init__(self, window: int = 2) -> None:
        self.window = window
        self._expected: int | None = None
        self._pending: dict[int, T] = {}
        self.lost = 0  # packets given up on
        self.late = 0  # packets dropped because they came after their turn (or twice)

    def push(self, seq: int, item: T) -> list[T]:
        """Add one packet; return the packets now ready, in order."""
        if self._expected is None:
            self._expected = seq
        distance = seq_distance(self._expected, seq)
        if distance < 0 or seq in self._pending:
            if distance < -_RESET_DISTANCE:
                return self._restart(seq, item)
            self.late += 1
            return []
        if distance > _RESET_DISTANCE:
            return self._restart(seq, item)
        self._pending[seq] = item
        ready = self._drain()
        if len(self._pending) > self.window:
            ready += self._skip_gap()
        return ready

    def _drain(self) -> list[T]:
        ready = []
        while self._expected in self._pending:
            ready.append(self._pending.pop(self._expected))
            self._expected = (self._expected + 1) % 65536
        return ready

    def _skip_gap(self) -> list[T]:
        """Give up on the missing packets before the oldest one waiting."""
        first = min(self._pending, key=lambda s: seq_distance(self._expected, s))
        self.lost += seq_distance(self._expected, first)
        self._expected = first
        return self._drain()

    def _restart(self, seq: int, item: T) -> list[T]:
        ready = [self._pending[s] for s in sorted(self._pending, key=lambda s: seq_distance(self._expected, s))]
        self._pending.clear()
        self._expected = (seq + 1) % 65536
        return ready + [item]

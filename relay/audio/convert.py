"""Fixed-size framing of audio byte streams. (No resampling: libopus codes the upstream's 24 kHz directly, see
relay/audio/opus.py.)"""

from __future__ import annotations


class Chunker:
    """Cuts a byte stream into chunks of exactly `size` bytes."""

    def __init__(self, size: int, pad: bytes = b"") -> None:
        self.size = size
        self._pad = pad or bytes(size)  # what fills the last chunk: the format's silence (G.711's is not zeros)
        self._pending = bytearray()

    def push(self, data: bytes) -> list[bytes]:
        self._pending += data
        whole = len(self._pending) // self.size * self.size
        if not whole:
            return []
        out = [bytes(self._pending[i : i + self.size]) for i in range(0, whole, self.size)]
        del self._pending[:whole]
        return out

    def flush(self) -> bytes:
        """The remainder, padded to a whole chunk (b"" if none)."""
        if not self._pending:
            return b""
        out = bytes(self._pending) + self._pad[: self.size - len(self._pending)]
        self._pending.clear()
        return out

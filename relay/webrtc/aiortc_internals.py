"""Every place the relay reaches into aiortc/aioice internals, in one module (aiortc is pinned to 1.16.x).

tests/unit/test_aiortc_internals.py fails loudly if any of these moves: an upgrade must break a test, not the audio.

1. The audio receiver's jitter buffer (`RTCRtpReceiver.__jitter_buffer`, a JitterBuffer(capacity=16, prefetch=4)):
   it holds 80 ms before releasing a frame and never shrinks after a loss. The relay swaps in its own object with
   the same `add(packet) -> (pli_flag, frame)` method; it takes every depayloaded packet, does its own reordering,
   decoding and resampling inline, and returns no frame, so aiortc's decoder thread and track queue stay idle.
2. aioice's host address discovery (`aioice.ice.get_host_addresses`), which has no option to choose interfaces:
   replaced to gather on the configured addresses only (RELAY_ICE_ADDRESSES; tests: 127.0.0.1).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Protocol

import aioice.ice
from aiortc import RTCRtpReceiver

JITTER_BUFFER_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"
_original_get_host_addresses = aioice.ice.get_host_addresses


class InternalsMoved(RuntimeError):
    pass


class PacketTap(Protocol):
    def add(self, packet: Any) -> tuple[bool, None]: ...


def install_packet_tap(receiver: RTCRtpReceiver, tap: PacketTap) -> None:
    """Route the receiver's depayloaded RTP packets to `tap` instead of aiortc's jitter buffer."""
    if not hasattr(receiver, JITTER_BUFFER_ATTRIBUTE):
        raise InternalsMoved(f"aiortc's RTCRtpReceiver has no {JITTER_BUFFER_ATTRIBUTE} any more")
    setattr(receiver, JITTER_BUFFER_ATTRIBUTE, tap)


def restrict_host_addresses(addresses: list[str]) -> None:
    """Gather host candidates on `addresses` only; an empty list restores aioice's own choice (every non-loopback
    interface). Process-wide: aioice offers no per-connection hook."""
    if not callable(getattr(aioice.ice, "get_host_addresses", None)):
        raise InternalsMoved("aioice.ice.get_host_addresses is gone")
    if not addresses:
        aioice.ice.get_host_addresses = _original_get_host_addresses
        return
    parsed = [ipaddress.ip_address(a) for a in addresses]

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [str(a) for a in parsed if (a.version == 4 and use_ipv4) or (a.version == 6 and use_ipv6)]

    aioice.ice.get_host_addresses = get_host_addresses

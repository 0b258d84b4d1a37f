"""Every place the relay reaches into aiortc/aioice internals, in one module (aiortc is pinned to 1.16.x).

tests/unit/test_aiortc_internals.py fails loudly if any of these moves: an upgrade must break a test, not the audio.

1. The audio receiver's jitter buffer (`RTCRtpReceiver.__jitter_buffer`, a JitterBuffer(capacity=16, prefetch=4)):
   it holds 80 ms before releasing a frame and never shrinks after a loss. The relay swaps in its own object with
   the same `add(packet) -> (pli_flag, frame)` method; it takes every depayloaded packet, does its own reordering,
   decoding and resampling inline, and returns no frame, so aiortc's decoder thread and track queue stay idle.
2. aioice's host address discovery (`aioice.ice.get_host_addresses`), which has no option to choose interfaces:
   replaced to gather on the configured addresses only (RELAY_ICE_ADDRESSES; tests: 127.0.0.1).
3. The audio sender's per-frame work (`RTCRtpSender._next_encoded_frame`): aiortc hands every 20 ms frame to a
   thread pool to encode it (~100 us of work behind a costly handoff) and computes its RFC 6465 audio level in a
   pure-Python loop (`aiortc.rtp.compute_audio_level_dbov`, ~140 us for a stereo frame). Together ~40 % of a call's
   CPU. Audio frames are encoded inline on the event loop instead, with the relay's own voice encoder
   (relay/webrtc/encoder.py: mono CELT from 24 kHz, ~60 us against aiortc's ~270 us), and the level comes from
   numpy (~5 us; nothing for digital silence).
4. aiortc's NTP clock (`aiortc.clock.current_ntp_time`), read for every RTP packet sent (abs-send-time and the
   next sender report) through datetime arithmetic (~6 us): computed from time.time() instead (~0.5 us).
5. Read only, for metrics and the drain: the audio sender's payload byte count (`RTCRtpSender.__octet_count`, what
   its getStats() reports as bytesSent, without building a stats report), and whether a data channel's messages
   have all been acknowledged (`RTCSctpTransport._outbound_queue`: chunks waiting to be sent; `_sent_queue`: sent,
   not yet acknowledged).
6. aioice's datagram intake (`aioice.ice.StunProtocol.datagram_received`, `Connection.data_received`): every
   datagram that is not STUN, from any source, goes into the connection's unbounded queue (nothing reads it until
   ICE has connected). Media is taken only from an address the peer has proven with an authenticated STUN check
   (a pair of the connection's check list; browsers do the same), the queue is bounded, and what is dropped is
   counted. It is also faster: RTP and DTLS are told from STUN by their first byte (RFC 7983) instead of by a
   failed STUN parse per packet.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any, Protocol

import aioice.ice
import aiortc.clock
import aiortc.rtp
from aiortc import RTCRtpReceiver, RTCRtpSender
from aiortc.codecs import get_encoder
from aiortc.rtcrtpsender import RTCEncodedFrame
from av import AudioFrame
from av.frame import Frame

from relay.webrtc.encoder import VoiceOpusEncoder, pcm_level_dbov

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


# --- 3. the audio sender ---------------------------------------------------------------------------------------------

_original_next_encoded_frame = RTCRtpSender._next_encoded_frame
_original_audio_level = aiortc.rtp.compute_audio_level_dbov


def audio_level_dbov(frame: AudioFrame) -> int | None:
    """RFC 6465 audio level (0 loudest, -127 silence) of a packed s16 frame, over every sample of every channel;
    None (no level sent) for other formats."""
    if frame.format.name != "s16":
        return None
    return pcm_level_dbov(bytes(frame.planes[0])[: frame.samples * len(frame.layout.channels) * 2])


async def _next_encoded_frame_inline(self: RTCRtpSender, codec: Any) -> RTCEncodedFrame | None:
    """aiortc's RTCRtpSender._next_encoded_frame, but audio is encoded inline rather than in a thread pool."""
    data = await self._RTCRtpSender__track.recv()
    if not self._enabled:
        return None
    if self._RTCRtpSender__encoder is None:
        voice = codec.mimeType.lower() == "audio/opus"
        self._RTCRtpSender__encoder = VoiceOpusEncoder() if voice else get_encoder(codec)
    encoder = self._RTCRtpSender__encoder
    audio_level = None
    if isinstance(data, AudioFrame) and isinstance(encoder, VoiceOpusEncoder):
        payloads, timestamp, audio_level = encoder.encode_with_level(data)  # ~60 us: cheaper than any handoff
    elif isinstance(data, AudioFrame):
        audio_level = audio_level_dbov(data)
        payloads, timestamp = encoder.encode(data, False)
    elif isinstance(data, Frame):  # video keeps aiortc's own path
        force_keyframe = self._RTCRtpSender__force_keyframe
        self._RTCRtpSender__force_keyframe = False
        payloads, timestamp = await self._RTCRtpSender__loop.run_in_executor(None, encoder.encode, data, force_keyframe)
    else:
        payloads, timestamp = encoder.pack(data)
    if not payloads:
        return None
    return RTCEncodedFrame(payloads, timestamp, audio_level)


def speed_up_audio_sender(enabled: bool = True) -> None:
    """Encode audio inline with the relay's voice encoder and compute its level with numpy, process-wide
    (False restores aiortc's own code)."""
    for name in ("_RTCRtpSender__track", "_RTCRtpSender__encoder", "_RTCRtpSender__force_keyframe",
                 "_RTCRtpSender__loop", OCTET_COUNT_ATTRIBUTE):
        if name not in _SENDER_ATTRIBUTES:
            raise InternalsMoved(f"aiortc's RTCRtpSender has no {name} any more")
    RTCRtpSender._next_encoded_frame = _next_encoded_frame_inline if enabled else _original_next_encoded_frame


# The private attributes aiortc's sender methods use (the inline sender reads some of them).
_SENDER_ATTRIBUTES = {
    name
    for member in vars(RTCRtpSender).values()
    for code in [getattr(getattr(member, "fget", member), "__code__", None)]
    if code is not None
    for name in code.co_names
    if name.startswith("_RTCRtpSender__")
}


# --- 5. read only: bytes sent, data channel acknowledged ------------------------------------------------------------

OCTET_COUNT_ATTRIBUTE = "_RTCRtpSender__octet_count"


def rtp_bytes_sent(sender: RTCRtpSender | None) -> int:
    """RTP payload bytes the sender has sent (0 before it has)."""
    return getattr(sender, OCTET_COUNT_ATTRIBUTE, 0) if sender is not None else 0


def data_channel_flushed(channel: Any) -> bool:
    """Every message sent on the channel has left and been acknowledged by the peer (or the channel is closed)."""
    if channel.readyState != "open":
        return True
    sctp = channel.transport
    return channel.bufferedAmount == 0 and not sctp._outbound_queue and not sctp._sent_queue


# --- 4. the NTP clock ---------------------------------------------------------------------------------------------

_original_current_ntp_time = aiortc.clock.current_ntp_time
_NTP_UNIX_OFFSET_S = 2208988800  # 1900-01-01 to 1970-01-01


def current_ntp_time() -> int:
    """aiortc.clock.current_ntp_time (64-bit NTP time: seconds since 1900 << 32 | fraction), without datetime."""
    now = time.time() + _NTP_UNIX_OFFSET_S
    seconds = int(now)
    return (seconds << 32) | int((now - seconds) * 4294967296.0)


def speed_up_ntp_clock(enabled: bool = True) -> None:
    """Process-wide; aiortc's modules call it as `clock.current_ntp_time()`, so the module attribute is enough."""
    if not callable(getattr(aiortc.clock, "current_ntp_time", None)):
        raise InternalsMoved("aiortc.clock.current_ntp_time is gone")
    aiortc.clock.current_ntp_time = current_ntp_time if enabled else _original_current_ntp_time


# --- 6. aioice's datagram intake: known sources only, bounded -------------------------------------------------------

MAX_QUEUED_DATAGRAMS = 256  # ~5 s of one call's audio packets waiting for DTLS/SRTP to read them
_original_datagram_received = aioice.ice.StunProtocol.datagram_received
_original_data_received = aioice.ice.Connection.data_received
ice_data_dropped = {"foreign": 0, "overflow": 0}  # process-wide counts of datagrams refused


def _from_checked_peer(protocol: Any, addr: tuple[str, int]) -> bool:
    """Did `addr` prove itself on this socket (a candidate pair of the check list: it sent an authenticated STUN
    request, or answered ours)? The nominated pair first: that is where media comes from."""
    connection = protocol.receiver
    for pair in connection._nominated.values():
        if pair.protocol is protocol and pair.remote_addr == addr:
            return True
    return any(pair.protocol is protocol and pair.remote_addr == addr for pair in connection._check_list)


def _datagram_received(self: Any, data: bytes, addr: tuple[Any, ...]) -> None:
    if data and data[0] > 3:  # not STUN (RFC 7983: DTLS 20-63, SRTP/SRTCP 128-191, anything else is junk)
        addr = (addr[0], addr[1])
        if _from_checked_peer(self, addr):
            self.receiver.data_received(data, self.local_candidate.component)
        else:
            ice_data_dropped["foreign"] += 1
        return
    _original_datagram_received(self, data, addr)


def _bounded_data_received(self: Any, data: bytes, component: int) -> None:
    if self._queue.qsize() < MAX_QUEUED_DATAGRAMS:
        self._queue.put_nowait((data, component))
    else:
        ice_data_dropped["overflow"] += 1


def guard_ice_data(enabled: bool = True) -> None:
    """Process-wide (False restores aioice's own intake)."""
    connection = aioice.ice.Connection
    attributes = connection.__init__.__code__.co_names
    if not hasattr(connection, "data_received") or not {"_queue", "_check_list", "_nominated"} <= set(attributes):
        raise InternalsMoved("aioice's Connection no longer has the queue, check list and nominated pairs")
    if not hasattr(aioice.ice.CandidatePair, "remote_addr"):
        raise InternalsMoved("aioice's CandidatePair.remote_addr is gone")
    aioice.ice.StunProtocol.datagram_received = _datagram_received if enabled else _original_datagram_received
    connection.data_received = _bounded_data_received if enabled else _original_data_received

"""The peer link: the client's side of a call, an aiortc peer connection with its audio tracks and data channel.

Owns: negotiation (offer in, answer out: Opus when offered, else the first of PCMU and PCMA the offer lists; the
inbound packet tap on the receiver, the playout track on the sender, the announced address), the `oai-events` data channel both ways (messages in: size and kind checked,
then handed to `on_text`; events out: held until the channel opens, the client dropped when it stops reading),
the connection's state (failed or closed: `on_gone`), and the byte counts of each.
Must not touch: what an event means (the call and its core decide), the upstream, the records. The audio it
carries goes straight between the tracks and the call's two audio callbacks (`on_audio` for each ~20 ms the
inbound tap decodes, `next_frame` on each playout tick): nothing of this module sits between them.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from typing import Any, Callable

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc import sdp as aiortc_sdp
from aiortc.exceptions import InvalidStateError

from relay.audio.formats import ANSWERED, OPUS, CallAudio
from relay.config import Settings
from relay.core.call import error_event
from relay.webrtc.aiortc_internals import data_channel_flushed, install_packet_tap, rtp_bytes_sent
from relay.webrtc.ice import announce_address, relay_ice_servers
from relay.webrtc.inbound import InboundAudio, PassThroughInbound
from relay.webrtc.playout import PlayoutTrack

log = logging.getLogger("relay.call")

EVENTS_CHANNEL = "oai-events"
MAX_PENDING_CLIENT_EVENTS = 1000  # held until the data channel opens; beyond it, the newest are dropped
MAX_CHANNEL_BUFFER_BYTES = 8 * 1024 * 1024  # unacknowledged data-channel bytes: beyond it the client is not reading


class SetupError(Exception):
    """A call that cannot be set up: the offer is unusable, or the call ended while it was set up (a 400)."""

    status = 400

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


STATIC_RTPMAPS = {"0": "PCMU/8000", "8": "PCMA/8000"}  # RFC 3551: payload types an offer may use unnamed


def with_static_rtpmaps(offer_sdp: str) -> str:
    """The offer with an `a=rtpmap` for each static G.711 payload type its audio m-lines list without one (telephony
    stacks leave them out, as RFC 3551 allows; aiortc only knows codecs that are named)."""
    lines = offer_sdp.splitlines()
    out: list[str] = []
    for index, line in enumerate(lines):
        out.append(line)
        if line.startswith("m=audio "):
            section = _section(lines, index)
            named = {l.split()[0].removeprefix("a=rtpmap:") for l in section if l.startswith("a=rtpmap:")}
            out += [f"a=rtpmap:{pt} {STATIC_RTPMAPS[pt]}" for pt in line.split()[3:]
                    if pt in STATIC_RTPMAPS and pt not in named]
    return "\r\n".join(out) + "\r\n" if out != lines else offer_sdp


def _section(lines: list[str], m_line: int) -> list[str]:
    """The lines of the media section that starts at `m_line`."""
    end = next((i for i in range(m_line + 1, len(lines)) if lines[i].startswith("m=")), len(lines))
    return lines[m_line + 1:end]


def offered_audio(offer_sdp: str) -> CallAudio | None:
    """The call's audio for this offer: Opus if its first audio m-line lists it (whatever else it lists), else the
    first of PCMU and PCMA it lists (in its order of preference), else None: nothing the relay answers. An offer that
    cannot be read is Opus's: negotiation then says what is wrong with it."""
    try:
        media = [m for m in aiortc_sdp.SessionDescription.parse(offer_sdp).media if m.kind == "audio"]
    except Exception:  # aiortc reports bad SDP with several exception types
        return OPUS
    if not media:
        return OPUS
    names = [codec.mimeType.lower().removeprefix("audio/") for codec in media[0].rtp.codecs]
    if "opus" in names:
        return OPUS
    return next((ANSWERED[name] for name in names if name in ("pcmu", "pcma")), None)


class PeerLink:
    def __init__(self, call_id: str, settings: Settings, started_at: float, on_audio: Callable[[bytes], None],
                 next_frame: Callable[[], bytes | None], on_text: Callable[[str], None],
                 on_gone: Callable[[str], None], audio: CallAudio = OPUS) -> None:
        self.call_id = call_id
        self.settings = settings
        self.audio = audio
        self._started_at = started_at
        self._on_text = on_text
        self._on_gone = on_gone
        self.inbound = PassThroughInbound(on_audio, audio, reorder_window=settings.reorder_window) \
            if audio.passthrough else InboundAudio(on_audio, reorder_window=settings.reorder_window)
        self.track = PlayoutTrack(next_frame, audio)
        self.pc: RTCPeerConnection | None = None
        self.channel: Any = None
        self._sender: RTCRtpSender | None = None
        self.pending: deque[str] = deque()  # events for the client until its data channel opens
        self.dropped_events = 0
        self.last_message_at: float | None = None
        self.bytes_in = self.bytes_out = 0  # data-channel text, both ways

    async def negotiate(self, offer_sdp: str) -> str:
        """The answer SDP to the client's offer (SetupError when none can be made)."""
        servers = [RTCIceServer(**server) for server in relay_ice_servers(self.settings, self.call_id, time.time())]
        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))  # [] means none, not Google's
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)
        # The call's one codec, on a transceiver made before the offer is applied (aiortc fixes an answer's codecs
        # then). No telephone-event: the relay does not read it. The offer's first audio m-line takes it, sendrecv.
        transceiver = pc.addTransceiver(self.track, direction="sendrecv")
        transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs
                                         if c.mimeType.lower() == "audio/" + self.audio.codec])
        try:
            check_media_ids(offer_sdp)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc reports bad SDP with several exception types
            raise SetupError("invalid_offer", f"The SDP offer could not be used: {exc}"[:300]) from None
        if transceiver.mid is None:
            raise SetupError("invalid_offer", "The SDP offer has no audio m-line.")
        install_packet_tap(transceiver.receiver, self.inbound)
        self._sender = transceiver.sender
        try:
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            raise SetupError("invalid_offer", f"No answer can be made to this offer: {exc}"[:300]) from None
        if self.audio.clock not in pc.localDescription.sdp.lower():
            raise SetupError("invalid_offer", f"The SDP offer does not offer {self.audio.codec.upper()} audio "
                             f"({self.audio.clock}) on its first audio m-line.")
        if self.settings.announced_ip:  # the address clients reach through the NAT in front (ports kept)
            return announce_address(pc.localDescription.sdp, self.settings.announced_ip)
        return pc.localDescription.sdp

    @property
    def rtp_bytes_sent(self) -> int:
        return rtp_bytes_sent(self._sender)

    # --- the data channel, in ----------------------------------------------------------------------------------

    def _on_datachannel(self, channel: Any) -> None:
        if channel.label != EVENTS_CHANNEL or self.channel is not None:
            return  # OpenAI's interface has one channel; others are ignored
        self.channel = channel
        channel.on("message", self.on_message)
        while self.pending:
            self._send(self.pending.popleft())

    def on_message(self, message: str | bytes) -> None:
        """A client message. Runs inside aiortc's SCTP loop: nothing may escape from here."""
        try:
            self.last_message_at = time.monotonic()
            self.bytes_in += len(message)
            if isinstance(message, bytes):
                self.send_text(_json(error_event(
                    "invalid_event", "Binary messages are not supported: send events as JSON text.")))
            elif _utf8_size(message) > self.settings.max_message_bytes:
                self.send_text(_json(error_event(
                    "message_too_large", f"Data-channel messages are limited to {self.settings.max_message_bytes} "
                    "bytes (RELAY_MAX_MESSAGE_BYTES).")))
            else:
                self._on_text(message)
        except Exception:
            log.exception("call %s: failed on a client message", self.call_id, extra={"call_id": self.call_id})
            self.send_text(_json(error_event("server_error", "The relay failed on this event.", "server_error")))

    # --- the data channel, out ---------------------------------------------------------------------------------

    def told(self, event: dict[str, Any], text: str) -> None:
        """The call's events (fanout.py): the client gets each one."""
        self.send_text(text)

    def send_text(self, text: str) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self._send(text)
        elif len(self.pending) < MAX_PENDING_CLIENT_EVENTS:
            self.pending.append(text)  # the first events (session.created) are never the ones dropped
        else:
            self.dropped_events += 1

    def _send(self, text: str) -> None:
        try:
            try:
                self.channel.send(text)
                self.bytes_out += len(text)
            except ValueError:  # larger than the client's max-message-size
                self.dropped_events += 1
                self.channel.send(json.dumps(error_event(
                    "event_too_large", f"An event of {len(text)} bytes was too large for the data channel and was "
                    "dropped.", "server_error")))
        except InvalidStateError:
            return  # the channel closed: the call is ending
        if self.channel.bufferedAmount > MAX_CHANNEL_BUFFER_BYTES:
            self._on_gone("client not reading its data channel")

    def flushed(self) -> bool:
        """Everything sent on the data channel has been acknowledged (or there is no channel)."""
        return self.channel is None or data_channel_flushed(self.channel)

    # --- the connection ----------------------------------------------------------------------------------------

    async def _on_connection_state(self) -> None:
        if self.pc is not None and self.pc.connectionState in ("failed", "closed"):
            self._on_gone(f"peer connection {self.pc.connectionState}")
        elif self.pc is not None and self.pc.connectionState == "connected":
            log.info("call %s connected", self.call_id, extra={
                "call_id": self.call_id, "event": "connected",
                "setup_ms": round((time.monotonic() - self._started_at) * 1000)})

    async def close(self) -> None:
        self.track.stop()
        if self.pc is not None:
            try:
                await self.pc.close()
            except Exception:  # aiortc may fail half-way on a peer it did not finish setting up
                log.warning("call %s: the peer connection did not close cleanly", self.call_id, exc_info=True,
                            extra={"call_id": self.call_id})


def check_media_ids(offer_sdp: str) -> None:
    """Every m-section has its own a=mid and a BUNDLE group names only those (browsers always do so): aiortc takes
    an offer without them, then fails inside its own tasks, and even in RTCPeerConnection.close()."""
    description = aiortc_sdp.SessionDescription.parse(offer_sdp)
    mids = [media.rtp.muxId for media in description.media]
    if not all(mids) or len(set(mids)) != len(mids):
        raise ValueError("every m-section needs an a=mid of its own")
    for group in description.group:
        if not set(group.items) <= set(mids):
            raise ValueError(f"a=group:{group.semantic} names a mid that no m-section has")


def _json(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"))


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))

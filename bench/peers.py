"""Benchmark client peers: real aiortc peers that post a raw SDP offer and log every RTP packet they receive.

The receiving side is measured at the packet: aiortc's jitter buffer is swapped for a `PacketLog` (the relay's own
packet-tap hook), which notes each packet's arrival time and, when asked, decodes it. So times are not blurred by
the client's own 80 ms buffer, and every target (relay, Pipecat, a bare aiortc echo) is seen the same way.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription

from relay.webrtc.aiortc_internals import install_packet_tap

FRAME = 960  # 20 ms at 48 kHz


class PacketLog:
    """aiortc's jitter-buffer interface: every received audio packet's arrival time, and its audio if decoding."""

    def __init__(self, decode: bool) -> None:
        self.times: list[float] = []
        self.pcm: list[np.ndarray] = []  # 48 kHz mono, one array per packet (when decoding)
        self._decoder = None
        if decode:
            self._decoder = av.CodecContext.create("libopus", "r")
            self._decoder.sample_rate, self._decoder.layout, self._decoder.format = 48000, "stereo", "s16"

    def add(self, packet: Any) -> tuple[bool, None]:
        self.times.append(time.monotonic())
        if self._decoder is not None:
            frames = self._decoder.decode(av.Packet(packet._data))
            pcm = [f.to_ndarray().reshape(-1, 2)[:, 0] for f in frames]
            self.pcm.append(np.concatenate(pcm).astype("<i2") if pcm else np.zeros(FRAME, "<i2"))
        return False, None

    def sample_times(self) -> tuple[np.ndarray, np.ndarray]:
        """All decoded audio, and for each sample the arrival time of its packet."""
        audio = np.concatenate(self.pcm) if self.pcm else np.zeros(0, "<i2")
        times = np.repeat(np.asarray(self.times[: len(self.pcm)]), [p.size for p in self.pcm])
        return audio, times


class PrecodedVoice(MediaStreamTrack):
    """A microphone that costs the load generator almost nothing: Opus packets encoded once, sent in a loop in
    real time (aiortc packs pre-encoded packets without encoding)."""

    kind = "audio"

    def __init__(self, packets: list[bytes]) -> None:
        super().__init__()
        self._packets = packets
        self._index = 0
        self._start: float | None = None

    async def recv(self) -> av.Packet:
        if self._start is None:
            self._start = time.monotonic()
        delay = self._start + self._index * 0.02 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        packet = av.Packet(self._packets[self._index % len(self._packets)])
        packet.pts, packet.time_base = self._index * FRAME, fractions.Fraction(1, 48000)
        self._index += 1
        return packet


def encode_opus(pcm48: np.ndarray) -> list[bytes]:
    """20 ms Opus packets of 48 kHz mono audio, as a browser would send speech (stereo layout, 32 kb/s)."""
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format, encoder.bit_rate = 48000, "stereo", "s16", 32000
    packets = []
    for start in range(0, pcm48.size - FRAME + 1, FRAME):
        frame = av.AudioFrame.from_ndarray(np.repeat(pcm48[start : start + FRAME], 2).reshape(1, -1),
                                           format="s16", layout="stereo")
        frame.sample_rate, frame.pts = 48000, start
        packets += [bytes(p) for p in encoder.encode(frame)]
    return packets


@dataclass
class BenchCall:
    pc: RTCPeerConnection
    log: PacketLog
    channel: Any = None  # the `oai-events` data channel
    events: list[dict[str, Any]] = field(default_factory=list)
    event_times: list[float] = field(default_factory=list)

    async def close(self) -> None:
        await self.pc.close()


async def connect(url: str, track: MediaStreamTrack, *, decode: bool, http: aiohttp.ClientSession,
                  codec: str | None = None, log: PacketLog | None = None) -> BenchCall:
    """Offer audio and an `oai-events` data channel (as OpenAI's clients do) to `url`; raise if it does not
    answer 201 with SDP. `codec` (e.g. "pcmu"): offer that audio codec only; `log`: what records the packets
    received (default: a PacketLog for Opus)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("oai-events")
    pc.addTrack(track)
    (transceiver,) = pc.getTransceivers()
    if codec is not None:
        transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs
                                         if c.mimeType.lower() == f"audio/{codec}"])
    call = BenchCall(pc, log or PacketLog(decode), channel)
    install_packet_tap(transceiver.receiver, call.log)

    @channel.on("message")
    def on_message(message: str) -> None:
        call.events.append(json.loads(message))
        call.event_times.append(time.monotonic())

    await pc.setLocalDescription(await pc.createOffer())
    async with http.post(url, data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}) as response:
        body = await response.text()
        if response.status != 201:
            await pc.close()
            raise RuntimeError(f"{url} answered {response.status}: {body[:300]}")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
    return call

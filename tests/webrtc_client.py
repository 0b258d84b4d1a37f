"""A WebRTC client for tests: a real aiortc peer that talks to the relay like OpenAI's own clients do.

It sends a speech file as its microphone (paced in real time, then silence), opens the `oai-events` data channel,
posts its offer to `POST /v1/realtime/calls`, and records the audio and events it receives, with arrival times.
By default it offers what a browser offers (Opus first); `codecs` narrows the offer, e.g. to G.711 only as a SIP
gateway or a softphone does (aiortc's own PCMU/PCMA encoder then takes the 48 kHz microphone down to 8 kHz).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import re
import time
import wave
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.rtp import RtpPacket
from av import AudioFrame

from relay.webrtc.aiortc_internals import JITTER_BUFFER_ATTRIBUTE, install_packet_tap
from relay.webrtc.inbound import InboundAudio
from tests.helpers import FIXTURES
from tests.oracle import check_server_event

RATE = 48000
FRAME = 960  # 20 ms at 48 kHz


def load_pcm48(name: str) -> np.ndarray:
    with wave.open(str(FIXTURES / name)) as wav:
        assert (wav.getframerate(), wav.getnchannels()) == (RATE, 1)
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")


def silence48(ms: int) -> np.ndarray:
    return np.zeros(ms * 48, dtype="<i2")


class Microphone(MediaStreamTrack):
    """Plays queued 48 kHz mono audio in real time, 20 ms per frame, then silence; notes when each frame left."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue = np.zeros(0, dtype="<i2")
        self._start: float | None = None
        self._index = 0
        self.sent_samples = 0  # samples sent so far (all frames, silence included)
        self.marks: dict[str, float] = {}  # label -> the time its first frame was handed over
        self._pending_marks: list[tuple[int, str]] = []

    def say(self, pcm: np.ndarray, mark: str | None = None) -> None:
        if mark is not None:
            self._pending_marks.append((self.sent_samples + self._queue.size, mark))
        self._queue = np.concatenate((self._queue, pcm))

    def position(self) -> int:
        """The sample (48 kHz, counted from the call's first frame) at which audio said now will start."""
        return self.sent_samples + self._queue.size

    def say_between(self, pcm: np.ndarray, lead_ms: int, tail_ms: int) -> None:
        """One utterance: silence, `pcm`, silence (enough for the VAD to end the turn)."""
        self.say(silence48(lead_ms))
        self.say(pcm)
        self.say(silence48(tail_ms))

    async def recv(self) -> AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        delay = self._start + self._index * 0.02 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        chunk, self._queue = self._queue[:FRAME], self._queue[FRAME:]
        if chunk.size < FRAME:
            chunk = np.concatenate((chunk, np.zeros(FRAME - chunk.size, dtype="<i2")))
        for position, label in list(self._pending_marks):
            if position < self.sent_samples + FRAME:
                self.marks[label] = time.monotonic()
                self._pending_marks.remove((position, label))
        frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._index * FRAME
        frame.time_base = fractions.Fraction(1, RATE)
        self._index += 1
        self.sent_samples += FRAME
        return frame


@dataclass(frozen=True)
class RtpSeen:
    """One RTP packet as a peer sent or received it (its plain header and payload, before SRTP / after it)."""

    time: float  # monotonic
    payload_type: int
    sequence_number: int
    timestamp: int
    payload: bytes


class ReceivedPackets:
    """aiortc's jitter-buffer interface, in front of the receiver's own jitter buffer: notes every depayloaded
    audio packet (`log`) and hands it on, so the client still plays what it gets."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.log: list[RtpSeen] = []

    def add(self, packet: Any) -> Any:
        self.log.append(RtpSeen(time.monotonic(), packet.payload_type, packet.sequence_number, packet.timestamp,
                                bytes(packet.payload)))
        return self._inner.add(packet)


class OutboundRtp:
    """Stands between the client's audio sender and its DTLS transport (which encrypts and sends): notes every RTP
    packet the sender hands over (`sent`: what left) and drops the ones planned (`dropped`), as a lossy network
    would: after the sender numbered and timestamped them. RTCP and everything else pass untouched."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.sent: list[RtpSeen] = []
        self.dropped: list[RtpSeen] = []
        self.count = 0  # RTP packets handed over so far (sent or dropped)
        self._drops: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def drop(self, after: int, every: int, count: int) -> None:
        """Drop `count` packets, `every` apart, the first `after` packets from now."""
        self._drops |= {self.count + after + every * i for i in range(count)}

    @property
    def drops_pending(self) -> int:
        return len(self._drops)

    async def _send_rtp(self, data: bytes) -> None:
        if len(data) >= 12 and data[0] >> 6 == 2 and not 192 <= data[1] <= 223:  # RTP, not RTCP (RFC 5761)
            packet = RtpPacket.parse(data)
            seen = RtpSeen(time.monotonic(), packet.payload_type, packet.sequence_number, packet.timestamp,
                           bytes(packet.payload))
            index, self.count = self.count, self.count + 1
            if index in self._drops:
                self._drops.discard(index)
                self.dropped.append(seen)
                return
            self.sent.append(seen)
        await self._inner._send_rtp(data)


def negotiated_codec(answer_sdp: str) -> tuple[str, int] | None:
    """The audio codec an answer chose (the first payload type on its audio m-line): (name in lower case, clock
    rate), or None if the answer names none."""
    formats = re.search(r"^m=audio \d+ \S+ (\d+)", answer_sdp, re.M)
    rtpmap = formats and re.search(rf"^a=rtpmap:{formats.group(1)} ([\w.-]+)/(\d+)", answer_sdp, re.M)
    return (rtpmap.group(1).lower(), int(rtpmap.group(2))) if rtpmap else None


@dataclass
class ClientCall:
    pc: RTCPeerConnection
    channel: Any
    mic: Microphone
    call_id: str
    location: str
    answer_sdp: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    event_times: list[float] = field(default_factory=list)
    codec: str = "opus"  # what the answer chose: "opus", "pcmu", "pcma"
    rate: int = RATE  # of the received audio and its RTP clock: 48000 (Opus), 8000 (G.711)
    audio: list[np.ndarray] = field(default_factory=list)  # received mono frames at `rate`
    audio_times: list[float] = field(default_factory=list)
    audio_pts: list[int] = field(default_factory=list)  # RTP timestamps (at `rate`) of the received frames
    packets: ReceivedPackets | None = None  # with `log_packets`: every audio RTP packet received
    outbound: OutboundRtp | None = None  # after tap_outbound(): every audio RTP packet sent (and drops)
    concealed: list[bytes] = field(default_factory=list)  # with `conceal`: 24 kHz PCM16, losses concealed
    receiver: Any = None  # with `conceal`: the InboundAudio the received packets go through
    _new_event: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def send(self, event: dict[str, Any] | str) -> None:
        self.channel.send(event if isinstance(event, str) else json.dumps(event))

    def received(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, dtype="<i2")

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def tap_outbound(self) -> OutboundRtp:
        """Put an OutboundRtp between the audio sender and its transport (once the answer is applied)."""
        if self.outbound is None:
            (sender,) = [t.sender for t in self.pc.getTransceivers() if t.kind == "audio"]
            self.outbound = OutboundRtp(sender.transport)
            setattr(sender, "_RTCRtpSender__transport", self.outbound)
        return self.outbound

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool] | str, timeout: float = 15.0,
                       after: int = 0) -> dict[str, Any]:
        """The first event (from index `after`) matching `predicate` (or of that type), waiting if needed."""
        test = (lambda e: e["type"] == predicate) if isinstance(predicate, str) else predicate
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events[after:]:
                    if test(event):
                        return event
                self._new_event.clear()
                await self._new_event.wait()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()


# Posts an offer SDP and returns (answer SDP, Location), e.g. through an SDK.
Poster = Callable[[str], Awaitable[tuple[str, str]]]


def strip_candidates(sdp: str) -> str:
    """An offer as OpenAI's JavaScript SDK may send it: before ICE gathering, with no candidates."""
    return "".join(line for line in sdp.splitlines(keepends=True) if not line.startswith(("a=candidate", "a=end-of-candidates")))


async def call_relay(base_url: str, mutate_offer: Callable[[str], str] = lambda s: s,
                     session: dict[str, Any] | None = None, http: aiohttp.ClientSession | None = None,
                     resume: str | None = None, headers: dict[str, str] | None = None,
                     on_answer: Callable[[str], Awaitable[None]] | None = None, strict: bool = True,
                     conceal: bool = False, post: Poster | None = None, codecs: list[str] | None = None,
                     log_packets: bool = False) -> ClientCall:
    """Connect a client peer to the relay; raises AssertionError with the body if it does not answer 201.
    `post`: sends the offer another way (an SDK) instead of aiohttp to `base_url` with `session`, `http`, `resume`
    and `headers`; whatever it raises is raised here, the peer closed.
    `on_answer` is awaited with the answer SDP before the client applies it (and starts its ICE checks).
    `strict`: every event the relay passes on must be a valid GA event (False: an upstream that sends garbage).
    `conceal`: receive like a browser (a jitter buffer that reorders and Opus loss concealment, here the relay's
    own inbound path with an 80 ms window) into `concealed`, instead of aiortc's receiver into `audio`.
    `codecs`: offer only these audio codecs, in this order (names as in the SDP: "PCMU", "PCMA", "opus", "G722");
    None: aiortc's default offer. The answer's choice is `codec`, and `rate` the rate of the audio received.
    `log_packets`: note every audio RTP packet received in `packets` (aiortc's receiver still plays them)."""
    if conceal and (log_packets or codecs is not None):
        raise ValueError("conceal receives Opus through the relay's inbound path: no codecs, no log_packets")
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("oai-events")
    mic = Microphone()
    pc.addTrack(mic)
    call = ClientCall(pc, channel, mic, "", "")
    (transceiver,) = [t for t in pc.getTransceivers() if t.kind == "audio"]
    if codecs is not None:
        available = RTCRtpSender.getCapabilities("audio").codecs
        chosen = [next((c for c in available if c.mimeType.lower() == f"audio/{name.lower()}"), None) for name in codecs]
        if not codecs or None in chosen:
            await pc.close()
            raise ValueError(f"aiortc cannot offer {codecs}: it has {[c.mimeType for c in available]}")
        transceiver.setCodecPreferences(chosen)
    if log_packets:
        call.packets = ReceivedPackets(getattr(transceiver.receiver, JITTER_BUFFER_ATTRIBUTE))
        install_packet_tap(transceiver.receiver, call.packets)

    def on_message(message: str) -> None:
        event = json.loads(message)
        if strict and not event["type"].startswith("relay."):  # the relay's own events; the rest are OpenAI's
            check_server_event(event)
        call.events.append(event)
        call.event_times.append(time.monotonic())
        call._new_event.set()

    channel.on("message", on_message)

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        if conceal:
            (receiver,) = [t.receiver for t in pc.getTransceivers() if t.receiver.track is track]
            call.receiver = InboundAudio(call.concealed.append, reorder_window=4)
            install_packet_tap(receiver, call.receiver)
            return
        async def record() -> None:
            with contextlib.suppress(Exception):
                while True:
                    frame = await track.recv()
                    samples = frame.to_ndarray().reshape(-1, 2)[:, 0] if frame.layout.name == "stereo" else frame.to_ndarray().ravel()
                    call.audio.append(samples.astype("<i2"))
                    call.audio_times.append(time.monotonic())
                    call.audio_pts.append(frame.pts)
        call._tasks.append(asyncio.ensure_future(record()))

    await pc.setLocalDescription(await pc.createOffer())
    sdp = mutate_offer(pc.localDescription.sdp)
    try:
        posting = post(sdp) if post is not None else _post_offer(base_url, sdp, session, http, resume, headers)
        call.answer_sdp, call.location = await posting
        call.call_id = re.fullmatch(r"/v1/realtime/calls/(rtc_\w+)", call.location).group(1)
        if on_answer is not None:
            await on_answer(call.answer_sdp)
        call.codec, call.rate = negotiated_codec(call.answer_sdp) or (call.codec, call.rate)
    except BaseException:
        await pc.close()
        raise
    await pc.setRemoteDescription(RTCSessionDescription(sdp=call.answer_sdp, type="answer"))
    return call


async def _post_offer(base_url: str, sdp: str, session: dict[str, Any] | None, http: aiohttp.ClientSession | None,
                      resume: str | None, headers: dict[str, str] | None) -> tuple[str, str]:
    """POST the offer (raw, or multipart with `session`): (answer SDP, Location); AssertionError unless 201."""
    owned = http is None
    http = http or aiohttp.ClientSession()
    try:
        params = {"resume": resume} if resume else None
        if session is None:
            request = http.post(f"{base_url}/v1/realtime/calls", data=sdp, params=params,
                                headers={"Content-Type": "application/sdp", **(headers or {})})
        else:
            form = aiohttp.FormData()
            form.add_field("sdp", sdp, content_type="application/sdp")
            form.add_field("session", json.dumps(session), content_type="application/json")
            request = http.post(f"{base_url}/v1/realtime/calls", data=form, params=params, headers=headers)
        async with request as response:
            body = await response.text()
            if response.status != 201:
                raise AssertionError(f"relay answered {response.status}: {body}")
            assert response.content_type == "application/sdp"
            return body, response.headers["Location"]
    finally:
        if owned:
            await http.close()

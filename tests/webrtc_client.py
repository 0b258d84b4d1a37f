"""A WebRTC client for tests: a real aiortc peer that talks to the relay like OpenAI's own clients do.

It sends a speech file as its microphone (paced in real time, then silence), opens the `oai-events` data channel,
posts its offer to `POST /v1/realtime/calls`, and records the audio and events it receives, with arrival times.
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
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from av import AudioFrame

from relay.webrtc.aiortc_internals import install_packet_tap
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
    audio: list[np.ndarray] = field(default_factory=list)  # received 48 kHz mono frames
    audio_times: list[float] = field(default_factory=list)
    audio_pts: list[int] = field(default_factory=list)  # RTP timestamps (48 kHz) of the received frames
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
                     conceal: bool = False, post: Poster | None = None) -> ClientCall:
    """Connect a client peer to the relay; raises AssertionError with the body if it does not answer 201.
    `post`: sends the offer another way (an SDK) instead of aiohttp to `base_url` with `session`, `http`, `resume`
    and `headers`; whatever it raises is raised here, the peer closed.
    `on_answer` is awaited with the answer SDP before the client applies it (and starts its ICE checks).
    `strict`: every event the relay passes on must be a valid GA event (False: an upstream that sends garbage).
    `conceal`: receive like a browser (a jitter buffer that reorders and Opus loss concealment, here the relay's
    own inbound path with an 80 ms window) into `concealed`, instead of aiortc's receiver into `audio`."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("oai-events")
    mic = Microphone()
    pc.addTrack(mic)
    call = ClientCall(pc, channel, mic, "", "")

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

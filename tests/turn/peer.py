"""An aiortc client for the TURN gateway's world, run inside a client namespace (gateway.py):

    ip netns exec NS python -m tests.turn.peer --base http://10.77.2.1:8080 --key sk-… [--turn] [--speak] [--calls N]

Each call: GET /relay/client-config with the key (the relay mints a TURN credential for a caller who may create
calls), a peer with those ICE servers (`--turn`; without it none, host candidates only), the offer posted, the ICE
and DTLS states and the first audio frame timed from the POST, then (`--speak`) a spoken turn and the echo heard,
then a hangup. aiortc has no iceTransportPolicy; inside the client namespace its host candidates reach nothing but
the gateway, so a call that connects went through TURN, and the nominated pair says so. One JSON line per call on
stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from typing import Any

import aiohttp
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from tests.audio_checks import loud_ms
from tests.webrtc_client import Microphone, load_pcm48, strip_candidates

HELLO48 = load_pcm48("speech_hello_48k.wav")


def _ms(start: float, end: float | None) -> float | None:
    return None if end is None else round((end - start) * 1000, 1)


def _candidates(sdp: str) -> list[dict[str, Any]]:
    found = []
    for line in sdp.splitlines():
        bits = line.split()
        if line.startswith("a=candidate:") and len(bits) >= 8:
            found.append({"address": bits[4], "port": int(bits[5]), "type": bits[7]})
    return found


def _nominated(pc: RTCPeerConnection) -> dict[str, Any] | None:
    """The pair aioice nominated (aiortc exposes no candidate-pair stats): its local and remote candidates."""
    (transceiver,) = pc.getTransceivers()
    connection = transceiver.sender.transport.transport._connection  # RTCIceTransport -> aioice.Connection
    pair = connection._nominated.get(1)
    if pair is None:
        return None
    local, remote = pair.local_candidate, pair.remote_candidate
    return {"local": {"type": local.type, "address": local.host, "port": local.port},
            "remote": {"type": remote.type, "address": remote.host, "port": remote.port}}


async def one_call(http: aiohttp.ClientSession, base: str, key: str, turn: bool, speak: bool,
                   connect_timeout: float, strip: bool = False) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {key}"}
    async with http.get(f"{base}/relay/client-config", headers=auth) as response:
        config = await response.json()
    servers = [RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
               for s in config["ice_servers"]] if turn else []
    result: dict[str, Any] = {"turn": turn, "ice_servers": [s.get("urls") for s in config["ice_servers"]],
                              "turn_username": next((s["username"] for s in config["ice_servers"] if "username" in s),
                                                    None),
                              "connected": False, "events": []}
    start = time.monotonic()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
    channel = pc.createDataChannel("oai-events")
    mic = Microphone()
    pc.addTrack(mic)
    times: dict[str, float] = {}
    ice_done, connected, failed, first_frame = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
    events: list[dict[str, Any]] = result["events"]
    new_event = asyncio.Event()
    audio: list[np.ndarray] = []
    audio_times: list[float] = []
    tasks: list[asyncio.Task] = []

    @pc.on("iceconnectionstatechange")
    def on_ice() -> None:
        if pc.iceConnectionState == "completed":
            times.setdefault("ice", time.monotonic())
            ice_done.set()
        elif pc.iceConnectionState == "failed":
            failed.set()

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState == "connected":
            times.setdefault("connected", time.monotonic())
            connected.set()
        elif pc.connectionState == "failed":
            failed.set()

    @channel.on("message")
    def on_message(message: str) -> None:
        events.append(json.loads(message))
        new_event.set()

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        async def record() -> None:
            with contextlib.suppress(Exception):
                while True:
                    frame = await track.recv()
                    times.setdefault("first_frame", time.monotonic())
                    first_frame.set()
                    samples = frame.to_ndarray().reshape(-1)
                    if frame.layout.name == "stereo":
                        samples = samples.reshape(-1, 2)[:, 0]
                    audio.append(samples.astype("<i2"))
                    audio_times.append(time.monotonic())
        tasks.append(asyncio.ensure_future(record()))

    async def wait_for(event_type: str, timeout: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(timeout):
                while not any(e.get("type") == event_type for e in events):
                    new_event.clear()
                    await new_event.wait()
                return True
        return False

    location = None
    try:
        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers everything here (TURN included)
        offer = strip_candidates(pc.localDescription.sdp) if strip else pc.localDescription.sdp
        result["offer_candidates"] = _candidates(offer)
        posted = time.monotonic()
        result["gather_ms"] = _ms(start, posted)
        async with http.post(f"{base}/v1/realtime/calls", data=offer,
                             headers={**auth, "Content-Type": "application/sdp"}) as response:
            body = await response.text()
            result["status"] = response.status
            if response.status != 201:
                result["error"] = body[:500]
                return result
            location = response.headers["Location"]
        answered = time.monotonic()
        result["call_id"] = re.fullmatch(r"/v1/realtime/calls/(rtc_\w+)", location).group(1)
        result["answer_candidates"] = _candidates(body)
        result["post_ms"] = _ms(posted, answered)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(connect_timeout):
                waiting = [asyncio.ensure_future(connected.wait()), asyncio.ensure_future(failed.wait())]
                try:
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in waiting:
                        task.cancel()
        result.update(ice_state=pc.iceConnectionState, connection_state=pc.connectionState,
                      connected=connected.is_set(), pair=_nominated(pc))
        result["ice_ms"] = _ms(posted, times.get("ice"))  # offer POST -> ICE connected
        result["connected_ms"] = _ms(posted, times.get("connected"))  # -> DTLS done: the call's media may flow
        result["from_start_connected_ms"] = _ms(start, times.get("connected"))  # gathering (TURN allocation) too
        if not connected.is_set():
            return result
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(first_frame.wait(), 5)
        result["first_frame_ms"] = _ms(posted, times.get("first_frame"))  # -> the relay's first audio frame here
        if speak:
            result["session_created"] = await wait_for("session.created", 10)
            said = time.monotonic()
            mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)
            result["turn_done"] = await wait_for("output_audio_buffer.stopped", 25)
            heard = np.concatenate([a for a, t in zip(audio, audio_times) if t > said]) if audio else np.zeros(0)
            result["loud_ms_heard"] = len(loud_ms(heard)) * 5 if heard.size else 0
            result["speech_ms_sent"] = HELLO48.size // 48
        return result
    except Exception as exc:  # reported, not raised: the test reads the JSON line
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        result["event_types"] = [e.get("type") for e in events]
        del result["events"]
        if location is not None:
            with contextlib.suppress(Exception):
                async with http.post(f"{base}{location}/hangup", headers=auth) as response:
                    result["hangup_status"] = response.status
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pc.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the relay's HTTP base URL as this namespace reaches it")
    parser.add_argument("--key", required=True)
    parser.add_argument("--turn", action="store_true", help="use the ICE servers of /relay/client-config")
    parser.add_argument("--speak", action="store_true", help="speak a turn and listen for the echo")
    parser.add_argument("--strip", action="store_true",
                        help="post the offer without candidates, as OpenAI's browser SDK does (peer-reflexive)")
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    args = parser.parse_args()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for _ in range(max(1, min(args.calls, 1000))):
            result = await one_call(http, args.base, args.key, args.turn, args.speak, args.connect_timeout,
                                    args.strip)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)

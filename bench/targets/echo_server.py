"""The direct path: a bare aiortc peer that sends back the audio it receives (decode, re-encode), stock aiortc.

    python bench/targets/echo_server.py [--port 0]

No relay and no upstream: the baseline for added latency and fidelity. `POST /offer` takes a raw SDP offer and
answers 201 with the SDP answer, like the relay's `POST /v1/realtime/calls`. ICE gathers on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from relay.webrtc.aiortc_internals import restrict_host_addresses  # noqa: E402

PEERS: web.AppKey[set[RTCPeerConnection]] = web.AppKey("peers")


async def offer(request: web.Request) -> web.Response:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    request.app[PEERS].add(pc)
    media = MediaRelay()

    @pc.on("track")
    def on_track(track):
        pc.addTrack(media.subscribe(track))

    @pc.on("connectionstatechange")
    async def on_state():
        if pc.connectionState in ("failed", "closed"):
            request.app[PEERS].discard(pc)
            await pc.close()

    await pc.setRemoteDescription(RTCSessionDescription(await request.text(), "offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    return web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    restrict_host_addresses(["127.0.0.1"])
    app = web.Application()
    app[PEERS] = set()
    app.router.add_post("/offer", offer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    print(f"listening on http://127.0.0.1:{runner.addresses[0][1]}/offer", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())

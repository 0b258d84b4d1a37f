"""Datagrams from foreign sources at a call's ports, during ICE and after: the call goes on and nothing piles up
(aioice alone would queue every non-STUN datagram from anyone, unbounded; relay/webrtc/aiortc_internals.py, 6)."""

from __future__ import annotations

import asyncio
import os
import re
import socket

from relay.webrtc.aiortc_internals import MAX_QUEUED_DATAGRAMS, ice_data_dropped
from relay.server.calls import CALLS
from tests.integration.test_webrtc_call import HELLO48, _serve, relay_settings
from tests.webrtc_client import call_relay

FLOOD_DATAGRAMS = 40_000  # bounded: the flood stops by itself
KINDS = [
    bytes([0x80, 0x6F]) + os.urandom(158),  # looks like RTP (Opus payload type)
    bytes([0x81, 0xC8]) + os.urandom(50),  # looks like RTCP
    bytes([0x16, 0xFE, 0xFD]) + os.urandom(100),  # looks like a DTLS handshake record
    bytes([0x15, 0xFE, 0xFD, 0, 0]) + os.urandom(20),  # a DTLS alert
    bytes([0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42]) + os.urandom(12),  # a STUN request without integrity
    os.urandom(1200),
    os.urandom(60_000),  # a large datagram
]


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1))


async def flood(ports: list[int], stop: asyncio.Event) -> int:
    """Send garbage from a foreign address (another port of this machine) to the relay's candidate ports."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sent = 0
    try:
        while sent < FLOOD_DATAGRAMS and not stop.is_set():
            for port in ports:
                try:
                    sock.sendto(KINDS[sent % len(KINDS)], ("127.0.0.1", port))
                except BlockingIOError:
                    pass
                sent += 1
            if sent % 200 == 0:
                await asyncio.sleep(0.005)  # let the relay run: ~40,000 datagrams a second at most
    finally:
        sock.close()
    return sent


def ice_connection(call):
    (transceiver,) = [t for t in call.pc.getTransceivers() if t.kind == "audio"]
    return transceiver.receiver.transport.transport._connection


async def test_foreign_datagrams_during_and_after_ice_are_dropped_and_the_call_goes_on(simulator):
    app, runner, url = await _serve(relay_settings(simulator.url + "?model=gpt-realtime"))
    stop = asyncio.Event()
    flooding: list[asyncio.Task] = []
    queued: list[int] = []

    async def on_answer(answer: str) -> None:
        # Before the client applies the answer, so the flood starts while ICE has not even begun.
        ports = sorted({int(m) for m in re.findall(r"a=candidate:\S+ 1 udp \d+ 127\.0\.0\.1 (\d+) typ host", answer)})
        assert ports
        flooding.append(asyncio.create_task(flood(ports, stop)))
        await asyncio.sleep(0.3)

    before = dict(ice_data_dropped)
    rss_before = rss_kib()
    try:
        call = await call_relay(url, on_answer=on_answer)
        try:
            (relay_call,) = app[CALLS].values()
            connection = ice_connection(relay_call.peer)
            await call.wait_for("session.created")
            call.mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)
            while not any(e["type"] == "response.done" for e in call.events):
                queued.append(connection._queue.qsize())
                await asyncio.sleep(0.05)
                assert len(queued) < 600, "no reply within 30 s under the flood"
            assert relay_call.close_reason is None and relay_call.peer.pc.connectionState == "connected"
            sent = await flooding[0]  # the rest of the flood lands after ICE, on a live call
            assert relay_call.close_reason is None
            assert relay_call.peer.inbound.stats.packets > 100  # the client's real audio got through all along
        finally:
            await call.close()
    finally:
        stop.set()
        await asyncio.gather(*flooding, return_exceptions=True)
        await runner.cleanup()
    dropped = ice_data_dropped["foreign"] - before["foreign"]
    print(f"\nflood: {sent} datagrams sent, {dropped} refused as foreign, largest ICE queue {max(queued)}, "
          f"RSS {(rss_kib() - rss_before) / 1024:+.1f} MiB")
    assert dropped > sent // 10, (dropped, sent)  # the kernel drops some when its buffer is full; the rest refused
    assert max(queued) <= MAX_QUEUED_DATAGRAMS
    assert rss_kib() - rss_before < 64 * 1024  # 40,000 datagrams of up to 60 kB queued would be gigabytes

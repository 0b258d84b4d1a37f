"""Debian's Chromium inside the TURN gateway's client namespace (gateway.py), driven by Playwright over a pipe (the
test process stays outside the namespace), making a call as a browser app with OpenAI's SDK does: client-config for
the ICE servers (a client secret as its credential), `iceTransportPolicy: "relay"`, the offer posted at once (no
waiting for candidates: the relay learns the client's relayed address from its checks), the `oai-events` channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import wave
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np

from tests.browser.harness import CHROMIUM_FLAGS
from tests.turn.gateway import Gateway

ROOT = Path(__file__).resolve().parents[2]

# Everything in the page: the config, the peer, the offer, then the connection's progress (times from the POST).
CALL = """async ({token, policy, turn, timeoutMs}) => {
  const auth = {Authorization: `Bearer ${token}`};
  const config = await (await fetch("/relay/client-config", {headers: auth})).json();
  const servers = turn ? config.ice_servers : [];
  const result = {turn_username: (servers.find((s) => s.username) || {}).username || null, events: [], times: {}};
  window.turnCall = result;
  const pc = new RTCPeerConnection({iceServers: servers, iceTransportPolicy: policy});
  window.turnPc = pc;
  const stream = await navigator.mediaDevices.getUserMedia({audio: true});
  pc.addTrack(stream.getAudioTracks()[0], stream);
  const channel = pc.createDataChannel("oai-events");
  channel.onmessage = (message) => result.events.push(JSON.parse(message.data));
  pc.ontrack = (event) => {
    const audio = new Audio();
    audio.autoplay = true;
    audio.srcObject = event.streams[0];
    window.turnAudio = audio;
  };
  const start = performance.now();
  await pc.setLocalDescription(await pc.createOffer());
  const posted = performance.now();
  result.times.offer_ms = posted - start;
  const connected = new Promise((resolve) => {
    pc.oniceconnectionstatechange = () => {
      if (pc.iceConnectionState === "connected" && result.times.ice_ms === undefined)
        result.times.ice_ms = performance.now() - posted;
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "connected") { result.times.connected_ms = performance.now() - posted; resolve(true); }
      if (pc.connectionState === "failed") resolve(false);
    };
  });
  const response = await fetch("/v1/realtime/calls", {method: "POST", body: pc.localDescription.sdp,
                                                        headers: {...auth, "Content-Type": "application/sdp"}});
  result.status = response.status;
  const answer = await response.text();
  result.times.post_ms = performance.now() - posted;
  if (response.status !== 201) { result.error = answer; return result; }
  result.location = response.headers.get("Location");
  result.answer_candidates = answer.split(/\\r?\\n/).filter((l) => l.startsWith("a=candidate:"))
    .map((l) => { const b = l.split(" "); return {address: b[4], port: Number(b[5]), type: b[7]}; });
  await pc.setRemoteDescription({type: "answer", sdp: answer});
  result.connected = await Promise.race([connected, new Promise((r) => setTimeout(() => r(false), timeoutMs))]);
  if (result.connected) {  // the first audio packet from the relay (its playout sends from the start), polled
    const until = performance.now() + 3000;
    while (performance.now() < until && result.times.first_packet_ms === undefined) {
      (await pc.getStats()).forEach((s) => {
        if (s.type === "inbound-rtp" && s.kind === "audio" && s.packetsReceived > 0)
          result.times.first_packet_ms = performance.now() - posted;
      });
      await new Promise((r) => setTimeout(r, 10));
    }
  }
  result.ice_state = pc.iceConnectionState;
  result.connection_state = pc.connectionState;
  return result;
}"""

# The selected candidate pair (as the transport reports it) and what the inbound audio carried.
STATS = """async () => {
  const report = await window.turnPc.getStats();
  const out = {pair: null, packets: 0, energy: 0, duration: 0};
  report.forEach((s) => {
    if (s.type === "transport" && s.selectedCandidatePairId) {
      const pair = report.get(s.selectedCandidatePairId);
      const local = report.get(pair.localCandidateId), remote = report.get(pair.remoteCandidateId);
      out.pair = {state: pair.state, bytesSent: pair.bytesSent, bytesReceived: pair.bytesReceived,
                  local: {type: local.candidateType, address: local.address, port: local.port,
                          relayProtocol: local.relayProtocol || null, url: local.url || null},
                  remote: {type: remote.candidateType, address: remote.address, port: remote.port}};
    }
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      out.packets = s.packetsReceived; out.energy = s.totalAudioEnergy; out.duration = s.totalSamplesDuration;
    }
  });
  return out;
}"""


def microphone(tmp: Path) -> Path:
    """Chromium loops a file as its microphone: a second of silence, the speech fixture, 2.5 s of silence."""
    with wave.open(str(ROOT / "tests/fixtures/speech_hello_48k.wav")) as w:
        hello = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    samples = np.concatenate([np.zeros(48000, "<i2"), hello, np.zeros(int(48000 * 2.5), "<i2")])
    path = tmp / "turn-microphone.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(48000)
        w.writeframes(samples.astype("<i2").tobytes())
    return path


@contextlib.asynccontextmanager
async def chromium(gateway: Gateway, mic: Path, ns: str | None = None) -> AsyncIterator[Any]:
    """Chromium in namespace `ns` (default: the client's), `mic` looped as its microphone. Its pages load from the
    relay's HTTP (through the gateway's forwarder, or directly from the benchmark's direct namespace), an http://
    origin that is not loopback: treated as secure for getUserMedia (a deployment serves https)."""
    ns = ns or gateway.client
    base = gateway.relay_url if ns == gateway.client else gateway.direct_relay_url
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(gateway.chromium_wrapper(ns)), headless=True,
            args=CHROMIUM_FLAGS + [f"--use-file-for-fake-audio-capture={mic}",
                                   f"--unsafely-treat-insecure-origin-as-secure={base}"])
        try:
            yield browser
        finally:
            await browser.close()


class BrowserCall:
    """One call from a fresh page of `browser`."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.console_errors: list[str] = []
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        self.result: dict[str, Any] = {}

    @classmethod
    async def start(cls, browser: Any, gateway: Gateway, token: str, policy: str = "relay", turn: bool = True,
                    timeout_s: float = 10.0, base: str | None = None) -> "BrowserCall":
        page = await (await browser.new_context()).new_page()
        call = cls(page)
        await page.route("**/favicon.ico", lambda route: route.fulfill(status=204))  # the relay serves none
        await page.goto((base or gateway.relay_url) + "/healthz")  # any page of the relay's origin: same-origin fetches
        call.result = await page.evaluate(CALL, {"token": token, "policy": policy, "turn": turn,
                                                 "timeoutMs": int(timeout_s * 1000)})
        return call

    async def event_types(self) -> list[str]:
        return await self.page.evaluate("window.turnCall.events.map((e) => e.type)")

    async def wait_for_event(self, event_type: str, timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if event_type in await self.event_types():
                return True
            await asyncio.sleep(0.1)
        return False

    async def stats(self) -> dict[str, Any]:
        return await self.page.evaluate(STATS)

    async def hang_up(self, token: str) -> None:
        """The relay's hangup for the call, then the peer closed (its TURN allocation released)."""
        await self.page.evaluate("""async (token) => {
          if (window.turnCall.location)
            await fetch(window.turnCall.location + "/hangup", {method: "POST",
                                                               headers: {Authorization: `Bearer ${token}`}});
          window.turnPc.close();
        }""", token)

    async def close(self) -> None:
        await self.page.context.close()

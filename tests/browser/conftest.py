"""The browser tests' world: a network namespace with only `lo`, the simulator and `relay serve` inside it, and
Debian's Chromium started inside it too (through a wrapper script), so no WebRTC packet can leave loopback.

Playwright talks to Chromium over a pipe, so the test process itself stays outside the namespace; it reads the
simulator's records through `ip netns exec`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.processes import clean_env, stop_all, wait_for_line

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
SIM_PORT, RELAY_PORT = 8090, 8080
CHROMIUM_FLAGS = [
    "--no-sandbox",  # CI runs as root
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--autoplay-policy=no-user-gesture-required",
    # Off the network: no background requests, updates, sync or first-run pages.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--no-first-run",
    "--disable-gpu",
]


def _unavailable(reason: str) -> None:
    """In CI a missing piece fails the run; elsewhere the browser tests skip, saying why."""
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run: {reason}")
    pytest.skip(f"browser tests skipped: {reason}")


def _check_requirements() -> None:
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} not found (apt-get install chromium)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    if os.geteuid() != 0 or not shutil.which("ip"):
        _unavailable("network namespaces need root and iproute2's `ip`")


@dataclass
class Stack:
    ns: str
    chromium: Path  # a wrapper that runs Chromium inside the namespace
    mic_wav: Path
    relay_url: str = f"http://127.0.0.1:{RELAY_PORT}"
    sim_url: str = f"http://127.0.0.1:{SIM_PORT}"

    def http_get(self, url: str) -> bytes:
        """GET inside the namespace (where the relay and the simulator are)."""
        code = "import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1], timeout=5).read())"
        result = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", code, url],
                                capture_output=True, timeout=20, check=True)
        return result.stdout

    def sim_sessions(self) -> list[dict]:
        return json.loads(self.http_get(f"{self.sim_url}/v1/simulator/sessions"))

    def sim_received(self, session_id: str) -> list[dict]:
        return json.loads(self.http_get(f"{self.sim_url}/v1/simulator/sessions/{session_id}"))["received"]

    def sim_audio(self, session_id: str) -> np.ndarray:
        data = self.http_get(f"{self.sim_url}/v1/simulator/sessions/{session_id}/input_audio.wav")
        body = data[data.index(b"data") + 8:]
        return np.frombuffer(body[: len(body) // 2 * 2], dtype="<i2")


def _speaking_microphone(path: Path) -> None:
    """Chromium loops this file as its microphone: a second of silence, speech, then silence for the VAD."""
    with wave.open(str(ROOT / "tests/fixtures/speech_hello_48k.wav")) as w:
        hello = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    signal = np.concatenate([np.zeros(48000, "<i2"), hello, np.zeros(int(48000 * 2.5), "<i2")])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(48000)
        w.writeframes(signal.tobytes())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    _check_requirements()
    tmp = tmp_path_factory.mktemp("browser")
    ns = f"relay-browser-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    processes: list[subprocess.Popen] = []
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        wrapper = tmp / "chromium-in-netns"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {ns} {CHROMIUM} "$@"\n')
        wrapper.chmod(0o755)
        mic = tmp / "microphone.wav"
        _speaking_microphone(mic)
        env = clean_env()
        sim_log, relay_log = tmp / "simulator.log", tmp / "relay.log"
        processes.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "relay", "simulator", "--port", str(SIM_PORT)],
            stdout=subprocess.DEVNULL, stderr=sim_log.open("w"), env=env, cwd=ROOT))
        wait_for_line(sim_log, "simulator listening", processes[-1])
        relay_env = env | {"RELAY_UPSTREAM_URL": f"ws://127.0.0.1:{SIM_PORT}/v1/realtime?model=gpt-realtime",
                           "RELAY_ICE_ADDRESSES": "127.0.0.1",
                           # A demo relay: the page's visitor sets the instructions (the locks have their own test).
                           "RELAY_CLIENT_SESSION_FIELDS": "*"}
        processes.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "relay", "serve", "--port", str(RELAY_PORT)],
            stdout=subprocess.DEVNULL, stderr=relay_log.open("w"), env=relay_env, cwd=ROOT))
        wait_for_line(relay_log, "relay listening", processes[-1])
        yield Stack(ns, wrapper, mic)
    finally:
        stop_all(processes, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture
async def browser(stack: Stack):
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(stack.chromium), headless=True,
            args=CHROMIUM_FLAGS + [f"--use-file-for-fake-audio-capture={stack.mic_wav}"],
        )
        yield browser
        await browser.close()


class Page:
    """A page of the relay's web client, with its console watched for errors."""

    def __init__(self, page, stack: Stack) -> None:
        self.page, self.stack = page, stack
        self.console_errors: list[str] = []
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.console_errors.append(str(e)))

    async def open_and_connect(self) -> None:
        await self.page.goto(self.stack.relay_url + "/")
        await self.page.click("#connect")
        await self.page.wait_for_selector('#state[data-state="connected"]', timeout=20_000)

    async def event_types(self) -> list[str]:
        return await self.page.evaluate("window.relayApp.events.map(e => e.type)")

    async def wait_for_event(self, event_type: str, after: int = 0, timeout: float = 20_000) -> None:
        await self.page.wait_for_function(
            "([type, after]) => window.relayApp.events.slice(after).some(e => e.type === type)",
            arg=[event_type, after], timeout=timeout)

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        await self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
async def page(browser, stack: Stack) -> Page:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    yield Page(await context.new_page(), stack)
    await context.close()

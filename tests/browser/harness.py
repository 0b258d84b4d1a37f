"""The browser tests' world: a network namespace with only `lo`, the simulator and `relay serve` inside it (and, for
a page on a second origin, a static file server), and Debian's Chromium started inside it too (through a wrapper
script), so no WebRTC packet can leave loopback.

Playwright talks to Chromium over a pipe, so the test process itself stays outside the namespace; it reaches the
relay and the simulator through `ip netns exec`. The benchmarks use the same world (bench/sdk_connect.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import numpy as np

from tests.processes import clean_env, stop_all, wait_for_line

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
SIM_PORT, RELAY_PORT = 8090, 8080
PAGE_HOST, PAGE_PORT = "127.0.0.2", 8000  # a second origin on loopback, for pages that are not the relay's
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
_namespaces = itertools.count()

# GET or POST inside the namespace; an HTTP error exits with its status and body (for the test's message).
_HTTP = """import json, sys, urllib.error, urllib.request
method, url, body, headers = sys.argv[1], sys.argv[2], sys.argv[3].encode() or None, json.loads(sys.argv[4])
try:
    sys.stdout.buffer.write(urllib.request.urlopen(
        urllib.request.Request(url, data=body, method=method, headers=headers), timeout=10).read())
except urllib.error.HTTPError as error:
    sys.exit(f"{method} {url}: {error.code} {error.read().decode(errors='replace')}")
"""


def missing_requirements() -> str | None:
    """Why the browser world cannot be built here, or None."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found (apt-get install chromium)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if os.geteuid() != 0 or not shutil.which("ip"):
        return "network namespaces need root and iproute2's `ip`"
    return None


@dataclass
class Stack:
    ns: str
    chromium: Path  # a wrapper that runs Chromium inside the namespace
    mic_wav: Path  # speech, looped
    silent_wav: Path  # a microphone that never triggers the VAD
    relay_url: str = f"http://127.0.0.1:{RELAY_PORT}"
    sim_url: str = f"http://127.0.0.1:{SIM_PORT}"
    page_url: str | None = None  # the second origin's static server, when the stack has one

    def http(self, url: str, method: str = "GET", body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
        """An HTTP request inside the namespace (where the relay and the simulator are)."""
        result = subprocess.run(
            ["ip", "netns", "exec", self.ns, sys.executable, "-c", _HTTP, method, url, body.decode(),
             json.dumps(headers or {})], capture_output=True, timeout=30)
        if result.returncode:
            raise RuntimeError(result.stderr.decode(errors="replace").strip())
        return result.stdout

    def http_get(self, url: str) -> bytes:
        return self.http(url)

    def sim_sessions(self) -> list[dict]:
        return json.loads(self.http_get(f"{self.sim_url}/v1/simulator/sessions"))

    def sim_received(self, session_id: str) -> list[dict]:
        return json.loads(self.http_get(f"{self.sim_url}/v1/simulator/sessions/{session_id}"))["received"]

    def sim_events(self, session_id: str) -> list[dict]:
        """What the simulator's session received, its audio appends left out."""
        return [e for e in self.sim_received(session_id) if e.get("type") != "input_audio_buffer.append"]

    async def live_session(self) -> str:
        """The simulator's newest session, once it is open (the relay opens it while answering the offer)."""
        for _ in range(50):
            sessions = self.sim_sessions()
            if sessions and sessions[-1]["ended_at"] is None:
                return sessions[-1]["session_id"]
            await asyncio.sleep(0.1)
        raise AssertionError("no live simulator session")

    async def received_until(self, session_id: str, done: Callable[[list[dict]], bool],
                             timeout: float = 15.0) -> list[dict]:
        """`sim_events` once `done` says so of them, or when `timeout` s have passed (the caller asserts)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not done(received := self.sim_events(session_id)) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
        return received

    def sim_audio(self, session_id: str) -> np.ndarray:
        data = self.http_get(f"{self.sim_url}/v1/simulator/sessions/{session_id}/input_audio.wav")
        body = data[data.index(b"data") + 8:]
        return np.frombuffer(body[: len(body) // 2 * 2], dtype="<i2")


def _write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(48000)
        w.writeframes(samples.astype("<i2").tobytes())


def _microphones(tmp: Path) -> tuple[Path, Path]:
    """Chromium loops a file as its microphone: a second of silence, speech, then silence for the VAD; or silence."""
    with wave.open(str(ROOT / "tests/fixtures/speech_hello_48k.wav")) as w:
        hello = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    speech, silent = tmp / "microphone.wav", tmp / "silence.wav"
    _write_wav(speech, np.concatenate([np.zeros(48000, "<i2"), hello, np.zeros(int(48000 * 2.5), "<i2")]))
    _write_wav(silent, np.zeros(48000, "<i2"))
    return speech, silent


def _start(processes: list[subprocess.Popen], ns: str, argv: list[str], log: Path, ready: str,
           env: dict[str, str]) -> None:
    """`argv` inside the namespace, its output in `log`; returns once `ready` is in the log."""
    with log.open("w") as output:  # the process has its own copy
        processes.append(subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=output,
                                          stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    wait_for_line(log, ready, processes[-1])


@contextlib.contextmanager
def browser_stack(tmp: Path, relay_env: dict[str, str], page_dir: Path | None = None) -> Iterator[Stack]:
    """A namespace with the simulator, `relay serve` (its env: the stack's defaults, then `relay_env`) and, with
    `page_dir`, a static server for it at http://PAGE_HOST:PAGE_PORT."""
    ns = f"relay-browser-{os.getpid()}-{next(_namespaces)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    processes: list[subprocess.Popen] = []
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        wrapper = tmp / "chromium-in-netns"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {ns} {CHROMIUM} "$@"\n')
        wrapper.chmod(0o755)
        env = clean_env()
        _start(processes, ns, [sys.executable, "-m", "relay", "simulator", "--port", str(SIM_PORT)],
               tmp / "simulator.log", "simulator listening", env)
        relay_env = {"RELAY_UPSTREAM_URL": f"ws://127.0.0.1:{SIM_PORT}/v1/realtime?model=gpt-realtime",
                     "RELAY_ICE_ADDRESSES": "127.0.0.1"} | relay_env
        _start(processes, ns, [sys.executable, "-m", "relay", "serve", "--port", str(RELAY_PORT)],
               tmp / "relay.log", "relay listening", env | relay_env)
        page_url = None
        if page_dir is not None:
            _start(processes, ns, [sys.executable, "-u", "-m", "http.server", str(PAGE_PORT), "--bind", PAGE_HOST,
                                   "--directory", str(page_dir)], tmp / "page-server.log", "Serving HTTP", env)
            page_url = f"http://{PAGE_HOST}:{PAGE_PORT}"
        yield Stack(ns, wrapper, *_microphones(tmp), page_url=page_url)
    finally:
        stop_all(processes, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], check=False)


@contextlib.asynccontextmanager
async def chromium(stack: Stack, microphone: Path) -> AsyncIterator:
    """Debian's Chromium inside the stack's namespace, `microphone` looped as its audio input."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(stack.chromium), headless=True,
            args=CHROMIUM_FLAGS + [f"--use-file-for-fake-audio-capture={microphone}"],
        )
        try:
            yield browser
        finally:
            await browser.close()

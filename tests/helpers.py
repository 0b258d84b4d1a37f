"""Test helpers: speech fixtures and a Realtime WebSocket client that checks every event against the oracle."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import wave
from pathlib import Path
from typing import Any, AsyncIterator

import websockets

from tests.oracle import check_client_event, check_server_event

FIXTURES = Path(__file__).parent / "fixtures"
BYTES_PER_MS = 48  # 24 kHz PCM16 mono


def load_pcm(name: str) -> bytes:
    with wave.open(str(FIXTURES / name)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        return wav.readframes(wav.getnframes())


def silence(ms: int) -> bytes:
    return bytes(ms * BYTES_PER_MS)


def ms_of(pcm: bytes) -> int:
    return len(pcm) // BYTES_PER_MS


# Every server event any test receives, for the conformance test's coverage check.
CORPUS: list[dict[str, Any]] = []


class RealtimeClient:
    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []  # everything received, in order

    async def send(self, event: dict[str, Any] | str | bytes, check: bool = True) -> None:
        """Send an event; valid events are checked against the oracle first (pass check=False for bad input)."""
        if isinstance(event, dict):
            if check:
                check_client_event(event)
            event = json.dumps(event)
        await self.ws.send(event)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        event = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        check_server_event(event)
        CORPUS.append(event)
        self.events.append(event)
        return event

    async def until(self, event_type: str, timeout: float = 10.0) -> dict[str, Any]:
        """Receive until an event of `event_type` arrives; return it (the others stay in self.events)."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.recv(timeout)
                if event["type"] == event_type:
                    return event

    async def seen(self, event_type: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first event of `event_type` received so far, or the next one (for events with no fixed order)."""
        earlier = next((e for e in self.events if e["type"] == event_type), None)
        return earlier if earlier is not None else await self.until(event_type, timeout)

    async def collect(self, last_type: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every event received up to and including the next `last_type`."""
        start = len(self.events)
        await self.until(last_type, timeout)
        return self.events[start:]

    async def error(self, timeout: float = 5.0) -> dict[str, Any]:
        return (await self.until("error", timeout))["error"]

    async def append(self, pcm: bytes, chunk_ms: int = 20) -> None:
        step = chunk_ms * BYTES_PER_MS
        for i in range(0, len(pcm), step):
            await self.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + step]).decode()})

    async def update(self, **session: Any) -> dict[str, Any]:
        await self.send({"type": "session.update", "session": {"type": "realtime", **session}})
        return (await self.until("session.updated"))["session"]


def audio_of(events: list[dict[str, Any]], item_id: str | None = None) -> bytes:
    return b"".join(
        base64.b64decode(e["delta"])
        for e in events
        if e["type"] == "response.output_audio.delta" and (item_id is None or e["item_id"] == item_id)
    )


def without_deltas(events: list[dict[str, Any]]) -> list[str]:
    """Event types in order, with runs of delta events folded into one."""
    types: list[str] = []
    for e in events:
        if not (e["type"].endswith(".delta") and types and types[-1] == e["type"]):
            types.append(e["type"])
    return [t for t in types if not t.endswith(".delta")]


@contextlib.asynccontextmanager
async def connect(url: str, key: str | None = None, **kwargs: Any) -> AsyncIterator[RealtimeClient]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kwargs.pop("headers", {}))
    async with websockets.connect(url, additional_headers=headers, max_size=None, **kwargs) as ws:
        yield RealtimeClient(ws)

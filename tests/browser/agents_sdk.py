"""OpenAI's browser SDK, `@openai/agents-realtime`, as an app uses it: pinned in tests/browser/sdk/package.json,
installed by `npm ci --prefix tests/browser/sdk`, bundled here with esbuild (nothing is fetched at test time), and
run by a page on a second loopback origin (sdk/page.html, sdk/app.js) against the relay in the browser world
(harness.py). The relay has API keys and the default event policy; the test, as the app's backend, mints a client
secret whose session locks the instructions and declares the page's tool, and hands it to the page.

Used by tests/browser/test_agents_sdk.py and bench/sdk_connect.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from tests.browser.harness import PAGE_HOST, PAGE_PORT, RELAY_PORT, ROOT, SIM_PORT, Stack, chromium

SDK_DIR = Path(__file__).parent / "sdk"
ESBUILD = SDK_DIR / "node_modules" / ".bin" / "esbuild"
BUNDLE = SDK_DIR / "dist" / "agents-realtime.js"
PAGE_ORIGIN = f"http://{PAGE_HOST}:{PAGE_PORT}"
CALLS_URL = f"http://127.0.0.1:{RELAY_PORT}/v1/realtime/calls"  # the only thing the app changes: the base URL
API_KEY = "sk-relay-sdk-" + secrets.token_hex(8)
LOCKED_INSTRUCTIONS = "You are the weather desk. Answer in one sentence."
# The page's tool as the SDK declares it in its session.update (app.js), declared by the backend in the secret.
WEATHER_TOOL = {
    "type": "function", "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                   "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False},
}


def relay_env() -> dict[str, str]:
    """The relay as an app's operator runs it: API keys, the page's origin allowed, the default event policy (no
    RELAY_CLIENT_SESSION_FIELDS). The simulator speaks in real time, so a response lasts as long as its audio plays
    (the SDK's interrupt() cancels only a response still in progress)."""
    return {"RELAY_API_KEYS": API_KEY, "RELAY_ALLOWED_ORIGINS": PAGE_ORIGIN,
            "RELAY_UPSTREAM_URL": f"ws://127.0.0.1:{SIM_PORT}/v1/realtime?model=gpt-realtime&sim_speed=1"}


def missing_sdk() -> str | None:
    """Why the SDK cannot be bundled here, or None."""
    if not ESBUILD.exists():
        return f"the SDK's npm packages are not installed (npm ci --prefix {SDK_DIR.relative_to(ROOT)})"
    return None


def build_bundle() -> Path:
    """The SDK bundle for the page, rebuilt when missing or older than what it is made from."""
    sources = [SDK_DIR / "entry.js", SDK_DIR / "package-lock.json", SDK_DIR / "node_modules" / ".package-lock.json"]
    newest = max(source.stat().st_mtime for source in sources if source.exists())
    if BUNDLE.exists() and BUNDLE.stat().st_mtime >= newest:
        return BUNDLE
    BUNDLE.parent.mkdir(exist_ok=True)
    partial = BUNDLE.with_suffix(f".{os.getpid()}.tmp")  # another run may be reading the old one
    subprocess.run([str(ESBUILD), "entry.js", "--bundle", "--format=esm", "--platform=browser",
                    f"--outfile={partial}", "--log-level=warning"], cwd=SDK_DIR, check=True, timeout=120)
    partial.replace(BUNDLE)
    return BUNDLE


def mint_client_secret(stack: Stack) -> str:
    """What the app's backend does for each visitor: a client secret with the API key, its session locking the
    instructions and declaring the page's function tool."""
    body = {"session": {"type": "realtime", "instructions": LOCKED_INSTRUCTIONS, "tools": [WEATHER_TOOL]}}
    answer = stack.http(f"{stack.relay_url}/v1/realtime/client_secrets", "POST", json.dumps(body).encode(),
                        {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    return json.loads(answer)["value"]


class SdkPage:
    """The test page with the SDK loaded; `window.sdkApp` (app.js) records what the SDK tells the app. Console
    errors and warnings are kept: the SDK warns there when it gives up waiting for `session.updated`."""

    def __init__(self, page, stack: Stack) -> None:
        self.page, self.stack = page, stack
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning")
                else None)
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    async def open(self, client_secret: str) -> None:
        await self.page.goto(f"{self.stack.page_url}/page.html")
        await self.page.wait_for_function("window.sdkApp && window.sdkApp.ready")
        await self.page.evaluate("([secret, url]) => window.sdkApp.configure(secret, url)", [client_secret, CALLS_URL])

    async def connect(self) -> None:
        """Click Connect and wait until the SDK's connect() settles; fail with the app's errors if it rejected."""
        await self.page.click("#connect")
        await self.page.wait_for_function("['connected', 'failed'].includes(window.sdkApp.state)", timeout=30_000)
        state = await self.page.evaluate("window.sdkApp.state")
        assert state == "connected", f"connect() failed: {await self.errors()} {self.console}"

    async def disconnect(self) -> None:
        await self.page.click("#disconnect")
        await self.page.wait_for_function("window.sdkApp.state === 'disconnected'")

    async def close(self) -> None:
        await self.page.context.close()

    async def events(self, since: int = 0) -> list[dict[str, Any]]:
        """The server events the SDK's transport passed to the app (transport_event), from index `since`."""
        return await self.page.evaluate("(since) => window.sdkApp.events.slice(since).map((e) => e.event)", since)

    async def event_count(self) -> int:
        return await self.page.evaluate("window.sdkApp.events.length")

    async def until(self, found: Callable[[dict[str, Any]], bool], since: int = 0, timeout: float = 30.0
                    ) -> dict[str, Any]:
        """The first server event from index `since` that `found` accepts, waiting up to `timeout` s for it."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            events = await self.events(since)
            if match := next((event for event in events if found(event)), None):
                return match
            if asyncio.get_running_loop().time() > deadline:
                seen = [event["type"] for event in await self.events()]
                raise AssertionError(f"no such event after {timeout} s; the SDK saw {seen}")
            since += len(events)
            await asyncio.sleep(0.1)

    async def wait_for_event(self, event_type: str, since: int = 0, timeout: float = 30.0) -> dict[str, Any]:
        return await self.until(lambda event: event["type"] == event_type, since, timeout)

    async def session_events(self) -> list[str]:
        """The RealtimeSession's own events (audio_stopped, agent_tool_start, …), in order."""
        return await self.page.evaluate("window.sdkApp.sessionEvents")

    async def errors(self) -> list[str]:
        """Whatever reached the app through the session's `error` event, or rejected connect()."""
        return await self.page.evaluate("window.sdkApp.errors")

    async def connect_ms(self) -> float:
        """From the click on Connect to the first `session.updated` the SDK received (page clock)."""
        return await self.page.evaluate("window.sdkApp.sessionUpdatedAt - window.sdkApp.clickAt")


@contextlib.asynccontextmanager
async def sdk_pages(stack: Stack, microphone: Path) -> AsyncIterator:
    """Chromium in the stack's namespace with `microphone`; yields a function opening an SdkPage with a new
    client secret (each page a visitor of its own)."""
    async with chromium(stack, microphone) as browser:  # closing the browser closes its pages

        async def open_page() -> SdkPage:
            page = SdkPage(await (await browser.new_context()).new_page(), stack)
            await page.open(await asyncio.to_thread(mint_client_secret, stack))
            return page

        yield open_page

"""The browser tests' fixtures: each module gets a world of its own (harness.py: a network namespace with only `lo`,
the simulator, `relay serve` set up for that module, Chromium inside it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.browser import agents_sdk
from tests.browser.harness import ARTIFACTS, Stack, browser_stack, chromium, missing_requirements


def _unavailable(reason: str) -> None:
    """In CI a missing piece fails the run; elsewhere the browser tests skip, saying why."""
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run: {reason}")
    pytest.skip(f"browser tests skipped: {reason}")


def _check_requirements() -> None:
    if reason := missing_requirements():
        _unavailable(reason)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """The bundled page's world: a demo relay where the page's visitor sets the instructions (the locks have their
    own test)."""
    _check_requirements()
    with browser_stack(tmp_path_factory.mktemp("browser"), {"RELAY_CLIENT_SESSION_FIELDS": "*"}) as world:
        yield world


@pytest.fixture(scope="module")
def sdk_stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """OpenAI's browser SDK on a page of another origin, against a relay as an operator runs it (agents_sdk.py)."""
    _check_requirements()
    if reason := agents_sdk.missing_sdk():
        _unavailable(reason)
    agents_sdk.build_bundle()
    with browser_stack(tmp_path_factory.mktemp("sdk"), agents_sdk.relay_env(), agents_sdk.SDK_DIR) as world:
        yield world


@pytest.fixture
async def browser(stack: Stack):
    async with chromium(stack, stack.mic_wav) as browser:
        yield browser


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

"""The bundled web page in Debian's Chromium, against `relay serve` and the simulator, all inside a network
namespace with only `lo` (see conftest.py)."""

from __future__ import annotations

import asyncio
import json

import numpy as np

from tests.browser.harness import ARTIFACTS

STATS = """async () => {
  const report = await window.relayApp.pc.getStats();
  let packets = 0, energy = 0;
  report.forEach((s) => { if (s.type === "inbound-rtp" && s.kind === "audio") { packets = s.packetsReceived; energy = s.totalAudioEnergy; } });
  return [packets, energy];
}"""


def dbfs(samples: np.ndarray) -> float:
    return 10 * np.log10(np.mean(samples.astype(np.float64) ** 2) / 32768**2 + 1e-12)


def _received_types(stack, session_id: str) -> list[str]:
    return [e.get("type") for e in stack.sim_events(session_id)]


async def _until_received(stack, session_id: str, wanted: set[str], after: int, timeout: float = 10.0) -> list[str]:
    """The upstream event types received after index `after`, once all of `wanted` are among them."""
    received = await stack.received_until(
        session_id, lambda events: wanted <= {e.get("type") for e in events[after:]}, timeout)
    return [e.get("type") for e in received[after:]]


async def test_talking_to_the_model_from_the_page(page, stack):
    await page.open_and_connect()
    session_id = await stack.live_session()
    p = page.page
    # Both sides of the transcript: the simulator transcribes the speech and echoes it.
    await p.wait_for_selector("#transcript li.user >> text=/\\[speech \\d+\\.\\d+ s\\]/", timeout=30_000)
    await p.wait_for_selector("#transcript li.assistant >> text=/echo of \\d+\\.\\d+ s/", timeout=30_000)
    await p.wait_for_selector("#latency-list li", timeout=20_000)
    latency = await p.inner_text("#latency-list li")
    assert latency.endswith(" ms") and 0 < int(latency.split()[0]) < 5000
    assert await p.locator("#latency-chart rect").count() >= 1

    # The page hears the model: WebRTC stats rise.
    packets, energy = await p.evaluate(STATS)
    await asyncio.sleep(1.5)
    packets_later, energy_later = await p.evaluate(STATS)
    assert packets_later > packets > 0 and energy_later > energy > 0

    # The upstream got the page's session and the speech.
    received = stack.sim_received(session_id)
    update = next(e for e in received if e.get("type") == "session.update")
    assert update["session"]["instructions"].startswith("You are a helpful voice assistant")
    assert update["session"]["audio"]["input"]["transcription"] == {"model": "gpt-4o-mini-transcribe"}
    audio = stack.sim_audio(session_id)
    loudest = max(dbfs(audio[i : i + 2400]) for i in range(0, audio.size - 2400, 2400))
    assert loudest > -40  # speech reached the upstream, not silence

    assert (await p.inner_text("#usage-cost")).startswith("$") and await p.inner_text("#usage-cost") != "$0.0000"
    await page.screenshot("browser-conversation.png")
    await p.click("#disconnect")
    await p.wait_for_selector('#state[data-state="ended"]')
    assert page.console_errors == []


async def test_mute_reply_now_interrupt_and_push_to_talk(page, stack):
    await page.open_and_connect()
    session_id = await stack.live_session()
    p = page.page

    # Mute: the microphone track is disabled, so the upstream hears silence.
    await p.click("#mute")
    assert await p.get_attribute("#mute", "aria-pressed") == "true"
    await asyncio.sleep(2.5)
    audio = stack.sim_audio(session_id)
    assert dbfs(audio[-24000 * 3 // 2 :]) < -60  # the last 1.5 s
    await p.click("#mute")
    assert await p.get_attribute("#mute", "aria-pressed") == "false"

    # Reply now: commit + response.create.
    before = len(_received_types(stack, session_id))
    await p.click("#reply")
    types = await _until_received(stack, session_id, {"input_audio_buffer.commit", "response.create"}, before)
    assert types[:2] == ["input_audio_buffer.commit", "response.create"]

    # Interrupt while the model speaks: the page cancels and clears; the relay truncates what was heard.
    count = len(await page.event_types())
    await page.wait_for_event("output_audio_buffer.started", after=count, timeout=30_000)
    before = len(_received_types(stack, session_id))
    await p.click("#interrupt")
    types = await _until_received(stack, session_id, {"response.cancel"}, before)
    assert "response.cancel" in types
    assert {"conversation.item.truncate", "conversation.item.delete"} & set(types)
    await page.wait_for_event("output_audio_buffer.cleared", after=count)
    if "conversation.item.truncate" in types:  # what the user never heard is shown as cut
        await p.wait_for_selector("#transcript li.assistant .cut", timeout=10_000)

    # Push to talk: turn detection off; hold (button, then space bar), release -> commit + response.create.
    await p.select_option("#turn", "push_to_talk")
    before = len(_received_types(stack, session_id))
    await p.click("#apply")
    types = await _until_received(stack, session_id, {"session.update"}, before)
    update = next(e for e in stack.sim_received(session_id)[::-1] if e.get("type") == "session.update")
    assert update["session"]["audio"]["input"]["turn_detection"] is None
    assert await p.is_visible("#ptt")

    async def hold_button() -> None:
        await p.hover("#ptt")
        await p.mouse.down()

    async def hold_space() -> None:
        await p.focus("#ptt")
        await p.keyboard.down("Space")

    for press, release in [(hold_button, p.mouse.up), (hold_space, lambda: p.keyboard.up("Space"))]:
        before = len(_received_types(stack, session_id))
        await press()
        await asyncio.sleep(2.0)
        await release()
        types = await _until_received(stack, session_id, {"input_audio_buffer.commit", "response.create"}, before)
        assert "input_audio_buffer.clear" in types  # the press starts a fresh turn
        assert types.index("input_audio_buffer.commit") < types.index("response.create")
    await page.screenshot("browser-controls.png")
    assert page.console_errors == []


async def test_operator_locks_disable_controls_with_an_explanation(page, stack):
    config = {"ice_servers": [], "locked": ["instructions", "voice"], "prices": {}}
    await page.page.route("**/relay/client-config", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps(config)))
    await page.open_and_connect()
    p = page.page
    assert await p.is_disabled("#instructions") and await p.is_disabled("#voice")
    assert await p.is_visible('.locked-note[data-for="instructions"]')
    assert "operator" in await p.inner_text('.locked-note[data-for="voice"]')
    assert await p.is_enabled("#turn") and not await p.is_visible('.locked-note[data-for="turn_detection"]')
    session_id = await stack.live_session()
    assert "session.update" in await _until_received(stack, session_id, {"session.update"}, 0)
    update = next(e for e in stack.sim_received(session_id) if e.get("type") == "session.update")
    assert "instructions" not in update["session"] and "voice" not in update["session"]["audio"]["output"]
    assert page.console_errors == []


async def test_phone_width_keyboard_and_labels(browser, stack):
    context = await browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    p = await context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    await p.goto(stack.relay_url + "/")
    assert await p.evaluate("document.scrollingElement.scrollWidth") <= 390  # no sideways scrolling
    unlabelled = await p.evaluate("""() => [...document.querySelectorAll('input, select, textarea, meter')]
        .filter((e) => e.labels === null || e.labels.length === 0).map((e) => e.id)""")
    assert unlabelled == []
    nameless = await p.evaluate("""() => [...document.querySelectorAll('button')]
        .filter((b) => !b.textContent.trim() && !b.getAttribute('aria-label')).map((b) => b.id)""")
    assert nameless == []
    # Keyboard only: the first Tab reaches Connect, Enter starts the call.
    await p.keyboard.press("Tab")
    assert await p.evaluate("document.activeElement.id") == "connect"
    await p.keyboard.press("Enter")
    await p.wait_for_selector('#state[data-state="connected"]', timeout=20_000)
    ARTIFACTS.mkdir(exist_ok=True)
    await p.screenshot(path=str(ARTIFACTS / "browser-phone.png"), full_page=True)
    await p.click("#disconnect")
    await context.close()
    assert errors == []


async def test_a_refused_call_shows_the_relays_reason(page, stack):
    reason = {"error": {"message": "The model service cannot be reached.", "type": "upstream_error",
                        "code": "upstream_unavailable", "param": None}}
    await page.page.route("**/v1/realtime/calls", lambda route: route.fulfill(
        status=502, content_type="application/json", body=json.dumps(reason)))
    await page.page.goto(stack.relay_url + "/")
    await page.page.click("#connect")
    await page.page.locator('#state[data-state="error"]').wait_for(timeout=20_000)
    assert await page.page.inner_text("#error") == "The model service cannot be reached."
    assert await page.page.evaluate("document.activeElement.id") == "connect"  # focus is not lost
    assert await page.page.is_enabled("#connect") and await page.page.is_disabled("#disconnect")
    # The failed request itself is the only console error (Chromium logs every non-2xx fetch).
    assert all("502" in error for error in page.console_errors)



async def test_disconnect_while_connecting_stays_disconnected(page, stack):
    p = page.page

    async def slow_config(route):
        await asyncio.sleep(1.5)
        try:
            await route.continue_()
        except Exception:  # the page may have moved on; that is the point of the test
            pass

    await p.route("**/relay/client-config", slow_config)
    await p.goto(stack.relay_url + "/")
    sessions_before = len(stack.sim_sessions())
    await p.click("#connect")
    await asyncio.sleep(0.2)
    await p.click("#disconnect")
    await asyncio.sleep(4.0)
    assert await p.get_attribute("#state", "data-state") == "ended"
    assert await p.evaluate("window.relayApp.call === null")
    assert len(stack.sim_sessions()) == sessions_before  # no call was made behind the user's back
    # Connecting again works, and ends cleanly: no microphone left open, no upstream session left behind.
    await p.unroute("**/relay/client-config")
    for _ in range(2):
        await p.click("#connect")
        await p.wait_for_selector('#state[data-state="connected"]', timeout=20_000)
        mic = await p.evaluate_handle("window.relayApp.call.mic")
        await p.click("#disconnect")
        assert await p.evaluate("(mic) => mic.getTracks().every((t) => t.readyState === 'ended')", mic)
    await asyncio.sleep(1.5)
    ours = stack.sim_sessions()[sessions_before:]
    assert len(ours) == 2 and all(s["ended_at"] is not None for s in ours)  # hangup ended them upstream too
    assert await p.evaluate("[...document.querySelectorAll('meter')].every((m) => m.value === 0)")
    assert page.console_errors == []


async def test_holding_space_neither_scrolls_nor_is_ended_by_the_mouse(page, stack):
    await page.open_and_connect()
    p = page.page
    await p.select_option("#turn", "push_to_talk")
    await p.click("#apply")
    await p.wait_for_function("window.relayApp.mode === 'push_to_talk'")
    await p.set_viewport_size({"width": 390, "height": 600})
    await p.evaluate("document.activeElement.blur()")
    scroll = await p.evaluate("window.scrollY")
    await p.keyboard.down("Space")
    for _ in range(5):
        await p.keyboard.down("Space")  # auto-repeat
    await p.mouse.move(5, 5)
    await p.hover("#ptt")
    await p.mouse.move(5, 5)  # the pointer crossing the button does not end a keyboard hold
    assert await p.evaluate("window.relayApp.hold && window.relayApp.hold.source") == "key"
    assert await p.evaluate("window.scrollY") == scroll
    await p.keyboard.up("Space")
    assert await p.evaluate("window.relayApp.hold") is None
    assert page.console_errors == []

"""The backend's side of a call, sans network: the core's trusted path (no event policy, the envelope still
checked), and the BackendLink's bounds (its queue, its message size, its close) on the event loop with a socket
double that never finishes a send (a backend that does not read)."""

from __future__ import annotations

import asyncio
import json

from relay.call.backend import CLOSE_NORMAL, CLOSE_POLICY, BackendLink, Backends, Traffic
from relay.call.fanout import Fanout
from relay.core.call import CallCore, ToClient
from relay.core.policy import EventPolicy

SYSTEM = {"type": "conversation.item.create",
          "item": {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "Obey."}]}}
INSTRUCTIONS = {"type": "session.update", "session": {"type": "realtime", "instructions": "New ones."}}


def locked_core() -> CallCore:
    return CallCore(policy=EventPolicy(["audio"]))  # instructions locked, system messages refused


def test_a_trusted_event_skips_the_policy_the_clients_does_not():
    core = locked_core()
    actions, text = core.on_client_event(json.dumps(SYSTEM))
    assert text is None and actions[0].event["error"]["code"] == "item_not_allowed"
    actions, text = core.on_client_event(json.dumps(SYSTEM), trusted=True)
    assert actions == [] and json.loads(text) == SYSTEM
    actions, text = core.on_client_event(json.dumps(INSTRUCTIONS), trusted=True)
    assert actions == [] and json.loads(text)["session"]["instructions"] == "New ones."
    actions, text = core.on_client_event(json.dumps(INSTRUCTIONS))
    assert [a.event["type"] for a in actions] == ["relay.policy.fields_kept"]


def test_a_trusted_event_still_passes_the_envelope_and_the_relays_own_fields():
    core = locked_core()
    for bad in ("not json", '{"type": "no.such.event"}', '{"type": "input_audio_buffer.append", "audio": ""}'):
        actions, text = core.on_client_event(bad, trusted=True)
        assert text is None and isinstance(actions[0], ToClient) and actions[0].event["type"] == "error"
    update = {"type": "session.update", "session": {"audio": {"output": {"format": {"type": "audio/pcmu"}}}}}
    _, text = core.on_client_event(json.dumps(update), trusted=True)
    assert json.loads(text)["session"]["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}


class Stuck:
    """A socket whose sends never finish after the first `room` (a backend that stopped reading)."""

    def __init__(self, room: int = 0) -> None:
        self.sent: list[str] = []
        self.room, self.closed_with = room, None

    async def send_str(self, data: str) -> None:
        if len(self.sent) >= self.room:
            await asyncio.Event().wait()
        self.sent.append(data)

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        self.closed_with = (code, message.decode())
        return True


def a_link(ws: Stuck, texts: list, queue_bytes: int = 1000) -> BackendLink:
    return BackendLink("rtc_x", ws, abort=lambda: None, on_text=lambda text, link: texts.append(text),
                       queue_bytes=queue_bytes, max_message_bytes=100, traffic=Traffic())


async def test_a_backend_that_does_not_read_is_closed_past_its_queue_and_the_teller_never_waits():
    ws, texts = Stuck(room=1), []
    fanout, backends = Fanout(), Backends("rtc_x", None, limit=2)
    backends._events = fanout
    link = a_link(ws, texts)
    backends.attach(link)
    fanout.tell({"type": "first"})
    await asyncio.sleep(0.01)
    for n in range(100):  # each returns at once; the 1000 bytes are passed on the way
        fanout.tell({"type": "x", "n": n})
    await asyncio.wait_for(link.closed(), 5)
    assert ws.closed_with[0] == CLOSE_POLICY and "too slow" in ws.closed_with[1]
    assert json.loads(ws.sent[0])["type"] == "first" and link.traffic.events_out == 1
    backends.detach(link)
    fanout.tell({"type": "after"})  # forgotten: nothing more reaches it
    assert backends.links == [] and not backends.full()


async def test_its_messages_are_checked_and_the_calls_end_flushes_then_closes():
    ws, texts = Stuck(room=10), []
    backends = Backends("rtc_x", Fanout(), limit=1)
    link = a_link(ws, texts)
    backends.attach(link)
    assert backends.full()
    link.on_message('{"type": "response.create"}')
    link.on_message("x" * 101)
    link.on_message(b"binary")
    assert texts == ['{"type": "response.create"}']
    backends.end_all("hangup")
    await asyncio.wait_for(link.closed(), 5)
    assert [json.loads(t)["error"]["code"] for t in ws.sent] == ["message_too_large", "invalid_event"]
    assert ws.closed_with == (CLOSE_NORMAL, "call ended: hangup") and link.traffic.events_in == 3

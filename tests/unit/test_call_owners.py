"""The call's owners one by one (relay/call/): the fan-out, the task set, the records, the peer link's data channel
and the upstream link, each with stand-ins for what it is connected to (no sockets, no aiortc peer)."""

from __future__ import annotations

import asyncio
import json
import time
import wave

import pytest

from relay.call.fanout import Fanout
from relay.call.peer import MAX_CHANNEL_BUFFER_BYTES, MAX_PENDING_CLIENT_EVENTS, PeerLink, check_media_ids
from relay.call.records import Records
from relay.call.tasks import Tasks
from relay.call.upstream import MAX_UPSTREAM_BACKLOG_BYTES, UpstreamLink
from relay.config import Settings
from relay.core.call import CallCore
from relay.core.history import History
from relay.upstream.client import UpstreamError
from relay.upstream.target import UpstreamTarget


def settings(**flags: str) -> Settings:
    return Settings.load(env={}, **flags)


# --- the fan-out -------------------------------------------------------------------------------------------------


class Heard:
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def heard(self, event):
        self.log.append((self.name, "heard", event["type"]))


class ToldAndAdded(Heard):
    def told(self, event, text):
        self.log.append((self.name, "told", text))

    def added(self, event):
        self.log.append((self.name, "added", event["type"]))


def test_each_listener_gets_the_streams_it_has_a_method_for_in_the_order_added():
    log: list = []
    events = Fanout()
    events.listen(ToldAndAdded(log, "a"))
    events.listen(Heard(log, "b"))
    events.tell({"type": "x", "n": 1})
    events.tell({"type": "y"}, text='{"type": "y"}')  # as received: not serialised again
    events.heard({"type": "z"})
    events.added({"type": "conversation.item.create"})
    assert log == [("a", "told", '{"type":"x","n":1}'), ("a", "told", '{"type": "y"}'),
                   ("a", "heard", "z"), ("b", "heard", "z"), ("a", "added", "conversation.item.create")]


def test_a_listener_that_hears_nothing_is_refused():
    with pytest.raises(TypeError):
        Fanout().listen(object())


# --- the task set ------------------------------------------------------------------------------------------------


async def test_the_task_set_names_its_tasks_reports_failures_and_cancels_the_rest():
    failed: list[asyncio.Task] = []
    tasks = Tasks("call-rtc_1", failed.append)

    async def fail():
        raise RuntimeError("boom")

    tasks.spawn(asyncio.sleep(60), "sleeper")
    tasks.spawn(fail(), "failing")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [t.get_name() for t in failed] == ["call-rtc_1-failing"] and len(tasks) == 1
    await tasks.cancel_all()
    assert len(tasks) == 0 and not failed[1:]


# --- the records -------------------------------------------------------------------------------------------------


def test_the_records_follow_the_calls_events_and_append_them_to_the_log(tmp_path):
    told: list[dict] = []
    records = Records("rtc_rec", settings(history_dir=str(tmp_path)), None, told.append)
    records.added({"type": "conversation.item.create",
                   "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}})
    records.heard({"type": "response.output_audio_transcript.done", "item_id": "it_1", "transcript": "Hello there"})
    records.told({"type": "relay.item.truncated", "item_id": "it_1", "audio_end_ms": 500,
                  "audio_received_ms": 1000}, "{}")
    records.heard({"type": "response.done", "response": {"id": "resp_1", "usage": {"output_tokens": 10}}})
    assert [e["type"] for e in told] == ["relay.usage"]
    entries = records.history.entries
    assert [e["role"] for e in entries] == ["user", "assistant", "relay"] and entries[1]["text"] != "Hello there"
    lines = [json.loads(line) for line in (tmp_path / "rtc_rec.jsonl").read_text().splitlines()]
    assert lines[-1]["type"] == "usage" and {line["seq"] for line in lines} == {0, 1, 2}


def test_a_failing_transcript_log_costs_the_log_not_the_call(tmp_path):
    records = Records("rtc_rec", settings(history_dir=str(tmp_path / "missing")), History({}), lambda e: None)
    records.heard({"type": "response.output_text.done", "item_id": "it_1", "text": "Hello"})
    records.heard({"type": "response.output_text.done", "item_id": "it_2", "text": "Again"})
    assert len(records.history.entries) == 2


async def test_the_recording_is_written_as_a_stereo_wav_and_finished(tmp_path):
    records = Records("rtc_rec", settings(recordings_dir=str(tmp_path)), None, lambda e: None)
    task = asyncio.ensure_future(records.keep_recording())
    records.recording.on_user_audio(b"\x01\x00" * 480, time.monotonic())
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await records.finish()
    with wave.open(str(tmp_path / "rtc_rec.wav")) as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (2, 2)


# --- the peer link's data channel --------------------------------------------------------------------------------


class Channel:
    label, readyState, bufferedAmount = "oai-events", "open", 0

    def __init__(self, limit: int = 10**6) -> None:
        self.limit, self.sent, self.handlers = limit, [], {}

    def on(self, name, handler):
        self.handlers[name] = handler

    def send(self, text: str) -> None:
        if len(text) > self.limit:
            raise ValueError("too large")
        self.sent.append(text)


def a_peer(**flags: str):
    texts: list[str] = []
    gone: list[str] = []
    peer = PeerLink("rtc_peer", settings(**flags), 0.0, on_audio=lambda pcm: None, next_frame=lambda: None,
                    on_text=texts.append, on_gone=gone.append)
    return peer, texts, gone


def test_events_wait_for_the_data_channel_then_go_in_order():
    peer, _, _ = a_peer()
    for n in range(MAX_PENDING_CLIENT_EVENTS + 5):
        peer.told({"type": "x"}, json.dumps({"n": n}))
    assert len(peer.pending) == MAX_PENDING_CLIENT_EVENTS and peer.dropped_events == 5
    channel = Channel()
    peer._on_datachannel(channel)
    assert [json.loads(t)["n"] for t in channel.sent] == list(range(MAX_PENDING_CLIENT_EVENTS))
    assert not peer.pending and peer.bytes_out == sum(map(len, channel.sent))
    peer._on_datachannel(Channel())  # a second channel is ignored
    assert peer.channel is channel


def test_client_messages_are_checked_before_the_call_sees_them():
    peer, texts, _ = a_peer(max_message_bytes="1024")
    peer.channel = Channel()
    peer.on_message('{"type":"response.create"}')
    peer.on_message(b"\x00binary")
    peer.on_message('{"type":"x","pad":"' + "x" * 1100 + '"}')
    assert texts == ['{"type":"response.create"}']
    codes = [json.loads(t)["error"]["code"] for t in peer.channel.sent]
    assert codes == ["invalid_event", "message_too_large"] and peer.last_message_at is not None


def test_a_failure_on_a_client_message_becomes_a_server_error_event(caplog):
    peer = PeerLink("rtc_peer", settings(), 0.0, on_audio=lambda pcm: None, next_frame=lambda: None,
                    on_text=lambda text: 1 / 0, on_gone=lambda reason: None)
    peer.channel = Channel()
    peer.on_message("{}")
    assert json.loads(peer.channel.sent[0])["error"]["code"] == "server_error"


def test_an_oversized_event_is_replaced_and_a_client_that_stops_reading_is_gone():
    peer, _, gone = a_peer()
    peer.channel = Channel(limit=1000)
    peer.send_text("x" * 2000)
    assert json.loads(peer.channel.sent[0])["error"]["code"] == "event_too_large" and peer.dropped_events == 1
    peer.channel.bufferedAmount = MAX_CHANNEL_BUFFER_BYTES + 1
    peer.send_text("{}")
    assert gone == ["client not reading its data channel"]


def test_offers_without_a_mid_for_each_section_are_refused():
    offer = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\n"
    with pytest.raises(ValueError):
        check_media_ids(offer)
    check_media_ids(offer + "a=mid:0\r\n")


# --- the upstream link -------------------------------------------------------------------------------------------


class Socket:
    """Stands for a websockets client connection: what the test pushes is read; what the link sends is kept."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.close_code: int | None = None

    async def send(self, text: str) -> None:
        self.sent.append(text)

    async def close(self) -> None:
        if self.close_code is None:
            self.close_code = 1000
        self.incoming.put_nowait(None)

    def drop(self, code: int) -> None:
        self.close_code = code
        self.incoming.put_nowait(None)

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        text = await self.incoming.get()
        if text is None:
            raise StopAsyncIteration
        return text


def created(expires_at: float | None = None) -> str:
    return json.dumps({"type": "session.created", "session": {"expires_at": expires_at, "instructions": "Hi"}})


class Owner:
    def __init__(self) -> None:
        self.core, self.history = CallCore(), History({})
        self.deltas: list[dict] = []
        self.events: list[str] = []
        self.told: list[dict] = []
        self.lost = 0
        self.closing: list[str] = []

    def on_audio_delta(self, event):
        self.deltas.append(event)

    def on_server_event(self, event, text):
        self.core.on_server_event(event)
        self.events.append(event["type"])

    def session_lost(self):
        self.lost += 1

    def tell(self, event):
        self.told.append(event)

    def quiet(self):
        return self.core.quiet

    def close_soon(self, reason):
        self.closing.append(reason)


def a_link(owner: Owner, tasks: Tasks, **flags: str) -> UpstreamLink:
    return UpstreamLink("rtc_up", settings(**flags), UpstreamTarget("url", "ws://127.0.0.1:9/unused"), owner,
                        tasks.spawn)


async def test_the_outbox_keeps_its_budget_for_the_clients_audio_and_events():
    owner, tasks = Owner(), Tasks("t", lambda task: None)
    link = a_link(owner, tasks)
    assert link.send("x" * MAX_UPSTREAM_BACKLOG_BYTES) and not link.send("y")
    assert link.send("own event", budgeted=False)  # the relay's own control events always go
    link.send_audio(b"\x00" * 960)
    assert link.dropped_audio_chunks == 1 and len(link.outbox) == 2
    link.outbox.clear()
    link.outbox_bytes = 0
    link.send_audio(b"\x00" * 960)
    assert link.outbox[0].startswith('{"type":"input_audio_buffer.append","audio":"')
    link.reconnecting = True  # no session to take it: the audio is stale by the time one comes
    link.send_audio(b"\x00" * 960)
    assert link.dropped_audio_chunks == 2 and len(link.outbox) == 1


async def test_events_are_read_and_handed_on_audio_apart():
    owner, tasks = Owner(), Tasks("t", lambda task: None)
    link = a_link(owner, tasks)
    link.on_text("not json")
    link.on_text('{"no":"type"}')
    link.on_text('{"type":"response.output_audio.delta","delta":""}')
    link.on_text('{"type":"error","error":{"code":"invalid_api_key"}}')
    assert len(owner.deltas) == 1 and owner.events == ["error"] and link._fatal_error == "invalid_api_key"


async def test_the_writer_sends_the_outbox_to_the_live_session_and_counts():
    owner, tasks = Owner(), Tasks("t", lambda task: None)
    link = a_link(owner, tasks)
    ws = Socket()
    link.adopt(ws, [created()], first=True)
    assert owner.events == ["session.created"] and owner.core.session["instructions"] == "Hi"
    link.start()
    link.send('{"type":"response.create"}')
    link.send_audio(b"\x00" * 960)
    await asyncio.sleep(0.01)
    assert ws.sent[0] == '{"type":"response.create"}' and len(ws.sent) == 2
    assert link.bytes_out == sum(map(len, ws.sent)) and link.outbox_bytes == 0
    await tasks.cancel_all()


async def test_a_lost_session_is_replaced_and_gets_what_still_means_something(monkeypatch):
    owner, tasks = Owner(), Tasks("t", lambda task: None)
    link = a_link(owner, tasks, upstream_retries="3", upstream_retry_backoff_s="0.01")
    first, second = Socket(), Socket()
    opened: list[tuple] = []

    async def open_session(session, replay, from_client=False):
        opened.append((session, replay))
        return second, [created()]

    monkeypatch.setattr(link, "open", open_session)
    link.adopt(first, [created()], first=True)
    link.start()
    link._live.clear()  # the session is gone before the writer could send these
    link.send('{"type":"session.update","session":{"instructions":"Be brief."}}')
    link.send_audio(b"\x00" * 960)
    first.drop(1006)
    async with asyncio.timeout(5):
        while not second.sent:
            await asyncio.sleep(0.01)
    assert [e["type"] for e in owner.told] == ["relay.upstream.reconnecting", "relay.upstream.reconnected"]
    assert owner.lost == 1 and link.reconnects == 1 and link.ws is second and not link.reconnecting
    assert opened[0][0]["instructions"] == "Hi"  # the session as the old one said it was
    assert second.sent == ['{"type":"session.update","session":{"instructions":"Be brief."}}']  # no stale audio
    await tasks.cancel_all()


async def test_a_refused_key_is_not_retried_and_ends_the_call(monkeypatch):
    owner, tasks = Owner(), Tasks("t", lambda task: None)
    link = a_link(owner, tasks, upstream_retries="3")

    async def refused(session, replay, from_client=False):
        raise UpstreamError(401, "invalid_api_key", "refused", fatal=True)

    monkeypatch.setattr(link, "open", refused)
    ws = Socket()
    link.adopt(ws, [created()], first=True)
    link.start()
    ws.drop(1006)
    async with asyncio.timeout(5):
        while not owner.closing:
            await asyncio.sleep(0.01)
    assert owner.closing == ["upstream lost"] and owner.told[-1]["error"]["code"] == "invalid_api_key"
    await tasks.cancel_all()


# --- the call: one more listener is one line ---------------------------------------------------------------------


async def test_a_listener_added_to_a_call_hears_what_its_client_is_told():
    from relay.call.call import Call

    class Backend:  # stands for a backend attached over the control socket
        def __init__(self) -> None:
            self.texts: list[str] = []

        def told(self, event, text):
            self.texts.append(text)

    call = Call(settings(), UpstreamTarget("url", "ws://127.0.0.1:9/unused"), on_closed=lambda c: None)
    backend = Backend()
    call.events.listen(backend)
    done = json.dumps({"type": "response.done", "response": {"id": "resp_1", "usage": {"output_tokens": 3}}})
    call.upstream.on_text(done)
    call.peer.on_message('{"type":"output_audio_buffer.clear"}')
    assert backend.texts[0] == done  # as received, not serialised again
    assert [json.loads(t)["type"] for t in backend.texts] == ["response.done", "relay.usage"]
    assert list(call.peer.pending) == backend.texts  # the client's data channel (not open yet) holds the same
    await call.close("test over")

"""One call's logic, sans-I/O: what to play, what the user heard, what to tell the model and the client.

The adapter feeds it the upstream's events, the model's audio (already cut into 20 ms frames), the client's
data-channel messages and the playout clock's ticks; it returns actions: events for the client's data channel and
events for the upstream. Tested on a virtual clock (tests/unit/test_call_core.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from relay.protocol import ProtocolError, new_id, parse_client_event

FRAME_MS = 20
RELAY_EVENT_PREFIX = "relay_"
SILENCE_PEAK = 100  # a frame whose samples all stay below this (about -50 dBFS) is silence


@dataclass
class ToClient:
    event: dict[str, Any]


@dataclass
class ToUpstream:
    event: dict[str, Any]


Action = ToClient | ToUpstream


@dataclass
class ItemPlayout:
    """Playout accounting for one assistant audio item."""

    response_id: str
    item_id: str
    received_ms: float = 0.0  # audio the model sent for it
    lead_ms: float = 0.0  # silence put in front of it to align frames (not the model's audio)
    queued_frames: int = 0
    emitted_frames: int = 0  # frames the playout clock handed to the encoder (or skipped as leading silence)
    sound_queued: bool = False  # a frame that is not silence has been queued

    @property
    def heard_ms(self) -> int:
        """What the user heard of the model's audio: frames sent, less the alignment lead, clamped to what was
        received (the last frame may be padding)."""
        return int(max(0.0, min(self.emitted_frames * FRAME_MS - self.lead_ms, self.received_ms)))


@dataclass
class CallStats:
    frames_played: int = 0
    silence_frames: int = 0
    leading_silence_skipped: int = 0
    frames_dropped: int = 0  # the playout queue was full
    barge_ins: int = 0
    truncations: int = 0
    deletions: int = 0
    client_errors: int = 0


class CallCore:
    def __init__(self, interruptions: bool = True, max_playout_frames: int = 30_000) -> None:
        self.interruptions = interruptions
        self.max_playout_frames = max_playout_frames
        self.stats = CallStats()
        self._queue: deque[tuple[ItemPlayout, bytes, bool]] = deque()  # (item, frame, is leading silence)
        self._items: dict[str, ItemPlayout] = {}  # audio items of responses not yet finished playing
        self._queued_by_response: dict[str, int] = {}
        self._active_response: str | None = None  # between response.created and response.done
        self._done: set[str] = set()  # responses whose response.done has come
        self._playing: str | None = None  # response whose output_audio_buffer.started went out
        self._flushed: set[str] = set()  # responses whose late audio must be dropped
        self._own_event_ids: deque[str] = deque(maxlen=256)

    # --- upstream -> relay -------------------------------------------------------------------------------------

    def on_server_event(self, event: dict[str, Any]) -> list[Action]:
        """Any upstream event but audio deltas (see on_audio). Returns what to send where."""
        kind = event.get("type")
        if kind == "error" and self._is_own(event):
            return []  # our own cancel/truncate/delete lost a race: harmless by design
        actions: list[Action] = [ToClient(event)]
        if kind == "response.created":
            self._active_response = event["response"]["id"]
        elif kind == "response.done":
            response_id = event["response"]["id"]
            if self._active_response == response_id:
                self._active_response = None
            if response_id in self._flushed:
                self._flushed.discard(response_id)  # response.done is its last event: no more audio to drop
            elif response_id in self._queued_by_response:  # it had audio; text-only responses need no tracking
                self._done.add(response_id)
                actions += self._maybe_stopped(response_id)
        elif kind == "input_audio_buffer.speech_started" and self.interruptions:
            flushed = self.flush()
            if flushed:
                self.stats.barge_ins += 1
            actions += flushed
        return actions

    def on_audio(self, response_id: str, item_id: str, frames: list[bytes], source_ms: float,
                 lead_ms: float = 0.0) -> list[Action]:
        """The model's audio for an item, as 20 ms frames ready for the encoder; `lead_ms` of silence were put
        in front of the item's first frame (they are not part of what the user heard of the item)."""
        if response_id in self._flushed:
            return []
        item = self._items.get(item_id)
        if item is None:
            item = self._items[item_id] = ItemPlayout(response_id, item_id, lead_ms=lead_ms)
        item.received_ms += source_ms
        for frame in frames:
            if len(self._queue) >= self.max_playout_frames:
                self.stats.frames_dropped += 1
                continue
            leading_silence = not item.sound_queued and _is_silence(frame)
            item.sound_queued = item.sound_queued or not leading_silence
            self._queue.append((item, frame, leading_silence))
            item.queued_frames += 1
            self._queued_by_response[response_id] = self._queued_by_response.get(response_id, 0) + 1
        return []

    # --- the playout clock -------------------------------------------------------------------------------------

    def tick(self) -> tuple[bytes | None, list[Action]]:
        """One 20 ms tick: the frame to send now (None: silence), and the events it causes."""
        if not self._queue:
            self.stats.silence_frames += 1
            return None, []
        # Behind schedule (more than this frame queued) with silence at the start of an item: skip it. That wins
        # back the delay a burst left in the queue; it never cuts a pause inside speech. Skipped frames count as
        # played: the item's timeline moves on, and truncation stays exact.
        while len(self._queue) > 1 and self._queue[0][2]:
            self._dequeue()
            self.stats.leading_silence_skipped += 1
        item, frame = self._dequeue()
        self.stats.frames_played += 1
        response_id = item.response_id
        actions: list[Action] = []
        if self._playing != response_id:
            self._playing = response_id
            actions.append(ToClient(_event("output_audio_buffer.started", response_id=response_id)))
        actions += self._maybe_stopped(response_id)
        return frame, actions

    def _dequeue(self) -> tuple[ItemPlayout, bytes]:
        item, frame, _ = self._queue.popleft()
        item.queued_frames -= 1
        item.emitted_frames += 1
        self._queued_by_response[item.response_id] -= 1
        return item, frame

    def _maybe_stopped(self, response_id: str) -> list[Action]:
        """output_audio_buffer.stopped once a finished response's audio has all been played."""
        if self._playing != response_id or response_id not in self._done:
            return []
        if self._queued_by_response.get(response_id, 0) > 0:
            return []
        self._forget(response_id)
        self._playing = None
        return [ToClient(_event("output_audio_buffer.stopped", response_id=response_id))]

    def _forget(self, response_id: str) -> None:
        self._done.discard(response_id)
        self._queued_by_response.pop(response_id, None)
        for item_id in [i for i, item in self._items.items() if item.response_id == response_id]:
            del self._items[item_id]

    # --- barge-in ----------------------------------------------------------------------------------------------

    def flush(self) -> list[Action]:
        """Stop the model's audio now; cancel its response if still generating; tell the model what was heard."""
        responses = {r for r in (self._playing, self._active_response) if r is not None}
        responses |= {item.response_id for item, _, _ in self._queue}
        if not responses:
            return []
        self._queue.clear()
        actions: list[Action] = []
        if self._active_response is not None:
            actions.append(ToUpstream(self._own("response.cancel")))
        for item in [i for i in self._items.values() if i.response_id in responses]:
            if item.response_id in self._done and item.queued_frames == 0 and item.heard_ms >= item.received_ms:
                continue  # fully heard: nothing to correct
            if item.heard_ms > 0:
                self.stats.truncations += 1
                actions.append(ToUpstream(self._own(
                    "conversation.item.truncate", item_id=item.item_id, content_index=0, audio_end_ms=item.heard_ms
                )))
            else:
                self.stats.deletions += 1
                actions.append(ToUpstream(self._own("conversation.item.delete", item_id=item.item_id)))
        cleared = self._playing or self._active_response or next(iter(responses))
        actions.append(ToClient(_event("output_audio_buffer.cleared", response_id=cleared)))
        for response_id in responses:
            self._forget(response_id)
            if response_id == self._active_response:
                self._flushed.add(response_id)
        self._playing = None
        return actions

    # --- client -> relay ---------------------------------------------------------------------------------------

    def on_client_event(self, text: str) -> list[Action]:
        """A data-channel message from the client."""
        try:
            event = parse_client_event(text)
        except ProtocolError as error:
            self.stats.client_errors += 1
            return [ToClient(_error_event(error))]
        if event.type == "input_audio_buffer.append":
            self.stats.client_errors += 1
            return [ToClient(_error_event(ProtocolError(
                "invalid_value",
                "input_audio_buffer.append is not supported over WebRTC: the audio goes by the RTP track.",
                "type",
                event.event_id,
            )))]
        if event.type == "output_audio_buffer.clear":
            return self.flush()
        raw = event.model_dump(exclude_unset=True)
        if event.type == "session.update" and not self.interruptions:
            turn_detection = raw["session"].get("audio", {}).get("input", {}).get("turn_detection")
            if turn_detection:
                turn_detection["interrupt_response"] = False
        return [ToUpstream(raw)]

    # --- relay-originated upstream events ----------------------------------------------------------------------

    def _own(self, event_type: str, **fields: Any) -> dict[str, Any]:
        event_id = new_id(RELAY_EVENT_PREFIX + "evt")
        self._own_event_ids.append(event_id)
        return {"type": event_type, "event_id": event_id, **fields}

    def _is_own(self, error_event: dict[str, Any]) -> bool:
        error = error_event.get("error")
        return isinstance(error, dict) and error.get("event_id") in self._own_event_ids


def _is_silence(frame: bytes) -> bool:
    samples = np.frombuffer(frame, dtype="<i2")
    return int(samples.max()) < SILENCE_PEAK and int(samples.min()) > -SILENCE_PEAK


def _event(event_type: str, **fields: Any) -> dict[str, Any]:
    return {"type": event_type, "event_id": new_id("event"), **fields}


def _error_event(error: ProtocolError) -> dict[str, Any]:
    return _event("error", error=error.detail())

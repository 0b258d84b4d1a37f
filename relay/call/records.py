"""The call's records: its conversation as text (History) with the transcript log, and its stereo recording.

Owns: the History (fed as a listener of the call's events, see fanout.py: what the model said and what it cost,
the items added, how much of a reply the user heard), appending its new entries to `RELAY_HISTORY_DIR/<id>.jsonl`,
and the recording: the StereoTimeline the audio path feeds (the call calls `recording.on_user_audio` /
`on_model_frame` directly, 50 times a second each way) and its WAV in `RELAY_RECORDINGS_DIR/<id>.wav`, written once a
second off the event loop. A failing disk costs the log or the recording, never the call.
Must not touch: the peer, the upstream socket or the core; what the records say goes to the client only through
`tell` (the `relay.usage` after each response).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import wave
from pathlib import Path
from typing import Any, Callable

from relay.config import Settings
from relay.core.history import History
from relay.core.recording import RATE, StereoTimeline

log = logging.getLogger("relay.call")
WRITE_EVERY_S = 1.0  # the recording's WAV grows this often


class Records:
    def __init__(self, call_id: str, settings: Settings, history: History | None,
                 tell: Callable[[dict[str, Any]], None], rate: int = RATE) -> None:
        self.call_id = call_id
        self.history = history or History(settings.prices)
        self._tell = tell
        self._log = Path(settings.history_dir) / f"{call_id}.jsonl" if settings.history_dir else None
        self._wav_path = Path(settings.recordings_dir) / f"{call_id}.wav" if settings.recordings_dir else None
        self.recording = StereoTimeline(time.monotonic(), rate) if self._wav_path else None  # the call's audio rate
        self._wav: wave.Wave_write | None = None
        self._wav_write: asyncio.Future | None = None

    # --- the call's events (fanout.py) -------------------------------------------------------------------------

    def told(self, event: dict[str, Any], text: str) -> None:
        if event["type"] == "relay.item.truncated":
            self.history.on_truncated(event["item_id"], event["audio_end_ms"], event["audio_received_ms"])
            self.save()

    def heard(self, event: dict[str, Any]) -> None:
        usage = self.history.on_server_event(event)
        if usage is not None:
            self._tell(usage)
        self.save()

    def added(self, event: dict[str, Any]) -> None:
        self.history.on_client_event(event)
        self.save()

    def upstream_lost(self) -> None:
        """The upstream session ended with replies under way: what they had said joins the transcript."""
        self.history.on_upstream_lost()
        self.save()

    # --- the transcript log ------------------------------------------------------------------------------------

    def save(self) -> None:
        """Append new transcript entries to the call's log file, if there is one."""
        entries = self.history.take_new()
        if not entries or self._log is None:
            return
        try:
            with self._log.open("a", encoding="utf-8") as log_file:
                log_file.write("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries))
        except OSError as exc:
            log.warning("call %s: transcript log disabled: %s", self.call_id, exc, extra={"call_id": self.call_id})
            self._log = None

    # --- the recording -----------------------------------------------------------------------------------------

    async def keep_recording(self) -> None:
        """The recording's task (the call owns it): write what was recorded once a second, off the event loop."""
        assert self._wav_path is not None and self.recording is not None
        try:
            self._wav = await asyncio.to_thread(_open_stereo_wav, self._wav_path, self.recording.rate)
            while True:
                await asyncio.sleep(WRITE_EVERY_S)
                # Shielded: cancelling this task must not leave a write running while finish() ends the file.
                self._wav_write = asyncio.ensure_future(
                    asyncio.to_thread(self._wav.writeframes, self.recording.take(time.monotonic())))
                await asyncio.shield(self._wav_write)
        except OSError as exc:
            log.warning("call %s: recording stopped: %s", self.call_id, exc, extra={"call_id": self.call_id})
            self.recording = None

    async def finish(self) -> None:
        """The call ended (its tasks are cancelled): write the rest of the recording and close the file."""
        if self._wav is None:
            return
        wav, self._wav = self._wav, None
        if self._wav_write is not None:
            with contextlib.suppress(OSError):
                await self._wav_write  # the last periodic write, if it is still running
        rest = self.recording.take(time.monotonic(), final=True) if self.recording is not None else b""

        def finish() -> None:
            wav.writeframes(rest)
            wav.close()  # writes the final sizes into the header

        try:
            await asyncio.to_thread(finish)
        except OSError as exc:
            log.warning("call %s: recording not finished: %s", self.call_id, exc, extra={"call_id": self.call_id})


def _open_stereo_wav(path: Path, rate: int) -> wave.Wave_write:
    wav = wave.open(str(path), "wb")
    wav.setnchannels(2)
    wav.setsampwidth(2)
    wav.setframerate(rate)
    return wav

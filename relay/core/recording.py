"""A call's audio on one clock, sans-I/O: the user on the left as the relay received it, the model on the right as
the relay sent it, and the measure practitioners use on such a recording (the gap from the end of the user's speech
to the start of the model's).

Each piece of audio is placed by the time it was handed over: the user's when its packet arrived (it ends then), the
model's when its frame left (it starts then). Consecutive pieces are laid end to end unless a piece comes more than
10 ms after the end of the last: then silence fills the gap, so small shortfalls cannot add up to a drift (measured:
with a 60 ms allowance, the user's side ran ~40 ms early after 2 s of a real call). A run of pieces
is anchored on its first piece; when a later piece shows that the first came late (it arrived earlier than its
place in the run), the run moves earlier into the silence before it, so one late packet does not shift the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RATE = 24000  # an Opus call's (the upstream's PCM); a G.711 call's recording is at its own 8 kHz
GAP_SLACK_S = 0.010
HOLD_S = 0.100  # the newest audio is not handed out yet: a run may still move earlier into the silence before it


class _Channel:
    def __init__(self, rate: int) -> None:
        self._slack = GAP_SLACK_S * rate
        self.pcm = bytearray()  # placed and not yet taken
        self.end = 0  # the sample after the last one placed, counted from the start of the call
        self._run_at = 0  # where the current run begins in `pcm` (samples)
        self._movable = 0  # silence just before the run, still in `pcm`, that the run may move into

    def place(self, pcm: bytes, start: int) -> None:
        if start > self.end + self._slack:
            silence = start - self.end  # a real gap
            self.pcm += bytes(silence * 2)
            self.end = start
            self._run_at, self._movable = len(self.pcm) // 2, silence
        elif start < self.end and self._movable:
            shift = min(self.end - start, self._movable)  # the run's first piece came late: move the run earlier
            del self.pcm[(self._run_at - shift) * 2 : self._run_at * 2]
            self._run_at -= shift
            self._movable -= shift
            self.end -= shift
        self.pcm += pcm
        self.end += len(pcm) // 2

    def consumed(self, samples: int) -> None:
        """`samples` left `pcm` from the front: what was written can no longer move."""
        self._run_at -= samples
        if self._run_at < 0:
            self._run_at, self._movable = 0, 0
        self._movable = min(self._movable, self._run_at)


class StereoTimeline:
    def __init__(self, start: float, rate: int = RATE) -> None:
        self._start = start
        self.rate = rate
        self._user, self._model = _Channel(rate), _Channel(rate)

    def on_user_audio(self, pcm: bytes, now: float) -> None:
        """Audio from the user that arrived at `now` (so it ended then)."""
        samples = len(pcm) // 2
        self._user.place(pcm[: samples * 2], self._sample(now) - samples)

    def on_model_frame(self, pcm: bytes | None, now: float, frame_samples: int = 480) -> None:
        """The frame the model's track sent at `now` (None: silence)."""
        self._model.place(pcm if pcm is not None else bytes(frame_samples * 2), self._sample(now))

    def take(self, now: float, final: bool = False) -> bytes:
        """Interleaved stereo PCM16 up to `now` less HOLD_S (`final`: everything). A side that has sent nothing
        for that long (a client that stopped its microphone) is silence until then, so the other side is written
        out rather than held in memory."""
        until = self._sample(now) - int(HOLD_S * self.rate)
        for channel in (self._user, self._model):
            if channel.end < until:
                channel.place(b"", until)  # silence up to `until`, if it is a real gap
        left, right = len(self._user.pcm) // 2, len(self._model.pcm) // 2
        count = max(left, right) if final else min(left, right) - int(HOLD_S * self.rate)
        if count <= 0:
            return b""
        out = np.zeros(count * 2, dtype="<i2")
        for index, channel in enumerate((self._user, self._model)):
            have = min(count, len(channel.pcm) // 2)
            out[index : have * 2 : 2] = np.frombuffer(channel.pcm, dtype="<i2", count=have)
            del channel.pcm[: have * 2]
            channel.consumed(have)
        return out.tobytes()

    def _sample(self, now: float) -> int:
        return max(0, round((now - self._start) * self.rate))


# --- the measure -------------------------------------------------------------------------------------------------

WINDOW_MS = 10
SPEECH_DB = -40.0
TURN_SILENCE_MS = 500  # a pause this long ends a turn


@dataclass
class Turn:
    user_end_s: float  # the end of the user's speech
    model_start_s: float | None  # the start of the model's next speech (None: it did not speak before the next turn)

    @property
    def gap_ms(self) -> float | None:
        return None if self.model_start_s is None else (self.model_start_s - self.user_end_s) * 1000


def speech_windows(samples: np.ndarray, rate: int) -> list[int]:
    """Indexes of the WINDOW_MS windows of PCM16 `samples` over SPEECH_DB: what the analysis counts as speech."""
    size = rate * WINDOW_MS // 1000
    windows = samples[: samples.size // size * size].astype(np.float64).reshape(-1, size)
    return [int(i) for i in np.nonzero(10 * np.log10(np.mean(windows**2, axis=1) / 32768**2 + 1e-12) > SPEECH_DB)[0]]


def _speech_runs(samples: np.ndarray, rate: int) -> list[tuple[float, float]]:
    """(start, end) seconds of speech: speech windows, pauses under TURN_SILENCE_MS bridged."""
    runs: list[list[float]] = []
    for index in speech_windows(samples, rate):
        start, end = index * WINDOW_MS / 1000, (index + 1) * WINDOW_MS / 1000
        if runs and start - runs[-1][1] < TURN_SILENCE_MS / 1000:
            runs[-1][1] = end
        else:
            runs.append([start, end])
    return [(a, b) for a, b in runs]


def turns(stereo: np.ndarray, rate: int = RATE) -> list[Turn]:
    """Per user turn: when the user stopped and when the model started answering (its first speech after that,
    before the user's next turn)."""
    user, model = _speech_runs(stereo[0::2], rate), _speech_runs(stereo[1::2], rate)
    out = []
    for index, (_, user_end) in enumerate(user):
        next_user = user[index + 1][0] if index + 1 < len(user) else float("inf")
        start = next((a for a, _ in model if user_end <= a < next_user), None)
        out.append(Turn(user_end, start))
    return out

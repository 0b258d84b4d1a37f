"""The Realtime session as the service fills it in: its defaults, the model names, and the effective session a
client secret reports.

`default_session` is what a GA session holds when nobody has set anything (OpenAI's documented defaults); the
relay reports it, with the operator's and the creator's settings on top, as a client secret's `session`, and the
simulator starts its sessions from it.
"""

from __future__ import annotations

import copy
import re
from typing import Any

# The realtime models the `openai` SDK's session types name (tests/unit/test_session_defaults.py checks this list
# against them): what a client may ask for by default (RELAY_MODELS).
REALTIME_MODELS = (
    "gpt-realtime", "gpt-realtime-1.5", "gpt-realtime-2", "gpt-realtime-2.1", "gpt-realtime-2.1-mini",
    "gpt-realtime-2025-08-28", "gpt-realtime-mini", "gpt-realtime-mini-2025-10-06", "gpt-realtime-mini-2025-12-15",
    "gpt-4o-realtime-preview", "gpt-4o-realtime-preview-2024-10-01", "gpt-4o-realtime-preview-2024-12-17",
    "gpt-4o-realtime-preview-2025-06-03", "gpt-4o-mini-realtime-preview", "gpt-4o-mini-realtime-preview-2024-12-17",
)
MODEL_NAME = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # what any service could call a model (or a deployment)

SERVER_VAD_DEFAULTS = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 500,
    "create_response": True,
    "interrupt_response": True,
    "idle_timeout_ms": None,
}
PCM_24K = {"type": "audio/pcm", "rate": 24000}


def default_session(model: str, instructions: str = "") -> dict[str, Any]:
    """A GA realtime session with nothing set but its model (and instructions, which the service leaves empty)."""
    return {
        "type": "realtime",
        "object": "realtime.session",
        "model": model,
        "output_modalities": ["audio"],
        "instructions": instructions,
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "include": None,
        "audio": {
            "input": {
                "format": dict(PCM_24K),
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": dict(SERVER_VAD_DEFAULTS),
            },
            "output": {"format": dict(PCM_24K), "voice": "marin", "speed": 1.0},
        },
    }


def filled_in(session: dict[str, Any], model: str) -> dict[str, Any]:
    """`session` (a realtime session as a client or operator writes it) with every field the service fills in."""
    return merge(default_session(model), {k: copy.deepcopy(v) for k, v in session.items() if k != "model"})


# What a session.update merges key by key (as the service does), as a tree: the session itself, its `audio`, and
# that one's `input` and `output`; any other value is replaced whole.
MERGED: dict[str, Any] = {"audio": {"input": {}, "output": {}}}


def merge(base: dict[str, Any], update: dict[str, Any], tree: dict[str, Any] = MERGED) -> dict[str, Any]:
    """`update` applied to `base` as a session.update applies it: key by key, down the MERGED objects."""
    result = dict(base)
    for name, value in update.items():
        parts = tree.get(name)
        if parts is not None and isinstance(value, dict) and isinstance(result.get(name), dict):
            result[name] = merge(result[name], value, parts)
        else:
            result[name] = value
    return result

"""The session as the service fills it in (relay.protocol.session), checked against the `openai` SDK's types."""

from __future__ import annotations

from openai.types.realtime import RealtimeSessionCreateResponse

from relay.config import Settings
from relay.protocol.session import REALTIME_MODELS, default_session, filled_in, merge
from relay.upstream.target import ModelChoice, UpstreamTarget
from tests.oracle import SESSION_MODELS


def test_the_default_models_are_the_realtime_models_the_sdk_names():
    assert "gpt-realtime" in SESSION_MODELS and len(SESSION_MODELS) > 10
    assert set(REALTIME_MODELS) == {name for name in SESSION_MODELS if "realtime" in name}
    settings = Settings.load(env={})
    openai = ModelChoice.of(settings, UpstreamTarget("openai", "wss://api.openai.com/v1/realtime?model=gpt-realtime"))
    assert openai == ModelChoice("gpt-realtime", list(REALTIME_MODELS))


def test_with_another_provider_clients_may_ask_only_for_its_own_model_unless_told():
    azure = UpstreamTarget("url", "wss://r.openai.azure.com/openai/v1/realtime?model=my-deployment")
    assert ModelChoice.of(Settings.load(env={}), azure) == ModelChoice("my-deployment", ["my-deployment"])
    told = Settings.load(env={"RELAY_MODELS": "my-deployment,my-mini"})
    assert ModelChoice.of(told, azure).allowed == ["my-deployment", "my-mini"]
    bare = UpstreamTarget("url", "wss://voice.example.org/v1/realtime")  # no model parameter: RELAY_MODEL names it
    assert ModelChoice.of(Settings.load(env={}), bare) == ModelChoice("gpt-realtime", ["gpt-realtime"])


def test_a_filled_in_session_is_what_openai_answers():
    session = filled_in({"type": "realtime", "instructions": "Be Ada.", "model": "ignored",
                         "audio": {"output": {"voice": "cedar"}, "input": {"transcription": {"model": "whisper-1"}}}},
                        "gpt-realtime-mini")
    parsed = RealtimeSessionCreateResponse.model_validate({**session, "id": "sess_1", "expires_at": 1})
    assert (parsed.model, parsed.instructions, parsed.audio.output.voice) == ("gpt-realtime-mini", "Be Ada.", "cedar")
    assert parsed.audio.output.format.type == "audio/pcm" and parsed.audio.output.speed == 1.0  # defaults kept
    assert parsed.audio.input.transcription.model == "whisper-1" and parsed.audio.input.turn_detection.threshold == 0.5
    assert default_session("gpt-realtime")["audio"]["input"]["turn_detection"] is not \
        default_session("gpt-realtime")["audio"]["input"]["turn_detection"]  # fresh each time: callers may change it


def test_settings_combine_as_a_session_update_does():
    base = {"instructions": "A", "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 0.4}},
                                           "output": {"voice": "marin"}}}
    update = {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}, "output": {"speed": 1.2}}, "tools": []}
    assert merge(base, update) == {
        "instructions": "A", "tools": [],
        "audio": {"input": {"turn_detection": {"type": "semantic_vad"}},  # replaced whole, as the service does
                  "output": {"voice": "marin", "speed": 1.2}}}
    assert base["audio"]["output"] == {"voice": "marin"}  # the base is not changed

"""A G.711 call's path through the relay, piece by piece: the codec chosen from the offer, the inbound pass-through
(losses filled with the law's silence), the playout track's ready packets, the core's format and silence, framing."""

from __future__ import annotations

import fractions
import json

import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCRtpSender
from aiortc.codecs import get_encoder

from relay.audio import g711
from relay.audio.convert import Chunker
from relay.audio.formats import OPUS, PCMA, PCMU
from relay.call.peer import PeerLink, offered_audio, with_static_rtpmaps
from relay.config import Settings
from relay.core.call import CallCore, ToUpstream
from relay.webrtc.aiortc_internals import restrict_host_addresses
from relay.webrtc.inbound import PassThroughInbound
from relay.webrtc.playout import PlayoutTrack
from tests.unit.test_media import FakeClock, Packet


async def offer(*codecs: str) -> str:
    """A real aiortc offer whose audio lists `codecs` (mime subtypes), in that order."""
    pc = RTCPeerConnection()
    transceiver = pc.addTransceiver("audio")
    by_name = {c.mimeType.lower().removeprefix("audio/"): c for c in RTCRtpSender.getCapabilities("audio").codecs}
    transceiver.setCodecPreferences([by_name[name] for name in codecs])
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


@pytest.mark.parametrize(("codecs", "chosen"), [
    (("opus",), OPUS), (("pcmu", "opus"), OPUS), (("pcma", "pcmu", "opus"), OPUS),
    (("pcmu",), PCMU), (("pcma",), PCMA), (("pcma", "pcmu"), PCMA), (("pcmu", "pcma"), PCMU),
])
async def test_opus_when_offered_else_the_first_g711_law_the_offer_lists(codecs, chosen):
    assert offered_audio(await offer(*codecs)) is chosen


async def test_an_offer_with_none_of_them_gets_none_and_unreadable_sdp_is_left_to_negotiation():
    g722 = (await offer("pcmu")).replace("PCMU/8000", "G722/8000")
    assert offered_audio(g722) is None
    assert offered_audio("not sdp at all") is OPUS  # negotiation says what is wrong with it


# --- inbound: payloads as they are --------------------------------------------------------------------------------


def g711_packets(count: int, law: str = g711.PCMU, first_seq: int = 7, first_ts: int = 1000) -> list[Packet]:
    tone = (np.sin(np.arange(160 * count) * 2 * np.pi * 440 / 8000) * 8000).astype("<i2").tobytes()
    payloads = [g711.encode(tone[i * 320:(i + 1) * 320], law) for i in range(count)]
    return [Packet(first_seq + i, first_ts + i * 160, payload) for i, payload in enumerate(payloads)]


def run(packets: list[Packet], audio=PCMU, arrivals: list[float] | None = None) -> tuple[PassThroughInbound, list[bytes]]:
    chunks: list[bytes] = []
    times = iter(arrivals or [i * 0.02 for i in range(len(packets))])
    now = [0.0]
    tap = PassThroughInbound(chunks.append, audio, clock=lambda: now[0])
    for packet in packets:
        now[0] = next(times)
        tap.add(packet)
    return tap, chunks


@pytest.mark.parametrize("audio", [PCMU, PCMA])
def test_each_payload_goes_upstream_untouched(audio):
    packets = g711_packets(10, audio.upstream_type)
    tap, chunks = run(packets, audio)
    assert chunks == [p._data for p in packets]
    assert tap.stats.packets == 10 and tap.stats.payload_bytes == 1600 and tap.stats.gap_fill_ms == 0


@pytest.mark.parametrize("audio", [PCMU, PCMA])
def test_a_lost_packet_is_filled_with_the_laws_silence_so_the_clock_stays_true(audio):
    packets = g711_packets(10, audio.upstream_type)
    tap, chunks = run(packets[:4] + packets[5:], audio)
    assert len(b"".join(chunks)) == 1600  # 200 ms of audio at 8 bytes a ms, the lost 20 ms included
    assert chunks[4] == bytes([g711.SILENCE[audio.upstream_type]]) * 160
    assert g711.peak(chunks[4], audio.upstream_type) <= 8
    assert tap.stats.lost == 1 and tap.stats.gap_fill_ms == 20


def test_reordered_packets_come_out_in_order_and_a_client_cannot_outrun_real_time():
    packets = g711_packets(6)
    _, chunks = run([packets[0], packets[2], packets[1], *packets[3:]])
    assert chunks == [p._data for p in packets]
    burst = g711_packets(100)
    tap, chunks = run(burst, arrivals=[0.0] * 100)  # 2 s of audio at once
    assert len(b"".join(chunks)) == 500 * 8  # the slack only: 500 ms
    assert tap.stats.over_budget_ms == 1500


# --- outbound: ready packets on an 8 kHz clock -----------------------------------------------------------------------


async def test_the_playout_track_hands_the_models_bytes_over_as_packets_on_an_8k_clock():
    clock = FakeClock()
    frame = g711.encode(b"\x10\x20" * 160, g711.PCMA)
    frames = iter([frame] * 2)
    track = PlayoutTrack(lambda: next(frames, None), PCMA, clock=clock, sleep=clock.sleep)
    out = [await track.recv() for _ in range(50)]
    assert [p.pts for p in out] == [i * 160 for i in range(50)] and out[0].time_base == fractions.Fraction(1, 8000)
    assert bytes(out[0]) == frame and bytes(out[2]) == bytes([0xD5]) * 160  # then A-law silence
    encoder = get_encoder(next(c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType == "audio/PCMA"))
    payloads, timestamp = encoder.pack(out[3])  # what the sender does with it: no coding
    assert payloads == [bytes([0xD5]) * 160] and timestamp == 480


def test_the_last_frame_of_an_item_is_padded_with_silence_not_zeros():
    chunker = Chunker(160, pad=PCMU.silence(160))
    assert chunker.push(b"\x01" * 200) == [b"\x01" * 160]
    assert chunker.flush() == b"\x01" * 40 + b"\xff" * 120


# --- the core: the call's format, the law's silence ------------------------------------------------------------------


@pytest.mark.parametrize("audio", [PCMU, PCMA])
def test_the_upstream_session_carries_the_calls_law_both_ways_always(audio):
    core = CallCore(audio=audio)
    wanted = {"type": audio.upstream_type}
    for offered in (None, {}, {"instructions": "x", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}},
                                                              "output": {"voice": "cedar"}}}):
        session = core.upstream_session(offered)
        assert session["audio"]["input"]["format"] == wanted and session["audio"]["output"]["format"] == wanted
    assert session["instructions"] == "x" and session["audio"]["output"]["voice"] == "cedar"
    assert CallCore().upstream_session(None) is None  # Opus: the service's default is its format


@pytest.mark.parametrize("audio", [PCMU, PCMA])
def test_a_clients_format_is_replaced_by_the_calls(audio):
    core = CallCore(audio=audio)
    update = {"type": "session.update", "session": {"type": "realtime", "audio": {
        "input": {"format": {"type": "audio/pcm", "rate": 24000}}, "output": {"format": {"type": "audio/pcmu"}}}}}
    _, text = core.on_client_event(json.dumps(update))
    sent = json.loads(text)["session"]["audio"]
    assert sent["input"]["format"] == sent["output"]["format"] == {"type": audio.upstream_type}
    create = {"type": "response.create", "response": {"audio": {"output": {"format": {"type": "audio/pcm"}}}}}
    _, text = core.on_client_event(json.dumps(create))
    assert json.loads(text)["response"]["audio"]["output"]["format"] == {"type": audio.upstream_type}


@pytest.mark.parametrize("audio", [PCMU, PCMA])
def test_leading_silence_in_the_laws_own_bytes_is_skipped_and_truncation_stays_exact(audio):
    core = CallCore(audio=audio)
    core.on_server_event({"type": "response.created", "response": {"id": "resp_1"}})
    loud = g711.encode((np.ones(160) * 6000).astype("<i2").tobytes(), audio.upstream_type)
    frames = [audio.silence(160)] * 5 + [loud] * 10
    core.on_audio("resp_1", "item_1", frames, 15 * 20)
    played = [core.tick()[0] for _ in range(3)]
    assert played == [loud] * 3  # the 100 ms of silence before the voice were skipped, not played
    actions = core.on_server_event({"type": "input_audio_buffer.speech_started"})
    truncate = next(a.event for a in actions if isinstance(a, ToUpstream) and a.event["type"] == "conversation.item.truncate")
    assert truncate["audio_end_ms"] == (5 + 3) * 20  # skipped frames count as heard: the item's own timeline


# --- the answer: one codec, no telephone-event ---------------------------------------------------------------------


def with_telephone_event(sdp: str) -> str:
    """A gateway's offer: RFC 4733 telephone-event beside the codecs (payload type 101)."""
    lines = sdp.split("\r\n")
    out = []
    for line in lines:
        if line.startswith("m=audio"):
            line += " 101"
        out.append(line)
        if line.startswith("a=rtpmap:0 PCMU/8000") or line.startswith("a=rtpmap:8 PCMA/8000"):
            out += ["a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-16"]
    return "\r\n".join(out)


@pytest.mark.parametrize(("codecs", "rtpmap"), [(("pcmu",), "a=rtpmap:0 PCMU/8000"),
                                                (("pcma", "pcmu"), "a=rtpmap:8 PCMA/8000")])
async def test_the_answer_names_the_chosen_law_alone_without_telephone_event(codecs, rtpmap):
    restrict_host_addresses(["127.0.0.1"])
    try:
        sdp = with_telephone_event(await offer(*codecs))
        assert "telephone-event" in sdp
        audio = offered_audio(sdp)
        peer = PeerLink("rtc_test", Settings.load(env={}), 0.0, on_audio=lambda a: None, next_frame=lambda: None,
                        on_text=lambda t: None, on_gone=lambda r: None, audio=audio)
        try:
            answer = await peer.negotiate(sdp)
        finally:
            await peer.close()
    finally:
        restrict_host_addresses([])
    m_line = next(line for line in answer.splitlines() if line.startswith("m=audio"))
    assert m_line.split()[3:] == [rtpmap.split(":")[1].split()[0]]
    assert [line for line in answer.splitlines() if line.startswith("a=rtpmap")] == [rtpmap]


async def test_static_payload_types_an_offer_leaves_unnamed_are_named_and_answered():
    named = await offer("pcmu", "pcma")
    bare = "\r\n".join(line for line in named.split("\r\n") if not line.startswith("a=rtpmap:"))
    assert "PCMU" not in bare and offered_audio(bare) is None  # aiortc knows only named codecs
    filled = with_static_rtpmaps(bare)
    assert offered_audio(filled) is PCMU
    assert filled.count("a=rtpmap:0 PCMU/8000") == 1 and filled.count("a=rtpmap:8 PCMA/8000") == 1
    assert with_static_rtpmaps(named) == named  # named already: untouched


def test_a_client_secret_locks_no_audio_format():
    from relay.server.calls import call_policy
    from relay.tools import Toolbox
    secret_session = {"type": "realtime", "model": "gpt-realtime", "audio": {
        "input": {"format": {"type": "audio/pcm", "rate": 24000}, "noise_reduction": {"type": "near_field"}},
        "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "cedar"}}}
    policy = call_policy(Settings.load(env={}), Toolbox([]), secret_session)
    assert policy.locked == {"audio": {"input": {"noise_reduction": {"type": "near_field"}}, "output": {"voice": "cedar"}}}
    core = CallCore(audio=PCMU, policy=policy)
    update = {"type": "session.update", "session": {"type": "realtime", "audio": {
        "input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}}}}
    actions, _ = core.on_client_event(json.dumps(update))
    assert not actions  # the format the client was told is not "kept": it is the call's


def test_an_opus_calls_offered_session_naming_g711_goes_up_as_pcm():
    session = CallCore().upstream_session({"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcmu"}},
                                                                        "output": {"format": {"type": "audio/pcma"}}}})
    assert session["audio"]["input"]["format"] == session["audio"]["output"]["format"] == {"type": "audio/pcm",
                                                                                          "rate": 24000}


def test_an_upstream_that_reports_another_format_than_the_calls_is_caught():
    pcmu = {"audio": {"input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}}}
    assert CallCore(audio=PCMU).format_mismatch(pcmu) is None
    assert CallCore(audio=PCMU).format_mismatch({"audio": {"input": {}}}) is None  # not reported: on trust
    ignored = {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}, "output": pcmu["audio"]["output"]}}
    assert "audio/pcmu" in CallCore(audio=PCMU).format_mismatch(ignored)
    assert CallCore().format_mismatch(pcmu) is not None
    assert CallCore().format_mismatch({"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}})
    assert CallCore().format_mismatch({"audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}}}}) is None

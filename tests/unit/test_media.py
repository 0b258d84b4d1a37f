"""The media adapters without a network: the inbound tap fed with real Opus packets, the playout track on a fake
clock."""

from __future__ import annotations

import fractions
import wave
from dataclasses import dataclass

import av
import numpy as np
import pytest

from relay.audio import opus
from relay.webrtc.inbound import InboundAudio
from relay.webrtc.playout import PlayoutTrack
from tests.helpers import FIXTURES


@dataclass
class Packet:  # what aiortc hands a jitter buffer: a depayloaded RTP packet
    sequence_number: int
    timestamp: int
    _data: bytes


def opus_packets(count: int, first_seq: int = 100, first_ts: int = 5000) -> list[Packet]:
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 48000, "stereo", "s16"
    encoder.time_base = fractions.Fraction(1, 48000)
    tone = (np.sin(np.arange(960 * count) * 2 * np.pi * 440 / 48000) * 8000).astype("<i2")
    payloads = []
    for i in range(count):
        frame = av.AudioFrame.from_ndarray(np.repeat(tone[i * 960 : (i + 1) * 960], 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts = 48000, i * 960
        payloads += [bytes(p) for p in encoder.encode(frame)]
    return [Packet((first_seq + i) % 65536, (first_ts + i * 960) % 2**32, data) for i, data in enumerate(payloads)]


def run(packets: list[Packet], arrivals: list[float] | None = None, **kwargs) -> tuple[InboundAudio, list[bytes]]:
    """Feed the packets as arriving 20 ms apart (or at `arrivals`, in seconds)."""
    arrivals = arrivals or [i * 0.020 for i in range(len(packets))]
    now = iter(arrivals)
    chunks: list[bytes] = []
    tap = InboundAudio(chunks.append, clock=lambda: next(now), **kwargs)
    for packet in packets:
        assert tap.add(packet) == (False, None)  # aiortc's decoder never gets anything
    return tap, chunks


def ms(chunks: list[bytes]) -> float:
    return sum(len(c) for c in chunks) / 48


def test_every_packet_is_decoded_and_sent_at_once_as_24k_mono():
    packets = opus_packets(50)
    tap, chunks = run(packets)
    assert len(chunks) == 50  # one append per packet: nothing waits for the next packet
    assert abs(ms(chunks) - 1000) < 1  # ~1 ms of resampler delay at most
    assert tap.stats.packets == 50 and tap.stats.lost == 0


def test_a_lost_packet_is_rebuilt_by_opus_to_its_length():
    packets = opus_packets(50)
    _, whole = run(packets)
    tap, chunks = run(packets[:20] + packets[21:], reorder_window=2)
    assert abs(ms(chunks) - ms(whole)) < 0.1  # the timeline stays aligned with real time
    assert tap.stats.lost == 1 and tap.stats.recovered_ms == 20 and tap.stats.gap_fill_ms == 0
    original = np.frombuffer(b"".join(whole), "<i2").astype(float)
    rebuilt = np.frombuffer(b"".join(chunks), "<i2").astype(float)
    lost = slice(20 * 480, 21 * 480)
    silence_error = np.sum(original[lost] ** 2)
    assert np.sum((rebuilt[lost] - original[lost]) ** 2) < silence_error / 4  # far closer than silence


def test_in_band_fec_rebuilds_a_lost_frame_better_than_concealment():
    with wave.open(str(FIXTURES / "speech_hello_24k.wav")) as wav:
        speech = wav.readframes(wav.getnframes())
    encoder = opus.Encoder(bitrate=32000, application="voip", fec_loss_percent=10)
    frames = [speech[i : i + 960] for i in range(0, len(speech) - 960, 960)]
    packets = [encoder.encode(frame) for frame in frames]
    energy = [np.sum(np.frombuffer(f, "<i2").astype(float) ** 2) for f in frames]
    k = int(np.argmax(energy[5:-5])) + 5  # lose the loudest frame: the hardest to guess
    reference, with_fec, concealed = opus.Decoder(), opus.Decoder(), opus.Decoder()
    for packet in packets[:k]:
        for decoder in (reference, with_fec, concealed):
            decoder.decode(packet)
    truth = np.frombuffer(reference.decode(packets[k]), "<i2").astype(float)
    errors = [np.sum((np.frombuffer(decoder.recover(480, payload), "<i2").astype(float) - truth) ** 2)
              for decoder, payload in ((with_fec, packets[k + 1]), (concealed, None))]
    assert errors[0] < errors[1] / 2, errors


def test_a_longer_gap_is_a_pause_filled_with_silence():
    packets = opus_packets(50)
    tap, chunks = run(packets[:20] + packets[27:], reorder_window=2)  # 140 ms: beyond what Opus rebuilds
    assert tap.stats.gap_fill_ms == 140 and tap.stats.recovered_ms == 0


def test_reordered_packets_come_out_in_order():
    packets = opus_packets(30)
    _, in_order = run(packets)
    swapped = packets[:10] + [packets[11], packets[10]] + packets[12:]
    tap, chunks = run(swapped)
    assert b"".join(chunks) == b"".join(in_order)
    assert tap.stats.lost == tap.stats.late == 0


def test_a_packet_too_late_for_the_window_is_dropped_not_played_twice():
    packets = opus_packets(30)
    late = packets[:10] + packets[11:15] + [packets[10]] + packets[15:]
    tap, chunks = run(late, reorder_window=2)
    assert tap.stats.lost == 1 and tap.stats.late == 1
    assert abs(ms(chunks) - 600) < 1


def test_a_pause_is_filled_up_to_the_cap_and_sequence_numbers_wrap():
    packets = opus_packets(20, first_seq=65530)
    for packet in packets[10:]:
        packet.timestamp += 48000 * 5  # the client paused for 5 s
    arrivals = [i * 0.020 + (5.0 if i >= 10 else 0.0) for i in range(20)]
    tap, chunks = run(packets, arrivals, max_gap_fill_ms=1000)
    assert tap.stats.gap_fill_ms == 1000
    assert abs(ms(chunks) - (400 + 1000)) < 1


def test_a_client_cannot_send_more_audio_than_real_time():
    packets = opus_packets(50)
    for i, packet in enumerate(packets):
        packet.timestamp = (5000 + i * 48000) % 2**32  # each 20 ms packet claims a second has passed
    tap, chunks = run(packets)  # ...but they arrive 20 ms apart: 1 s of wall time
    assert ms(chunks) <= 1000 + 500  # real time plus the jitter slack, not 49 s
    assert tap.stats.over_budget_ms > 40_000


def test_garbage_payloads_are_counted_not_fatal():
    packets = opus_packets(10)
    packets[5]._data = b"\xff" * 3
    tap, chunks = run(packets)
    assert tap.stats.decode_errors == 1 and len(chunks) >= 9


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_one_20ms_frame_per_recv_on_an_anchored_schedule():
    clock = FakeClock()
    frames = iter([b"\x01\x00" * 480] * 3)
    track = PlayoutTrack(lambda: next(frames, None), clock=clock, sleep=clock.sleep)
    out = [await track.recv() for _ in range(500)]
    assert [f.pts for f in out] == [i * 480 for i in range(500)]
    assert all((f.samples, f.sample_rate, f.layout.name, f.format.name) == (480, 24000, "mono", "s16") for f in out)
    assert bytes(out[0].planes[0])[:4] == b"\x01\x00\x01\x00" and not any(bytes(out[3].planes[0]))  # then silence
    assert abs(clock.now - (1000.0 + 499 * 0.020)) < 1e-9  # no drift after 10 s


async def test_a_small_delay_is_caught_up_a_stall_is_not_burst_out():
    clock = FakeClock()
    track = PlayoutTrack(lambda: None, clock=clock, sleep=clock.sleep)
    for _ in range(10):
        await track.recv()
    clock.now += 0.030  # the loop was busy for 30 ms
    await track.recv()
    await track.recv()
    assert track.reanchors == 0 and abs(clock.now - (1000.0 + 11 * 0.020)) < 1e-9  # back on schedule
    clock.now += 0.500  # a long stall
    await track.recv()
    stalled_at = clock.now
    clock.slept.clear()
    await track.recv()
    assert track.reanchors == 1
    assert clock.slept and abs(clock.now - stalled_at - 0.020) < 1e-9  # the next frame waits its 20 ms: no burst


def _voice(seconds: float = 1.0) -> list[av.AudioFrame]:
    """20 ms frames of a 220 Hz tone, as the playout track makes them: 24 kHz mono s16."""
    tone = (np.sin(np.arange(int(24000 * seconds)) * 2 * np.pi * 220 / 24000) * 8000).astype("<i2")
    frames = []
    for i in range(0, tone.size, 480):
        frame = av.AudioFrame.from_ndarray(tone[i : i + 480].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 24000, i
        frames.append(frame)
    return frames


def test_the_voice_encoder_makes_mono_opus_with_growing_timestamps():
    from relay.webrtc.encoder import VoiceOpusEncoder

    encoder = VoiceOpusEncoder()
    results = [encoder.encode(f) for f in _voice()]
    stamps = [ts for payloads, ts in results if payloads]
    assert stamps[:3] == [0, 960, 1920] and len(stamps) == 50  # RTP counts 48 kHz ticks; no frame held back
    decoder = av.CodecContext.create("libopus", "r")  # an independent decoder (ffmpeg's), as a browser's would be
    (decoded,) = decoder.decode(av.Packet(results[5][0][0]))
    assert (decoded.samples, decoded.sample_rate) == (960, 48000)
    packet = results[5][0][0]
    assert packet[0] & 0b100 == 0  # the TOC byte's stereo flag: mono
    assert packet[0] >> 3 == 27  # configuration 27: CELT, super-wideband (all of 24 kHz audio), 20 ms


def test_the_voice_encoder_settings_take_effect():
    """Each setting is checked by what it changes in the bitstream."""
    import wave

    from relay.webrtc.encoder import VoiceOpusEncoder
    from tests.helpers import FIXTURES

    with wave.open(str(FIXTURES / "speech_hello_48k.wav")) as w:
        speech = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")[::2]  # 24 kHz is enough for the voice
    frames = []
    for i in range(0, speech.size - 480, 480):
        frame = av.AudioFrame.from_ndarray(speech[i : i + 480].reshape(1, -1).copy(), format="s16", layout="mono")
        frame.sample_rate = 24000
        frames.append(frame)

    def packets(**settings) -> list[bytes]:
        encoder = VoiceOpusEncoder(**settings)
        return [payloads[0] for payloads, _ in (encoder.encode(f) for f in frames) if payloads]

    chosen = packets()
    assert all(p[0] >> 3 >= 16 for p in chosen)  # configurations 16-31: CELT
    assert any(p[0] >> 3 < 16 for p in packets(application="voip"))  # SILK or hybrid
    assert packets(complexity=10) != chosen  # the complexity setting is applied
    mean_bytes = sum(map(len, chosen)) / len(chosen)
    assert mean_bytes <= 48000 / 8 / 50 * 1.15  # constrained VBR stays near 48 kb/s
    plain_vbr = packets(constrained_vbr=False)
    assert sum(map(len, plain_vbr)) / len(plain_vbr) > mean_bytes * 1.3  # what the constraint changes
    assert sum(map(len, packets(bitrate=24000))) < sum(map(len, chosen)) * 0.7  # the bitrate setting is applied


def test_the_voice_encoder_takes_other_tracks_without_holding_audio_back():
    """A 48 kHz microphone (mono or stereo) is coded at its own rate: a packet for every frame, from the first (a
    resampler would hold each frame back ~20 ms). Other shapes go through a resampler."""
    from relay.webrtc.encoder import VoiceOpusEncoder

    tone = (np.sin(np.arange(960) * 2 * np.pi * 440 / 48000) * 8000).astype("<i2")
    for layout, samples in (("mono", tone), ("stereo", np.repeat(tone, 2))):
        encoder = VoiceOpusEncoder()
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = 48000
        outputs = [encoder.encode(frame) for _ in range(3)]
        assert [ts for _, ts in outputs] == [0, 960, 1920]  # one packet per frame, from the first
        packet = outputs[-1][0][0]
        assert packet[0] >> 3 == 31 and packet[0] & 0b100 == 0  # CELT fullband 20 ms, mono
    odd = av.AudioFrame.from_ndarray(np.zeros((1, 441), "<i2"), format="s16", layout="mono")  # 10 ms at 44.1 kHz
    odd.sample_rate = 44100
    encoder = VoiceOpusEncoder()
    outputs = [encoder.encode(odd) for _ in range(6)]
    assert any(payloads for payloads, _ in outputs) and not outputs[0][0]  # resampled, after a first frame's wait


def test_the_opus_binding_decodes_any_client_packet_to_24k_mono_and_survives_garbage():
    from relay.audio import opus

    encoder = av.CodecContext.create("libopus", "w")  # a browser-like stereo 48 kHz stream, from another encoder
    encoder.sample_rate, encoder.layout, encoder.format, encoder.bit_rate = 48000, "stereo", "s16", 64000
    tone = (np.sin(np.arange(960 * 10) * 2 * np.pi * 440 / 48000) * 8000).astype("<i2")
    packets = []
    for i in range(0, tone.size, 960):
        frame = av.AudioFrame.from_ndarray(np.repeat(tone[i : i + 960], 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts = 48000, i
        packets += [bytes(p) for p in encoder.encode(frame)]
    decoder = opus.Decoder()
    pcm = [decoder.decode(p) for p in packets]
    assert {len(p) for p in pcm} == {960}  # 20 ms of 24 kHz mono PCM16 each
    assert np.abs(np.frombuffer(pcm[-1], "<i2")).max() > 2000  # the tone, at about its level
    for garbage in (b"\xff" * 3, b""):
        with pytest.raises(opus.OpusError):
            decoder.decode(garbage)
    assert len(decoder.decode(packets[-1])) == 960  # still decoding
    with pytest.raises(ValueError):
        opus.Encoder().encode(bytes(100))  # only whole 20 ms frames
    assert opus.VERSION.startswith("libopus")


def test_settled_silence_reuses_a_packet_and_speech_after_it_is_as_good_as_always_encoding():
    """Skipping libopus for settled digital silence must not cost the speech that follows any fidelity. (The
    packets after the pause are not bit-identical: the encoder's rate control moves on during silence. Their
    signal-to-noise against the input is what matters.)"""
    import wave

    from relay.webrtc.encoder import SILENCE_SETTLE_FRAMES, VoiceOpusEncoder
    from tests.audio_checks import best_alignment
    from tests.helpers import FIXTURES

    with wave.open(str(FIXTURES / "speech_hello_48k.wav")) as w:
        speech = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")[::2].copy()
    pcm = np.concatenate([speech, np.zeros(24000, "<i2"), speech])  # speech, 1 s of digital silence, speech

    def encode_all(encoder: VoiceOpusEncoder) -> list[bytes]:
        out = []
        for i in range(0, pcm.size - 480, 480):
            frame = av.AudioFrame.from_ndarray(pcm[i : i + 480].reshape(1, -1).copy(), format="s16", layout="mono")
            frame.sample_rate = 24000
            out.append(encoder.encode(frame)[0][0])
        return out

    def snr_of_second_speech(packets: list[bytes]) -> float:
        decoder = av.CodecContext.create("libopus", "r")
        decoder.layout = "mono"
        out = np.concatenate([f.to_ndarray().ravel() for p in packets for f in decoder.decode(av.Packet(p))])
        received = out[::2].astype(np.float64)[speech.size + 24000 - 200 :]  # back to 24 kHz
        sent = speech[:-400].astype(np.float64)
        offset, _ = best_alignment(received, sent)
        got = received[offset : offset + sent.size]
        gain = np.dot(got, sent) / np.dot(sent, sent)
        return float(10 * np.log10(np.dot(gain * sent, gain * sent) / np.sum((got - gain * sent) ** 2)))

    memo, reference = VoiceOpusEncoder(), VoiceOpusEncoder()
    reference._encode_pcm = reference._opus.encode  # libopus for every frame
    ours, theirs = encode_all(memo), encode_all(reference)
    assert memo.encoded <= len(ours) - (50 - SILENCE_SETTLE_FRAMES - 2)  # most of the silent second skipped libopus
    silent = slice(speech.size // 480 + SILENCE_SETTLE_FRAMES + 2, (speech.size + 24000) // 480 - 1)
    assert len(set(ours[silent])) == 1 and set(ours[silent]) == set(theirs[silent])  # libopus's own silence packet
    assert abs(snr_of_second_speech(ours) - snr_of_second_speech(theirs)) < 0.1

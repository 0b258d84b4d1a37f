"""The aiortc/aioice internals the relay relies on (relay/webrtc/aiortc_internals.py). If an upgrade moves any of
them, these fail: an upgrade must break a test, not the audio."""

import asyncio
import inspect

import aioice.ice
import aiortc
import numpy as np
from aiortc import RTCRtpReceiver, RTCRtpSender
from aiortc.jitterbuffer import JitterBuffer

from relay.webrtc import aiortc_internals
from relay.webrtc.aiortc_internals import (
    JITTER_BUFFER_ATTRIBUTE,
    _next_encoded_frame_inline,
    install_packet_tap,
    restrict_host_addresses,
    speed_up_audio_sender,
)


async def _audio_receiver():
    pc = aiortc.RTCPeerConnection()
    return pc, pc.addTransceiver("audio").receiver


def test_aiortc_is_the_pinned_minor_version():
    assert aiortc.__version__.startswith("1.16.")


async def test_the_audio_receiver_still_has_the_jitter_buffer_we_replace():
    pc, receiver = await _audio_receiver()
    buffer = getattr(receiver, JITTER_BUFFER_ATTRIBUTE)
    await pc.close()
    assert isinstance(buffer, JitterBuffer) and buffer.capacity == 16
    source = inspect.getsource(RTCRtpReceiver._handle_rtp_packet)
    assert "pli_flag, encoded_frame = self.__jitter_buffer.add(packet)" in source
    assert "packet._data = depayload(codec, packet.payload)" in source  # the tap reads packet._data


async def test_the_tap_replaces_it():
    pc, receiver = await _audio_receiver()

    class Tap:
        def add(self, packet):
            return False, None

    tap = Tap()
    install_packet_tap(receiver, tap)
    assert getattr(receiver, JITTER_BUFFER_ATTRIBUTE) is tap
    await pc.close()


def test_aioice_still_finds_host_addresses_through_the_function_we_replace():
    assert "get_host_addresses(" in inspect.getsource(aioice.ice.Connection)
    try:
        restrict_host_addresses(["127.0.0.1", "::1"])
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1", "::1"]
    finally:
        restrict_host_addresses([])
    assert aioice.ice.get_host_addresses is aiortc_internals._original_get_host_addresses


def test_the_sender_code_we_replace_is_still_what_we_copied():
    from relay.webrtc.aiortc_internals import _original_next_encoded_frame

    source = inspect.getsource(_original_next_encoded_frame)
    for line in ("data = await self.__track.recv()", "audio_level = rtp.compute_audio_level_dbov(data)",
                 "None, self.__encoder.encode, data, force_keyframe", "self.__encoder = get_encoder(codec)",
                 "return RTCEncodedFrame(payloads, timestamp, audio_level)"):
        assert line in source, line
    assert "rtp.compute_audio_level_dbov" in inspect.getsource(aiortc.rtcrtpsender.RTCRtpSender)


def test_numpy_audio_level_matches_rfc_6465():
    from av import AudioFrame

    from relay.webrtc.aiortc_internals import _original_audio_level, audio_level_dbov

    tone = (np.sin(np.arange(960) * 0.05) * 8000).astype("<i2")
    mono = AudioFrame.from_ndarray(tone.reshape(1, -1), format="s16", layout="mono")
    stereo = AudioFrame.from_ndarray(np.repeat(tone, 2).reshape(1, -1), format="s16", layout="stereo")
    silent = AudioFrame.from_ndarray(np.zeros((1, 1920), "<i2"), format="s16", layout="stereo")
    assert audio_level_dbov(mono) == _original_audio_level(mono) == -15
    assert audio_level_dbov(stereo) == -15  # the same sound (aiortc's own loop says -12 for stereo: +3 dB)
    assert audio_level_dbov(silent) == -127


async def test_the_inline_sender_sends_audio():
    """A real call with the faster sender: audio frames arrive at the other peer."""
    from tests.webrtc_client import Microphone

    was = RTCRtpSender._next_encoded_frame
    speed_up_audio_sender()
    restrict_host_addresses(["127.0.0.1"])
    sender_pc, receiver_pc = aiortc.RTCPeerConnection(), aiortc.RTCPeerConnection()
    try:
        mic = Microphone()
        mic.say(np.full(48000, 3000, dtype="<i2"))
        sender_pc.addTrack(mic)
        frames: list = []
        reading: list[asyncio.Task] = []

        @receiver_pc.on("track")
        def on_track(track):
            async def read():
                while len(frames) < 20:
                    frames.append(await track.recv())
            reading.append(asyncio.ensure_future(read()))

        await sender_pc.setLocalDescription(await sender_pc.createOffer())
        await receiver_pc.setRemoteDescription(sender_pc.localDescription)
        await receiver_pc.setLocalDescription(await receiver_pc.createAnswer())
        await sender_pc.setRemoteDescription(receiver_pc.localDescription)
        async with asyncio.timeout(10):
            while len(frames) < 20:
                await asyncio.sleep(0.05)
        assert RTCRtpSender._next_encoded_frame is _next_encoded_frame_inline
    finally:
        await sender_pc.close()
        await receiver_pc.close()
        restrict_host_addresses([])
        RTCRtpSender._next_encoded_frame = was  # leave the process as it was


def test_the_fast_ntp_clock_agrees_with_aiortcs_and_is_what_aiortc_reads():
    from relay.webrtc.aiortc_internals import _original_current_ntp_time, current_ntp_time, speed_up_ntp_clock

    ours, theirs = current_ntp_time(), _original_current_ntp_time()
    assert abs(ours - theirs) < 0.005 * 2**32  # within 5 ms (they are read one after the other)
    assert "clock.current_ntp_time()" in inspect.getsource(aiortc.rtcrtpsender.RTCRtpSender)
    speed_up_ntp_clock()
    try:
        assert aiortc.clock.current_ntp_time is current_ntp_time
    finally:
        speed_up_ntp_clock(False)
    assert aiortc.clock.current_ntp_time is _original_current_ntp_time


async def test_the_sender_byte_count_and_the_sctp_outbound_queue_are_still_there():
    from aiortc.rtcsctptransport import RTCSctpTransport

    pc = aiortc.RTCPeerConnection()
    sender = pc.addTransceiver("audio").sender
    await pc.close()
    assert aiortc_internals.rtp_bytes_sent(sender) == 0 and aiortc_internals.rtp_bytes_sent(None) == 0
    assert hasattr(sender, aiortc_internals.OCTET_COUNT_ATTRIBUTE)
    assert "self.__octet_count += len(payload)" in inspect.getsource(RTCRtpSender._run_rtp)
    source = inspect.getsource(RTCSctpTransport)
    assert "self._outbound_queue: Deque[DataChunk] = deque()" in source  # waiting to be sent
    assert "self._sent_queue: Deque[DataChunk] = deque()" in source  # sent, not yet acknowledged
    assert "schunk = self._sent_queue.popleft()" in inspect.getsource(RTCSctpTransport._receive_sack_chunk)


async def test_aioice_takes_media_only_from_checked_peers_and_queues_a_bounded_amount():
    from aioice.candidate import Candidate

    aiortc_internals.guard_ice_data()
    connection = aioice.ice.Connection(ice_controlling=False)
    protocol = aioice.ice.StunProtocol(connection)
    protocol.local_candidate = Candidate("1", 1, "udp", 1, "127.0.0.1", 5000, "host")
    peer = Candidate("2", 1, "udp", 1, "127.0.0.1", 6000, "host")
    dropped = dict(aiortc_internals.ice_data_dropped)
    rtp = bytes([0x80, 0x6F]) + bytes(100)
    protocol.datagram_received(rtp, ("127.0.0.1", 6000))  # no check has proven that address yet
    assert connection._queue.qsize() == 0
    assert aiortc_internals.ice_data_dropped["foreign"] == dropped["foreign"] + 1
    connection._check_list.append(aioice.ice.CandidatePair(protocol, peer))
    protocol.datagram_received(rtp, ("127.0.0.1", 6000))
    protocol.datagram_received(bytes([0x16, 0xFE, 0xFD]) + bytes(20), ("127.0.0.1", 6000))  # DTLS: also media
    protocol.datagram_received(rtp, ("127.0.0.1", 6001))  # another port of the same host: foreign
    assert connection._queue.qsize() == 2
    for _ in range(aiortc_internals.MAX_QUEUED_DATAGRAMS + 10):
        protocol.datagram_received(rtp, ("127.0.0.1", 6000))
    assert connection._queue.qsize() == aiortc_internals.MAX_QUEUED_DATAGRAMS
    assert aiortc_internals.ice_data_dropped["overflow"] >= dropped["overflow"] + 12
    await connection.close()

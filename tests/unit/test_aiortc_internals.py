"""The aiortc/aioice internals the relay relies on (relay/webrtc/aiortc_internals.py). If an upgrade moves any of
them, these fail: an upgrade must break a test, not the audio."""

import inspect

import aioice.ice
import aiortc
from aiortc import RTCRtpReceiver
from aiortc.jitterbuffer import JitterBuffer

from relay.webrtc import aiortc_internals
from relay.webrtc.aiortc_internals import JITTER_BUFFER_ATTRIBUTE, install_packet_tap, restrict_host_addresses


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

"""libopus through ctypes: the relay's voice codec, 24 kHz mono PCM16 in and out.

Why not PyAV's codec contexts: ffmpeg's libopus wrapper only decodes at 48 kHz (so every packet also needed a
resampler to reach the upstream's 24 kHz), and each call goes through frame objects and format checks. Called
directly, libopus decodes straight to 24 kHz mono (~35 us a packet, against ~60 us plus ~25 us of resampling) and
encodes 24 kHz audio (~60 us at complexity 5, against ~145 us plus ~25 us of resampling to 48 kHz). Opus carries
any of its rates in the same RTP stream (48 kHz RTP clock, RFC 7587), so nothing changes on the wire.

The library is the system's libopus if there is one (Debian: libopus0; 1.3.1 in bookworm encodes ~20 % faster here
than the 1.6.1 in PyAV's wheel), else the copy bundled in PyAV's wheel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import weakref

RATE = 24000  # the relay's rate: the upstream's
RATES = (8000, 12000, 16000, 24000, 48000)  # what libopus codes directly
FRAME_SAMPLES = RATE // 50  # 20 ms
MAX_PACKET_BYTES = 1500
MAX_FRAME_SAMPLES = RATE * 120 // 1000  # the longest Opus packet: 120 ms
CONCEAL_STEP = RATE // 400  # lost audio is recovered in multiples of 2.5 ms (libopus' smallest frame)

_APPLICATIONS = {"voip": 2048, "audio": 2049, "restricted_lowdelay": 2051}
_SET_BITRATE, _SET_VBR, _SET_COMPLEXITY, _SET_VBR_CONSTRAINT = 4002, 4006, 4010, 4020
_SET_INBAND_FEC, _SET_PACKET_LOSS_PERC = 4012, 4014


class OpusError(RuntimeError):
    pass


def _find_library() -> str:
    found = ctypes.util.find_library("opus")
    if found:
        return found
    import av

    bundled = glob.glob(os.path.join(os.path.dirname(av.__file__), os.pardir, "av.libs", "libopus*.so*"))
    if bundled:
        return bundled[0]
    raise OpusError("libopus not found: install the system package (Debian: libopus0)")


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(_find_library())
    lib.opus_get_version_string.restype = ctypes.c_char_p
    lib.opus_strerror.restype = ctypes.c_char_p
    lib.opus_strerror.argtypes = [ctypes.c_int]
    lib.opus_encoder_create.restype = ctypes.c_void_p
    lib.opus_encoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_encoder_ctl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int32]
    lib.opus_encode.restype = ctypes.c_int32
    lib.opus_encode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int32]
    lib.opus_decoder_create.restype = ctypes.c_void_p
    lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_decode.restype = ctypes.c_int
    lib.opus_decode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int,
                                ctypes.c_int]
    return lib


_lib = _load()
VERSION = _lib.opus_get_version_string().decode()


def _check(code: int, what: str) -> int:
    if code < 0:
        raise OpusError(f"{what}: {_lib.opus_strerror(code).decode()}")
    return code


class Encoder:
    """20 ms frames of mono PCM16 (at 24 kHz: 960 bytes; any of RATES) to Opus packets."""

    def __init__(self, bitrate: int = 48000, complexity: int = 5, application: str = "audio",
                 constrained_vbr: bool = True, rate: int = RATE, fec_loss_percent: int = 0) -> None:
        if rate not in RATES:
            raise ValueError(f"libopus codes {RATES} Hz, not {rate}")
        self.rate = rate
        self._frame_samples = rate // 50
        error = ctypes.c_int()
        self._state = _lib.opus_encoder_create(rate, 1, _APPLICATIONS[application], ctypes.byref(error))
        _check(error.value, "opus_encoder_create")
        weakref.finalize(self, _lib.opus_encoder_destroy, self._state)  # also safe at interpreter exit
        for request, value in ((_SET_BITRATE, bitrate), (_SET_COMPLEXITY, complexity), (_SET_VBR, 1),
                               (_SET_VBR_CONSTRAINT, int(constrained_vbr))):
            _check(_lib.opus_encoder_ctl(self._state, request, value), f"opus_encoder_ctl({request})")
        if fec_loss_percent:  # in-band FEC, as browsers send it (SILK and hybrid modes only: `application="voip"`)
            for request, value in ((_SET_INBAND_FEC, 1), (_SET_PACKET_LOSS_PERC, fec_loss_percent)):
                _check(_lib.opus_encoder_ctl(self._state, request, value), f"opus_encoder_ctl({request})")
        self._out = ctypes.create_string_buffer(MAX_PACKET_BYTES)

    def encode(self, pcm: bytes) -> bytes:
        if len(pcm) != self._frame_samples * 2:
            raise ValueError(f"expected {self._frame_samples * 2} bytes (20 ms of {self.rate} Hz mono PCM16), "
                             f"got {len(pcm)}")
        size = _check(_lib.opus_encode(self._state, pcm, self._frame_samples, self._out, MAX_PACKET_BYTES),
                      "opus_encode")
        return ctypes.string_at(self._out, size)


class Decoder:
    """Opus packets (any mode, mono or stereo) to 24 kHz mono PCM16."""

    def __init__(self) -> None:
        error = ctypes.c_int()
        self._state = _lib.opus_decoder_create(RATE, 1, ctypes.byref(error))
        _check(error.value, "opus_decoder_create")
        weakref.finalize(self, _lib.opus_decoder_destroy, self._state)
        self._out = ctypes.create_string_buffer(MAX_FRAME_SAMPLES * 2)

    def decode(self, payload: bytes) -> bytes:
        """The packet's audio; OpusError for a packet libopus refuses (the decoder stays usable)."""
        if not payload:
            raise OpusError("opus_decode: empty packet")
        samples = _check(_lib.opus_decode(self._state, payload, len(payload), self._out, MAX_FRAME_SAMPLES, 0),
                         "opus_decode")
        return ctypes.string_at(self._out, samples * 2)

    def recover(self, samples: int, next_payload: bytes | None) -> bytes:
        """`samples` (a multiple of 2.5 ms, at most 120 ms) of audio that was lost, ending where `next_payload`
        begins: its in-band FEC copy of the lost frame where the sender put one (SILK and hybrid modes, browsers'
        default), else libopus' loss concealment (a continuation of the voice that fades out)."""
        samples = min(samples, MAX_FRAME_SAMPLES) // CONCEAL_STEP * CONCEAL_STEP
        if samples <= 0:
            return b""
        fec = 1 if next_payload else 0
        got = _check(_lib.opus_decode(self._state, next_payload or None, len(next_payload or b""), self._out,
                                      samples, fec), "opus_decode (recovery)")
        return ctypes.string_at(self._out, got * 2)

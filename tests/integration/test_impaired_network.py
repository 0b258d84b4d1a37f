"""Calls over an impaired path: a lossy, jittery NAT on loopback between the client peer and the relay (every packet
of the call crosses it: the client's offer has no candidates and the relay announces the NAT's address). Figures
are printed (pytest -s) and kept in docs/robustness.md."""

from __future__ import annotations

import asyncio
import math
import random
import socket
import wave

import numpy as np
import pytest

from relay.server.calls import CALLS
from tests.audio_checks import best_alignment
from tests.helpers import FIXTURES
from tests.integration.test_nat import PUBLIC, OneToOneNat, _host_candidates
from tests.integration.test_webrtc_call import HELLO48, _serve, relay_settings
from tests.webrtc_client import call_relay, strip_candidates

with wave.open(str(FIXTURES / "speech_hello_24k.wav")) as _wav:
    HELLO24 = np.frombuffer(_wav.readframes(_wav.getnframes()), "<i2")


class ImpairedNat(OneToOneNat):
    """The NAT, with netem's impairments on every datagram either way: loss, a delay with jitter (independent
    delays reorder packets), and an outage switch."""

    def __init__(self, loss: float = 0.0, delay_ms: float = 0.0, jitter_ms: float = 0.0, seed: int = 7) -> None:
        super().__init__()
        self.loss, self.delay_ms, self.jitter_ms = loss, delay_ms, jitter_ms
        self.out = False  # everything dropped, both ways
        self.dropped = 0
        self._random = random.Random(seed)

    def _forward(self, sock: socket.socket, data: bytes, to: tuple[str, int]) -> None:
        if self.out or self._random.random() < self.loss:
            self.dropped += 1
            return
        delay = max(0.0, self._random.uniform(self.delay_ms - self.jitter_ms, self.delay_ms + self.jitter_ms))
        self._loop.call_later(delay / 1000, super()._forward, sock, data, to)


async def impaired_call(simulator, nat: ImpairedNat, **settings):
    app, runner, url = await _serve(relay_settings(simulator.url + "?model=gpt-realtime", announced_ip=PUBLIC,
                                                   **settings))

    async def through_the_nat(answer: str) -> None:
        nat.open(sorted({port for _, port in _host_candidates(answer)}))

    call = await call_relay(url, mutate_offer=strip_candidates, on_answer=through_the_nat, conceal=True)
    return app, runner, call


def segmental_snr(received: np.ndarray, reference: np.ndarray, rate: int) -> float:
    """How well `received` carries `reference`: each loud 200 ms of the reference is looked for in it on its own
    (a lost stretch must not misalign the rest), and the median correlation is given as an SNR in dB."""
    step = rate // 5
    scores = [best_alignment(received, reference[i : i + step])[1] if received.size > step else 0.0
              for i in range(0, reference.size - step, step)
              if np.sqrt(np.mean(reference[i : i + step].astype(float) ** 2)) > 500]
    score = min(0.9999, float(np.median(scores)))
    return 10 * math.log10(score**2 / max(1e-9, 1 - score**2))


async def echo_turn(simulator, call, after: int) -> tuple[float, float]:
    """Say hello; the simulator echoes it: (SNR of what the model heard, SNR of what the client heard back), dB."""
    heard_from, upstream_from = len(call.concealed), len(simulator.recorder.sessions[-1].input_audio)
    call.mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)
    await call.wait_for("output_audio_buffer.stopped", timeout=30, after=after)
    model_heard = np.frombuffer(bytes(simulator.recorder.sessions[-1].input_audio[upstream_from:]), "<i2")
    client_heard = np.frombuffer(b"".join(call.concealed[heard_from:]), "<i2")
    return segmental_snr(model_heard, HELLO24, 24000), segmental_snr(client_heard, HELLO24, 24000)


async def test_five_percent_loss_and_30ms_jitter_keep_the_call_and_audio_both_ways(simulator):
    nat = ImpairedNat(loss=0.05, delay_ms=40, jitter_ms=30)
    app, runner, call = await impaired_call(simulator, nat)
    try:
        await call.wait_for("session.created")
        turns = [await echo_turn(simulator, call, after=len(call.events)) for _ in range(2)]
        (relay_call,) = app[CALLS].values()
        inbound, outbound = relay_call.peer.inbound.stats, call.receiver.stats
        print(f"\n5 % loss, 40±30 ms each way: SNR heard by the model {turns[0][0]:.1f} / {turns[1][0]:.1f} dB, by the "
              f"client {turns[0][1]:.1f} / {turns[1][1]:.1f} dB; at the relay {inbound.packets} packets, "
              f"{inbound.lost} lost, {inbound.late} late, {inbound.recovered_ms:.0f} ms rebuilt by Opus; at the "
              f"client {outbound.packets} packets, {outbound.lost} lost, {outbound.late} late; the relay sent "
              f"{relay_call.peer.track.late_frames} frames late; the NAT dropped {nat.dropped} of "
              f"{nat.to_relay + nat.from_relay} datagrams")
        assert relay_call.close_reason is None and relay_call.peer.pc.connectionState == "connected"
        assert inbound.lost > 0 and inbound.recovered_ms > 0  # the loss was real, and Opus filled it in
        # Both turns, both ways: the model heard the user and the user heard the model, through the loss.
        assert min(snr for turn in turns for snr in turn) > 0
    finally:
        await call.close()
        nat.close()
        await runner.cleanup()


async def test_a_two_second_outage_heals_by_itself(simulator):
    nat = ImpairedNat()
    app, runner, call = await impaired_call(simulator, nat)
    try:
        await call.wait_for("session.created")
        assert min(await echo_turn(simulator, call, after=len(call.events))) > 0
        nat.out = True
        await asyncio.sleep(2.0)
        nat.out = False
        heard = await echo_turn(simulator, call, after=len(call.events))
        (relay_call,) = app[CALLS].values()
        print(f"\nafter a 2 s outage: SNR heard by the model {heard[0]:.1f} dB, by the client {heard[1]:.1f} dB; "
              f"{nat.dropped} datagrams lost in it")
        assert min(heard) > 0 and relay_call.close_reason is None and nat.dropped > 50
    finally:
        await call.close()
        nat.close()
        await runner.cleanup()


@pytest.mark.timeout(90)
async def test_a_client_that_vanishes_is_noticed_and_its_call_freed(simulator):
    nat = ImpairedNat()
    app, runner, call = await impaired_call(simulator, nat)  # the default idle timeout
    try:
        await call.wait_for("session.created")
        (relay_call,) = app[CALLS].values()
        nat.out = True  # the client is gone: no media, no data channel, no DTLS close, no hangup
        vanished = asyncio.get_running_loop().time()
        await asyncio.wait_for(relay_call.closed.wait(), 60)
        freed_after = asyncio.get_running_loop().time() - vanished
        print(f"\na vanished client's call freed after {freed_after:.1f} s ({relay_call.close_reason})")
        assert app[CALLS] == {} and relay_call.upstream.ws.close_code is not None
    finally:
        await call.close()
        nat.close()
        await runner.cleanup()

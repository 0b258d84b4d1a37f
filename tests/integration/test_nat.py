"""NAT traversal over real peers on loopback: the announced address through a 1:1 NAT, TURN credentials handed to
clients, and the relay's own peer authenticating to a TURN server with a credential minted for the call."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import sys

import aiohttp
import pytest
from aioice import stun
from aioice.turn import make_integrity_key

from relay.config import Settings
from relay.server.calls import CALLS
from tests.audio_checks import loud_ms
from tests.integration.test_webrtc_call import HELLO48, _serve, relay_settings
from tests.webrtc_client import call_relay, strip_candidates

PRIVATE, PUBLIC = "127.0.0.1", "127.0.0.2"  # all of 127.0.0.0/8 is loopback on Linux
TURN_SECRET = "turn-canary-secret-0123456789"
KEY = "sk-relay-nat-test-key"


class OneToOneNat:
    """A NAT in front of the relay, on loopback: a datagram to PUBLIC:port goes to PRIVATE:port (the same port),
    and the relay's answers leave from PUBLIC:port, as a cloud's elastic IP or Docker's published port range does.
    It also masquerades its clients (each client address gets its own inside socket), so the relay sees only the
    NAT: with an offer without candidates, every packet of a call that connects went through it."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._public: dict[int, socket.socket] = {}
        self._inside: dict[tuple[int, tuple[str, int]], socket.socket] = {}
        self.to_relay = 0
        self.from_relay = 0

    def open(self, ports: list[int]) -> None:
        for port in ports:
            sock = self._socket(PUBLIC, port)
            self._public[port] = sock
            self._loop.add_reader(sock.fileno(), self._from_client, sock, port)

    def close(self) -> None:
        for sock in [*self._public.values(), *self._inside.values()]:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    @staticmethod
    def _socket(host: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, port))
        sock.setblocking(False)
        return sock

    def _from_client(self, public: socket.socket, port: int) -> None:
        while True:
            try:
                data, client = public.recvfrom(65536)
            except BlockingIOError:
                return
            inside = self._inside.get((port, client))
            if inside is None:
                inside = self._inside[(port, client)] = self._socket(PRIVATE, 0)
                self._loop.add_reader(inside.fileno(), self._from_relay, inside, port, client)
            self.to_relay += 1
            self._forward(inside, data, (PRIVATE, port))

    def _from_relay(self, inside: socket.socket, port: int, client: tuple[str, int]) -> None:
        while True:
            try:
                data, source = inside.recvfrom(65536)
            except BlockingIOError:
                return
            if source == (PRIVATE, port):  # only the mapped socket gets out (a NAT's filtering)
                self.from_relay += 1
                self._forward(self._public[port], data, client)


    def _forward(self, sock: socket.socket, data: bytes, to: tuple[str, int]) -> None:
        """Where a datagram crosses the NAT (an impaired network delays or drops it here)."""
        with contextlib.suppress(OSError):  # a full socket buffer: the datagram is lost, as on a network
            sock.sendto(data, to)


def _host_candidates(sdp: str) -> list[tuple[str, int]]:
    found = []
    for line in sdp.splitlines():
        bits = line.split()
        if line.startswith("a=candidate:") and bits[7] == "host":
            found.append((bits[4], int(bits[5])))
    return found


async def test_a_call_connects_through_a_one_to_one_nat_to_the_announced_address(simulator):
    app, runner, url = await _serve(relay_settings(simulator.url + "?model=gpt-realtime", announced_ip=PUBLIC))
    nat = OneToOneNat()

    async def through_the_nat(answer: str) -> None:
        nat.open(sorted({port for _, port in _host_candidates(answer)}))

    try:
        # No candidates in the offer: the relay learns the client from its checks, which come through the NAT.
        call = await call_relay(url, mutate_offer=strip_candidates, on_answer=through_the_nat)
        try:
            announced = _host_candidates(call.answer_sdp)
            assert announced and {host for host, _ in announced} == {PUBLIC}
            assert PRIVATE not in call.answer_sdp  # neither in a candidate nor in a c= line
            assert f"c=IN IP4 {PUBLIC}" in call.answer_sdp
            # The relay gathered on the private address; the answer kept its ports.
            gatherer = app[CALLS][call.call_id].peer.pc.getTransceivers()[0].sender.transport.transport.iceGatherer
            gathered = [(c.ip, c.port) for c in gatherer.getLocalCandidates() if c.type == "host"]
            assert {host for host, _ in gathered} == {PRIVATE}
            assert sorted(port for _, port in gathered) == sorted({port for _, port in announced})
            # The call works (ICE, DTLS, the data channel, audio both ways), all of it through the NAT.
            await call.wait_for("session.created")
            call.mic.say_between(HELLO48, lead_ms=200, tail_ms=900)
            await call.wait_for("output_audio_buffer.stopped", timeout=20)
            assert len(loud_ms(call.received())) * 5 > 200  # ms of the echo heard
            assert nat.to_relay > 50 and nat.from_relay > 50  # RTP, not just a handful of ICE checks
        finally:
            await call.close()
    finally:
        nat.close()
        await runner.cleanup()


# --- TURN credentials for clients --------------------------------------------------------------------------------


async def _client_config(url: str, token: str | None = None) -> tuple[dict, str, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url + "/relay/client-config", headers=headers) as response:
        assert response.status == 200
        text = await response.text()
        return await response.json(), text, dict(response.headers)


def _turn_entries(config: dict) -> list[dict]:
    return [s for s in config["ice_servers"] if "username" in s]


def _is_minted(entry: dict) -> bool:
    expected = base64.b64encode(hmac.new(TURN_SECRET.encode(), entry["username"].encode(), hashlib.sha1).digest())
    return entry["credential"] == expected.decode() and entry["urls"] == ["turn:turn.example.org:3478?transport=udp"]


TURN = {"turn_urls": "turn:turn.example.org:3478?transport=udp",
        "ice_servers": '[{"urls": "stun:stun.example.org:3478"}]'}


async def test_an_open_relay_hands_every_client_a_fresh_turn_credential(simulator):
    settings = Settings.load(env={"RELAY_TURN_SECRET": TURN_SECRET}, upstream_url=simulator.url,
                             ice_addresses="127.0.0.1", turn_ttl_s="600", max_call_duration_s="300", **TURN)
    app, runner, url = await _serve(settings)
    try:
        first, text, headers = await _client_config(url)
        second, _, _ = await _client_config(url)
        assert first["ice_servers"][0] == {"urls": "stun:stun.example.org:3478"}
        (entry,) = _turn_entries(first)
        assert _is_minted(entry) and _is_minted(_turn_entries(second)[0])
        assert entry["username"] != _turn_entries(second)[0]["username"]
        assert headers["Cache-Control"] == "no-store"
        assert TURN_SECRET not in text
    finally:
        await runner.cleanup()


async def test_behind_api_keys_only_callers_get_a_turn_credential(simulator):
    settings = Settings.load(env={"RELAY_TURN_SECRET": TURN_SECRET, "RELAY_API_KEYS": KEY},
                             upstream_url=simulator.url, ice_addresses="127.0.0.1", **TURN)
    app, runner, url = await _serve(settings)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/realtime/client_secrets", json={},
                                 headers={"Authorization": f"Bearer {KEY}"}) as response:
                token = (await response.json())["value"]
        for who in (None, "sk-wrong", "ek_forged.signature", token[:-4] + "AAAA"):
            config, text, headers = await _client_config(url, who)
            assert config["ice_servers"] == [{"urls": "stun:stun.example.org:3478"}], who  # the rest, still
            assert headers["Cache-Control"] == "no-store"
        for who in (KEY, token):
            config, text, _ = await _client_config(url, who)
            (entry,) = _turn_entries(config)
            assert _is_minted(entry)
            assert TURN_SECRET not in text
    finally:
        await runner.cleanup()


# --- TURN for the relay's own peer --------------------------------------------------------------------------------


class TurnServerThatChecksCredentials(asyncio.DatagramProtocol):
    """The authentication half of a TURN server (RFC 8656 long-term credentials, coturn's use-auth-secret): the
    first ALLOCATE gets a 401 with realm and nonce, the second must carry MESSAGE-INTEGRITY made with the password
    that coturn derives from the username and the shared secret; it is then refused (403), which ends the relay's
    TURN gathering at once."""

    REALM = "relay.test"

    def __init__(self) -> None:
        self.verified: list[str] = []
        self.failed: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        request = stun.parse_message(data)
        if request.message_method != stun.Method.ALLOCATE or request.message_class != stun.Class.REQUEST:
            return
        response = stun.Message(stun.Method.ALLOCATE, stun.Class.ERROR, transaction_id=request.transaction_id)
        username = request.attributes.get("USERNAME")
        if username is None:
            response.attributes.update({"ERROR-CODE": (401, "Unauthorized"), "REALM": self.REALM,
                                        "NONCE": b"0123456789abcdef"})
            self.transport.sendto(bytes(response), addr)
            return
        password = base64.b64encode(hmac.new(TURN_SECRET.encode(), username.encode(), hashlib.sha1).digest()).decode()
        key = make_integrity_key(username, self.REALM, password)
        (self.verified if request.check_message_integrity(key) else self.failed).append(username)
        response.attributes["ERROR-CODE"] = (403, "Forbidden")
        response.add_message_integrity(key)
        self.transport.sendto(bytes(response), addr)


@pytest.mark.parametrize("turn_for_relay", [True, False])
async def test_the_relays_own_peer_uses_turn_with_a_credential_for_the_call_only_when_told(simulator, turn_for_relay):
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(TurnServerThatChecksCredentials,
                                                            local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    settings = Settings.load(env={"RELAY_TURN_SECRET": TURN_SECRET}, upstream_url=simulator.url + "?model=gpt-realtime",
                             ice_addresses="127.0.0.1", turn_urls=f"turn:127.0.0.1:{port}?transport=udp",
                             turn_for_relay=str(turn_for_relay).lower())
    app, runner, url = await _serve(settings)
    try:
        call = await call_relay(url)
        try:
            await call.wait_for("session.created")  # the call still works on its host candidates
        finally:
            await call.close()
        assert server.failed == []
        if turn_for_relay:
            (username,) = server.verified
            assert username.endswith(":" + call.call_id)
        else:
            assert server.verified == []
    finally:
        await runner.cleanup()
        transport.close()


# --- the UDP port range -------------------------------------------------------------------------------------------

GATHER = """
import asyncio, json
from aiortc import RTCConfiguration, RTCPeerConnection
from relay.webrtc.aiortc_internals import restrict_host_addresses

async def main():
    restrict_host_addresses(["127.0.0.1"])
    peers = [RTCPeerConnection(RTCConfiguration(iceServers=[])) for _ in range(3)]
    for pc in peers:
        pc.addTransceiver("audio")
        pc.createDataChannel("oai-events")
        await pc.setLocalDescription(await pc.createOffer())
    print(json.dumps([int(line.split()[5]) for pc in peers for line in pc.localDescription.sdp.splitlines()
                      if line.startswith("a=candidate:")]))
    for pc in peers:
        await pc.close()

asyncio.run(main())
"""


def test_the_network_namespaces_sysctl_sets_the_udp_ports_aioice_takes():
    """What the compose file relies on (aioice has no port-range option): in a network namespace whose
    net.ipv4.ip_local_port_range is narrowed, every candidate aiortc gathers takes a port from that range."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        reason = "needs root, unshare and ip (util-linux, iproute2) for a network namespace"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    low, high = 47000, 47009  # far from the usual ephemeral range, so a port in it is the sysctl's doing
    script = (f"ip link set lo up && echo '{low} {high}' > /proc/sys/net/ipv4/ip_local_port_range && "
              f"exec {sys.executable} -c \"$GATHER\"")
    result = subprocess.run(["unshare", "--net", "sh", "-c", script], env={**os.environ, "GATHER": GATHER},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    ports = json.loads(result.stdout.splitlines()[-1])
    assert len(set(ports)) >= 3  # a port or two per peer (before the answer, bundling is not agreed yet)
    assert all(low <= port <= high for port in ports), ports

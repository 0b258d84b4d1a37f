"""Media into pods through a TURN gateway (issue 19): the relay on a pod network that only coturn reaches, gathering
only its pod address; clients that reach only coturn (its TURN REST credentials minted by /relay/client-config); a
spoken turn through it from aiortc and from Chromium (`iceTransportPolicy: "relay"`). The world: gateway.py."""

from __future__ import annotations

import asyncio
import json
import sys

from tests.turn.browser import BrowserCall, chromium, microphone
from tests.turn.gateway import (API_KEY, CLIENT, CLIENT_GW, POD_GW, POD_RELAY, TURN_PORT, Gateway, client_config_in,
                                mint_client_secret, minted_by_secret, run_peer, turn_sessions, turn_usage)

TURN_EVENTS = ["session.created", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
               "response.done", "output_audio_buffer.stopped"]


def _in_order(types: list[str], wanted: list[str]) -> bool:
    positions = [types.index(t) if t in types else -1 for t in wanted]
    return -1 not in positions and positions == sorted(positions)


def _only_the_pod_address(candidates: list[dict]) -> bool:
    return bool(candidates) and all(c["address"] == POD_RELAY and c["type"] == "host" for c in candidates)


async def _relayed_both_ways(gateway: Gateway, username: str) -> list[dict[str, int]]:
    """coturn's own account of the call's allocation: packets relayed to the relay's pod address and back."""
    usage = await turn_usage(gateway, username)
    assert any(u["rp"] > 50 and u["sp"] > 50 for u in usage), (usage, turn_sessions(gateway.turn_log(), username))
    return usage


def test_the_client_reaches_the_pod_network_only_through_the_gateway(gateway: Gateway):
    # No route from the client to the pod network, none back, and the gateway does not forward: only coturn and the
    # HTTP forwarder (TCP 8080) join the two sides.
    unreachable = gateway.run(gateway.client, "ip", "route", "get", POD_RELAY)
    assert unreachable.returncode != 0 and "unreachable" in unreachable.stderr.lower(), unreachable
    assert gateway.run(gateway.pod, "ip", "route", "get", CLIENT).returncode != 0
    assert gateway.run(gateway.gw, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "0"
    # The relay's client-config, through the forwarder: a TURN credential for a caller with the API key (coturn's
    # REST scheme, the shared secret), none for a stranger.
    config = client_config_in(gateway, gateway.client, gateway.relay_url, API_KEY)
    (turn,) = config["ice_servers"]
    assert turn["urls"] == [gateway.turn_url] and minted_by_secret(turn)
    assert client_config_in(gateway, gateway.client, gateway.relay_url, None)["ice_servers"] == []
    # coturn takes that credential, and a forged one not; it relays to the pod range and to no other private address
    # (its own legs, the clients' network, loopback, the other private ranges): it is no way into other networks.
    others = [CLIENT, CLIENT_GW, POD_GW, "127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254"]
    probe = _turn_probe(gateway, turn["username"], turn["credential"], POD_RELAY, "10.77.1.200", *others)
    assert probe["allocated"][0] == POD_GW, probe
    assert probe["peers"] == {POD_RELAY: "ok", "10.77.1.200": "ok", **{peer: 403 for peer in others}}, probe
    forged = _turn_probe(gateway, turn["username"], "Zm9yZ2Vk" + turn["credential"][8:], POD_RELAY)
    assert forged["allocated"] is None and forged["error"][0] == 401, forged


def _turn_probe(gateway: Gateway, username: str, credential: str, *peers: str) -> dict:
    result = gateway.run(gateway.client, sys.executable, "-m", "tests.turn.turn_probe", "--server",
                         f"{CLIENT_GW}:{TURN_PORT}", "--username", username, "--credential", credential, *peers)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


async def test_an_aiortc_client_speaks_a_turn_through_the_turn_gateway(gateway: Gateway):
    (call,) = await run_peer(gateway, gateway.client, "--base", gateway.relay_url, "--key", API_KEY,
                             "--turn", "--speak")
    assert call["status"] == 201, call
    # The relay gathered its pod address only; the client offered its host address and a relayed one from coturn's
    # pod-side leg.
    assert _only_the_pod_address(call["answer_candidates"]), call["answer_candidates"]
    assert {(c["type"], c["address"]) for c in call["offer_candidates"]} == {("host", CLIENT), ("relay", POD_GW)}
    assert call["connected"], call
    # The nominated pair: from the client's TURN allocation to the relay's pod address.
    assert call["pair"]["local"]["type"] == "relay" and call["pair"]["local"]["address"] == POD_GW, call["pair"]
    assert call["pair"]["remote"] == {**call["pair"]["remote"], "type": "host", "address": POD_RELAY}, call["pair"]
    # A spoken turn: the simulator heard the speech and its echo came back, loud, through the gateway.
    assert call["session_created"] and call["turn_done"], call["event_types"]
    assert _in_order(call["event_types"], TURN_EVENTS), call["event_types"]
    assert call["loud_ms_heard"] >= 500, call  # of the 1.8 s said
    assert call["hangup_status"] == 200
    sessions = turn_sessions(gateway.turn_log(), call["turn_username"])
    assert any("ALLOCATE processed, success" in line for line in sessions), sessions
    await _relayed_both_ways(gateway, call["turn_username"])


async def test_chromium_with_relay_only_policy_speaks_a_turn_through_the_turn_gateway(
        gateway: Gateway, browser_requirements, tmp_path):
    token = mint_client_secret(gateway)  # the backend's; the browser never sees the API key
    async with chromium(gateway, microphone(tmp_path)) as browser:
        call = await BrowserCall.start(browser, gateway, token, policy="relay", turn=True, timeout_s=15)
        try:
            result = call.result
            assert result["status"] == 201, result
            assert _only_the_pod_address(result["answer_candidates"]), result["answer_candidates"]
            assert result["connected"], result
            before = await call.stats()  # connected, the relay's silence playing: the echo comes seconds later
            assert await call.wait_for_event("output_audio_buffer.stopped", timeout_s=30), await call.event_types()
            assert _in_order(await call.event_types(), TURN_EVENTS), await call.event_types()
            stats = await call.stats()
            pair = stats["pair"]
            assert pair and pair["state"] == "succeeded", stats
            assert pair["local"]["type"] == "relay" and pair["local"]["address"] == POD_GW, pair
            assert pair["local"]["relayProtocol"] == "udp" and CLIENT_GW in (pair["local"]["url"] or CLIENT_GW), pair
            assert pair["remote"]["type"] == "host" and pair["remote"]["address"] == POD_RELAY, pair
            # Heard: the echo's energy (WebRTC's totalAudioEnergy, the sum of squared levels (1 = full scale) times
            # seconds; ~0.9 here for the echo, 0.05 is a second at -26 dBFS), none before it.
            assert before["energy"] < 0.005 and stats["packets"] > 100 and stats["energy"] > 0.05, (before, stats)
            assert call.console_errors == []
            await call.hang_up(token)
        finally:
            await call.close()
    await _relayed_both_ways(gateway, result["turn_username"])


async def test_without_the_turn_gateway_neither_client_connects(gateway: Gateway, browser_requirements, tmp_path):
    """The same clients with no ICE servers (Chromium with policy "all": host candidates): signaling still works
    through the forwarder, the media path does not exist."""
    token = mint_client_secret(gateway)

    async def from_chromium() -> dict:
        async with chromium(gateway, microphone(tmp_path)) as browser:
            call = await BrowserCall.start(browser, gateway, token, policy="all", turn=False, timeout_s=6)
            try:
                await call.hang_up(token)
                return call.result
            finally:
                await call.close()

    (aiortc,), browser = await asyncio.gather(
        run_peer(gateway, gateway.client, "--base", gateway.relay_url, "--key", API_KEY, "--connect-timeout", "6"),
        from_chromium())
    for result in (aiortc, browser):
        assert result["status"] == 201, result
        assert _only_the_pod_address(result["answer_candidates"]), result
        assert not result["connected"] and result["connection_state"] != "connected", result
    assert {c["address"] for c in aiortc["offer_candidates"]} == {CLIENT}

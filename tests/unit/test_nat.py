"""NAT traversal, sans-I/O: TURN credentials in coturn's REST scheme, the ICE server lists, the announced address
written into the answer, and their settings."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from relay.config import Settings, SettingsError
from relay.webrtc.ice import announce_address, client_ice_servers, relay_ice_servers, turn_credential

SECRET = "north-wind-secret-42"
TURN_ENV = {"RELAY_TURN_URLS": "turn:turn.example.org:3478?transport=udp,turn:turn.example.org:3478?transport=tcp",
            "RELAY_TURN_SECRET": SECRET}

# An answer as aiortc writes it (CRLF), gathered on a container's two IPv4 interfaces and an IPv6 one, with a STUN
# server: c= carries the first candidate's address, the srflx candidate's raddr a host address.
ANSWER = "\r\n".join([
    "v=0",
    "o=- 3920000000 3920000000 IN IP4 0.0.0.0",
    "s=-",
    "t=0 0",
    "a=group:BUNDLE 0 1",
    "a=msid-semantic:WMS *",
    "m=audio 50012 UDP/TLS/RTP/SAVPF 96",
    "c=IN IP4 172.17.0.2",
    "a=sendrecv",
    "a=mid:0",
    "a=rtcp:9 IN IP4 0.0.0.0",
    "a=rtcp-mux",
    "a=rtpmap:96 opus/48000/2",
    "a=candidate:0b2f5e6fc9a3e1c2b3c4 1 udp 2130706431 172.17.0.2 50012 typ host",
    "a=candidate:6d1a2f3e4b5c6d7e8f90 1 udp 2130706431 10.0.0.5 50013 typ host",
    "a=candidate:1f2e3d4c5b6a79881726 1 udp 2130706431 fd00::2 50014 typ host",
    "a=candidate:aa11bb22cc33dd44ee55 1 udp 1694498815 198.51.100.9 61000 typ srflx raddr 172.17.0.2 rport 50012",
    "a=end-of-candidates",
    "a=ice-ufrag:abcd",
    "a=ice-pwd:0123456789abcdef01234567",
    "a=fingerprint:sha-256 00:11",
    "a=setup:active",
    "m=application 50012 DTLS/SCTP 5000",
    "c=IN IP4 172.17.0.2",
    "a=mid:1",
    "a=candidate:0b2f5e6fc9a3e1c2b3c4 1 udp 2130706431 172.17.0.2 50012 typ host",
    "a=end-of-candidates",
    "",
])


def _candidates(sdp: str) -> list[list[str]]:
    return [line.split(" ") for line in sdp.split("\r\n") if line.startswith("a=candidate:")]


# --- TURN credentials -------------------------------------------------------------------------------------------


def test_turn_credential_is_coturns_rest_scheme():
    # expected value from: echo -n "1700000000:alice" | openssl dgst -binary -sha1 -hmac north-wind-secret-42 | base64
    assert turn_credential(SECRET, "alice", ttl_s=100, now=1699999900.7) == (
        "1700000000:alice", "SUSiPzSfxOh+6CiIOw/CDB8Nvfc=")


def test_clients_get_a_fresh_turn_entry_after_the_configured_servers():
    settings = Settings.load(env={**TURN_ENV, "RELAY_ICE_SERVERS": '[{"urls": "stun:stun.example.org:3478"}]',
                                  "RELAY_TURN_TTL_S": "3700"})
    first = client_ice_servers(settings, now=1_000_000, with_turn=True)
    second = client_ice_servers(settings, now=1_000_000, with_turn=True)
    assert first[0] == {"urls": "stun:stun.example.org:3478"}
    turn = first[1]
    assert turn["urls"] == ["turn:turn.example.org:3478?transport=udp", "turn:turn.example.org:3478?transport=tcp"]
    expiry, user = turn["username"].split(":")
    assert int(expiry) == 1_003_700 and user
    expected = base64.b64encode(hmac.new(SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest()).decode()
    assert turn["credential"] == expected
    assert second[1]["username"] != turn["username"]  # one per request
    assert SECRET not in repr(first)


def test_clients_that_may_not_call_get_no_turn_entry():
    settings = Settings.load(env=TURN_ENV)
    assert client_ice_servers(settings, now=0, with_turn=False) == []
    assert client_ice_servers(Settings.load(env={}), now=0, with_turn=True) == []


def test_the_relays_own_peer_uses_turn_only_when_told_to():
    stun = '[{"urls": "stun:stun.example.org:3478"}]'
    assert relay_ice_servers(Settings.load(env={**TURN_ENV, "RELAY_ICE_SERVERS": stun}), "rtc_1", now=0) == [
        {"urls": "stun:stun.example.org:3478"}]
    servers = relay_ice_servers(Settings.load(env={**TURN_ENV, "RELAY_ICE_SERVERS": stun,
                                                   "RELAY_TURN_FOR_RELAY": "true"}), "rtc_1", now=0)
    assert servers[0]["username"] == "4000:rtc_1"  # first: aiortc uses the first TURN server only
    assert servers[1] == {"urls": "stun:stun.example.org:3478"}


# --- the announced address ----------------------------------------------------------------------------------------


def test_announced_ip_replaces_host_candidates_and_c_lines_keeping_ports():
    out = announce_address(ANSWER, "203.0.113.7")
    candidates = _candidates(out)
    assert [(c[4], c[5], c[7]) for c in candidates] == [
        ("203.0.113.7", "50012", "host"), ("203.0.113.7", "50013", "host"), ("fd00::2", "50014", "host"),
        ("198.51.100.9", "61000", "srflx"), ("203.0.113.7", "50012", "host")]
    assert candidates[3][8:] == ["raddr", "203.0.113.7", "rport", "50012"]  # no private address left in it
    assert out.count("c=IN IP4 203.0.113.7") == 2
    assert "172.17.0.2" not in out and "10.0.0.5" not in out
    # everything else is byte for byte the same, CRLF included
    assert [line for line in out.split("\r\n") if "203.0.113.7" not in line] == \
        [line for line in ANSWER.split("\r\n") if "172.17.0.2" not in line and "10.0.0.5" not in line]
    assert "a=rtcp:9 IN IP4 0.0.0.0" in out and out.endswith("\r\n")


def test_an_ipv6_announced_address_moves_only_ipv6_host_candidates():
    out = announce_address(ANSWER, "2001:db8::7")
    assert [(c[4], c[5]) for c in _candidates(out)][:3] == [
        ("172.17.0.2", "50012"), ("10.0.0.5", "50013"), ("2001:db8::7", "50014")]
    assert "c=IN IP4 172.17.0.2" in out


def test_an_answer_without_host_candidates_of_that_family_is_unchanged():
    assert announce_address(ANSWER, "2001:db8::7").replace("2001:db8::7", "fd00::2") == ANSWER
    relayed_only = "\r\n".join(line for line in ANSWER.split("\r\n") if "typ host" not in line)
    assert announce_address(relayed_only, "203.0.113.7") == relayed_only
    assert announce_address(ANSWER.replace("\r\n", "\n"), "203.0.113.7") == \
        announce_address(ANSWER, "203.0.113.7").replace("\r\n", "\n")


# --- settings ---------------------------------------------------------------------------------------------------


def test_nat_settings_defaults():
    settings = Settings.load(env={})
    assert settings.announced_ip is None and settings.turn_urls == [] and settings.turn_secret is None
    assert settings.turn_ttl_s == 4000 and settings.turn_for_relay is False


def test_nat_settings_from_env_and_a_json_list():
    settings = Settings.load(env={**TURN_ENV, "RELAY_ANNOUNCED_IP": " 203.0.113.7 "})
    assert settings.announced_ip == "203.0.113.7"
    assert settings.turn_urls == ["turn:turn.example.org:3478?transport=udp", "turn:turn.example.org:3478?transport=tcp"]
    assert Settings.load(env={**TURN_ENV, "RELAY_TURN_URLS": '["turns:[2001:db8::1]:5349?transport=tcp"]'}
                         ).turn_urls == ["turns:[2001:db8::1]:5349?transport=tcp"]
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())


@pytest.mark.parametrize(("env", "named"), [
    ({"RELAY_ANNOUNCED_IP": "relay.example.org"}, "RELAY_ANNOUNCED_IP"),
    ({"RELAY_ANNOUNCED_IP": "0.0.0.0"}, "RELAY_ANNOUNCED_IP"),
    ({"RELAY_ANNOUNCED_IP": "224.0.0.1"}, "RELAY_ANNOUNCED_IP"),
    ({**TURN_ENV, "RELAY_TURN_URLS": "stun:turn.example.org:3478"}, "RELAY_TURN_URLS"),
    ({**TURN_ENV, "RELAY_TURN_URLS": "turn:turn.example.org:70000"}, "RELAY_TURN_URLS"),
    ({**TURN_ENV, "RELAY_TURN_URLS": "turn:turn.example.org?transport=sctp"}, "RELAY_TURN_URLS"),
    ({"RELAY_TURN_URLS": TURN_ENV["RELAY_TURN_URLS"]}, "RELAY_TURN_SECRET"),
    ({"RELAY_TURN_SECRET": SECRET}, "RELAY_TURN_URLS"),
    ({**TURN_ENV, "RELAY_TURN_SECRET": "short"}, "RELAY_TURN_SECRET"),
    ({"RELAY_TURN_FOR_RELAY": "true"}, "RELAY_TURN_FOR_RELAY"),
    ({**TURN_ENV, "RELAY_TURN_TTL_S": "10"}, "RELAY_TURN_TTL_S"),
])
def test_bad_nat_settings_are_refused_naming_the_setting(env, named):
    with pytest.raises(SettingsError, match=named) as caught:
        Settings.load(env=env)
    assert SECRET not in str(caught.value)


def test_a_turn_credential_must_outlive_the_longest_call():
    with pytest.raises(SettingsError, match="turn_ttl_s: 3600 s would expire"):
        Settings.load(env={**TURN_ENV, "RELAY_TURN_TTL_S": "3600"})
    assert Settings.load(env={**TURN_ENV, "RELAY_TURN_TTL_S": "600", "RELAY_MAX_CALL_DURATION_S": "300"})

"""Cluster mode, the parts without I/O: call ids naming node and worker, the signature between relays, where a node
is reached, the registry's entries, which transcripts are due and how much of them is stored, single-use secrets
given back, and the settings."""

from __future__ import annotations

import json
import re

import pytest

from relay.cluster.ids import new_call_id, owner_of, Owner
from relay.cluster.peers import Peers, RegistryDown, template_url
from relay.cluster.registry import SAME_NODE_S, STALE_S, Entry, live_url, other_urls
from relay.cluster.signing import (CALLER, CLIENT, MAX_AGE_S, NODE, SIGNATURE, TIME, Forwarded, SignatureError, sign,
                                   verify)
from relay.cluster.store import SharedStateError
from relay.cluster.transcripts import MAX_RECORD_BYTES, Revisions, answer, encode, record
from relay.config import Settings, SettingsError
from relay.protocol import new_id
from relay.server.auth import Tokens, TokenError
from relay.server.workers import Worker

SECRET = b"s" * 32
NOW = 1_700_000_000.0
VOUCHED = Forwarded("a", "backend:key0", "192.0.2.7")


# --- call ids ----------------------------------------------------------------------------------------------------


def test_without_a_node_id_call_ids_are_as_before():
    for worker in (0, 9, 10, 61):
        call_id = new_call_id(new_id("rtc"), worker)
        assert re.fullmatch(r"rtc_[A-Za-z0-9]{22}", call_id)
        assert owner_of(call_id) == Owner(None, worker)


@pytest.mark.parametrize("node", ["0", "7", "42", "eu1", "A" * 32])
def test_a_call_id_names_its_node_and_worker(node):
    for worker in (0, 1, 61):
        call_id = new_call_id(new_id("rtc"), worker, node)
        assert re.fullmatch(rf"rtc_{node}_[A-Za-z0-9]{{22}}", call_id)
        assert owner_of(call_id) == Owner(node, worker)


@pytest.mark.parametrize("call_id", ["sess_abc", "rtc_", "rtc_a-b_0abc", "rtc_A_", "rtc_" + "A" * 33 + "_0abc",
                                     "rtc__0abc", "rtc_A_-bc", "rtc_a_b_0abc"])
def test_ids_that_are_not_ours_name_no_owner(call_id):
    assert owner_of(call_id) is None


def test_a_worker_forwards_only_its_own_nodes_calls_to_its_other_workers():
    worker = Worker(0, 2, node="A")
    assert worker.other_owner(new_call_id(new_id("rtc"), 1, "A")) == 1
    assert worker.other_owner(new_call_id(new_id("rtc"), 0, "A")) is None  # its own
    assert worker.other_owner(new_call_id(new_id("rtc"), 1, "B")) is None  # another node's
    assert worker.other_owner(new_call_id(new_id("rtc"), 1)) is None  # a relay without a node id
    assert worker.other_owner(new_call_id(new_id("rtc"), 5, "A")) is None  # no such worker
    assert Worker(0, 2).other_owner(new_call_id(new_id("rtc"), 1, "A")) is None
    assert Worker(0, 2).other_owner(new_call_id(new_id("rtc"), 1)) == 1
    assert Worker(0, 2, node="A").call_id(new_id("rtc")).startswith("rtc_A_0")


# --- the signature -----------------------------------------------------------------------------------------------


def signed(**changes) -> dict[str, str]:
    return sign(SECRET, "POST", "/v1/realtime/calls/rtc_a_0x/hangup", b"", VOUCHED, NOW) | changes


def test_a_signed_request_is_trusted_for_what_it_vouches():
    headers = signed()
    assert set(headers) == {NODE, TIME, CALLER, CLIENT, SIGNATURE}
    assert verify(SECRET, "post", "/v1/realtime/calls/rtc_a_0x/hangup", b"", headers, NOW + 1) == VOUCHED


@pytest.mark.parametrize("change", [
    {"method": "DELETE"}, {"path_qs": "/v1/realtime/calls/rtc_a_0y/hangup"}, {"body": b"x"},
    {"secret": b"t" * 32}])
def test_a_signature_covers_method_path_body_and_key(change):
    request = {"secret": SECRET, "method": "POST", "path_qs": "/v1/realtime/calls/rtc_a_0x/hangup", "body": b""}
    with pytest.raises(SignatureError):
        verify(headers=signed(), now=NOW, **(request | change))


@pytest.mark.parametrize("header,value", [(CALLER, "backend:key1"), (CALLER, "anyone"), (CLIENT, "198.51.100.1"),
                                          (NODE, "b"), (TIME, f"{NOW + 1:.3f}"), (TIME, "nan")])
def test_what_a_relay_vouches_for_cannot_be_changed(header, value):
    with pytest.raises(SignatureError):
        verify(SECRET, "POST", "/v1/realtime/calls/rtc_a_0x/hangup", b"", signed(**{header: value}), NOW)


@pytest.mark.parametrize("age", [MAX_AGE_S + 0.5, -(MAX_AGE_S + 0.5), 3600.0])
def test_a_stale_or_future_signature_is_refused(age):
    with pytest.raises(SignatureError, match="from now"):
        verify(SECRET, "POST", "/v1/realtime/calls/rtc_a_0x/hangup", b"", signed(), NOW + age)


@pytest.mark.parametrize("broken", ["missing", "v2", "bare", "empty"])
def test_an_incomplete_or_foreign_signature_is_refused(broken):
    headers = signed()
    mac = headers[SIGNATURE].split("=", 1)[1]
    if broken == "missing":
        del headers[TIME]
    else:
        headers[SIGNATURE] = {"v2": f"v2={mac}", "bare": mac, "empty": ""}[broken]
    with pytest.raises(SignatureError):
        verify(SECRET, "POST", "/v1/realtime/calls/rtc_a_0x/hangup", b"", headers, NOW)


# --- where a node is ---------------------------------------------------------------------------------------------


async def test_without_a_registry_a_node_is_where_the_template_says():
    assert template_url("http://relay-{node}.relay-internal:8080", "2") == "http://relay-2.relay-internal:8080"
    assert await Peers(None, "http://relay-{node}.x:8080").url_of("0") == "http://relay-0.x:8080"
    assert await Peers(None, None).url_of("0") is None  # nowhere: gone


class DownRegistry:
    """A registry whose Redis does not answer."""

    def __init__(self, url: str | None = None) -> None:
        self.url, self.down = url, False

    async def lookup(self, node: str, now: float) -> str | None:
        if self.down:
            raise SharedStateError("registry")
        return self.url


async def test_redis_down_and_nothing_to_go_by_is_not_a_gone_node():
    registry = DownRegistry()
    peers = Peers(registry, None)
    assert await peers.url_of("1") is None  # asked, and not there: gone
    registry.down = True
    with pytest.raises(RegistryDown):  # not asked: it may be up (503, not 404)
        await peers.url_of("1")
    assert await Peers(registry, "http://relay-{node}:8080").url_of("1") == "http://relay-1:8080"
    registry.down, registry.url = False, "http://10.0.0.1:8080"
    assert await peers.url_of("1") == "http://10.0.0.1:8080"
    registry.down = True
    assert await peers.url_of("1") == "http://10.0.0.1:8080"  # its last word


def entry(at: float, url: str = "http://10.0.0.1:8080") -> Entry:
    return Entry(url, "serving", 3, 50, at)


def test_registry_entries_round_trip_and_garbage_is_no_entry():
    assert Entry.decode(entry(NOW).encode()) == entry(NOW)
    for raw in ("", "{", "[]", '{"url": "x"}', '{"url":"x","state":"serving","calls":"many","capacity":1,"at":1}'):
        assert Entry.decode(raw) is None


def test_a_node_is_live_while_one_of_its_workers_beats():
    fresh, older, stale = entry(NOW - 0.5, "http://new:1"), entry(NOW - 2, "http://old:1"), entry(NOW - STALE_S - 1)
    assert live_url([stale, older, None, fresh], NOW) == "http://new:1"
    assert live_url([stale, None], NOW) is None
    assert live_url([], NOW) is None


def test_another_address_beaten_just_now_under_this_node_id_is_another_relay():
    assert other_urls([entry(NOW - 0.5, "http://b:1"), entry(NOW, "http://a:1"), None], "http://a:1", NOW) == {
        "http://b:1"}
    assert other_urls([entry(NOW - SAME_NODE_S - 0.1, "http://b:1")], "http://a:1", NOW) == set()  # it stopped


# --- transcripts -------------------------------------------------------------------------------------------------


def test_a_transcript_is_due_when_it_changed_since_it_was_saved():
    revisions = Revisions()
    assert revisions.changed({"a": 1, "b": 0}) == ["a", "b"]
    revisions.saved("a", 1)
    revisions.saved("b", 0)
    assert revisions.changed({"a": 1, "b": 0}) == []
    assert revisions.changed({"a": 2, "b": 0}) == ["a"]
    assert revisions.changed({"b": 0}) == []  # a ended: forgotten
    assert revisions.changed({"a": 2, "b": 0}) == ["a"]


def test_transcripts_saved_longest_ago_come_first():
    """A tick that writes only some (PUBLISH_BYTES): the others are first at the next one, none waits forever."""
    revisions = Revisions()
    for call_id in "abc":
        revisions.saved(call_id, 0)
    assert revisions.changed({"a": 1, "b": 1, "c": 1, "d": 0}) == ["d", "a", "b", "c"]  # never saved first
    revisions.saved("d", 0)
    revisions.saved("a", 1)
    assert revisions.changed({"a": 2, "b": 1, "c": 1, "d": 1}) == ["b", "c", "d", "a"]


def snapshot(*texts: str, dropped: int = 0) -> dict:
    return {"entries": [{"seq": i, "role": "user", "text": text} for i, text in enumerate(texts)],
            "entries_dropped": dropped, "usage": {"responses": 1}}


def test_a_stored_transcript_keeps_its_newest_entries_within_the_bound():
    small = record("rtc_a_0x", "active", "a", snapshot("a", "b", dropped=3))
    assert json.loads(encode(small)) == small  # within the bound: as it is
    big = record("rtc_a_0x", "active", "a", snapshot(*(str(i) * 100_000 for i in range(5)), "tail", dropped=3))
    stored = json.loads(encoded := encode(big))
    assert len(encoded.encode()) <= MAX_RECORD_BYTES
    assert [e["seq"] for e in stored["entries"]] == [3, 4, 5]  # the newest that fit
    assert stored["entries_dropped"] == 3 + 3 and stored["usage"] == {"responses": 1}
    too_long = record("rtc_a_0x", "ended", "a", snapshot("x" * (MAX_RECORD_BYTES + 1)))
    assert json.loads(encode(too_long))["entries"] == []  # an entry over the bound alone: counted, not stored
    assert json.loads(encode(too_long))["entries_dropped"] == 1
    escaped = record("rtc_a_0x", "ended", "a", snapshot("é" * 100_000, "\n" * 100_000))  # 6 and 2 bytes in JSON
    assert len(encode(escaped).encode()) <= MAX_RECORD_BYTES


def test_a_single_use_secret_given_back_at_its_minting_worker_works_again():
    tokens = Tokens(b"k" * 32, single_use=True)
    token, _ = tokens.mint(None, 60, NOW)
    claims = tokens.check(token, NOW)
    tokens.redeem(claims, NOW)
    with pytest.raises(TokenError):
        tokens.redeem(claims, NOW)
    tokens.give_back(claims)  # its call was not created
    tokens.redeem(claims, NOW)


def test_a_stored_transcript_answers_as_the_relay_does():
    stored = record("rtc_a_0x", "active", "a", {"entries": [], "entries_dropped": 0, "usage": {}})
    assert answer(stored) == {"call_id": "rtc_a_0x", "status": "active", "entries": [], "entries_dropped": 0,
                              "usage": {}}
    assert answer(stored, status="ended")["status"] == "ended"


# --- settings ----------------------------------------------------------------------------------------------------

CLUSTER = {"RELAY_NODE_ID": "1", "RELAY_CLUSTER_SECRET": "k" * 32}


def test_cluster_settings_are_read_and_urls_tidied():
    settings = Settings.load(env=CLUSTER | {"RELAY_PEER_URL_TEMPLATE": "http://relay-{node}.internal:8080/",
                                            "RELAY_REDIS_URL": "redis://127.0.0.1:6379/0",
                                            "RELAY_ADVERTISE_URL": "http://10.1.2.3:8080/"})
    assert settings.node_id == "1" and settings.peer_url_template == "http://relay-{node}.internal:8080"
    assert settings.advertise_url == "http://10.1.2.3:8080" and settings.transcript_ttl_s == 3600
    assert Settings.load(env={}).node_id is None  # not in a cluster by default
    assert Settings.load(env={"RELAY_REDIS_URL": "unix:///run/redis.sock"}).redis_url  # shared state, no cluster
    assert Settings.load(env={"RELAY_REDIS_URL": "redis://h/0", "RELAY_TRANSCRIPT_REDIS_URL": "redis://t/0"}
                         ).transcript_redis_url == "redis://t/0"


@pytest.mark.parametrize("env,named", [
    ({"RELAY_NODE_ID": "relay-0", "RELAY_CLUSTER_SECRET": "k" * 32}, "RELAY_NODE_ID"),
    ({"RELAY_NODE_ID": "x" * 33, "RELAY_CLUSTER_SECRET": "k" * 32}, "RELAY_NODE_ID"),
    ({"RELAY_NODE_ID": "1", "RELAY_PEER_URL_TEMPLATE": "http://r-{node}:1"}, "RELAY_CLUSTER_SECRET"),
    (CLUSTER | {"RELAY_CLUSTER_SECRET": "k" * 31, "RELAY_PEER_URL_TEMPLATE": "http://r-{node}:1"},
     "RELAY_CLUSTER_SECRET"),
    (CLUSTER, "RELAY_PEER_URL_TEMPLATE"),  # no way to reach the others
    (CLUSTER | {"RELAY_REDIS_URL": "redis://h"}, "RELAY_ADVERTISE_URL"),  # registered without an address
    (CLUSTER | {"RELAY_PEER_URL_TEMPLATE": "http://relay:8080"}, "RELAY_PEER_URL_TEMPLATE"),  # no {node}
    (CLUSTER | {"RELAY_PEER_URL_TEMPLATE": "tcp://r-{node}:1"}, "RELAY_PEER_URL_TEMPLATE"),
    (CLUSTER | {"RELAY_PEER_URL_TEMPLATE": "http://r-{node}:99999"}, "RELAY_PEER_URL_TEMPLATE"),
    (CLUSTER | {"RELAY_REDIS_URL": "redis://h", "RELAY_ADVERTISE_URL": "10.0.0.1:8080"}, "RELAY_ADVERTISE_URL"),
    (CLUSTER | {"RELAY_REDIS_URL": "redis://h", "RELAY_ADVERTISE_URL": "http://h:1/?x=1"}, "RELAY_ADVERTISE_URL"),
    ({"RELAY_REDIS_URL": "http://h:6379"}, "RELAY_REDIS_URL"),
    ({"RELAY_ADVERTISE_URL": "http://h:1"}, "RELAY_NODE_ID"),  # meaningless alone
    ({"RELAY_REDIS_URL": "redis://h", "RELAY_TRANSCRIPT_TTL_S": "10"}, "RELAY_TRANSCRIPT_TTL_S"),
    ({"RELAY_TRANSCRIPT_REDIS_URL": "redis://t"}, "RELAY_TRANSCRIPT_REDIS_URL"),  # nothing else shared
    ({"RELAY_REDIS_URL": "redis://h", "RELAY_TRANSCRIPT_REDIS_URL": "http://t"}, "RELAY_TRANSCRIPT_REDIS_URL"),
])
def test_bad_cluster_settings_stop_the_start_naming_the_setting(env, named):
    with pytest.raises(SettingsError, match=named):
        Settings.load(env=env)


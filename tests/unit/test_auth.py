"""Client secrets (sans-I/O), the open-access rule and locked session fields."""

from __future__ import annotations

import json

import pytest

from relay.config import Settings, SettingsError
from relay.server.auth import Tokens, TokenError, is_api_key, ttl_of
from relay.server.workers import _child_env


def test_a_token_is_good_once_until_it_expires_and_only_where_it_was_signed():
    tokens = Tokens(b"secret", worker=1)
    token, expires_at = tokens.mint({"instructions": "x"}, 60, now=1000.0)
    assert token.startswith("ek_") and expires_at == 1060
    claims = tokens.check(token, now=1059.0)
    assert claims.worker == 1
    with pytest.raises(TokenError, match="expired"):
        tokens.check(token, now=1060.0)
    assert Tokens(b"secret", worker=0).check(token, now=1000.0) == claims  # any worker of the relay can check
    with pytest.raises(TokenError, match="not valid"):
        Tokens(b"another secret").check(token, now=1000.0)
    payload, signature = token.split(".")
    for forged in (payload + "." + signature[::-1], payload[:-2] + "x." + signature, "ek_", token + ".x"):
        with pytest.raises(TokenError):
            tokens.check(forged, now=1000.0)
    assert tokens.redeem(claims, now=1001.0) == {"instructions": "x"}
    with pytest.raises(TokenError, match="already been used"):
        tokens.redeem(claims, now=1002.0)
    assert tokens.signed_nonce(token) == claims.nonce  # still names its call after expiry and use
    assert Tokens(b"another secret").signed_nonce(token) is None


def test_an_unused_token_is_not_redeemed_after_its_expiry():
    tokens = Tokens(b"secret")
    token, _ = tokens.mint(None, 10, now=0.0)
    claims = tokens.check(token, now=5.0)
    with pytest.raises(TokenError):
        tokens.redeem(claims, now=10.0)


def test_expires_after_follows_openais_shape_and_bounds():
    assert ttl_of({}, 60) == 60
    assert ttl_of({"expires_after": {"anchor": "created_at", "seconds": 600}}, 60) == 600
    for bad in ({"seconds": 5}, {"seconds": 7201}, {"anchor": "used_at", "seconds": 60}, {"seconds": "60"}, 60):
        with pytest.raises(ValueError):
            ttl_of({"expires_after": bad}, 60)


def test_api_keys_compare_against_every_key():
    assert is_api_key("b", ["a", "b"]) and not is_api_key("c", ["a", "b"]) and not is_api_key("a", [])


def test_open_access_only_on_loopback_or_when_asked_for():
    for host in ("127.0.0.1", "::1", "localhost"):
        assert Settings.load(env={}, host=host).api_keys == []
    with pytest.raises(SettingsError, match="RELAY_API_KEYS, or pass --insecure"):
        Settings.load(env={}, host="0.0.0.0")
    assert Settings.load(env={"RELAY_API_KEYS": "k1,k2"}, host="0.0.0.0").api_keys[1].get_secret_value() == "k2"
    assert Settings.load(env={}, host="0.0.0.0", insecure="true").insecure
    with pytest.raises(SettingsError, match="allowed_origins"):
        Settings.load(env={}, allowed_origins="https://app.example.com/path")


def test_workers_get_one_token_secret_and_never_the_keys_in_their_settings(tmp_path):
    settings = Settings.load(env={"RELAY_API_KEYS": "k1"})
    env = _child_env(settings, 8080, 0, 2, tmp_path, "shared")
    assert env["RELAY_TOKEN_SECRET"] == "shared"
    assert "**" not in json.dumps(env)  # a secret is inherited as it is, never as its mask

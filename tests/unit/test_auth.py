"""Client secrets (sans-I/O), the open-access rule and locked session fields."""

from __future__ import annotations

import base64
import json
import os
import zlib

import pytest

from relay.config import Settings, SettingsError
from relay.server.auth import Tokens, TokenError, is_api_key, ttl_of
from relay.server.workers import _child_env


def test_a_token_is_good_until_it_expires_at_any_relay_with_the_same_secret():
    tokens = Tokens(b"secret", worker=1)
    session = {"instructions": "Be Ada.", "tools": [{"type": "function", "name": "f", "parameters": {}}]}
    token, expires_at = tokens.mint(session, 60, now=1000.0)
    assert token.startswith("ek_") and expires_at == 1060
    claims = tokens.check(token, now=1059.0)
    assert (claims.worker, claims.session) == (1, session)
    assert tokens.check(token, now=1059.0) == claims  # any number of times (OpenAI's secrets create many calls)
    with pytest.raises(TokenError, match="expired"):
        tokens.check(token, now=1060.0)
    assert Tokens(b"secret", worker=0).check(token, now=1000.0) == claims  # another worker, another relay
    with pytest.raises(TokenError, match="not valid"):
        Tokens(b"another secret").check(token, now=1000.0)
    assert tokens.signed_nonce(token) == claims.nonce  # still names its calls after expiry
    assert Tokens(b"another secret").signed_nonce(token) is None


def test_a_token_cannot_be_read_or_altered_by_its_holder():
    tokens = Tokens(b"secret")
    token, _ = tokens.mint({"instructions": "The operator's secret prompt"}, 60, now=0.0)
    sealed = base64.urlsafe_b64decode(token[3:] + "=" * (-len(token[3:]) % 4))
    assert b"secret prompt" not in sealed  # encrypted: not plain text, and not merely compressed either
    with pytest.raises(zlib.error):
        zlib.decompress(sealed[12:])
    # A character changed in the IV and in the sealed text (the last one may carry only padding bits: not that one),
    # the token cut short or lengthened, nothing at all.
    flipped = [token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:] for i in (10, len(token) // 2, -8)]
    flipped += [token[:-8], token + "AAAA", "ek_", "ek_" + token[3:20], token.replace("ek_", "ek_x")]
    for forged in flipped:
        with pytest.raises(TokenError, match="not valid"):
            tokens.check(forged, now=1.0)


def test_a_single_use_token_is_good_once_where_it_was_minted():
    tokens = Tokens(b"secret", single_use=True)
    token, _ = tokens.mint({"instructions": "x"}, 60, now=1000.0)
    claims = tokens.check(token, now=1000.0)
    tokens.redeem(claims, now=1001.0)
    with pytest.raises(TokenError, match="already been used"):
        tokens.redeem(claims, now=1002.0)
    with pytest.raises(TokenError, match="already been used"):  # another relay never saw it minted
        Tokens(b"secret", single_use=True).redeem(claims, now=1001.0)


def test_an_unused_single_use_token_is_not_redeemed_after_its_expiry():
    tokens = Tokens(b"secret", single_use=True)
    token, _ = tokens.mint(None, 10, now=0.0)
    claims = tokens.check(token, now=5.0)
    with pytest.raises(TokenError):
        tokens.redeem(claims, now=10.0)


def test_a_session_too_long_for_a_header_is_refused_at_minting():
    tokens = Tokens(b"secret")
    with pytest.raises(ValueError, match="longer than"):
        tokens.mint({"instructions": base64.b64encode(os.urandom(8000)).decode()}, 60, now=0.0)


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


def test_a_short_token_secret_is_refused_at_start():
    with pytest.raises(SettingsError, match="token_secret.*at least 32 characters"):
        Settings.load(env={"RELAY_TOKEN_SECRET": "password123"})
    assert Settings.load(env={"RELAY_TOKEN_SECRET": "x" * 32}).token_secret is not None


def test_a_single_use_token_says_so_itself_whatever_the_relay_that_checks_it():
    single, _ = Tokens(b"secret", single_use=True).mint(None, 60, now=0.0)
    many, _ = Tokens(b"secret").mint(None, 60, now=0.0)
    checker = Tokens(b"secret")  # a relay of the other setting, sharing the secret
    assert checker.check(single, now=1.0).single_use and not checker.check(many, now=1.0).single_use


def test_workers_get_one_token_secret_and_never_the_keys_in_their_settings(tmp_path):
    settings = Settings.load(env={"RELAY_API_KEYS": "k1"})
    env = _child_env(settings, 8080, 0, 2, tmp_path, "shared")
    assert env["RELAY_TOKEN_SECRET"] == "shared"
    assert "**" not in json.dumps(env)  # a secret is inherited as it is, never as its mask

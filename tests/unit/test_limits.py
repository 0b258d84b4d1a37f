"""The per-address rate of call creations, and which address a request comes from (sans-I/O)."""

from __future__ import annotations

from relay.server.limits import RateLimiter, client_address, networks, rate_key, retry_after


def test_a_burst_then_the_rate():
    limiter = RateLimiter(rate=2.0, burst=5)
    assert [limiter.take("a", 0.0) for _ in range(5)] == [0.0] * 5
    assert limiter.take("a", 0.0) == 0.5  # one token comes back every 0.5 s
    assert limiter.take("b", 0.0) == 0.0  # another address has its own
    assert limiter.take("a", 0.5) == 0.0 and limiter.take("a", 0.5) > 0
    assert limiter.take("a", 100.0) == 0.0  # refilled, never beyond the burst
    assert [limiter.take("a", 100.0) for _ in range(5)].count(0.0) == 4


def test_refused_attempts_do_not_earn_credit():
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.take("a", 0.0) == 0.0
    assert 0 < limiter.take("a", 0.2) <= 0.8
    assert 0 < limiter.take("a", 0.4) <= 0.6
    assert limiter.take("a", 1.0) == 0.0


def test_memory_stays_bounded_by_forgetting_refilled_addresses_first():
    limiter = RateLimiter(rate=1.0, burst=2, max_tracked=100)
    for i in range(1000):
        limiter.take(f"10.0.{i // 256}.{i % 256}", float(i))
    assert len(limiter) <= 101
    busy = RateLimiter(rate=0.001, burst=2, max_tracked=100)  # nobody refills: the oldest half goes
    for i in range(1000):
        busy.take(f"a{i}", 0.0)
    assert len(busy) <= 101


def test_retry_after_is_whole_seconds():
    assert retry_after(0.01) == "1" and retry_after(2.2) == "3"


def test_the_client_address_behind_trusted_proxies_only():
    proxies = networks(["10.0.0.0/8", "::1"])
    assert client_address("203.0.113.5", "198.51.100.1", proxies) == "203.0.113.5"  # not a proxy: header ignored
    assert client_address("10.1.2.3", "198.51.100.1", proxies) == "198.51.100.1"
    # The client may write anything left of the proxies' own entries: the last untrusted one counts.
    assert client_address("10.1.2.3", "1.1.1.1, 198.51.100.1, 10.9.9.9", proxies) == "198.51.100.1"
    assert client_address("::1", None, proxies) == "::1"
    assert client_address("10.1.2.3", "not-an-ip", proxies) == "not-an-ip"  # its own bucket, like any other
    assert client_address(None, None, []) == "unknown"


def test_ipv6_clients_share_their_64_and_mapped_ipv4_is_ipv4():
    assert rate_key("2001:db8:1:2:aaaa::1") == rate_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert rate_key("2001:db8:1:3::1") != rate_key("2001:db8:1:2::1")
    assert rate_key("::ffff:198.51.100.7") == rate_key("198.51.100.7") == "198.51.100.7"
    assert rate_key("unknown") == "unknown"

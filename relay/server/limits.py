"""Call creations per client IP: a token bucket per address, and which address a request comes from."""

from __future__ import annotations

import ipaddress
import math

BURST = 5.0  # creations a client may make at once before the per-second rate applies
MAX_TRACKED = 10_000  # addresses remembered; beyond it, those whose bucket is full again are forgotten first


class RateLimiter:
    """`rate` tokens a second per key, up to `burst`. Sans-I/O: the caller passes the time."""

    def __init__(self, rate: float, burst: float = BURST, max_tracked: int = MAX_TRACKED) -> None:
        self.rate, self.burst, self.max_tracked = rate, burst, max_tracked
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, now: float) -> float:
        """Take a token for `key`: 0.0 when allowed, else the seconds until one is there (for Retry-After)."""
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self.max_tracked:
            self._forget_refilled(now)
        return 0.0

    def _forget_refilled(self, now: float) -> None:
        """Drop the keys whose bucket has refilled (they are as good as new); if none has, the oldest half."""
        full = [k for k, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.rate >= self.burst]
        for key in full or sorted(self._buckets, key=lambda k: self._buckets[k][1])[: len(self._buckets) // 2]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


Networks = list[ipaddress.IPv4Network | ipaddress.IPv6Network]


def networks(specs: list[str]) -> Networks:
    return [ipaddress.ip_network(spec, strict=False) for spec in specs]


def client_address(peer: str | None, forwarded_for: str | None, trusted_proxies: Networks) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the last address of
    X-Forwarded-For that is not a trusted proxy (addresses further left are the client's own say, forgeable)."""
    chain = [part.strip() for part in (forwarded_for or "").split(",") if part.strip()]
    address = peer or "unknown"
    while _within(address, trusted_proxies) and chain:
        address = chain.pop()
    return address


def rate_key(address: str) -> str:
    """Whose allowance a request uses: an IPv4 address, or an IPv6 address's /64 (one subscriber holds a whole
    /64: per address, it would have 2^64 allowances)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


def _within(address: str, trusted: Networks) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)

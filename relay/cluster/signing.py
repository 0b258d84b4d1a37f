"""What makes a request one relay forwards to another trustworthy there: an HMAC-SHA256 (RELAY_CLUSTER_SECRET) over
the method, the path and query, a timestamp, the body's hash, and what the forwarding relay established about the
request (its own node id, who the caller is, the client's address), all carried in headers. Never the client's own
credentials: the relay that got the request checked them; its peers trust the signature. Sans-I/O: the caller
passes the time.

A signature is good for MAX_AGE_S either side of the receiver's clock (the relays' clocks must agree that well, as
NTP keeps them). Within that window a captured request can be sent again, and is trusted again: a hangup or DELETE
ends nothing more (the call has ended), a transcript is read once more, but a replayed control-socket upgrade
attaches one more backend to the call, with the caller's rights, for as long as that socket stays open. Nothing
remembers which signatures were used. So keep what relays send each other where others can neither read it nor
send it again: on the cluster's own network (encrypted by the network plugin where others share the wire), with a
NetworkPolicy that lets only the relays and the ingress reach the relays' port (docs/deployment.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Mapping

NODE = "X-Relay-Cluster-Node"  # the node that forwarded the request
TIME = "X-Relay-Cluster-Time"  # when it signed it: unix seconds, 3 decimals
CALLER = "X-Relay-Cluster-Caller"  # who the forwarding node found the caller to be (see relay/server/auth.py)
CLIENT = "X-Relay-Cluster-Client"  # the client's address as the forwarding node saw it (unused by the owner so far)
SIGNATURE = "X-Relay-Cluster-Signature"  # "v1=" + hex HMAC-SHA256
HEADERS = (NODE, TIME, CALLER, CLIENT, SIGNATURE)
VERSION = "v1"
MAX_AGE_S = 10.0
MIN_SECRET_CHARS = 32


class SignatureError(Exception):
    """Why a forwarded request is not trusted (for the log; the client gets a plain 401)."""


@dataclass(frozen=True)
class Forwarded:
    """What the forwarding node vouches for."""

    node: str
    caller: str
    client: str


def sign(secret: bytes, method: str, path_qs: str, body: bytes, forwarded: Forwarded, now: float) -> dict[str, str]:
    """The headers that carry `forwarded` and the signature over the request."""
    timestamp = f"{now:.3f}"
    mac = _mac(secret, method, path_qs, timestamp, body, forwarded)
    return {NODE: forwarded.node, TIME: timestamp, CALLER: forwarded.caller, CLIENT: forwarded.client,
            SIGNATURE: f"{VERSION}={mac}"}


def verify(secret: bytes, method: str, path_qs: str, body: bytes, headers: Mapping[str, str], now: float
           ) -> Forwarded:
    """What a correctly signed, fresh request's forwarding node vouches for; SignatureError otherwise."""
    try:
        forwarded = Forwarded(headers[NODE], headers[CALLER], headers[CLIENT])
        timestamp, signature = headers[TIME], headers[SIGNATURE]
        signed_at = float(timestamp)
    except (KeyError, ValueError):
        raise SignatureError("incomplete cluster headers") from None
    version, _, mac = signature.partition("=")
    expected = _mac(secret, method, path_qs, timestamp, body, forwarded)
    if version != VERSION or not hmac.compare_digest(mac.encode(), expected.encode()):
        raise SignatureError("bad signature")
    if not abs(now - signed_at) <= MAX_AGE_S:  # `not <=`: a NaN timestamp is stale too
        raise SignatureError(f"signed {now - signed_at:.1f} s from now (allowed: {MAX_AGE_S:g} s)")
    return forwarded


def _mac(secret: bytes, method: str, path_qs: str, timestamp: str, body: bytes, forwarded: Forwarded) -> str:
    # A JSON list: no value can pass for a boundary between two others.
    message = json.dumps([VERSION, method.upper(), path_qs, timestamp, hashlib.sha256(body).hexdigest(),
                          forwarded.node, forwarded.caller, forwarded.client])
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()

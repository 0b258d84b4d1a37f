"""NAT traversal, sans-I/O: TURN credentials, the ICE servers of clients and of the relay's own peer, and the
announced address written into the answer.

TURN credentials follow coturn's `use-auth-secret` REST scheme (draft-uberti-behave-turn-rest): the username is
`<unix expiry>:<anything>`, the password is base64(HMAC-SHA1(shared secret, username)). The TURN server checks them
with the same secret (coturn's `static-auth-secret`) and refuses them after the expiry, so nothing is stored.

Does the relay's own peer use TURN? Not by default (`RELAY_TURN_FOR_RELAY=false`). aiortc gathers every candidate
before it answers (no trickle ICE), so a TURN allocation would delay every call's answer by a round trip or two to
the TURN server and hold an allocation per call, and a relay with a public or announced address needs none: a client
behind a restrictive NAT or firewall relays through TURN from its own side, to the relay's host candidate. Turn it on
for a relay that nobody can reach directly (no public address and no port forwarding).

The announced address: aioice binds each host address it finds and has no option to advertise another one, so the
answer's host candidates are rewritten instead (what Janus calls a 1:1 NAT mapping): their addresses become the
announced one and their ports stay, which is right when the NAT in front of the relay forwards each port to the
same port (Docker's published port ranges, a cloud's elastic IP).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
from typing import Any

from relay.config import Settings


def turn_credential(secret: str, user: str, ttl_s: int, now: float) -> tuple[str, str]:
    """(username, credential) valid for `ttl_s` from `now`, in coturn's REST scheme."""
    username = f"{int(now) + ttl_s}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def turn_server(settings: Settings, user: str, now: float) -> dict[str, Any] | None:
    """The configured TURN server as a WebRTC RTCIceServer dict with a fresh credential; None when none is set."""
    if not settings.turn_urls or settings.turn_secret is None:
        return None
    username, credential = turn_credential(settings.turn_secret.get_secret_value(), user, settings.turn_ttl_s, now)
    return {"urls": list(settings.turn_urls), "username": username, "credential": credential}


def client_ice_servers(settings: Settings, now: float, with_turn: bool) -> list[dict[str, Any]]:
    """What a client uses: RELAY_ICE_SERVERS, then (when it may have one) a TURN entry minted for this request."""
    servers = [dict(server) for server in settings.ice_servers]
    turn = turn_server(settings, secrets.token_hex(8), now) if with_turn else None
    return servers + [turn] if turn else servers


def relay_ice_servers(settings: Settings, call_id: str, now: float) -> list[dict[str, Any]]:
    """What the relay's own peer uses for a call: RELAY_ICE_SERVERS, and with RELAY_TURN_FOR_RELAY a TURN entry
    minted for the call (first: aiortc uses the first TURN server it finds and ignores the others). The call id in
    the username finds the call in the TURN server's logs."""
    servers = [dict(server) for server in settings.ice_servers]
    turn = turn_server(settings, call_id, now) if settings.turn_for_relay else None
    return [turn] + servers if turn else servers


def announce_address(sdp: str, announced: str) -> str:
    """`sdp` with every host candidate of the announced address's IP family moved to `announced` (ports kept), and
    the other mentions of those addresses (a `c=` line, a related address `raddr`) with them; the rest untouched."""
    family = ipaddress.ip_address(announced).version
    lines = sdp.split("\n")
    replaced: set[str] = set()
    for line in lines:
        bits = line.rstrip("\r").split(" ")
        if line.startswith("a=candidate:") and len(bits) >= 8 and bits[6] == "typ" and bits[7] == "host" \
                and _family(bits[4]) == family:
            replaced.add(bits[4])
    replaced.discard(announced)
    if not replaced:
        return sdp
    out = []
    for line in lines:
        end = "\r" if line.endswith("\r") else ""
        bits = line.removesuffix("\r").split(" ")
        if line.startswith("a=candidate:") and len(bits) >= 8:
            if bits[4] in replaced and bits[7] == "host":
                bits[4] = announced
            for index in range(8, len(bits) - 1):
                if bits[index] == "raddr" and bits[index + 1] in replaced:
                    bits[index + 1] = announced
        elif line.startswith("c=") and len(bits) == 3 and bits[2] in replaced:
            bits[2] = announced
        out.append(" ".join(bits) + end)
    return "\n".join(out)


def _family(address: str) -> int | None:
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return None  # an mDNS name or garbage: not ours to rewrite

"""Call ids that say where a call lives, so that any relay can send a request about it to its owner.

Without a node id (a single relay): `rtc_` + the worker's digit (base 62) + random, as always. With RELAY_NODE_ID:
`rtc_` + the node id + `_` + the worker's digit + random. Still `rtc_` followed by letters, digits and `_`, as
OpenAI's call ids; a node id holds no `_`, so the last `_` ends it.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

DIGITS = string.digits + string.ascii_letters  # base 62: a worker's index in one character
NODE_ID = re.compile(r"[A-Za-z0-9]{1,32}")
PREFIX = "rtc"


@dataclass(frozen=True)
class Owner:
    node: str | None  # None: a call id of a relay without a node id
    worker: int


def new_call_id(random_id: str, worker: int, node: str | None = None) -> str:
    """A call id for `worker` of `node`, from a random id (`rtc_` + 22 random characters)."""
    prefix, rest = random_id.split("_", 1)
    local = DIGITS[worker] + rest[1:]
    return f"{prefix}_{node}_{local}" if node else f"{prefix}_{local}"


def owner_of(call_id: str) -> Owner | None:
    """Which node and worker a call id names; None for an id that is not one of ours."""
    prefix, _, rest = call_id.partition("_")
    if prefix != PREFIX:
        return None
    node, named, local = rest.rpartition("_")
    if named and not NODE_ID.fullmatch(node):
        return None
    if not local or local[0] not in DIGITS:
        return None
    return Owner(node if named else None, DIGITS.index(local[0]))

"""The cluster's work while the app runs (issue 19), and its place in the app: with Redis (RELAY_REDIS_URL), this
worker's heartbeat in the registry, and its calls' transcripts, written as they change and when they end, so that an
ended call's transcript is served by any relay. What one tick writes is bounded (PUBLISH_BYTES, and each call's record
by transcripts.MAX_RECORD_BYTES), yielding to the calls between two calls' records. Forwarding is cluster.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Callable, Mapping

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

from relay.cluster.registry import BEAT_S, Entry, Registry, other_urls
from relay.cluster.store import SharedStateError
from relay.cluster.transcripts import Revisions, encode, record
from relay.core.history import History
from relay.server.cluster import (CLUSTER, CONNECT_TIMEOUT_S, Cluster, now_and_then, route_to_owner,
                                  trust_signed)

log = logging.getLogger("relay.cluster")
PUBLISH_EVERY_S = 1.0  # how often live calls' changed transcripts are written to Redis
PUBLISH_BYTES = 4 * 1024 * 1024  # written at most per tick (16 calls at their bound; the rest the next tick)
FINAL_WRITES_S = 2.0  # at shutdown, for the last transcripts and leaving the registry


# --- while the app runs -------------------------------------------------------------------------------------------


async def keep_beating(registry: Registry, entry: Callable[[], Entry]) -> None:
    """This worker's heartbeat in the registry, every BEAT_S (Redis down: counted, and tried again)."""
    while True:
        await beat(registry, entry)
        await asyncio.sleep(BEAT_S)


async def beat(registry: Registry, entry: Callable[[], Entry]) -> None:
    """One heartbeat; whatever goes wrong is logged and the next one tried (a relay out of the registry loses
    its calls' requests). Another relay beating under this node id is an error of the deployment: said."""
    try:
        mine = entry()
        others = other_urls(await registry.beat(mine), mine.url, mine.at)
    except SharedStateError:
        return
    except Exception:
        if now_and_then("heartbeat failed"):
            log.exception("cluster heartbeat failed", extra={"event": "heartbeat_failed"})
        return
    if others and now_and_then("same node id"):
        log.error("another relay beats as node %s, at %s (this one is at %s): node ids must differ (RELAY_NODE_ID)",
                  registry.node, ", ".join(sorted(others)), mine.url,
                  extra={"event": "duplicate_node_id", "node": registry.node})


async def keep_publishing(cluster: Cluster, calls: Mapping[str, Any]) -> None:
    """Write the live calls' changed transcripts every PUBLISH_EVERY_S, and ended calls' at once; whatever goes
    wrong is logged and tried again next time (cancelled at shutdown: the last writes follow)."""
    revisions = Revisions()
    while True:
        await cluster.woken(PUBLISH_EVERY_S)
        try:
            await publish(cluster, calls, revisions)
        except SharedStateError:
            pass  # counted and logged by the store
        except Exception:
            if now_and_then("publishing failed"):
                log.exception("writing transcripts failed", extra={"event": "transcripts_failed"})


async def publish(cluster: Cluster, calls: Mapping[str, Any], revisions: Revisions) -> bool:
    """Write what is due, ended calls first: True when all of it was written, False when some waits for the next
    tick (PUBLISH_BYTES). SharedStateError when Redis failed. The ended calls taken go back unless written, however
    this ends (cancelled mid-write at shutdown included), so that the last writes still have them."""
    ended = cluster.take_ended()
    try:
        left = await _publish(cluster, calls, revisions, ended)
    except BaseException:
        cluster.ended_again(ended)
        raise
    cluster.ended_again({call_id: history for call_id, history in ended.items() if call_id in left})
    return not left


async def _publish(cluster: Cluster, calls: Mapping[str, Any], revisions: Revisions, ended: Mapping[str, History]
                   ) -> set[str]:
    """Write this tick's share of what is due; the calls left for the next."""
    assert cluster.transcripts is not None
    live = {call_id: call.history.revision for call_id, call in calls.items()}
    due = [(call_id, "ended", history) for call_id, history in ended.items()]
    due += [(call_id, "active", calls[call_id].history) for call_id in revisions.changed(live)]
    batch: list[tuple[str, str]] = []
    size = 0
    for call_id, status, history in due:
        if size >= PUBLISH_BYTES:
            break
        text = encode(record(call_id, status, cluster.node, history.snapshot()))
        batch.append((call_id, text))
        size += len(text)
        await asyncio.sleep(0)  # encoding is the event loop's time: the calls' audio goes first
    if batch:
        await cluster.transcripts.save(batch)
    for call_id, _ in batch:
        if call_id in live:
            revisions.saved(call_id, live[call_id])
    return {call_id for call_id, _, _ in due[len(batch):]}


def peer_connector() -> TCPConnector:
    """Connections to the other nodes: no cap (each relayed backend socket holds one for its life: a cap would make
    the next requests wait, then look like a gone node; the owner bounds its sockets); names resolved again after a
    second (a pod that came back has a new address under the template's name)."""
    return TCPConnector(limit=0, ttl_dns_cache=1)


def add_cluster(app: web.Application, cluster: Cluster, calls: Mapping[str, Any], entry: Callable[[], Entry]) -> None:
    """Install the cluster's middlewares (around auth: signed requests checked before it, forwarding after it) and
    its tasks (the HTTP client to the other nodes, the heartbeat, the transcripts)."""
    app[CLUSTER] = cluster
    if cluster.node is not None:  # auth's middleware is the first (add_auth): forwarding comes right after it
        app.middlewares.insert(1, route_to_owner(cluster))
        app.middlewares.insert(0, trust_signed(cluster))

    async def running(app: web.Application):
        if cluster.node is not None:
            cluster.http = ClientSession(connector=peer_connector(),
                                         timeout=ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S))
        tasks = []
        if cluster.registry is not None:
            tasks.append(asyncio.ensure_future(keep_beating(cluster.registry, entry)))
        if cluster.transcripts is not None:
            tasks.append(asyncio.ensure_future(keep_publishing(cluster, calls)))
        yield
        for task in tasks:
            task.cancel()  # publish() puts back what it had taken: the last writes have it
        await asyncio.gather(*tasks, return_exceptions=True)
        await _last_writes(cluster, calls)
        if cluster.http is not None:
            await cluster.http.close()
        await cluster.aclose()

    app.cleanup_ctx.append(running)


async def _last_writes(cluster: Cluster, calls: Mapping[str, Any]) -> None:
    """At shutdown, within FINAL_WRITES_S: the calls' last transcripts (a drain ends them just before; as many
    ticks' worth as it takes), then leave the registry."""
    with contextlib.suppress(asyncio.TimeoutError):
        async with asyncio.timeout(FINAL_WRITES_S):
            if cluster.transcripts is not None:
                with contextlib.suppress(SharedStateError):
                    revisions = Revisions()
                    while not await publish(cluster, calls, revisions):
                        pass
            if cluster.registry is not None:
                with contextlib.suppress(SharedStateError):
                    await cluster.registry.leave()

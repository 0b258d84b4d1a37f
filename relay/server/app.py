"""The relay's aiohttp application and the `relay serve` loop."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import contextlib
import logging
import signal
import time
from pathlib import Path
from urllib.parse import urlencode

from aiohttp import web

from relay.config import Settings
from relay.core.policy import EventPolicy
from relay.simulator.config import SimConfig
from relay.simulator.server import RunningSimulator, start_simulator
from relay.cluster.registry import Entry
from relay.server.auth import add_auth, may_call
from relay.server.errors import json_errors
from relay.server.control import add_control_route
from relay.server.calls import CALLS, KEY_BURST, SHUTTING_DOWN, TOOLBOX, add_call_routes, call_capacity, drain
from relay.server.cluster import Cluster
from relay.server.cluster_tasks import add_cluster
from relay.server.limits import BURST
from relay.server.metrics import add_metrics
from relay.server.workers import Worker
from relay.upstream.target import ModelChoice, UpstreamTarget, choose_upstream
from relay.webrtc.ice import client_ice_servers
from relay.webrtc.aiortc_internals import (guard_ice_data, restrict_host_addresses, speed_up_audio_sender,
                                          speed_up_ntp_clock)

log = logging.getLogger("relay")
SHUTDOWN_TIMEOUT_S = 5.0

async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 while this worker takes new calls; 503 while it drains (SIGTERM) or carries its share of max_calls."""
    if request.app[SHUTTING_DOWN].is_set():
        return web.json_response({"status": "draining", "reason": "shutting down: live calls go on, new calls are "
                                  "refused"}, status=503, headers={"Cache-Control": "no-store"})
    capacity = call_capacity(request.app)
    body = {"calls": capacity.calls, "max_calls": capacity.limit}
    if capacity.full:
        return web.json_response({"status": "full", "reason": "this worker carries its share of max_calls", **body},
                                 status=503, headers={"Cache-Control": "no-store"})
    return web.json_response({"status": "ready", **body}, headers={"Cache-Control": "no-store"})


STATIC = Path(__file__).resolve().parent.parent / "static"


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def client_config(settings: Settings):
    """What the bundled page (and any client) may know of the relay's configuration: never a secret."""
    body = {
        "ice_servers": settings.ice_servers,
        "locked": EventPolicy(settings.client_session_fields).locked_for_display(),  # clients cannot change these
        "prices": settings.prices,
    }

    async def handler(request: web.Request) -> web.Response:
        # A TURN credential is minted per request, for a client that may create calls (with API keys: a key or a
        # client secret): strangers do not get to relay through the TURN server. Fresh each time: never cached.
        ice_servers = client_ice_servers(settings, time.time(), with_turn=may_call(request))
        return web.json_response({**body, "ice_servers": ice_servers}, headers={"Cache-Control": "no-store"})

    return handler


def registry_entry(app: web.Application, url: str) -> Entry:
    """What this worker says of itself in the cluster's registry."""
    capacity = call_capacity(app)
    return Entry(url, "draining" if app[SHUTTING_DOWN].is_set() else "serving", capacity.calls, capacity.limit,
                 time.time())


def create_app(settings: Settings, upstream: UpstreamTarget, worker: Worker = Worker()) -> web.Application:
    """The relay's routes. Applies the process-wide aiortc adjustments: the ICE address restriction (aioice has
    no per-call option) and the faster audio sender."""
    restrict_host_addresses(settings.ice_addresses)
    speed_up_audio_sender()
    speed_up_ntp_clock()
    guard_ice_data()
    worker = dataclasses.replace(worker, node=settings.node_id)  # call ids name the node, in a cluster
    cluster = Cluster.of(settings, worker, ip_burst=BURST, key_burst=KEY_BURST)
    app = web.Application(client_max_size=settings.max_sdp_bytes)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/", index)
    app.router.add_get("/relay/client-config", client_config(settings))
    app.router.add_static("/static/", STATIC)
    add_call_routes(app, settings, upstream, worker)
    add_control_route(app)
    add_auth(app, settings, worker, CALLS, ModelChoice.of(settings, upstream), app[TOOLBOX].definitions(),
             single_use=cluster.single_use)
    add_cluster(app, cluster, app[CALLS], lambda: registry_entry(app, cluster.advertise_url or ""))
    # Innermost: what the routes and aiohttp raise becomes a JSON error that auth's CORS headers are added to.
    app.middlewares.append(json_errors(settings.max_sdp_bytes))
    # And outermost: what the middlewares raise themselves (a body over client_max_size read to check a cluster
    # signature or to pass a request to another worker) is a JSON error too, not aiohttp's plain text.
    app.middlewares.insert(0, json_errors(settings.max_sdp_bytes))
    add_metrics(app, settings.metrics, CALLS)
    return app


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the relay until SIGINT/SIGTERM (or `stop` is set), then drain: new calls are refused at once, live
    calls go on for up to drain_timeout_s (a second signal: no more waiting), then end with a relay.shutdown event."""
    stop = stop or asyncio.Event()
    hurry = asyncio.Event()
    loop = asyncio.get_running_loop()

    worker = Worker.from_env()
    supervised = worker.count > 1  # a master forwards every signal to its workers

    def on_signal(sig: int) -> None:
        # Under a master a repeated SIGTERM is no hurry: it also came from the master, forwarding the first one
        # (systemd, `kill -TERM -<pgid>` and Docker signal the whole group). The master says hurry with SIGUSR1.
        if stop.is_set() and not (supervised and sig == signal.SIGTERM):
            hurry.set()
        stop.set()

    def on_hurry() -> None:
        hurry.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
    if supervised:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGUSR1, on_hurry)
    upstream = choose_upstream(settings)
    simulator: RunningSimulator | None = None
    runner: web.AppRunner | None = None
    try:
        if upstream.kind == "simulator":
            # The embedded simulator listens on loopback only; the relay reaches it over a real WebSocket, the
            # same code path as any other upstream.
            simulator = await start_simulator(SimConfig(default_model=settings.model), "127.0.0.1", 0)
            upstream = UpstreamTarget("simulator", f"{simulator.url}?{urlencode({'model': settings.model})}")
        if worker.index == 0:
            log.info(upstream.describe())
        # shutdown_timeout: what the last requests in progress get once the calls are gone (a signaling request
        # waits for the upstream at most upstream_timeout_s; a forwarded one 10 s).
        runner = web.AppRunner(create_app(settings, upstream, worker), access_log=None, handle_signals=False,
                               shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=worker.count > 1 or None)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
        # Everything loaded so far (modules, the app) lives as long as the process: take it out of the garbage
        # collector's view, so that a full collection scans the calls' objects only. Measured: full collections
        # paused the loop for 20-70 ms with 20 calls, long enough to make every call's next frames late.
        gc.freeze()
        if worker.count > 1:
            # Ready: the master announces the address once every worker's socket is there.
            await web.UnixSite(runner, str(worker.socket_path(worker.index))).start()
        else:
            for address in runner.addresses:
                host, port = address[0], address[1]
                log.info("relay listening on http://%s:%d/", f"[{host}]" if ":" in host else host, port)
        await stop.wait()
        log.info("relay stopping: new calls refused", extra={"event": "stopping"})
        await drain(runner.app, settings.drain_timeout_s, hurry)
    finally:
        if runner is not None:
            await runner.cleanup()
        if simulator is not None:
            await simulator.stop()


class ListenError(RuntimeError):
    """The relay could not open its listening socket (address in use, no permission, ...)."""

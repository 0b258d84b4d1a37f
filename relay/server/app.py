"""The relay's aiohttp application and the `relay serve` loop."""

from __future__ import annotations

import asyncio
import gc
import contextlib
import logging
import signal
from pathlib import Path
from urllib.parse import urlencode

from aiohttp import web

from relay.config import Settings
from relay.simulator.config import SimConfig
from relay.simulator.server import RunningSimulator, start_simulator
from relay.server.auth import add_auth
from relay.server.calls import CALLS, add_call_routes
from relay.server.workers import Worker
from relay.upstream.target import UpstreamTarget, choose_upstream
from relay.webrtc.aiortc_internals import restrict_host_addresses, speed_up_audio_sender, speed_up_ntp_clock

log = logging.getLogger("relay")

async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


STATIC = Path(__file__).resolve().parent.parent / "static"


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def client_config(settings: Settings):
    """What the bundled page (and any client) may know of the relay's configuration: never a secret."""
    body = {
        "ice_servers": settings.ice_servers,
        "locked": [],  # session fields the operator forbids clients to change (the event policy fills this)
        "prices": settings.prices,
    }

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(body)

    return handler


def create_app(settings: Settings, upstream: UpstreamTarget, worker: Worker = Worker()) -> web.Application:
    """The relay's routes. Applies the process-wide aiortc adjustments: the ICE address restriction (aioice has
    no per-call option) and the faster audio sender."""
    restrict_host_addresses(settings.ice_addresses)
    speed_up_audio_sender()
    speed_up_ntp_clock()
    app = web.Application(client_max_size=settings.max_sdp_bytes)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", index)
    app.router.add_get("/relay/client-config", client_config(settings))
    app.router.add_static("/static/", STATIC)
    add_call_routes(app, settings, upstream, worker)
    add_auth(app, settings, worker, CALLS)
    return app


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the relay until SIGINT/SIGTERM (or `stop` is set)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    upstream = choose_upstream(settings)
    simulator: RunningSimulator | None = None
    runner: web.AppRunner | None = None
    try:
        if upstream.kind == "simulator":
            # The embedded simulator listens on loopback only; the relay reaches it over a real WebSocket, the
            # same code path as any other upstream.
            simulator = await start_simulator(SimConfig(default_model=settings.model), "127.0.0.1", 0)
            upstream = UpstreamTarget("simulator", f"{simulator.url}?{urlencode({'model': settings.model})}")
        worker = Worker.from_env()
        if worker.index == 0:
            log.info(upstream.describe())
        runner = web.AppRunner(create_app(settings, upstream, worker), access_log=None, handle_signals=False)
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
        log.info("relay stopping")
    finally:
        if runner is not None:
            await runner.cleanup()
        if simulator is not None:
            await simulator.stop()


class ListenError(RuntimeError):
    """The relay could not open its listening socket (address in use, no permission, ...)."""

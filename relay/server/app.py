"""The relay's aiohttp application and the `relay serve` loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from relay.config import Settings
from relay.simulator.config import SimConfig
from relay.simulator.server import RunningSimulator, start_simulator
from relay.upstream.target import UpstreamTarget, choose_upstream

log = logging.getLogger("relay")

UPSTREAM: web.AppKey[UpstreamTarget] = web.AppKey("upstream")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(upstream: UpstreamTarget) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream
    app.router.add_get("/healthz", healthz)
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
    if upstream.kind == "simulator":
        # The embedded simulator listens on loopback only; the relay reaches it over a real WebSocket, the same
        # code path as any other upstream.
        simulator = await start_simulator(SimConfig(default_model=settings.model), "127.0.0.1", 0)
        upstream = UpstreamTarget("simulator", f"{simulator.url}?model={settings.model}")
    log.info(upstream.describe())
    runner = web.AppRunner(create_app(upstream), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    for address in runner.addresses:
        host, port = address[0], address[1]
        log.info("relay listening on http://%s:%d/", f"[{host}]" if ":" in host else host, port)
    try:
        await stop.wait()
    finally:
        log.info("relay stopping")
        await runner.cleanup()
        if simulator is not None:
            await simulator.stop()

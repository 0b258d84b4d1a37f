"""`relay serve --workers N`: N processes behind one port, because one Python process drives one core.

The master binds the port first (so `--port 0` resolves to a real port), starts N workers that listen on it with
SO_REUSEPORT (the kernel spreads new connections over them), waits until all are ready, and supervises them:
SIGTERM/SIGINT go to every worker, which drains (up to drain_timeout_s; the master waits that long, plus a margin);
a second signal goes to them as SIGUSR1, and they stop at once (a repeated SIGTERM alone does not hurry a worker:
systemd and Docker signal the whole process group, so each worker gets the first one twice). A worker that dies is
restarted (its calls are lost with it). The workers' Prometheus metrics live in files in a directory of the master's (PROMETHEUS_MULTIPROC_DIR), so
that any worker's /metrics shows them all.

A call lives in the worker that answered its offer. Its id says which (`rtc_` + the worker's index in base 62 +
random; in a cluster, `rtc_` + the node id + `_` + the worker's digit + random: relay/cluster/ids.py), and each
worker also listens on a Unix socket of its own: a later request about a call (hangup, delete) that the kernel hands
to another worker is forwarded there.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, UnixConnector, web
from yarl import URL

from relay.cluster.ids import new_call_id, owner_of
from relay.config import Settings
from relay.server.errors import error_response

log = logging.getLogger("relay")

FORWARDED = "X-Relay-Forwarded"
PEER = "X-Relay-Peer"  # the client's address, on a request forwarded to another worker
MAX_RESTARTS_PER_MINUTE = 5
DRAIN_MARGIN_S = 15.0  # beyond drain_timeout_s: a worker's last calls closing, its last requests, its exit
HURRY_S = 10.0  # after a second signal, how long the workers get before they are killed
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FORWARD_TIMEOUT = ClientTimeout(total=10)
SECRETS = {name for name, info in Settings.model_fields.items() if "SecretStr" in str(info.annotation)}
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


@dataclass(frozen=True)
class Worker:
    """Who this process is among the workers (a single process is worker 0 of 1)."""

    index: int = 0
    count: int = 1
    sockets: Path | None = None  # the directory of the workers' Unix sockets
    node: str | None = None  # the relay's RELAY_NODE_ID, in a cluster

    def socket_path(self, index: int) -> Path:
        assert self.sockets is not None
        return self.sockets / f"worker-{index}.sock"

    def call_id(self, random_id: str) -> str:
        """`rtc_` + (the node id + `_`) + this worker's digit + the rest of a random id."""
        return new_call_id(random_id, self.index, self.node)

    @staticmethod
    def owner(call_id: str) -> int | None:
        """The index of the worker that owns the call (of whichever node)."""
        owner = owner_of(call_id)
        return owner.worker if owner is not None else None

    def other_owner(self, call_id: str) -> int | None:
        """The index of the other worker of this relay that owns the call, if it is one."""
        owner = owner_of(call_id)
        if owner is None or owner.node != self.node:
            return None
        return owner.worker if owner.worker != self.index and owner.worker < self.count else None

    @classmethod
    def from_env(cls) -> "Worker":
        if "RELAY_WORKER_INDEX" not in os.environ:
            return cls()
        return cls(int(os.environ["RELAY_WORKER_INDEX"]), int(os.environ["RELAY_WORKER_COUNT"]),
                   Path(os.environ["RELAY_WORKER_SOCKETS"]))


def routing_middleware(worker: Worker, calls_key: web.AppKey):
    """Forward a request about a call owned by another worker to that worker."""

    @web.middleware
    async def route(request: web.Request, handler):
        call_id = request.match_info.get("call_id")
        if call_id and call_id not in request.app[calls_key] and FORWARDED not in request.headers:
            owner = worker.other_owner(call_id)
            if owner is not None:
                return await forward(request, worker, owner)
        return await handler(request)

    return route


def from_a_worker(request: web.Request) -> bool:
    """Whether another worker of this relay sent the request (over this worker's Unix socket: no client can)."""
    return isinstance(request.transport.get_extra_info("sockname") if request.transport else None, str)


def path_qs(request: web.Request) -> str:
    """The request's path and query as passed on to another worker or relay (and signed, and checked there):
    relative (an absolute-form request target's scheme and host are dropped), %-encoded as received."""
    return request.rel_url.raw_path_qs


def peer_address(request: web.Request) -> str | None:
    """The address of whoever connected: a request forwarded by another worker carries the address its first worker
    saw."""
    if from_a_worker(request):
        return request.headers.get(PEER, request.remote)
    return request.remote


async def forward(request: web.Request, worker: Worker, owner: int) -> web.Response:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS | {PEER.lower()}}
    headers[PEER] = peer_address(request) or ""
    answer = await ask_worker(worker, owner, path_qs(request), request.method, headers, await request.read())
    if answer is None:
        return error_response(503, "worker_unavailable", "The worker that owns this call is not available.",
                              "server_error")
    status, response_headers, payload = answer
    kept = {k: v for k, v in response_headers.items() if k.lower() not in _HOP_HEADERS}
    return web.Response(status=status, body=payload, headers=kept)


async def ask_worker(worker: Worker, index: int, path_qs: str, method: str = "GET",
                     headers: dict[str, str] | None = None, body: bytes = b""
                     ) -> tuple[int, Any, bytes] | None:
    """Send a request to another worker over its Unix socket: (status, headers, body), or None if it does not
    answer (gone, restarting, or stuck)."""
    try:
        async with ClientSession(connector=UnixConnector(path=str(worker.socket_path(index))),
                                 timeout=FORWARD_TIMEOUT) as session:
            # As received (%-encoded): a request signed by another relay (relay/cluster/signing.py) stays signed.
            async with session.request(method, URL(f"http://worker{path_qs}", encoded=True),
                                       headers=(headers or {}) | {FORWARDED: "1"}, data=body) as response:
                return response.status, response.headers, await response.read()
    except (OSError, ClientError, asyncio.TimeoutError, ValueError):  # ValueError: a path that makes no URL
        return None


# --- the master ------------------------------------------------------------------------------------------------


def _resolve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Check that host:port is free, then hold it with SO_REUSEPORT (not listening: it takes no connections).

    The first bind has no SO_REUSEPORT, so a port another relay already shares is refused here rather than joined.
    It has SO_REUSEADDR (as the workers' own sockets): connections of a relay killed on this port linger in
    TIME_WAIT for a minute, and its restart in place (a container in its pod) must not be refused for them; a port
    someone listens on is refused all the same.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as check:
        check.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        check.bind((host, port))
        port = check.getsockname()[1]
    probe = socket.socket(family, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    probe.bind((host, port))
    return probe, port


def _child_env(settings: Settings, port: int, index: int, count: int, sockets: Path, token_secret: str
               ) -> dict[str, str]:
    """The worker's settings, as the environment it reads them from (secrets are inherited as they are)."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        if name in SECRETS or value is None:
            continue
        env[Settings.env_name(name)] = value if isinstance(value, str) else json.dumps(value)
    if settings.token_secret is None:  # the workers must share one, or a token minted by one fails at another
        env[Settings.env_name("token_secret")] = token_secret
    env |= {"RELAY_PORT": str(port), "RELAY_WORKERS": "1", "RELAY_WORKER_INDEX": str(index),
            "RELAY_WORKER_COUNT": str(count), "RELAY_WORKER_SOCKETS": str(sockets)}
    return env


def _die_with_the_master() -> None:
    """In the child, before exec: SIGTERM when the master dies, however it dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def run_master(settings: Settings) -> int:
    """Start and supervise the workers until SIGTERM/SIGINT; returns the exit code."""
    try:
        probe, port = _resolve_port(settings.host, settings.port)
    except OSError as exc:
        print(f"relay: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    count = settings.workers
    children: list[subprocess.Popen] = []
    stopping = False
    hurry_at: float | None = None  # when a second signal came
    sockets = Path(tempfile.mkdtemp(prefix="relay-workers-"))
    metrics_dir = Path(tempfile.mkdtemp(prefix="relay-metrics-"))
    token_secret = secrets.token_urlsafe(32)  # used when the operator set none: one for all workers, restarts too

    def spawn(index: int) -> subprocess.Popen:
        env = _child_env(settings, port, index, count, sockets, token_secret) | {MULTIPROC_ENV: str(metrics_dir)}
        child = subprocess.Popen([sys.executable, "-m", "relay", "serve"], preexec_fn=_die_with_the_master, env=env)
        if stopping:  # a signal came while it started: it must stop too
            child.send_signal(signal.SIGTERM)
        return child

    def stop(signum=None, frame=None) -> None:
        """The first signal: the workers drain. A second: they stop at once."""
        nonlocal stopping, hurry_at
        if stopping and signum is not None and hurry_at is None:
            hurry_at = time.monotonic()
        stopping = True
        for child in children:  # a second signal is SIGUSR1: a worker may get SIGTERM twice (its group's, ours)
            if child.poll() is None:
                child.send_signal(signal.SIGTERM if hurry_at is None else signal.SIGUSR1)

    def wait_all(timeout: float) -> None:
        """Wait for every worker to exit, `timeout` at most (HURRY_S once a second signal came); kill the rest."""
        deadline = time.monotonic() + timeout
        while any(child.poll() is None for child in children):
            limit = deadline if hurry_at is None else min(deadline, hurry_at + HURRY_S)
            if time.monotonic() >= limit:
                break
            time.sleep(0.05)
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for index in range(count):
            children.append(spawn(index))
        deadline = time.monotonic() + 60
        while not stopping and not all((sockets / f"worker-{i}.sock").exists() for i in range(count)):
            if time.monotonic() > deadline or any(c.poll() is not None for c in children):
                log.error("relay workers failed to start")
                stop()
                wait_all(10)
                return 1
            time.sleep(0.05)
        if not stopping:
            host = f"[{settings.host}]" if ":" in settings.host else settings.host
            log.info("relay listening on http://%s:%d/ (%d workers)", host, port, count)
        restarts: list[float] = []
        while not stopping:
            for index, child in enumerate(children):
                if child.poll() is not None and not stopping:
                    restarts = [t for t in restarts if time.monotonic() - t < 60] + [time.monotonic()]
                    if len(restarts) > MAX_RESTARTS_PER_MINUTE:
                        log.error("relay workers keep dying; stopping")
                        stop()
                        wait_all(30)
                        return 1
                    log.warning("relay worker %d exited (%s); restarting it", index, child.returncode)
                    (sockets / f"worker-{index}.sock").unlink(missing_ok=True)
                    _forget_metrics_of(child.pid, metrics_dir)
                    children[index] = spawn(index)
            time.sleep(0.2)
        wait_all(settings.drain_timeout_s + DRAIN_MARGIN_S)
        return 0
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        probe.close()
        shutil.rmtree(sockets, ignore_errors=True)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _forget_metrics_of(pid: int, metrics_dir: Path) -> None:
    """A dead worker's live gauges (its calls in progress) stop counting; its counters stay."""
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, str(metrics_dir))

"""A relay cluster on one machine: Redis (Debian's redis-server), one Realtime simulator, relays in cluster mode on
loopback addresses of their own (127.0.0.11, .12, .13: HTTP and ICE), Debian's nginx in front of them on 127.0.0.10
doing plain round robin (no affinity, WebSocket upgrades passed on). Every process is started here, in a directory
of its own, and stopped by its PID (a relay by its own process group: the master and its workers, as a pod's
processes die together). Used by tests/cluster and bench/cluster_forwarding.py.

Every response through nginx carries `X-Upstream`: the relay that answered it (nginx's $upstream_addr), so that a
test knows which node each request reached.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.processes import clean_env

NGINX = "/usr/sbin/nginx"
REDIS = "/usr/bin/redis-server"
FRONT = "127.0.0.10"  # nginx listens here and talks to the relays from here (proxy_bind): the trusted proxy
ADDRESSES = ("127.0.0.11", "127.0.0.12", "127.0.0.13")  # node i on ADDRESSES[i]
KEY = "sk-cluster-test-key"
LIMITED_KEY = "sk-cluster-limited-key"  # used by the per-key limit test only: its allowance is its own
CLUSTER_SECRET = "cluster-secret-of-the-one-machine-test-0123456789"
TOKEN_SECRET = "token-secret-of-the-one-machine-test-0123456789ab"
SIMULATOR_KNOBS = ("--speed", "20", "--first-delta-delay-ms", "20", "--transcription-delay-ms", "10")


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _wait_for_text(log: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise RuntimeError(f"{log.name}: the process exited ({process.returncode}) before {text!r}:\n"
                               f"{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"{text!r} not in {log.name} after {timeout} s:\n{log.read_text(errors='replace')[-4000:]}")


def _wait_for_port(host: str, port: int, process: subprocess.Popen, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}) before listening on {host}:{port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not listening on {host}:{port} after {timeout} s")


def _stop(process: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15, group: bool = False
          ) -> None:
    """Signal `process` (its own group with `group`: it leads one), wait, SIGKILL what is left."""
    if process is None:
        return
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig) if group else process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL) if group else process.kill()
            process.wait()
    if group:  # workers left behind by a master that died first: its group's members, by their PIDs
        for pid in group_members(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (from /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@dataclass
class Node:
    index: int
    address: str
    port: int
    logs: list[Path] = field(default_factory=list)  # one per start
    process: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def upstream(self) -> str:
        """How nginx names it in $upstream_addr."""
        return f"{self.address}:{self.port}"

    def output(self) -> str:
        """Everything this node logged, over all its starts."""
        return "".join(log.read_text(errors="replace") for log in self.logs if log.exists())

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Cluster:
    """Start with `start()`, stop with `stop()` (or use it as a context manager)."""

    def __init__(self, root: Path, nodes: int = 3, workers: int = 2, log_level: str = "info", front: bool = True,
                 **settings: str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.with_front = front  # nginx in front (False: the relays only, asked directly)
        self.log_level = log_level
        self.settings = settings  # RELAY_<NAME> for every relay, e.g. calls_per_ip_per_s="0.01"
        self.nodes = [Node(i, ADDRESSES[i], free_port(ADDRESSES[i])) for i in range(nodes)]
        self.redis_port = free_port("127.0.0.1")
        self.simulator_port = free_port("127.0.0.1")
        self.front_port = free_port(FRONT)
        self.redis: subprocess.Popen | None = None
        self.simulator: subprocess.Popen | None = None
        self.nginx: subprocess.Popen | None = None
        self._files: list = []

    # --- what tests use ---------------------------------------------------------------------------------------

    @property
    def front(self) -> str:
        return f"http://{FRONT}:{self.front_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def node_at(self, upstream_addr: str | None) -> int | None:
        """The node that answered, from nginx's X-Upstream ("a:p" or, after a retry, "a:p, b:p": the last)."""
        if not upstream_addr:
            return None
        last = upstream_addr.split(",")[-1].strip()
        return next((n.index for n in self.nodes if n.upstream == last), None)

    def relay_env(self, node: Node) -> dict[str, str]:
        env = {
            "RELAY_HOST": node.address, "RELAY_PORT": str(node.port), "RELAY_WORKERS": str(self.workers),
            "RELAY_NODE_ID": str(node.index), "RELAY_CLUSTER_SECRET": CLUSTER_SECRET,
            "RELAY_ADVERTISE_URL": node.base, "RELAY_REDIS_URL": self.redis_url,
            "RELAY_UPSTREAM_URL": f"ws://127.0.0.1:{self.simulator_port}/v1/realtime?model=gpt-realtime",
            "RELAY_ICE_ADDRESSES": node.address, "RELAY_API_KEYS": f"{KEY},{LIMITED_KEY}",
            "RELAY_TOKEN_SECRET": TOKEN_SECRET, "RELAY_TRUSTED_PROXIES": FRONT, "RELAY_LOG_LEVEL": self.log_level,
            "RELAY_DRAIN_TIMEOUT_S": "1",
        }
        env |= {f"RELAY_{name.upper()}": str(value) for name, value in self.settings.items()}
        return clean_env(**env)

    # --- starting and stopping --------------------------------------------------------------------------------

    def start(self) -> "Cluster":
        try:
            self._start_redis()
            self._start_simulator()
            for node in self.nodes:
                self._spawn_relay(node)  # all at once: their workers import aiortc in parallel
            for node in self.nodes:
                self._await_relay(node)
            if self.with_front:
                self._start_nginx()
            self.wait_registered()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _log(self, name: str):
        handle = open(self.root / name, "wb")
        self._files.append(handle)
        return handle

    def _start_redis(self) -> None:
        log = self.root / "redis.log"
        self.redis = subprocess.Popen(
            [REDIS, "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.root), "--logfile", str(log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_for_port("127.0.0.1", self.redis_port, self.redis, "redis-server")

    def _start_simulator(self) -> None:
        log = self.root / "simulator.log"
        self.simulator = subprocess.Popen(
            [sys.executable, "-m", "relay", "simulator", "--host", "127.0.0.1", "--port", str(self.simulator_port),
             "--log-level", "warning", *SIMULATOR_KNOBS],
            env=clean_env(), stdin=subprocess.DEVNULL, stdout=self._log(log.name), stderr=subprocess.STDOUT)
        _wait_for_port("127.0.0.1", self.simulator_port, self.simulator, "the simulator")

    def _spawn_relay(self, node: Node) -> None:
        log = self.root / f"relay-{node.index}.{len(node.logs)}.log"
        node.logs.append(log)
        node.process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve"], env=self.relay_env(node), stdin=subprocess.DEVNULL,
            stdout=self._log(log.name), stderr=subprocess.STDOUT, start_new_session=True)

    def _await_relay(self, node: Node, timeout: float = 60) -> None:
        if self.log_level in ("debug", "info"):
            _wait_for_text(node.logs[-1], "relay listening on", node.process, timeout)
        deadline = time.monotonic() + timeout
        while True:  # every worker up: /readyz answers on fresh connections
            try:
                with urllib.request.urlopen(node.base + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline or node.process.poll() is not None:
                raise RuntimeError(f"relay {node.index} not ready:\n{node.output()[-4000:]}")
            time.sleep(0.1)

    def redis_client(self):
        import redis  # the relay's own dependency

        return redis.Redis.from_url(self.redis_url, socket_timeout=2, decode_responses=True)

    def wait_registered(self, since: float = 0.0, timeout: float = 15) -> None:
        """Until every live node's workers all beat in the Redis registry (relay/cluster/registry.py), since `since`
        (unix time): the other relays can find each of them."""
        from relay.cluster.registry import KEY, Entry

        with self.redis_client() as client:
            deadline = time.monotonic() + timeout
            while True:
                missing = []
                for node in self.nodes:
                    if not node.alive():
                        continue
                    entries = [Entry.decode(raw) for raw in client.hgetall(KEY.format(node=node.index)).values()]
                    fresh = [e for e in entries if e is not None and e.url == node.base and e.at >= since]
                    if len(fresh) < self.workers:
                        missing.append(node.index)
                if not missing:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nodes {missing} not (all workers) in the registry after {timeout} s")
                time.sleep(0.1)

    def stored_transcript(self, call_id: str) -> dict | None:
        """The call's transcript as its relay last wrote it to Redis (relay/cluster/transcripts.py)."""
        import json

        from relay.cluster.transcripts import KEY

        with self.redis_client() as client:
            raw = client.get(KEY.format(call_id=call_id))
        return json.loads(raw) if raw else None

    def _start_nginx(self) -> None:
        for folder in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.root / "nginx" / folder).mkdir(parents=True, exist_ok=True)
        config = self.root / "nginx" / "nginx.conf"
        config.write_text(self.nginx_config())
        self.nginx = subprocess.Popen(
            [NGINX, "-p", str(self.root / "nginx"), "-c", str(config), "-e", str(self.root / "nginx" / "error.log"),
             "-g", "daemon off;"],
            stdin=subprocess.DEVNULL, stdout=self._log("nginx.out"), stderr=subprocess.STDOUT)
        _wait_for_port(FRONT, self.front_port, self.nginx, "nginx")

    def nginx_config(self) -> str:
        tmp = self.root / "nginx"
        servers = "\n".join(f"        server {n.upstream} max_fails=0;" for n in self.nodes)
        user = "user root;\n" if os.geteuid() == 0 else ""  # the workers write the temp folders in our directory
        return f"""{user}worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    log_format upstream '$remote_addr "$request" $status upstream=$upstream_addr $request_time';
    access_log {tmp}/access.log upstream;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream relays {{
        # plain round robin, no affinity; max_fails=0: a dead relay is never taken out (each request tries it,
        # its refused connection sends the request to the next one)
{servers}
    }}
    server {{
        listen {FRONT}:{self.front_port};
        client_max_body_size 1m;
        location / {{
            proxy_pass http://relays;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_bind {FRONT};
            proxy_connect_timeout 2s;
            proxy_read_timeout 600s;
            proxy_buffering off;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"""

    def access_log(self) -> str:
        log = self.root / "nginx" / "access.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def kill(self, index: int) -> None:
        """SIGKILL the node's whole process group (master and workers), as a pod dies: nothing cleans up."""
        node = self.nodes[index]
        os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait()

    def terminate(self, index: int) -> None:
        """SIGTERM to the node's master: it drains (RELAY_DRAIN_TIMEOUT_S) with its workers, then exits."""
        self.nodes[index].process.send_signal(signal.SIGTERM)

    def restart(self, index: int, same_port: bool = False) -> None:
        """Start the node again (same id and address) once its last start is gone; wait until it is registered.
        A new port unless `same_port` (as a pod rescheduled gets a new address): nginx is told (its configuration
        rewritten, SIGHUP) and waited for."""
        node = self.nodes[index]
        if node.alive():
            _stop(node.process, signal.SIGTERM, group=True)
        _stop(node.process, signal.SIGKILL, group=True)  # any worker left behind
        if not same_port:
            node.port = free_port(node.address)
        since = time.time()
        self._spawn_relay(node)
        self._await_relay(node)
        self.wait_registered(since)
        if not same_port and self.nginx is not None:
            self._reload_nginx(node)

    def _reload_nginx(self, node: Node, timeout: float = 10) -> None:
        (self.root / "nginx" / "nginx.conf").write_text(self.nginx_config())
        self.nginx.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:  # until requests reach the node at its new port
            for _ in range(len(self.nodes)):
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(self.front + "/healthz", timeout=2) as response:
                        if response.headers.get("X-Upstream", "").endswith(node.upstream):
                            return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nginx does not reach node {node.index} at {node.upstream} after reloading")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            _stop(node.process, signal.SIGTERM, timeout=15, group=True)
        _stop(self.nginx, signal.SIGQUIT)
        _stop(self.simulator)
        _stop(self.redis)
        for handle in self._files:
            with contextlib.suppress(OSError):
                handle.close()
        self._files.clear()


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0

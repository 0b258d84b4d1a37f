"""Media into pods through a TURN gateway, on one machine: three network namespaces (four for the benchmark) joined
by veth pairs, coturn from Debian in the middle, `relay serve` on the "pod network" behind it.

    client ns                 gw ns (coturn)                     pod ns (relay serve, built-in simulator)
    eth0 10.77.2.2/24 ----- c0 10.77.2.1/24   p0 10.77.1.1/24 ----- eth0 10.77.1.2/24
    (no other route)          listening-ip      relay-ip               RELAY_ICE_ADDRESSES=10.77.1.2
                              TCP forwarder :8080 -> 10.77.1.2:8080    (HTTP only)

    direct ns (benchmark only): eth0 10.77.3.2/24 ----- d0 10.77.3.1/24 in the pod ns; route 10.77.1.0/24 via it

The gateway does not route (net.ipv4.ip_forward=0 in its namespace) and the client has no route to 10.77.1.0/24,
so a client's media reaches the relay only as TURN traffic: coturn allocates a relayed address on its pod-side leg
(10.77.1.1) and sends from there to the relay's one host candidate. Signaling (HTTP: /relay/client-config, the
offer, the hangup) goes through a plain TCP forwarder in the gateway namespace, as an ingress or a Kubernetes Service
would carry it; it carries TCP to port 8080 only, so no UDP path to the pod exists. coturn runs with the TURN REST
scheme (use-auth-secret) and the relay's RELAY_TURN_SECRET, and relays to the pods' addresses only (10.77.1.2-254:
not its own leg, no other private range), as a gateway in front of a pod network must be configured.

Everything runs in the foreground, logs into the temporary directory, and is stopped by its PID; the namespaces
(and the veths in them) are deleted on the way out, failure or not. Needs root, iproute2 and coturn's `turnserver`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tests.processes import clean_env, stop_all, wait_for_line

ROOT = Path(__file__).resolve().parents[2]
TURNSERVER = "turnserver"

POD_GW, POD_RELAY = "10.77.1.1", "10.77.1.2"  # the pod network: the gateway's pod-side leg, the relay's pod address
CLIENT_GW, CLIENT = "10.77.2.1", "10.77.2.2"  # the clients' side: where coturn listens, the client
DIRECT_POD, DIRECT = "10.77.3.1", "10.77.3.2"  # the benchmark's direct path: the pod's second leg, its client
RELAY_PORT, TURN_PORT = 8080, 3478
TURN_MIN_PORT, TURN_MAX_PORT = 49160, 49359
TURN_SECRET = "turn-gateway-test-secret-0123456789abcdef"
TURN_REALM = "relay.test"
API_KEY = "sk-relay-turn-gateway-test-key"
_worlds = itertools.count()

# A TCP forwarder (the gateway namespace's only way to the pod's HTTP): listen, connect, copy both ways.
FORWARDER = """import asyncio, sys
listen_host, listen_port, target_host, target_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

async def copy(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()

async def handle(reader, writer):
    try:
        target_reader, target_writer = await asyncio.wait_for(asyncio.open_connection(target_host, target_port), 5)
    except (OSError, asyncio.TimeoutError):
        writer.close()
        return
    await asyncio.gather(copy(reader, target_writer), copy(target_reader, writer))

async def main():
    server = await asyncio.start_server(handle, listen_host, listen_port)
    print(f"forwarding {listen_host}:{listen_port} -> {target_host}:{target_port}", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def missing_requirements() -> str | None:
    """Why the gateway world cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, package in (("ip", "iproute2"), (TURNSERVER, "coturn")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install {package})"
    return None


def minted_by_secret(entry: dict) -> bool:
    """Whether a client-config ICE server entry carries a credential coturn accepts: HMAC-SHA1 of its username
    under the shared secret (coturn's use-auth-secret)."""
    digest = hmac.new(TURN_SECRET.encode(), entry["username"].encode(), hashlib.sha1).digest()
    return entry.get("credential") == base64.b64encode(digest).decode()


@dataclass
class Gateway:
    tmp: Path
    pod: str
    gw: str
    client: str
    direct: str | None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def relay_url(self) -> str:
        """The relay's HTTP as the client namespace reaches it: the gateway's forwarder."""
        return f"http://{CLIENT_GW}:{RELAY_PORT}"

    @property
    def direct_relay_url(self) -> str:
        """The relay's HTTP as the direct namespace reaches it (its pod address, no forwarder)."""
        return f"http://{POD_RELAY}:{RELAY_PORT}"

    @property
    def turn_url(self) -> str:
        return f"turn:{CLIENT_GW}:{TURN_PORT}?transport=udp"

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def run(self, ns: str, *argv: str, timeout: float = 30, check: bool = False) -> subprocess.CompletedProcess:
        """`argv` inside namespace `ns`, its output captured."""
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout,
                              check=check, cwd=ROOT, env=clean_env())

    def peer_argv(self, ns: str, *args: str) -> list[str]:
        """The aiortc client (tests/turn/peer.py) inside `ns`."""
        return ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.turn.peer", *args]

    def chromium_wrapper(self, ns: str) -> Path:
        """A script that runs Debian's Chromium inside namespace `ns` (Playwright's executable_path)."""
        wrapper = self.tmp / f"chromium-in-{ns}"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {ns} /usr/bin/chromium "$@"\n')
        wrapper.chmod(0o755)
        return wrapper

    def turn_log(self) -> str:
        return self.log("turnserver")


def _ip(*argv: str) -> None:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    if result.returncode:
        raise RuntimeError(f"ip {' '.join(argv)}: {result.stderr.strip()}")


def _sysctl(ns: str, name: str, value: str) -> None:
    result = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c",
                             f"echo {value} > /proc/sys/{name.replace('.', '/')}"],
                            capture_output=True, text=True, timeout=30)
    if result.returncode:
        raise RuntimeError(f"{ns}: {name}={value}: {result.stderr.strip()}")


def _veth(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
    """A veth pair created straight inside the two namespaces: no interface ever appears in the machine's own."""
    _ip("-n", ns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b)


def _address(ns: str, device: str, cidr: str) -> None:
    _ip("-n", ns, "addr", "add", cidr, "dev", device)
    _ip("-n", ns, "link", "set", device, "up")


def _turnserver_config(tmp: Path) -> Path:
    """coturn as a TURN gateway in front of a pod network: TURN REST credentials (use-auth-secret) checked with the
    relay's secret, listening on the clients' side only, relaying from its pod-side leg, to the pod range only."""
    denied = ["0.0.0.0-0.255.255.255", "10.0.0.0-10.255.255.255", "100.64.0.0-100.127.255.255",
              "127.0.0.0-127.255.255.255", "169.254.0.0-169.254.255.255", "172.16.0.0-172.31.255.255",
              "192.168.0.0-192.168.255.255", "::1"]
    lines = [
        f"listening-ip={CLIENT_GW}", f"listening-port={TURN_PORT}",
        f"relay-ip={POD_GW}", f"min-port={TURN_MIN_PORT}", f"max-port={TURN_MAX_PORT}",
        "use-auth-secret", f"static-auth-secret={TURN_SECRET}", f"realm={TURN_REALM}",
        # Relayed traffic: to the pods' addresses, nowhere else private, not to its own leg (an address both
        # allowed and denied is allowed, so the allowed range starts after it).
        *[f"denied-peer-ip={r}" for r in denied], "allowed-peer-ip=10.77.1.2-10.77.1.254", "no-multicast-peers",
        "no-tls", "no-dtls", "no-cli", "no-rfc5780", "no-software-attribute",
        # Everything in the temporary directory: no log in /var/log, no pid file in /var/run, no database in /var.
        "log-file=stdout", "simple-log", "verbose",
        f"pidfile={tmp / 'turnserver.pid'}", f"userdb={tmp / 'turndb'}",
    ]
    path = tmp / "turnserver.conf"
    path.touch(mode=0o600)
    path.write_text("\n".join(lines) + "\n")
    return path


def _start(gateway: Gateway, name: str, ns: str, argv: list[str], ready: str, env: dict[str, str]) -> None:
    log = gateway.tmp / f"{name}.log"
    with log.open("w") as output:
        gateway.processes[name] = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=output,
                                                   stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wait_for_line(log, ready, gateway.processes[name])


def relay_env(**extra: str) -> dict[str, str]:
    """`relay serve` on the pod network: API keys (it listens on a non-loopback address), the TURN gateway's URL as
    clients reach it and its secret, host candidates on the pod address only, the built-in simulator upstream."""
    return clean_env() | {
        "RELAY_HOST": POD_RELAY, "RELAY_PORT": str(RELAY_PORT), "RELAY_WORKERS": "1",
        "RELAY_API_KEYS": API_KEY, "RELAY_ICE_ADDRESSES": POD_RELAY,
        "RELAY_TURN_URLS": f"turn:{CLIENT_GW}:{TURN_PORT}?transport=udp", "RELAY_TURN_SECRET": TURN_SECRET,
        "RELAY_CALL_IDLE_TIMEOUT_S": "10"} | extra


@contextlib.contextmanager
def turn_gateway(tmp: Path, direct: bool = False, relay_extra: dict[str, str] | None = None) -> Iterator[Gateway]:
    """The world above, torn down on the way out. `direct`: also the benchmark's direct client namespace."""
    prefix = f"rturn-{os.getpid()}-{next(_worlds)}"
    gateway = Gateway(tmp, f"{prefix}-pod", f"{prefix}-gw", f"{prefix}-client", f"{prefix}-direct" if direct else None)
    namespaces = [ns for ns in (gateway.pod, gateway.gw, gateway.client, gateway.direct) if ns]
    made: list[str] = []
    try:
        for ns in namespaces:
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        # A new namespace may inherit the machine's forwarding setting: the gateway must not route, only relay.
        _sysctl(gateway.gw, "net.ipv4.ip_forward", "0")
        _veth(gateway.gw, "p0", gateway.pod, "eth0")
        _veth(gateway.gw, "c0", gateway.client, "eth0")
        _address(gateway.gw, "p0", f"{POD_GW}/24")
        _address(gateway.pod, "eth0", f"{POD_RELAY}/24")
        _address(gateway.gw, "c0", f"{CLIENT_GW}/24")
        _address(gateway.client, "eth0", f"{CLIENT}/24")
        if gateway.direct:
            _veth(gateway.pod, "d0", gateway.direct, "eth0")
            _address(gateway.pod, "d0", f"{DIRECT_POD}/24")
            _address(gateway.direct, "eth0", f"{DIRECT}/24")
            _ip("-n", gateway.direct, "route", "add", "10.77.1.0/24", "via", DIRECT_POD)

        config = _turnserver_config(tmp)
        _start(gateway, "turnserver", gateway.gw, [TURNSERVER, "-c", str(config)],
               "UDP listener opened on", clean_env())
        _start(gateway, "relay", gateway.pod, [sys.executable, "-m", "relay", "serve"], "relay listening",
               relay_env(**(relay_extra or {})))
        _start(gateway, "forwarder", gateway.gw,
               [sys.executable, "-u", "-c", FORWARDER, CLIENT_GW, str(RELAY_PORT), POD_RELAY, str(RELAY_PORT)],
               "forwarding", clean_env())
        yield gateway
    finally:
        stop_all(gateway.processes.values(), timeout=10)
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


# An HTTP request inside a namespace; an HTTP error exits with its status and body (for the test's message).
_HTTP = """import json, sys, urllib.error, urllib.request
method, url, body, headers = sys.argv[1], sys.argv[2], sys.argv[3].encode() or None, json.loads(sys.argv[4])
try:
    sys.stdout.buffer.write(urllib.request.urlopen(
        urllib.request.Request(url, data=body, method=method, headers=headers), timeout=10).read())
except urllib.error.HTTPError as error:
    sys.exit(f"{method} {url}: {error.code} {error.read().decode(errors='replace')}")
"""


def http_in(gateway: Gateway, ns: str, url: str, method: str = "GET", body: dict | None = None,
            token: str | None = None) -> dict:
    """A JSON request from inside `ns` (what a client or a backend there gets); its JSON answer."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    result = gateway.run(ns, sys.executable, "-c", _HTTP, method, url, json.dumps(body) if body is not None else "",
                         json.dumps(headers))
    if result.returncode:
        raise RuntimeError(f"{method} {url} from {ns}: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout)


def client_config_in(gateway: Gateway, ns: str, base: str, token: str | None) -> dict:
    """GET /relay/client-config from inside `ns`."""
    return http_in(gateway, ns, base + "/relay/client-config", token=token)


def mint_client_secret(gateway: Gateway) -> str:
    """A client secret, as a backend on the clients' side mints one for a browser (with the API key)."""
    answer = http_in(gateway, gateway.client, gateway.relay_url + "/v1/realtime/client_secrets", "POST", {},
                     API_KEY)
    return answer["value"]


async def run_peer(gateway: Gateway, ns: str, *args: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """tests/turn/peer.py inside `ns`: its JSON lines, one per call; fails with its output if it fails."""
    process = await asyncio.create_subprocess_exec(
        *gateway.peer_argv(ns, *args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=ROOT)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"the peer in {ns} ran over {timeout} s") from None
    assert process.returncode == 0, f"the peer in {ns} exited {process.returncode}:\n{stderr.decode()[-3000:]}"
    lines = [json.loads(line) for line in stdout.decode().splitlines() if line.startswith("{")]
    assert lines, f"the peer in {ns} reported nothing:\n{stderr.decode()[-3000:]}"
    return lines


def turn_sessions(log: str, username: str) -> list[str]:
    """coturn's log lines (verbose) about the allocations of one TURN username."""
    return [line for line in log.splitlines() if f"<{username}>" in line]


async def turn_usage(gateway: Gateway, username: str, timeout: float = 5.0) -> list[dict[str, int]]:
    """The `peer usage` coturn logs when an allocation of `username` closes (packets and bytes to and from the
    peers): one dict per allocation that closed, waited for up to `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        usage = []
        for line in turn_sessions(gateway.turn_log(), username):
            if "peer usage:" in line:
                fields = dict(part.strip().split("=", 1) for part in line.split("peer usage:")[1].split(",")
                              if "=" in part and part.strip().split("=", 1)[0] in {"rp", "rb", "sp", "sb"})
                usage.append({k: int(v) for k, v in fields.items()})
        if any(u.get("rp", 0) > 0 for u in usage) or loop.time() > deadline:
            return usage
        await asyncio.sleep(0.1)

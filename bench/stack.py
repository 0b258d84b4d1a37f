"""The benchmarked processes: simulators, targets (relay, Pipecat, bare aiortc echo), pinned to CPUs, on loopback.

Each target is its own process, started with the RTP timing probe (bench/probe) and its own probe folder, and
stopped by its PID. CPU time and RSS are read from /proc for the process and its children (relay workers).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import clean_env, stop_all  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PROBE = ROOT / "bench" / "probe"
ALL_CPUS = sorted(os.sched_getaffinity(0))  # read at import, before the harness narrows its own


def pinned(cpus: str | None, command: list[str]) -> list[str]:
    """`command` on `cpus` (None: on every CPU, whatever the parent process was narrowed to)."""
    if not shutil.which("taskset"):
        return command
    return ["taskset", "-c", cpus or ",".join(map(str, ALL_CPUS)), *command]


def stand_in(command: list[str]) -> list[str]:
    """A process that stands in for another machine (the upstream service, the callers) runs as SCHED_IDLE: where it
    shares a core with the target it takes only the CPU the target leaves, and never delays the target's wake-ups.
    (nice 10 was not enough: the target still waited behind it and sent frames late at 70 % CPU.)"""
    return ["chrt", "--idle", "0", *command]


def other_cpus() -> str:
    """Every CPU but 0 (where a target is pinned), for clients and upstream."""
    return ",".join(str(c) for c in ALL_CPUS if c != 0) or "0"


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


def process_tree(pid: int) -> list[int]:
    pids, index = [pid], 0
    while index < len(pids):
        pids += _children(pids[index])
        index += 1
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
    return total


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, over all cores (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / TICKS, steal / TICKS


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            pass
    return total


@dataclass
class Target:
    """A running benchmark target: where to post offers, its processes' PIDs and its probe counters."""

    name: str
    process: subprocess.Popen
    offer_url: str
    probe_dir: Path
    log: Path

    def pids(self) -> list[int]:
        return process_tree(self.process.pid)

    def probe(self) -> dict[str, float]:
        """Frames sent and late frames so far, summed over the target's processes (written every 0.5 s)."""
        total = {"frames": 0, "late": 0}
        for path in self.probe_dir.glob("probe-*.json"):
            try:
                counters = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            total["frames"] += counters["frames"]
            total["late"] += counters["late"]
        return total


@dataclass
class Stack:
    """Everything started for a run; `stop()` ends it all, by PID."""

    work: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    started: int = 0

    def _start(self, name: str, command: list[str], env: dict[str, str], ready: str, timeout: float = 60.0
               ) -> tuple[subprocess.Popen, Path, str]:
        log = self.work / f"{name}.log"
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=log.open("w"), env=env, cwd=ROOT)
        self.processes.append(process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := re.search(ready, log.read_text()):
                return process, log, found.group(1)
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited early:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{name} not ready after {timeout}s:\n{log.read_text()[-3000:]}")

    def simulator(self, name: str, *flags: str) -> str:
        """A simulator on the client CPUs; its ws:// URL (without a query)."""
        port = free_port()
        command = stand_in(pinned(other_cpus(), [sys.executable, "-m", "relay", "simulator", "--port", str(port),
                                                 "--log-level", "warning", *flags]))
        log = self.work / f"{name}.log"
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=log.open("w"), env=clean_env(), cwd=ROOT)
        self.processes.append(process)
        wait_for_http(f"http://127.0.0.1:{port}/healthz", process, log)
        return f"ws://127.0.0.1:{port}/v1/realtime"

    def target(self, kind: str, upstream: str | None, cpus: str | None = "0", workers: int = 1) -> Target:
        self.started += 1
        name = f"{kind}-{self.started}"
        probe_dir = self.work / f"probe-{name}"
        probe_dir.mkdir()
        env = clean_env(PYTHONPATH=f"{PROBE}{os.pathsep}{ROOT}", BENCH_PROBE_DIR=str(probe_dir))
        if kind == "relay":
            # Every caller comes from 127.0.0.1 here, standing for many clients: no per-address limit.
            env |= {"RELAY_UPSTREAM_URL": f"{upstream}?model=gpt-realtime", "RELAY_ICE_ADDRESSES": "127.0.0.1",
                    "RELAY_CALLS_PER_IP_PER_S": "100000"}
            command = [sys.executable, "-m", "relay", "serve", "--port", "0", "--workers", str(workers),
                       "--log-level", "info"]
            ready, path = r"relay listening on (http://127\.0\.0\.1:\d+)/", "/v1/realtime/calls"
        elif kind == "pipecat":
            command = [sys.executable, str(ROOT / "bench/targets/pipecat_server.py"), "--upstream", upstream]
            ready, path = r"listening on (http://127\.0\.0\.1:\d+)/offer", "/offer"
        else:
            command = [sys.executable, str(ROOT / "bench/targets/echo_server.py")]
            ready, path = r"listening on (http://127\.0\.0\.1:\d+)/offer", "/offer"
        process, log, base = self._start(name, pinned(cpus, command), env, ready)
        return Target(name, process, base + path, probe_dir, log)

    def stop(self, process: subprocess.Popen | None = None) -> None:
        chosen = [process] if process else self.processes
        stop_all(chosen, timeout=15)
        self.processes = [p for p in self.processes if p not in chosen]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"{log.name} exited early:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer in {timeout}s")

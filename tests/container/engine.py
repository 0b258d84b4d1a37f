"""A Docker engine of the tests' own, and the relay's image built with it from the repository's Dockerfile.

The engine is a guest that leaves nothing behind: `dockerd` with its data root, exec root, pidfile, socket and config
in a temporary directory, no bridge and no firewall rules (`--bridge=none --iptables=false --ip6tables=false`), so
containers run with `--network host` and every test packet stays on loopback; it is stopped by its PID at the end.
There is no Docker Hub here: the base image is made from Debian's mirror with mmdebstrap and `docker import`ed, and
pip inside the build gets a wheelhouse that the host built, served on loopback (the Dockerfile's PIP_FIND_LINKS and
PIP_NO_INDEX build arguments), so that the Dockerfile's install command stays the one users run.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "relay:container-test"
BASE_IMAGE = "relay-test-base:bookworm"
# RELAY_TEST_BASE_IMAGE: build on this base instead (a machine that reaches Docker Hub: python:3.11-slim-bookworm)
BASE_FROM_ENV = "RELAY_TEST_BASE_IMAGE"
# The base from Debian's mirror: what the Dockerfile needs of a base (python3, python3-venv), apt and dpkg set up like
# Debian's own slim images (no docs, man pages or translations; apt keeps no caches), so that its apt-get stays small.
MMDEBSTRAP = [
    "mmdebstrap", "--variant=minbase", "--include=python3,python3-venv", "--aptopt=Acquire::Retries \"3\"",
    "--aptopt=Dir::Cache::pkgcache \"\"", "--aptopt=Dir::Cache::srcpkgcache \"\"",
    "--aptopt=DPkg::Post-Invoke {\"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true\";}",
    "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/info/*", "bookworm",
]


def unavailable(reason: str) -> None:
    """In CI a missing piece fails the run; elsewhere the test skips, saying why."""
    if os.environ.get("CI"):
        pytest.fail(f"cannot run: {reason}")
    pytest.skip(f"skipped: {reason}")


def missing_requirements() -> str | None:
    """Why the container tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "dockerd needs root"
    needed = ["dockerd", "docker"] + ([] if os.environ.get(BASE_FROM_ENV) else ["mmdebstrap"])
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (.ci/run installs docker.io and mmdebstrap)"
    return None


def _interfaces() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def _mounts_under(directory: Path) -> list[str]:
    """Mount points inside `directory`, deepest first (dockerd leaves its exec root's netns/default mounted)."""
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return sorted((p for p in points if p.startswith(f"{directory}/")), key=len, reverse=True)


@dataclass
class Engine:
    """A running dockerd of our own; `docker()` talks to it and to nothing else."""

    directory: Path
    process: subprocess.Popen
    interfaces_before: set[str]
    figures: dict[str, float | str] = field(default_factory=dict)  # what the tests measured, for the summary

    @property
    def host(self) -> str:
        return f"unix://{self.directory / 'docker.sock'}"

    def docker(self, *args: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
        result = subprocess.run(["docker", "--host", self.host, *args], capture_output=True, text=True,
                                timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def inspect(self, container: str, template: str) -> str:
        return self.docker("inspect", "--format", template, container).stdout.strip()


@contextlib.contextmanager
def engine(log_to: Path) -> Iterator[Engine]:
    """Start dockerd in a temporary directory (a short path: containerd's sockets live in it); stop it by its PID."""
    directory = Path(tempfile.mkdtemp(prefix="relay-dockerd-"))
    (directory / "daemon.json").write_text("{}")  # not /etc/docker/daemon.json: nothing of the host's engine
    before = _interfaces()
    log = open(log_to, "w")
    process = subprocess.Popen(
        ["dockerd", "--config-file", str(directory / "daemon.json"), "--data-root", str(directory / "data"),
         "--exec-root", str(directory / "exec"), "--pidfile", str(directory / "dockerd.pid"),
         "--host", f"unix://{directory / 'docker.sock'}", "--bridge=none", "--iptables=false", "--ip6tables=false",
         "--log-level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    running = Engine(directory, process, before)
    try:
        deadline = time.monotonic() + 60
        while running.docker("version", check=False, timeout=10).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not start:\n{log_to.read_text()}")
            time.sleep(0.2)
        yield running
    finally:
        with contextlib.suppress(Exception):
            ids = running.docker("ps", "-aq", check=False, timeout=30).stdout.split()
            if ids:
                running.docker("rm", "-f", *ids, check=False, timeout=60)
        process.send_signal(signal.SIGTERM)  # dockerd stops its containerd and unmounts what it mounted
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()
        for point in _mounts_under(directory):
            subprocess.run(["umount", point], check=False, timeout=30)
        assert not _mounts_under(directory), f"the engine left mounts behind: {_mounts_under(directory)}"
        shutil.rmtree(directory)
        left = _interfaces() - before
        assert not left, f"the engine left network interfaces behind: {sorted(left)}"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[str]:
    """`directory` over HTTP on loopback, for pip's --find-links: its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _timed(figures: dict, name: str, command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                            **kwargs)
    figures[name] = round(time.monotonic() - started, 1)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command[:3])} … exited {result.returncode}:\n{result.stdout[-3000:]}"
                             f"{result.stderr[-3000:]}")
    return result


def build_image(running: Engine, work: Path) -> str:
    """The repository's Dockerfile built as users build it (the classic builder, `docker build .`), given a base
    and a wheelhouse; its figures go to `running.figures`."""
    figures = running.figures
    base = os.environ.get(BASE_FROM_ENV)
    if not base:
        tarball = work / "base.tar"
        _timed(figures, "base image: mmdebstrap (s)", [*MMDEBSTRAP, str(tarball)], timeout=900)
        running.docker("import", str(tarball), BASE_IMAGE, timeout=300)
        tarball.unlink()
        base = BASE_IMAGE
        figures["base image size (MB)"] = round(int(running.inspect(BASE_IMAGE, "{{.Size}}")) / 1e6)
    wheels = work / "wheels"
    # The host's Python decides the environment markers; the image's (Debian's 3.11.2 in the test base) may need
    # more: redis asks for async-timeout below 3.11.3.
    _timed(figures, "wheelhouse: pip wheel on the host (s)",
           [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels), str(ROOT), "setuptools>=68",
            "async-timeout>=4.0.3"],
           timeout=900)
    for own in wheels.glob("realtime_webrtc_relay-*.whl"):
        own.unlink()  # the build builds the relay itself, from the context
    with serving(wheels) as index:
        _timed(figures, "image: docker build (s)",
               ["docker", "--host", running.host, "build", "--network", "host", "--build-arg", f"BASE={base}",
                "--build-arg", "PIP_NO_INDEX=1", "--build-arg", f"PIP_FIND_LINKS={index}", "--tag", IMAGE, str(ROOT)],
               timeout=1200, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    shutil.rmtree(wheels, ignore_errors=True)
    figures["base image"] = base
    figures["image size (MB)"] = round(int(running.inspect(IMAGE, "{{.Size}}")) / 1e6)
    venv = running.docker("run", "--rm", "--network", "host", "--entrypoint", "du", IMAGE, "-sm", "/opt/relay")
    figures["of which the venv /opt/relay (MB)"] = int(venv.stdout.split()[0])
    return IMAGE


def health_check(running: Engine, image: str) -> dict:
    return json.loads(running.inspect(image, "{{json .Config.Healthcheck}}"))

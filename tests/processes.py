"""Starting and stopping the project's own processes in tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterable


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the relay's settings and keys (a developer's own must not leak in), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") and k != "OPENAI_API_KEY"}
    return env | extra


def stop_all(processes: Iterable[subprocess.Popen], timeout: float) -> None:
    """SIGTERM every process still running, then wait for each (together at most ~`timeout`), killing stragglers."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait until the process's log file holds `text`; fail at once if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        if process.poll() is not None:
            raise RuntimeError(f"{log.name} exited early:\n{log.read_text()}")
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} not in {log.name} after {timeout}s:\n{log.read_text()}")


@contextlib.asynccontextmanager
async def relay_serve(*args: str, env: dict[str, str], timeout: float = 30.0,
                      command: tuple[str, ...] = (sys.executable, "-m", "relay"), cwd: Path | None = None,
                      ) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, str]]:
    """`relay serve --port 0 ARGS` as a process (`command`: another installation's `relay`): yields it, its base URL
    and its `relay listening` log line. The process is killed on the way out if the test did not end it."""
    process = await asyncio.create_subprocess_exec(
        *command, "serve", "--port", "0", *args, env=env, stderr=subprocess.PIPE, cwd=cwd)
    try:
        async with asyncio.timeout(timeout):
            while True:
                line = (await process.stderr.readline()).decode()
                assert line, "relay serve exited early"
                if found := re.search(r"relay listening on (http://127\.0\.0\.1:\d+)/", line):
                    break
        yield process, found.group(1), line
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@dataclass
class LoggedRelay:
    """A `relay serve` process whose stdout and stderr are read as they come (a debug log would fill a pipe)."""

    process: asyncio.subprocess.Process
    base: str
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)


@contextlib.asynccontextmanager
async def relay_logged(*args: str, env: dict[str, str], timeout: float = 30.0, own_group: bool = False
                       ) -> AsyncIterator[LoggedRelay]:
    """`relay serve --port 0 ARGS`, yielded once it logs that it listens; every line it writes is kept. Killed on
    the way out if the test did not end it. `own_group`: in a process group of its own (its pid is the group's id),
    for signals to the whole group as systemd and Docker send them."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--port", "0", *args, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=own_group)
    relay = LoggedRelay(process, "")
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def read(stream: asyncio.StreamReader, lines: list[str]) -> None:
        while line := await stream.readline():  # ends at EOF: when the relay (and its workers) exit
            lines.append(line.decode(errors="replace"))
            found = re.search(r"relay listening on (http://127\.0\.0\.1:\d+)/", lines[-1])
            if found and not listening.done():
                listening.set_result(found.group(1))

    readers = [asyncio.ensure_future(read(process.stdout, relay.stdout)),
               asyncio.ensure_future(read(process.stderr, relay.stderr))]
    try:
        async with asyncio.timeout(timeout):
            await asyncio.wait([listening, readers[1]], return_when=asyncio.FIRST_COMPLETED)
        assert listening.done(), f"relay serve exited early:\n{relay.output()}"
        relay.base = listening.result()
        yield relay
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*readers, return_exceptions=True), 10)
        for reader in readers:
            reader.cancel()
        listening.cancel()

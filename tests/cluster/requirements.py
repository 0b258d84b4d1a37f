"""What the cluster tests (tests/cluster, tests/turn, and the cluster unit and integration tests that start
redis-server) need from the machine, and what a missing piece does, as for the browser and container tests: with
`CI` set it fails the run (a skip there would hide a failure); elsewhere the test is skipped, saying why."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def unavailable(what: str, reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{what} cannot run: {reason}")
    pytest.skip(f"{what} skipped: {reason}")


def missing_programs(*needed: tuple[str, str]) -> str | None:
    """Why not, for (program, Debian package) pairs: the first not found, or None."""
    for program, package in needed:
        if shutil.which(program) is None:
            return f"`{program}` not found (apt-get install {package})"
    return None


def require_redis_server() -> None:
    if reason := missing_programs(("redis-server", "redis-server")):
        unavailable("the Redis tests", reason)

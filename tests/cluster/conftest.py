"""The cluster tests' world (stack.py): Redis, a simulator, three relays in cluster mode on 127.0.0.11-13 and nginx
on 127.0.0.10 in front of them, started once for the module and stopped by their PIDs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster.requirements import unavailable
from tests.cluster.stack import NGINX, REDIS, Cluster

ROOT = Path(__file__).resolve().parents[2]
# Low limits, so that the limit test sees them hold cluster-wide; every other test keeps under them (its calls come
# from addresses of their own, or use API keys with an allowance of their own).
LIMITS = {"calls_per_ip_per_s": "0.01", "calls_per_key_per_s": "0.01"}


def missing_requirements() -> str | None:
    missing = [path for path in (NGINX, REDIS) if not os.access(path, os.X_OK)]
    if missing:
        return f"{', '.join(missing)} not installed (Debian's nginx and redis-server)"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    if reason := missing_requirements():
        unavailable("the cluster tests", reason)
    root = tmp_path_factory.mktemp("cluster")
    with Cluster(root, nodes=3, workers=2, client_secret_single_use="true", call_idle_timeout_s="10",
                 **LIMITS) as running:
        yield running
    if request.session.testsfailed:  # keep what each process said, for the failure's reader
        artifacts = ROOT / "test-artifacts" / "cluster"
        shutil.rmtree(artifacts, ignore_errors=True)
        shutil.copytree(root, artifacts, ignore=shutil.ignore_patterns("client_body", "proxy", "fastcgi", "uwsgi",
                                                                       "scgi", "*.sock"))

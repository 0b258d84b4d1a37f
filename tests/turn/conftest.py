"""The TURN gateway tests' world (gateway.py): the relay on a pod network that only coturn reaches, clients that reach
only coturn. Built once per module and torn down after it, failure or not.

These tests need root, iproute2, coturn and Chromium, which CI installs (.ci/run) and runs as root. A missing piece
fails them when `CI` is set (a skip there would hide a failure) and skips them elsewhere, saying why
(tests/cluster/requirements.py, as for the other cluster tests).
"""

from __future__ import annotations

import pytest

from tests.browser.harness import missing_requirements as browser_missing
from tests.cluster.requirements import unavailable
from tests.turn.gateway import Gateway, missing_requirements, turn_gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    if reason := missing_requirements():
        unavailable("the TURN gateway tests", reason)
    with turn_gateway(tmp_path_factory.mktemp("turn-gateway")) as world:
        yield world


@pytest.fixture
def browser_requirements() -> None:
    if reason := browser_missing():
        unavailable("the TURN gateway's browser test", reason)

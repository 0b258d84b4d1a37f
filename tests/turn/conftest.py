"""The TURN gateway tests' world (gateway.py): the relay on a pod network that only coturn reaches, clients that reach
only coturn. Built once per module and torn down after it, failure or not.

No skipping: these tests need root, iproute2, coturn and Chromium, which CI installs (.ci/run) and runs as root. A
missing piece fails the tests with the reason, as a skip in CI would hide a failure.
"""

from __future__ import annotations

import pytest

from tests.browser.harness import missing_requirements as browser_missing
from tests.turn.gateway import Gateway, missing_requirements, turn_gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    if reason := missing_requirements():
        pytest.fail(f"the TURN gateway tests cannot run: {reason}")
    with turn_gateway(tmp_path_factory.mktemp("turn-gateway")) as world:
        yield world


@pytest.fixture
def browser_requirements() -> None:
    if reason := browser_missing():
        pytest.fail(f"the TURN gateway's browser test cannot run: {reason}")

from __future__ import annotations

import pytest

from relay.simulator.config import SimConfig
from relay.simulator.server import RunningSimulator, start_simulator

# Fast but faithful: the same event sequence as the defaults, a short first-delta delay, 20x real time.
FAST = SimConfig(first_delta_delay_ms=20, speed=20.0, transcription_delay_ms=10)


@pytest.fixture
async def simulator() -> RunningSimulator:
    sim = await start_simulator(FAST, "127.0.0.1", 0)
    yield sim
    await sim.stop()


@pytest.fixture
def url(simulator: RunningSimulator) -> str:
    return simulator.url + "?model=gpt-realtime"

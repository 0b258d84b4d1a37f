"""The container tests' engine and image (engine.py): the image built once for this folder's tests, from the
repository's Dockerfile; the engine stops when they are done."""

from __future__ import annotations

import pytest

from tests.container.engine import ROOT, Engine, build_image, engine, missing_requirements, unavailable

ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="package")
def docker_engine(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Engine:
    if reason := missing_requirements():
        unavailable(reason)
    ARTIFACTS.mkdir(exist_ok=True)
    with engine(ARTIFACTS / "container-dockerd.log") as running:
        request.config.stash[FIGURES] = running.figures
        yield running


@pytest.fixture(scope="package")
def image(docker_engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_image(docker_engine, tmp_path_factory.mktemp("image"))


FIGURES = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    figures = config.stash.get(FIGURES, None)
    if figures:
        terminalreporter.section("the relay's image, measured in this run")
        for name, value in figures.items():
            terminalreporter.write_line(f"{name}: {value}")

"""The package users install by name: the sdist and the wheel as `python -m build` makes them (the wheel from the
sdist), checked by `twine check`, and the wheel installed into a fresh venv, where `relay serve` carries a call."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import aiohttp
import pytest

import relay
from tests.container.calls import spoken_turn
from tests.processes import clean_env, relay_serve

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTION = "realtime-webrtc-relay"  # "relay" on PyPI is another project
pytestmark = pytest.mark.timeout(1200)  # the builds and the venv fetch from the package index; each step is bounded


def run(*command: str | Path, timeout: float, cwd: Path | None = None) -> str:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, (f"{command[:3]} exited {result.returncode}:\n"
                                    f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, ROOT, timeout=600)
    return out


def test_the_sdist_and_wheel_pass_twine_check_and_carry_the_package_and_its_page(dist: Path):
    (sdist,), (wheel,) = list(dist.glob("*.tar.gz")), list(dist.glob("*.whl"))
    assert sdist.name == f"realtime_webrtc_relay-{relay.__version__}.tar.gz"
    assert wheel.name == f"realtime_webrtc_relay-{relay.__version__}-py3-none-any.whl"
    assert "PASSED" in run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel, timeout=120)
    sources = {str(path.relative_to(ROOT)) for path in (ROOT / "relay").rglob("*")
               if path.is_file() and "__pycache__" not in path.parts}
    assert {"relay/static/index.html", "relay/static/app.js", "relay/static/style.css"} <= sources
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert sources <= names, sorted(sources - names)
        info = f"realtime_webrtc_relay-{relay.__version__}.dist-info"
        metadata = archive.read(f"{info}/METADATA").decode()
        assert re.search(rf"^Name: {DISTRIBUTION}$", metadata, re.MULTILINE)
        assert re.search(rf"^Version: {re.escape(relay.__version__)}$", metadata, re.MULTILINE)
        assert "relay = relay.cli:main" in archive.read(f"{info}/entry_points.txt").decode()
    with tarfile.open(sdist) as archive:
        top = f"realtime_webrtc_relay-{relay.__version__}/"
        assert {top + name for name in sources} <= set(archive.getnames())


def test_the_changelog_names_the_packages_version_as_its_latest_release():
    releases = re.findall(r"^## \[?(\d+\.\d+\.\d+)\]?", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert releases and releases[0] == relay.__version__


async def test_the_wheel_in_a_fresh_venv_serves_the_page_and_carries_a_call(dist: Path, tmp_path: Path):
    (wheel,) = dist.glob("*.whl")
    venv = tmp_path / "venv"
    await asyncio.to_thread(run, sys.executable, "-m", "venv", venv, timeout=120)
    await asyncio.to_thread(run, venv / "bin" / "pip", "install", "--quiet", wheel, timeout=900)
    where = await asyncio.to_thread(run, venv / "bin" / "python", "-c", "import relay; print(relay.__file__)",
                                    timeout=60, cwd=tmp_path)
    assert where.startswith(str(venv)), where  # the installed package, not this checkout
    env = clean_env(RELAY_ICE_ADDRESSES="127.0.0.1")
    async with relay_serve(env=env, command=(str(venv / "bin" / "relay"),), cwd=tmp_path, timeout=60) as (
            process, base, _):
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/") as response:
                assert response.status == 200 and "<html" in (await response.text()).lower()
        assert await spoken_turn(base) > 0
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0

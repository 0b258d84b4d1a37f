"""How long OpenAI's browser SDK takes to connect through the relay: from the click on Connect to the first
`session.updated` the SDK receives (the event its `connect()` waits for), in Debian's Chromium.

    python bench/sdk_connect.py [--connects 10] [--json results.json]

The world of the SDK's browser test (tests/browser/agents_sdk.py): a network namespace with only `lo`, the
simulator, `relay serve` with API keys and the default event policy, and the SDK's page on a second origin. Each
connect is a new visitor: the backend mints a client secret, a fresh page connects with it, then hangs up.
Needs root, /usr/bin/chromium and `npm ci --prefix tests/browser/sdk`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.analysis import percentile, run  # noqa: E402
from tests.browser import agents_sdk  # noqa: E402
from tests.browser.harness import browser_stack, missing_requirements  # noqa: E402


async def connect_times(stack, connects: int) -> list[float]:
    """Milliseconds from click to `session.updated`, one per connect."""
    times = []
    async with agents_sdk.sdk_pages(stack, stack.silent_wav) as open_page:
        for _ in range(connects):
            page = await open_page()
            await page.connect()
            times.append(await page.connect_ms())
            assert await page.errors() == [] and page.console == [], (await page.errors(), page.console)
            await page.disconnect()
            await page.close()
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connects", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if reason := missing_requirements() or agents_sdk.missing_sdk():
        sys.exit(f"cannot run: {reason}")
    agents_sdk.build_bundle()
    # One address makes every call: the per-address call limit is not what is measured.
    env = agents_sdk.relay_env() | {"RELAY_CALLS_PER_IP_PER_S": "1000"}
    with tempfile.TemporaryDirectory() as tmp, browser_stack(Path(tmp), env, agents_sdk.SDK_DIR) as stack:
        times = await connect_times(stack, args.connects)
    figures = {"connects": len(times), "p50_ms": percentile(times, 50), "min_ms": min(times), "max_ms": max(times),
               "all_ms": [round(t, 1) for t in times]}
    print(f"SDK connect (click -> session.updated), {len(times)} connects: p50 {figures['p50_ms']:.0f} ms, "
          f"min {figures['min_ms']:.0f} ms, max {figures['max_ms']:.0f} ms")
    print("each (ms):", " ".join(f"{t:.0f}" for t in times))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    run(main())

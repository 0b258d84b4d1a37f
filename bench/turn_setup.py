"""Call set-up time through a TURN gateway against a direct call, in the same run (issue 19: media into pods).

    python bench/turn_setup.py [--calls 10] [--no-chromium] [--json results.json]

The world of tests/turn (tests/turn/gateway.py): `relay serve` on a pod network (10.77.1.2, its only ICE address),
coturn between it and a client namespace that reaches only coturn (and the relay's HTTP through a TCP forwarder), plus
a "direct" namespace with a route to the pod address. Each call, timed from the offer's POST: the answer, ICE
connected, connected (DTLS done: the call is usable), the first audio packet from the relay. Then it is hung up.

Clients, `--calls` set-ups each, after one warm-up call each that is not counted:
- aiortc, through the gateway (its TURN credential from /relay/client-config) and direct, offering its candidates
  as aiortc does, and again with the offer's candidates stripped as OpenAI's browser SDK posts it (the relay then
  learns the client's address from its checks);
- Chromium (`iceTransportPolicy: "relay"` through the gateway; "all" with no ICE servers direct), posting at once.
Prints p50/p90 per client and path, and JSON (stdout's last line, and --json).

What to expect: through the gateway ~20-40 ms more than direct, except aiortc offering its candidates: ~500 ms more.
There the relay checks the client's relayed candidate as soon as it answers, before the client's TURN permission for
the relay exists, so coturn drops that check; the client's own check reaches the relay a few ms later, but aioice
does not re-send a check already in progress (RFC 8445 7.3.1.4 says to), so the relay's side waits for the STUN
retransmission at 500 ms. Browsers posting at once (the SDK) and offers without candidates do not meet it.

Needs root, iproute2, coturn, and
/usr/bin/chromium with Playwright for the Chromium part. Bounded: each call has its timeouts; the namespaces and
every process are removed at the end, on failure or SIGTERM too.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.analysis import percentile, run  # noqa: E402
from tests.browser.harness import missing_requirements as browser_missing  # noqa: E402
from tests.turn.browser import BrowserCall, chromium, microphone  # noqa: E402
from tests.turn.gateway import (API_KEY, Gateway, missing_requirements, mint_client_secret, run_peer,  # noqa: E402
                                turn_gateway)

METRICS = ("post_ms", "ice_ms", "connected_ms", "first_audio_ms")


async def aiortc_setups(gateway: Gateway, through_turn: bool, strip: bool, calls: int) -> list[dict[str, Any]]:
    ns, base = (gateway.client, gateway.relay_url) if through_turn else (gateway.direct, gateway.direct_relay_url)
    args = ["--base", base, "--key", API_KEY, "--calls", str(calls + 1), "--connect-timeout", "10"]
    args += ["--turn"] if through_turn else []
    args += ["--strip"] if strip else []
    results = await run_peer(gateway, ns, *args, timeout=30 + 15 * (calls + 1))
    out = []
    for result in results[1:]:  # the first is the warm-up
        expected = "relay" if through_turn else "host"
        if not result.get("connected") or (result.get("pair") or {}).get("local", {}).get("type") != expected:
            raise RuntimeError(f"a call did not connect as expected ({expected}): {json.dumps(result)[:1500]}")
        out.append({"post_ms": result["post_ms"], "ice_ms": result["ice_ms"], "connected_ms": result["connected_ms"],
                    "first_audio_ms": result.get("first_frame_ms"), "gather_ms": result["gather_ms"]})
    return out


async def chromium_setups(gateway: Gateway, through_turn: bool, calls: int, tmp: Path) -> list[dict[str, Any]]:
    ns, base = (gateway.client, gateway.relay_url) if through_turn else (gateway.direct, gateway.direct_relay_url)
    out = []
    async with chromium(gateway, microphone(tmp), ns) as browser:
        for index in range(calls + 1):
            token = mint_client_secret(gateway)
            call = await BrowserCall.start(browser, gateway, token, policy="relay" if through_turn else "all",
                                           turn=through_turn, timeout_s=10, base=base)
            try:
                result = call.result
                stats = await call.stats() if result.get("connected") else {}
                expected = "relay" if through_turn else "host"
                if not result.get("connected") or (stats.get("pair") or {}).get("local", {}).get("type") != expected:
                    raise RuntimeError(f"a Chromium call did not connect as expected ({expected}): {result}")
                await call.hang_up(token)
            finally:
                await call.close()
            if index:  # the first is the warm-up
                times = result["times"]
                out.append({"post_ms": times["post_ms"], "ice_ms": times.get("ice_ms"),
                            "connected_ms": times["connected_ms"], "first_audio_ms": times.get("first_packet_ms")})
    return out


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    figures: dict[str, Any] = {"calls": len(rows)}
    for metric in (*METRICS, "gather_ms"):  # gather_ms: aiortc's offer, its TURN allocation included
        values = [row[metric] for row in rows if row.get(metric) is not None]
        if values:
            figures[metric] = {"p50": round(percentile(values, 50), 1), "p90": round(percentile(values, 90), 1),
                               "min": round(min(values), 1), "max": round(max(values), 1)}
    figures["all"] = rows
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10, help="set-ups per client and path (1-200)")
    parser.add_argument("--no-chromium", action="store_true", help="aiortc only")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    calls = max(1, min(args.calls, 200))
    if reason := missing_requirements():
        sys.exit(f"cannot run: {reason}")
    with_chromium = not args.no_chromium
    if with_chromium and (reason := browser_missing()):
        sys.exit(f"cannot run the Chromium part: {reason} (--no-chromium skips it)")
    # SIGTERM: leave through the finally blocks, which stop every process and delete the namespaces.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    figures: dict[str, Any] = {"calls_per_case": calls}
    cases = [("aiortc", "turn", False), ("aiortc", "direct", False),
             ("aiortc_no_candidates", "turn", True), ("aiortc_no_candidates", "direct", True)]
    # One address makes every call (the forwarder): the per-address call limit is not what is measured.
    with tempfile.TemporaryDirectory() as tmp, \
            turn_gateway(Path(tmp), direct=True, relay_extra={"RELAY_CALLS_PER_IP_PER_S": "1000"}) as gateway:
        for client, path, strip in cases:
            rows = await aiortc_setups(gateway, path == "turn", strip, calls)
            figures.setdefault(client, {})[path] = summarize(rows)
        if with_chromium:
            for path in ("turn", "direct"):
                rows = await chromium_setups(gateway, path == "turn", calls, Path(tmp))
                figures.setdefault("chromium", {})[path] = summarize(rows)
    figures["wall_s"] = round(time.monotonic() - started, 1)

    print(f"Call set-up through the TURN gateway vs direct, {calls} calls each (ms from the offer's POST; p50 / p90)")
    print(f"{'client':22} {'path':7} " + " ".join(f"{m:>18}" for m in METRICS))
    for client in ("aiortc", "aiortc_no_candidates", "chromium"):
        for path in ("turn", "direct"):
            case = figures.get(client, {}).get(path)
            if case:
                cells = [f"{case[m]['p50']:>8.1f} / {case[m]['p90']:>7.1f}" if m in case else f"{'-':>18}"
                         for m in METRICS]
                print(f"{client:22} {path:7} " + " ".join(cells))
    for client in ("aiortc", "aiortc_no_candidates", "chromium"):
        if client in figures:
            turn, direct = figures[client]["turn"], figures[client]["direct"]
            added = turn["connected_ms"]["p50"] - direct["connected_ms"]["p50"]
            print(f"{client}: the TURN gateway adds {added:.1f} ms (p50) to POST -> connected")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({k: v if not isinstance(v, dict) else {p: {m: c[m] for m in c if m != "all"}
                                                            for p, c in v.items()}
                      for k, v in figures.items()}))


if __name__ == "__main__":
    run(main())

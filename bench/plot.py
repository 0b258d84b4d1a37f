"""Draw the latency figures of docs/performance.md from a `bench/call_latency.py --json FILE` run.

    python bench/call_latency.py --markers 30 --barge-ins 10 --json docs/call_latency.json
    python bench/plot.py docs/call_latency.json docs/

Needs matplotlib (`pip install -e ".[bench]"`). Writes latency-distributions.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def main(results: Path, out: Path) -> None:
    data = json.loads(results.read_text())
    relay, bare, barge = data["relay"], data["bare_aiortc"], data["barge_in"]
    ms = lambda values: [v * 1000 for v in values]  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    ax.hist([ms(relay["round_trip_ms"]), ms(bare["round_trip_ms"])], bins=20, label=["through the relay", "bare aiortc echo"])
    ax.set_title("Echo round trip, client to client")
    ax.set_xlabel("ms")
    ax.legend()
    ax = axes[1]
    ax.hist(ms(relay["mouth_to_upstream_ms"]), bins=20, color="tab:green")
    ax.set_title("Mouth to upstream")
    ax.set_xlabel("ms")
    ax = axes[2]
    ax.hist([ms(barge["client_barge_in_ms"]), ms(barge["relay_barge_in_ms"])], bins=10,
            label=["as the client hears it", "frames sent after the event"])
    ax.set_title("Barge-in (speech_started to last audio)")
    ax.set_xlabel("ms")
    ax.legend()
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "latency-distributions.png", dpi=100)
    print(f"wrote {out / 'latency-distributions.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

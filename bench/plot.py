"""Draw the figures of docs/performance.md from a `bench/compare.py` run (it calls this itself).

    python bench/plot.py bench-results/results.json docs/

Needs matplotlib (`pip install -e ".[bench]"`). Writes latency-distributions.png and capacity-ramp.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

TARGETS = (("relay", "tab:blue"), ("pipecat", "tab:orange"), ("direct", "tab:gray"))


def _ms(values: list[float] | None) -> list[float]:
    return [v * 1000 for v in values or []]


def _cdf(ax, values_ms: list[float], label: str, color: str) -> None:
    if values_ms:
        ordered = sorted(values_ms)
        ax.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post", label=label, color=color)


def latency(results: dict, out: Path) -> Path:
    panels = (("round_trip_s", "Echo round trip, client to client"), ("mouth_to_upstream_s", "Mouth to upstream"),
              ("barge_in_s", "Barge-in: speech_started → last packet"),
              ("truncation_error_s", "Truncation error (audio_end_ms − received)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.8))
    for ax, (key, title) in zip(axes, panels):
        for name, color in TARGETS:
            _cdf(ax, _ms(results.get(name, {}).get(key)), "direct aiortc echo" if name == "direct" else name, color)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction ≤ x")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / "latency-distributions.png")


def capacity(ramps: dict, out: Path) -> Path:
    fig, (late, cpu) = plt.subplots(1, 2, figsize=(12, 4))
    for name, ramp in ramps.items():
        steps = [s for s in ramp["steps"] if "late_fraction" in s]
        calls = [s["calls"] for s in steps]
        late.plot(calls, [s["late_fraction"] * 100 for s in steps], marker="o", label=name)
        cpu.plot(calls, [s["cpu_share"] * 100 for s in steps], marker="o", label=name)
    late.axhline(0.5, color="red", linestyle="--", linewidth=1, label="0.5 % limit")
    late.set_yscale("symlog", linthresh=0.1)
    late.set_ylim(bottom=0)
    late.set_title("Outbound frames > 20 ms late", fontsize=10)
    late.set_ylabel("% of frames")
    cpu.set_title("Target CPU (100 % = one core)", fontsize=10)
    cpu.set_ylabel("% of one core")
    for ax in (late, cpu):
        ax.set_xlabel("concurrent full-duplex calls")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / "capacity-ramp.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_all(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [latency(results, out)]
    if results.get("capacity"):
        paths.append(capacity(results["capacity"], out))
    return paths


if __name__ == "__main__":
    for written in plot_all(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])):
        print(f"wrote {written}")

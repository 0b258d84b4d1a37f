"""The soak bench's 2-minute version: 20 calls against one `relay serve` process, watched for leaks (bench/soak.py;
`python bench/soak.py --minutes 30` is the full run, figures in docs/robustness.md). Its timing criterion (event-loop
lag p99) stays in the bench: this machine is shared."""

from __future__ import annotations

import pytest

from bench.soak import judge, soak, summary

CALLS, SECONDS = 20, 120


@pytest.mark.timeout(SECONDS + 240)
def test_twenty_calls_for_two_minutes_leak_nothing_and_lose_nothing(tmp_path):
    result = soak(CALLS, SECONDS, every=5.0, work=tmp_path, rss_limit_mb=10.0)
    print("\n" + summary(result))
    assert "checks" in result, result
    failed = {name: check for name, check in result["checks"].items() if name != "lag_p99_ms" and not check["passed"]}
    assert not failed, summary(result)


def test_the_judge_fails_what_leaks_or_loses():
    def sample(t, rss, tasks=100, fds=50, calls=CALLS, ended=0):
        return {"t": t, "rss_mb": rss, "fds": fds, "tasks": tasks, "calls": calls, "ended": ended,
                "lag_buckets": {0.01: 4 * t, float("inf"): 4 * t}}

    steady = [sample(t, 100 + min(t, 60) / 10) for t in range(0, 125, 5)]
    assert judge(steady, CALLS, 120, 5, 10, [6000] * CALLS)["passed"]
    leaking = [sample(t, 100 + t / 4) for t in range(0, 125, 5)]
    assert not judge(leaking, CALLS, 120, 5, 10, [6000] * CALLS)["checks"]["rss_growth_mb"]["passed"]
    tasks = [sample(t, 100, tasks=100 + t) for t in range(0, 125, 5)]
    assert not judge(tasks, CALLS, 120, 5, 10, [6000] * CALLS)["checks"]["tasks"]["passed"]
    lost = steady[:-1] + [sample(120, 106, calls=CALLS - 1, ended=1)]
    assert not judge(lost, CALLS, 120, 5, 10, [6000] * CALLS)["checks"]["calls_lost"]["passed"]
    assert not judge(steady, CALLS, 120, 5, 10, [6000] * (CALLS - 1) + [10])["checks"]["peers_heard_to_the_end"]["passed"]

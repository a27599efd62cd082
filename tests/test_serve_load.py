"""Load test of the server (a small version of bench/bench_serve.py): concurrent streaming clients that
hang up at random, before the first byte or midway.

Checks: no 5xx, every stream that was not abandoned ends with [DONE] and no error event, the KV cache
back to 0 after every round, and the process RSS flat after the warm-up round. The server runs
in-process, so the RSS measured is this test process (server + clients). The 64-client version of
the issue is the slow-marked test (python -m pytest tests/test_serve_load.py -m slow).
"""

from __future__ import annotations

import os

import pytest

from lmstack.serve.app import create_app
from lmstack.serve.run import serve_in_thread
from serve_helpers import bench_serve, health, tiny_checkpoint  # noqa: F401


def run(checkpoint, cfg) -> list:
    app = create_app(checkpoint, max_num_seqs=8, max_waiting=256, device="cpu", model_name="m")
    with serve_in_thread(app) as url:
        results = bench_serve.run_load(url, os.getpid(), cfg, model="m", log=print)
        counters = health(url)["counters"]
    failures = bench_serve.check(results, rss_slack_mb=32.0)
    assert not failures, failures
    outcomes = {k: sum(r.outcomes.get(k, 0) for r in results) for k in ("done", "abandoned_early", "abandoned_mid")}
    assert outcomes["done"] > 0 and outcomes["abandoned_mid"] > 0, outcomes
    assert counters["disconnects"] > 0, "the server should have seen clients leave (and aborted their requests)"
    return results


def test_sixteen_streaming_clients_with_random_disconnects(tiny_checkpoint):
    cfg = bench_serve.LoadConfig(clients=16, rounds=3, requests=2, max_tokens=24, disconnect_prob=0.35, seed=1)
    results = run(tiny_checkpoint, cfg)
    assert all(r.outcomes.get("refused", 0) == 0 for r in results)  # 256 waiting places: nobody is refused


@pytest.mark.slow
def test_sixty_four_streaming_clients_with_random_disconnects(tiny_checkpoint):
    cfg = bench_serve.LoadConfig(clients=64, rounds=3, requests=3, max_tokens=48, disconnect_prob=0.25, seed=2)
    run(tiny_checkpoint, cfg)

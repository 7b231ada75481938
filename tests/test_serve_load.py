"""Loopback load test (CI size): concurrent requests, 10% malformed, random disconnects, a small KV pool.

The full 1,000-request run is ``python -m cometq.serve.loadtest --requests 1000``.
"""
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from cometq.serve.loadtest import run_load_test  # noqa: E402


@pytest.mark.parametrize("kv4,full_step", [(False, False), (True, False), (True, True)])
def test_load_mixed_requests(kv4, full_step):
    # full_step: the KV4 decode steps through the full-step graph path (run eagerly on the CPU),
    # so async scheduling serves the load: disconnects abort requests with a step queued ahead
    n = 200 if not kv4 else 60
    rep = run_load_test(requests=n, concurrency=32, malformed=0.1, disconnect=0.1, max_tokens=8 + 4 * full_step,
                        seed=1 + kv4 + full_step, timeout=120.0, kv4=kv4, full_step=full_step)
    if full_step:
        assert rep["async_steps"] > 0
    assert rep["failures"] == []
    assert rep["ok"] + rep["rejected_with_error"] + rep["disconnected"] == n
    assert rep["rejected_with_error"] > 0 and rep["disconnected"] > 0 and rep["ok"] > n // 2
    assert rep["kv_blocks_used_after"] == 0 and rep["engine_alive"] and rep["health_status"] == 200
    assert rep["passed"]

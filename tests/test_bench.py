"""`launch.py bench`: its metrics follow vLLM's definitions, and a short sweep against a running server completes
every request with exactly the asked output length."""

import json
import subprocess
import sys

import pytest

from frontend.bench import Output, metrics
from tests.test_server import ROOT, server  # noqa: F401  (the module's server fixture, started once here too)


def test_metrics_follow_vllm_definitions():
    # request 1: first text at 0.5 s, then texts 0.1 s and 0.3 s apart, done at 0.9 s with 4 output tokens
    # request 2: failed, counts nowhere
    outputs = [Output(ok=True, ttft=0.5, latency=0.9, itl=[0.1, 0.3], prompt_tokens=10, output_tokens=4),
               Output(error="boom")]
    m = metrics(outputs, duration=2.0, concurrency=2)
    assert (m["completed"], m["failed"], m["total_output_tokens"]) == (1, 1, 4)
    assert m["request_throughput"] == 0.5 and m["output_throughput"] == 2.0 and m["total_token_throughput"] == 7.0
    assert m["ttft_ms"]["mean"] == pytest.approx(500)
    assert m["tpot_ms"]["mean"] == pytest.approx((900 - 500) / 3)  # (latency - TTFT) / (output tokens - 1)
    assert m["itl_ms"]["mean"] == pytest.approx(200) and m["itl_ms"]["median"] == pytest.approx(200)
    assert m["e2el_ms"]["p99"] == pytest.approx(900)


def test_a_sweep_against_a_running_server_gets_every_token(server, tiny_model, tmp_path):  # noqa: F811
    out = subprocess.run(
        [sys.executable, "launch.py", "bench", "--url", server, "--model", str(tiny_model), "--image-size", "64x48",
         "--input-len", "8", "--output-len", "5", "--num-prompts", "3", "--concurrency", "1,2",
         "--out", str(tmp_path / "bench.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| output token throughput (tok/s) |" in out.stdout and "concurrency 2 / 1" in out.stdout
    levels = json.loads((tmp_path / "bench.json").read_text())["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert (lv["completed"], lv["failed"], lv["total_output_tokens"]) == (3, 0, 15)  # ignore_eos: 5 each
        assert lv["ttft_ms"]["mean"] > 0 and lv["itl_ms"]["median"] > 0

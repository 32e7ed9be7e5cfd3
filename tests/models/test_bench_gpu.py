"""benchmarks/bench_gpu.py runs on CPU with the tiny configs, so the GPU check cannot rot."""

from __future__ import annotations

import importlib
import sys

import pytest

from tests.conftest import REPO


@pytest.fixture()
def bench_gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    module = importlib.import_module("bench_gpu")
    yield module
    sys.modules.pop("bench_gpu", None)


def test_gpu_check_runs_on_cpu_with_the_tiny_configs(bench_gpu, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    results = bench_gpu.main(["--quick", "--steps", "1", "--compare-steps", "3", "--resume-steps", "4",
                              "--out", str(out)])
    printed = capsys.readouterr().out
    assert set(results) == {"harmonix_f", "harmonix_s", "harmonizer"} and out.is_file()
    for name, result in results.items():
        throughput = result["throughput"]
        assert throughput["samples_per_s"] > 0 and throughput["tokens_per_s"] > throughput["samples_per_s"]
        assert throughput["backend"].startswith("flash"), throughput["backend"]  # SDPA's CPU kernel
        precision = result["precision"]
        assert len(precision["loss_bf16"]) == len(precision["loss_fp32"]) == 3
        assert precision["max_relative_difference"] < 0.05  # bf16 autocast tracks fp32 over a few steps
        assert precision["loss_fp32"][-1] < precision["loss_fp32"][0]  # the steps train
        # On CPU, with deterministic algorithms, stopping and resuming changes no bit.
        assert result["resume"]["bit_identical"] and result["resume"]["max_abs_difference"] == 0
        assert f"\n{name}: batch 2 per GPU" in printed
    assert "MFU: not reported on CPU" in printed

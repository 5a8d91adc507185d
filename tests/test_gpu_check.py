"""scripts/gpu_check.py runs on CPU too: every row filled, the CUDA-only rows saying "no CUDA"."""
import json
import subprocess
import sys

import pytest

from common import REPO_ROOT
from scripts import gpu_check


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_at_a_tiny_size(tmp_path):
    out = tmp_path / "gpu_check.json"
    # aot_eager: the compiled row's graphs and recompiles are dynamo's; inductor's C++ would add minutes here
    result = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--device", "cpu", "--tiny",
                             "--compile_backend", "aot_eager", "--out", str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = report["checks"]
    for name in ("loss bf16 vs fp32", "syncs per step", "peak memory"):
        assert checks[name] == gpu_check.NO_CUDA, name
    for name in ("steps/s eager", "steps/s compiled"):
        assert checks[name]["steps_per_s"] > 0 and checks[name]["steps_timed"] >= 1
    compiled = checks["steps/s compiled"]
    assert compiled["graphs_at_end"] == compiled["graphs_after_warmup"] > 0  # new lengths compiled nothing more
    assert compiled["graph_breaks"] == 0  # the collator's positions: nothing read back from the device
    assert sum(checks["attention kernels (training)"].values()) >= 2  # one call per layer at least
    assert sum(checks["attention kernels (generation)"].values()) > 0
    assert checks["generation"]["dtype"] == "float32" and checks["generation"]["tokens_per_s"] > 0
    assert checks["API"]["status"] == 200 and checks["API"]["completion_tokens"] > 0
    assert checks["torchrun 2 processes"]["returncode"] == 0, checks["torchrun 2 processes"]
    table = result.stdout
    assert "| check | result |" in table and "no CUDA" in table and "steps/s compiled" in table


def test_torchrun_row_on_one_gpu_says_it_needs_two(monkeypatch, tmp_path):
    """NCCL puts one process on each GPU: on a one-GPU machine the row says so instead of failing rank 1."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("torchrun was started"))
    row = gpu_check.torchrun_check({}, torch.device("cuda"), gpu_check.SIZES["tiny"], tmp_path)
    assert row == "needs 2 GPUs, torch sees 1 (NCCL puts one process on each)"

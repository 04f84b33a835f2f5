"""benchmarks/gpu_check.sh, the check prepared for a GPU: its CPU path runs here, so it cannot rot before one is at hand.

The tiny mode runs the same sequence as the GPU mode (SFT → reward → DPO → PPO → GRPO through each stage's
main, figures read from the stages' own outputs) on rlhf.tiny's Llama, a handful of steps each (~35 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
HEADLINE = {
    "sft": "tokens_per_second",
    "reward": "samples_per_second",
    "dpo": "tokens_per_second",
    "ppo": "episodes_per_second",
    "grpo": "steps_per_second",
}


def run_script(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_cpu_path_measures_every_stage_from_its_own_outputs(tmp_path):
    out = tmp_path / "figures" / "gpu_check.json"
    result = run_script("--cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr[-4000:]

    figures = json.loads(out.read_text())
    assert figures["complete"] is True
    assert figures["mode"] == "tiny"
    assert figures["device"].startswith("cpu")
    assert figures["vllm"]  # "not installed" here; recorded, never fatal
    assert list(figures["stages"]) == list(HEADLINE)  # no vLLM arm without a GPU
    for stage, key in HEADLINE.items():
        measured = figures["stages"][stage]
        assert measured[key] > 0, (stage, measured)
        assert measured["train_runtime_s"] > 0 and measured["steps"] > 0 and measured["wall_s"] > 0
        assert measured["peak_gpu_memory_gb"] is None  # on the CPU; torch.cuda.max_memory_allocated on a GPU
    assert figures["stages"]["sft"]["tokens"] > 0 and figures["stages"]["ppo"]["episodes"] == 16
    # The printed table names every stage.
    for stage in HEADLINE:
        assert f"| {stage} |" in result.stdout


def test_gpu_mode_without_a_gpu_fails_loudly(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = run_script("--gpu", "--out", str(out), timeout=120, CUDA_VISIBLE_DEVICES="")  # hides any GPU
    assert result.returncode != 0
    assert "needs a CUDA GPU" in result.stderr
    assert "FAILED" in result.stderr

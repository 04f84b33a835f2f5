"""A killed stage never leaves a finished-looking output, and a rerun resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.artifacts import atomic_output_dir, incomplete_dir, read_metrics
from tests.conftest import FAST_TRAINING, write_recipe


def test_atomic_output_dir_publishes_only_on_success(tmp_path):
    target = tmp_path / "out"
    try:
        with atomic_output_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed")
    except RuntimeError:
        pass
    assert not target.exists()
    with atomic_output_dir(target) as tmp:
        (tmp / "done.txt").write_text("done")
    assert (target / "done.txt").exists() and not incomplete_dir(target).exists()


def test_published_weights_are_readable_like_the_files_beside_them(tmp_path):
    import torch
    from safetensors.torch import save_file

    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")  # safetensors 0.8 creates it 0o600
        (tmp / "config.json").write_text("{}")
    assert (out / "model.safetensors").stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777


def test_killed_sft_leaves_no_output_and_rerun_resumes(tiny_checkpoint, tmp_path):
    out = tmp_path / "sft"
    recipe = write_recipe(
        tmp_path / "sft.yaml",
        stage="sft",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name="synthetic:sft",
        synthetic_num_examples=200,
        max_length=64,
        max_steps=400,
        output_dir=str(out),
        **{**FAST_TRAINING, "save_strategy": "steps", "save_steps": 5},
    )
    command = [sys.executable, "-m", "rlhf.stages.sft", str(recipe)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint_dir = incomplete_dir(out)
    deadline = time.time() + 240
    while time.time() < deadline and not list(checkpoint_dir.glob("checkpoint-*/trainer_state.json")):
        assert process.poll() is None, "the stage ended before it could be killed"
        time.sleep(0.5)
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists(), "a killed run must not leave a finished-looking output"
    checkpoints = sorted(checkpoint_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints

    # Rerun with the same command, shortened: it must pick up the last checkpoint, not start over.
    subprocess.run([*command, "--max_steps", str(int(checkpoints[-1].name.split("-")[1]) + 5)], env=env, check=True)
    metrics = read_metrics(out)
    assert metrics["resumed_from"] and Path(metrics["resumed_from"]).name.startswith("checkpoint-")
    assert not checkpoint_dir.exists()
    # train_loss covers the whole run, not only the steps after the resume.
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [(e["step"], e["loss"]) for e in history if "loss" in e]
    assert logged[0][0] <= int(Path(metrics["resumed_from"]).name.split("-")[1])  # logged before the kill
    steps = [0] + [step for step, _ in logged]
    expected = sum(loss * (step - steps[i]) for i, (step, loss) in enumerate(logged)) / steps[-1]
    assert metrics["train"]["train_loss"] == pytest.approx(expected)
    assert metrics["train_this_run"]["train_loss"] != pytest.approx(expected)


def test_a_checkpoint_killed_mid_write_is_never_resumed_from(tmp_path):
    from rlhf.artifacts import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "optimizer.pt").write_bytes(b"")  # killed before its state was written
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")

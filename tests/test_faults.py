"""Faults a long job meets on a shared machine: each promise provoked for real, on tiny models.

Foreign folders are never replaced, output paths stay where the user named them, one run writes an
output at a time (a second fails at once, a lock left by kill -9 is taken over), Ctrl-C, SIGTERM (a
scheduler's stop; to a stage, PPO or a pipeline) and a full disk end in one line with finished outputs
intact and the same command resumes, and a from-scratch initialisation is seeded.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from rlhf.artifacts import acquire_output_lock, atomic_output_dir, release_output_lock
from rlhf.config import RecipeError
from rlhf.entrypoint import run
from rlhf.pipeline import load_pipeline, run_pipeline
from rlhf.stages import pretrain, sft
from tests.conftest import FAST_TRAINING, write_recipe

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _sft_recipe(path: Path, checkpoint: Path, output: Path, **keys) -> Path:
    values = {
        "stage": "sft",
        "model_name_or_path": str(checkpoint),
        "dataset_name": "synthetic:sft",
        "synthetic_num_examples": 64,
        "max_length": 64,
        "max_steps": 4,
        "output_dir": str(output),
        **FAST_TRAINING,
    }
    return write_recipe(path, **{**values, **keys})


def test_a_stage_never_replaces_a_folder_it_did_not_write(tmp_path, tiny_checkpoint):
    mine = tmp_path / "my-files"
    (mine / "photos").mkdir(parents=True)
    (mine / "important.txt").write_text("keep me")
    recipe = _sft_recipe(tmp_path / "sft.yaml", tiny_checkpoint, mine)
    with pytest.raises(RecipeError, match="was not written by rlhf"):
        sft.main([str(recipe)])
    assert (mine / "important.txt").read_text() == "keep me" and (mine / "photos").is_dir()
    assert not (tmp_path / "my-files.incomplete").exists()
    for where in (".", "/", str(Path.home())):
        with pytest.raises(RecipeError, match="not a folder rlhf can write into"):
            sft.parse([str(recipe), "--output_dir", where])


def test_commands_refuse_a_foreign_output_folder_before_loading(tmp_path, tiny_checkpoint):
    from rlhf.compress.quantize import quantize
    from rlhf.export import export

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("mine")
    for command in (lambda: quantize(str(tiny_checkpoint), mine, "int8"), lambda: export(str(tiny_checkpoint), mine)):
        with pytest.raises(RecipeError, match="was not written by rlhf"):
            command()
    assert (mine / "notes.md").read_text() == "mine" and sorted(os.listdir(mine)) == ["notes.md"]


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", ".hidden"])
def test_pipeline_stage_names_cannot_leave_the_pipeline_folder(tmp_path, name):
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": [{"name": name, "command": "tiny-checkpoint"}]})
    )
    with pytest.raises(RecipeError, match="stage name"):
        load_pipeline(str(path))


def _hold_lock_in_another_process(output: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from rlhf.artifacts import acquire_output_lock; "
        f"acquire_output_lock({str(output)!r}); print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_one_run_per_output_folder_and_a_killed_holder_frees_it(tmp_path, tiny_checkpoint):
    out = tmp_path / "sft"
    recipe = _sft_recipe(tmp_path / "sft.yaml", tiny_checkpoint, out)
    holder = _hold_lock_in_another_process(out)
    try:
        started = time.time()
        with pytest.raises(RecipeError, match=f"being written by another run \\(pid {holder.pid} "):
            sft.main([str(recipe)])
        assert time.time() - started < 60  # fails at once, does not wait for the holder
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without releasing: its lock is stale, and the next run takes it over.
    sft.main([str(recipe)])
    assert (out / "model.safetensors").exists()
    acquire_output_lock(out)  # free again after the stage finished
    release_output_lock(out)


def test_two_pipelines_on_one_folder_the_second_fails_at_once(tmp_path):
    path = tmp_path / "pipeline.yaml"
    out = tmp_path / "out"
    path.write_text(
        yaml.safe_dump({"output_dir": str(out), "stages": [{"name": "base", "command": "tiny-checkpoint"}]})
    )
    holder = _hold_lock_in_another_process(out / ".pipeline")
    try:
        with pytest.raises(RecipeError, match="being written by another run"):
            run_pipeline(load_pipeline(str(path)))
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "base").exists()


def _default_signals() -> None:
    """In the child, before exec: Ctrl-C and SIGTERM act as in a terminal even when pytest runs as a background
    job, which POSIX shells start with SIGINT ignored (an ignored signal stays ignored across exec)."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_DFL)


def _signal_after_first_checkpoint(command: list[str], incomplete: Path, number: int) -> tuple[int, str]:
    """Start `command`, send it signal `number` once `incomplete` holds a complete checkpoint; (exit code, stderr)."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=_default_signals
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(incomplete.glob("checkpoint-*/trainer_state.json")):
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.2)
        process.send_signal(number)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:  # never leave a stage training after a failed test
            process.kill()
            process.wait()
    return process.returncode, stderr


def _stopped_line(stderr: str, received: str) -> Path:
    """Check that a stopped run ended in one line naming what it received; return the checkpoint that line names."""
    assert "Traceback" not in stderr, stderr
    line = stderr.strip().splitlines()[-1]
    start = f"{received}: finished outputs are intact; run the same command again to resume from "
    assert line.startswith(start) and line.endswith("."), stderr
    checkpoint = Path(line.removeprefix(start).removesuffix("."))
    assert (checkpoint / "trainer_state.json").is_file(), line
    return checkpoint


@pytest.mark.parametrize(
    ("number", "received", "code"),
    [(signal.SIGINT, "interrupted", 130), (signal.SIGTERM, "stopped by SIGTERM", 143)],
    ids=["ctrl-c", "sigterm"],
)
def test_ctrl_c_and_sigterm_end_in_one_line_and_the_same_command_resumes(
    number, received, code, tmp_path, tiny_checkpoint
):
    out = tmp_path / "sft"
    recipe = _sft_recipe(
        tmp_path / "sft.yaml", tiny_checkpoint, out, max_steps=400, save_strategy="steps", save_steps=5
    )
    command = [sys.executable, "-m", "rlhf.stages.sft", str(recipe)]
    returncode, stderr = _signal_after_first_checkpoint(command, tmp_path / "sft.incomplete", number)
    assert returncode == code
    checkpoint = _stopped_line(stderr, received)
    assert not out.exists()

    resumed = subprocess.run([*command, "--max_steps", "12"], capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert yaml.safe_load((out / "metrics.json").read_text())["resumed_from"] == str(checkpoint)


def test_sigterm_stops_ppo_with_its_checkpoint_kept_and_the_same_command_resumes(tmp_path, tiny_checkpoint):
    out = tmp_path / "ppo"
    recipe = write_recipe(
        tmp_path / "ppo.yaml",
        stage="ppo",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name="synthetic:prompts",
        synthetic_num_examples=64,
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        max_eval_samples=8,
        num_ppo_epochs=1,
        response_length=6,
        max_steps=200,
        output_dir=str(out),
        **{**FAST_TRAINING, "per_device_train_batch_size": 4, "save_strategy": "steps", "save_steps": 1},
    )
    command = [sys.executable, "-m", "rlhf.stages.ppo", str(recipe)]
    returncode, stderr = _signal_after_first_checkpoint(command, tmp_path / "ppo.incomplete", signal.SIGTERM)
    assert returncode == 143
    checkpoint = _stopped_line(stderr, "stopped by SIGTERM")
    assert not out.exists()

    step = int(checkpoint.name.split("-")[-1])
    resumed = subprocess.run(
        [*command, "--max_steps", str(step + 2)], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    metrics = yaml.safe_load((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(checkpoint) and metrics["train"]["train_updates"] == step + 2


def test_sigterm_to_a_pipeline_stops_the_stage_it_launched_and_the_same_command_resumes(tmp_path):
    """SIGTERM to the pipeline's pid alone (a container's PID 1, `kill PID`) reaches the stage that
    `accelerate launch` started; the stage keeps its checkpoint and the same pipeline command resumes it."""
    wired = Path("wired-by-pipeline")
    sft_recipe = _sft_recipe(tmp_path / "sft.yaml", wired, wired, max_steps=40, save_strategy="steps", save_steps=1)
    pipeline = {
        "output_dir": str(tmp_path / "out"),
        "accelerate_config": str(Path(__file__).resolve().parents[1] / "accelerate_configs" / "cpu.yaml"),
        "stages": [
            {"name": "base", "command": "tiny-checkpoint", "args": {"hidden_size": 32, "num_layers": 1}},
            {"name": "sft", "recipe": str(sft_recipe), "inputs": {"model_name_or_path": "base"}},
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    command = [sys.executable, "-m", "rlhf.pipeline", str(path)]
    returncode, stderr = _signal_after_first_checkpoint(command, tmp_path / "out" / "sft.incomplete", signal.SIGTERM)
    assert returncode == 143
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM: ")
    stage_line = [line for line in stderr.splitlines() if line.startswith("stopped by SIGTERM: ")][0]
    checkpoint = _stopped_line(stage_line, "stopped by SIGTERM")  # the stage's own line names its checkpoint
    assert not (tmp_path / "out" / "sft").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    metrics = yaml.safe_load((tmp_path / "out" / "sft" / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(checkpoint)


def test_a_full_disk_ends_in_one_line_and_the_finished_output_stays(tmp_path, capsys):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "weights.txt").write_text("finished")

    def write_more(argv: list[str] | None) -> None:
        with atomic_output_dir(out) as tmp:
            (tmp / "weights.txt").symlink_to("/dev/full")  # every write to it fails with ENOSPC
            with open(tmp / "weights.txt", "w") as handle:
                handle.write("x" * 2**16)
                handle.flush()

    with pytest.raises(SystemExit) as exit_info:
        run(write_more, [])
    assert exit_info.value.code == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: the disk is full") and len(message.splitlines()) == 1
    assert (out / "weights.txt").read_text() == "finished"
    assert not (tmp_path / "out.incomplete").exists()


def test_from_scratch_initialisation_is_seeded(tmp_path, tiny_checkpoint):
    weights = []
    for run_name in ("first", "second"):
        recipe = write_recipe(
            tmp_path / f"{run_name}.yaml",
            stage="pretrain",
            model_name_or_path=str(tiny_checkpoint),
            from_scratch=True,
            dataset_name="synthetic:pretrain",
            synthetic_num_examples=64,
            max_length=64,
            max_steps=2,
            output_dir=str(tmp_path / run_name),
            **FAST_TRAINING,
        )
        pretrain.main([str(recipe)])
        weights.append(load_file(tmp_path / run_name / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][name] == weights[1][name]).all() for name in weights[0])


KILL_RESUME_STAGES = {
    "reward": {"dataset_name": "synthetic:preference", "max_length": 64, "reward_stats_samples": 16},
    "dpo": {"dataset_name": "synthetic:preference", "max_length": 64},
    "grpo": {
        "dataset_name": "synthetic:prompts",
        "reward_funcs": ["rlhf.data.synthetic:rule_reward"],
        "num_generations": 4,
        "max_completion_length": 8,
    },
}


@pytest.mark.parametrize("stage", sorted(KILL_RESUME_STAGES))
def test_kill_9_then_the_same_command_gives_the_uninterrupted_weights(stage, tmp_path, tiny_sft_checkpoint):
    """SIGKILL after the first checkpoint, rerun: the final weights equal an uninterrupted run's."""
    recipes = {
        run_name: write_recipe(
            tmp_path / f"{run_name}.yaml",
            stage=stage,
            model_name_or_path=str(tiny_sft_checkpoint),
            synthetic_num_examples=160,
            max_eval_samples=8,
            eval_strategy="no",
            max_steps=16,
            output_dir=str(tmp_path / run_name),
            **{**FAST_TRAINING, "save_strategy": "steps", "save_steps": 2},
            **KILL_RESUME_STAGES[stage],
        )
        for run_name in ("uninterrupted", "killed")
    }
    # The reference runs in this process (one interpreter start fewer); the killed run is the command, twice.
    importlib.import_module(f"rlhf.stages.{stage}").main([str(recipes["uninterrupted"])])
    command = [sys.executable, "-m", f"rlhf.stages.{stage}", str(recipes["killed"])]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob("killed.incomplete/checkpoint-*/trainer_state.json")):
        assert process.poll() is None, "the stage ended before it could be killed"
        time.sleep(0.1)
    process.kill()
    process.wait()
    assert not (tmp_path / "killed").exists()
    subprocess.run(command, stdout=subprocess.DEVNULL, env=ENV, check=True, timeout=600)
    outputs = {run_name: load_file(tmp_path / run_name / "model.safetensors") for run_name in recipes}
    assert yaml.safe_load((tmp_path / "killed" / "metrics.json").read_text())["resumed_from"]
    for name, tensor in outputs["uninterrupted"].items():
        assert (outputs["killed"][name] == tensor).all(), f"{stage}: {name} differs after kill -9 and resume"

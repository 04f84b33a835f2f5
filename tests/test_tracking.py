"""`report_to: tensorboard`: every stage's logs land in `<output_dir>/runs/`, read back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf.publish import files_to_upload, skipped_files
from rlhf.stages import grpo, ppo, sft
from tests.conftest import FAST_TRAINING, write_recipe

TRACKED = {**FAST_TRAINING, "report_to": "tensorboard", "logging_steps": 1}


def _events(output: Path) -> EventAccumulator:
    """The run's TensorBoard events (one run folder: `runs/<time>_<host>/`), everything kept."""
    (run,) = (output / "runs").iterdir()
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _scalars(events: EventAccumulator, tag: str) -> list[float]:
    return [event.value for event in events.Scalars(tag)]


def test_sft_logs_its_loss_to_tensorboard(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # The evaluation before training logs before the TensorBoard callback's on_train_begin: its writer
    # must still open under the output folder, never as ./runs in the working directory.
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sft"
    recipe = write_recipe(
        tmp_path / "sft.yaml",
        stage="sft",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name="synthetic:sft",
        synthetic_num_examples=32,
        max_length=64,
        max_steps=3,
        output_dir=str(out),
        **TRACKED,
    )
    sft.main([str(recipe)])
    events = _events(out)
    assert len(_scalars(events, "train/loss")) == 3, events.Tags()["scalars"]
    assert _scalars(events, "eval/loss") and not (tmp_path / "runs").exists()
    # The event files stay local: publishing uploads only the allow-listed model files.
    assert any(name.startswith("runs/") for name in skipped_files(out))
    assert not any(name.startswith("runs/") for name in files_to_upload(out))


def test_grpo_logs_loss_reward_kl_and_a_completions_table(tiny_checkpoint: Path, tmp_path: Path):
    out = tmp_path / "grpo"
    recipe = write_recipe(
        tmp_path / "grpo.yaml",
        stage="grpo",
        model_name_or_path=str(tiny_checkpoint),
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        dataset_name="synthetic:prompts",
        synthetic_num_examples=32,
        max_steps=2,
        num_generations=4,
        max_completion_length=8,
        beta=0.05,  # TRL computes (and logs) the KL only with a KL penalty
        completions_table_rows=4,
        output_dir=str(out),
        **TRACKED,
    )
    grpo.main([str(recipe)])
    events = _events(out)
    scalars = events.Tags()["scalars"]
    for tag in ("train/loss", "train/reward", "train/kl", "train/rewards/rule_reward/mean"):
        assert len(_scalars(events, tag)) == 2, (tag, scalars)
    (table_tag,) = [tag for tag in events.Tags()["tensors"] if tag.startswith("completions")]
    tables = events.Tensors(table_tag)
    assert [t.step for t in tables] == [1, 2]
    text = tables[-1].tensor_proto.string_val[0].decode()
    header, rule, *rows = text.splitlines()
    assert header == "| prompt | response | rule_reward | advantage |" and len(rows) == 4, text


def test_ppo_logs_losses_reward_kl_and_a_completions_table(tiny_checkpoint: Path, tmp_path: Path):
    out = tmp_path / "ppo"
    recipe = write_recipe(
        tmp_path / "ppo.yaml",
        stage="ppo",
        model_name_or_path=str(tiny_checkpoint),
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        dataset_name="synthetic:prompts",
        synthetic_num_examples=32,
        max_eval_samples=0,
        max_steps=2,
        num_ppo_epochs=1,
        response_length=8,
        completions_table_rows=4,
        output_dir=str(out),
        **TRACKED,
    )
    ppo.main([str(recipe)])
    events = _events(out)
    scalars = events.Tags()["scalars"]
    for tag in (
        "train/loss/policy_avg",
        "train/loss/value_avg",
        "train/objective/scores",
        "train/objective/kl",
        "train/reward/rule_reward",
    ):
        assert len(_scalars(events, tag)) == 2, (tag, scalars)
    (table_tag,) = [tag for tag in events.Tags()["tensors"] if tag.startswith("completions")]
    tables = events.Tensors(table_tag)
    assert [t.step for t in tables] == [1, 2]
    text = tables[-1].tensor_proto.string_val[0].decode()
    header, rule, *rows = text.splitlines()
    # PPO's advantages are per token: the table shows each reward source's score of the whole response.
    assert header == "| prompt | response | rule_reward |" and len(rows) == 4, text

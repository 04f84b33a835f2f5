"""Bad numbers: a reward source that returns NaN, ±inf or a huge value, and a loss or gradient that blows up.

Each case stops with one line naming what went wrong (and publishes nothing), or, where the recipe
asks, skips or clips and says so in the logs and metrics.json. A model with NaN/inf weights is never
published as a finished stage.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from rlhf.artifacts import finish_stage, incomplete_dir, read_metrics, start_stage
from rlhf.config import DataArguments, ModelArguments, Recipe, RecipeError
from rlhf.entrypoint import run
from rlhf.rewards import RewardGuard
from rlhf.stages import dpo, grpo, ppo, rloo
from tests.conftest import FAST_TRAINING, write_recipe
from tests.test_grpo import ONLINE
from tests.test_ppo import PPO_FAST

# ---- reward functions with bad values for every fourth completion --------------------------------


def _polite(completions: list) -> list[float]:
    return [float("sorry" in c[0]["content"].lower()) for c in completions]


def _every_fourth(bad: float | None, completions: list) -> list[float | None]:
    return [bad if i % 4 == 0 else value for i, value in enumerate(_polite(completions))]


def nan_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    return _every_fourth(float("nan"), completions)


def inf_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    return _every_fourth(float("inf"), completions)


def huge_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    return _every_fourth(1e9, completions)


def huge_or_none_reward(prompts: list, completions: list, **kwargs) -> list[float | None]:
    """1e9 for every fourth completion, None ("no reward here", which TRL allows) for the one after it."""
    values = _every_fourth(1e9, completions)
    return [None if i % 4 == 1 else value for i, value in enumerate(values)]


def polite_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    return _polite(completions)


def alternating_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """1 for every other completion: every group has a spread, so the first step has a gradient whatever
    the model says."""
    return [float(i % 2) for i in range(len(completions))]


def _finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())


# ---- the checks on their own ----------------------------------------------------------------------


def test_reward_guard_stops_skips_clips_and_lets_none_pass():
    values = torch.tensor([[1.0, 0.5], [float("nan"), 0.5], [2e9, float("-inf")], [float("nan"), -3e9]])
    missing = torch.tensor([[0, 0], [0, 0], [0, 0], [1, 0]], dtype=torch.bool)  # row 3: the model gave None
    with pytest.raises(RecipeError, match=r"reward source rm returned nan at update 7 \(1 of 4 samples\)"):
        RewardGuard(["rm", "f"], "stop").check(values, missing, "update 7")

    guard = RewardGuard(["rm", "f"], "skip", max_abs_reward=100.0)
    checked, skipped = guard.check(values, missing, "update 7")
    assert skipped.tolist() == [False, True, True, False]  # the None in row 3 is not a bad number
    assert checked[0].tolist() == [1.0, 0.5] and checked[2, 0] == 100.0 and checked[3, 1] == -100.0
    assert torch.isnan(checked[1, 0]) and torch.isnan(checked[2, 1]) and torch.isnan(checked[3, 0])
    assert guard.summary()["skipped_samples"] == 2
    assert guard.nonfinite == {"rm": 1, "f": 1} and guard.clipped == {"rm": 1, "f": 1}
    guard.check(values, missing, "evaluation", record=False)  # evaluation is not counted
    assert guard.summary()["skipped_samples"] == 2


# ---- PPO --------------------------------------------------------------------------------------------

PPO_SHORT = {
    **PPO_FAST,
    "synthetic_num_examples": 64,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "num_ppo_epochs": 1,
    "response_length": 8,
    "max_steps": 2,
    "max_eval_samples": 0,  # no evaluation: the checks during training are what these tests look at
}


def _ppo(tmp_path: Path, checkpoint: Path, **keys) -> Path:
    out = tmp_path / "ppo"
    recipe = write_recipe(
        tmp_path / "ppo.yaml",
        stage="ppo",
        model_name_or_path=str(checkpoint),
        output_dir=str(out),
        **{**PPO_SHORT, **keys},
    )
    ppo.main([str(recipe)])
    return out


def test_ppo_stops_on_a_nan_reward_naming_source_update_and_value(tiny_sft_checkpoint: Path, tmp_path: Path):
    # Before: the NaN became a reward of 0 and the run finished as if nothing happened.
    with pytest.raises(RecipeError, match=r"reward source tests.test_bad_numbers:nan_reward returned nan at update 1"):
        _ppo(tmp_path, tiny_sft_checkpoint, reward_funcs=["tests.test_bad_numbers:nan_reward"])
    assert not (tmp_path / "ppo").exists() and incomplete_dir(tmp_path / "ppo").is_dir()


def test_ppo_skips_inf_rewards_and_counts_them(tiny_sft_checkpoint: Path, tmp_path: Path):
    # Before: +inf made the losses NaN (logged beside health/ok 1), then the next update crashed.
    out = _ppo(
        tmp_path,
        tiny_sft_checkpoint,
        reward_funcs=["tests.test_bad_numbers:inf_reward"],
        nonfinite_rewards="skip",
        max_eval_samples=8,
    )
    metrics = read_metrics(out)
    checks = metrics["reward_checks"]
    assert checks["skipped_samples"] == 4 and checks["nonfinite"] == {"tests.test_bad_numbers:inf_reward": 4}
    assert metrics["eval"]["eval_rewards_skipped"] == 2
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["reward/skipped"] for entry in history] == [2, 2]
    assert all(entry["health/ok"] == 1 and entry["loss/value_avg"] < 10 for entry in history)
    assert _finite(out)


def test_ppo_clips_a_huge_reward_and_says_so_once(
    tiny_sft_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    # Before: 1e9 went into the value loss unannounced (1e17).
    with caplog.at_level(logging.WARNING, logger="rlhf.rewards"):
        out = _ppo(tmp_path, tiny_sft_checkpoint, reward_funcs=["tests.test_bad_numbers:huge_reward"])
    warnings = [r.getMessage() for r in caplog.records if "max_abs_reward" in r.getMessage()]
    assert len(warnings) == 1 and "returned 1e+09 at update 1" in warnings[0], warnings
    metrics = read_metrics(out)
    assert metrics["reward_checks"]["clipped"] == {"tests.test_bad_numbers:huge_reward": 4}
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert max(entry["reward/huge_reward"] for entry in history) <= 1e4  # clipped to the bound


def test_ppo_stops_cleanly_when_its_weights_blow_up(tiny_sft_checkpoint: Path, tmp_path: Path):
    # learning_rate 1e8: update 1 breaks the weights; before, update 2 crashed in sampling with a traceback.
    with pytest.raises(RecipeError, match=r"training diverged at update 2 .*checkpoint-1"):
        _ppo(
            tmp_path,
            tiny_sft_checkpoint,
            reward_funcs=["tests.test_bad_numbers:polite_reward"],
            learning_rate=1e8,
            save_strategy="steps",
            save_steps=1,
            health_action="stop",
        )
    incomplete = incomplete_dir(tmp_path / "ppo")
    assert not (tmp_path / "ppo").exists()
    assert sorted(p.name for p in incomplete.glob("checkpoint-*")) == ["checkpoint-1"]


# ---- GRPO and RLOO ------------------------------------------------------------------------------------


def _online(module, tmp_path: Path, checkpoint: Path, **keys) -> Path:
    """Run the GRPO or RLOO stage module on ONLINE settings plus `keys`; its output folder."""
    stage = module.__name__.rsplit(".", 1)[-1]
    out = tmp_path / stage
    recipe = write_recipe(
        tmp_path / f"{stage}.yaml",
        stage=stage,
        model_name_or_path=str(checkpoint),
        output_dir=str(out),
        **{**ONLINE, **keys},
    )
    module.main([str(recipe)])
    return out


def test_grpo_stops_on_an_inf_reward(tiny_sft_checkpoint: Path, tmp_path: Path):
    # Before: +inf gave every advantage NaN → 0; GRPO trained nothing and published the start model.
    with pytest.raises(RecipeError, match=r"tests.test_bad_numbers:inf_reward returned inf at step 1 \(2 of 8"):
        _online(grpo, tmp_path, tiny_sft_checkpoint, reward_funcs=["tests.test_bad_numbers:inf_reward"])
    assert not (tmp_path / "grpo").exists()


def test_grpo_clips_a_huge_reward_and_lets_none_pass(tiny_sft_checkpoint: Path, tmp_path: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="rlhf.rewards"):
        out = _online(grpo, tmp_path, tiny_sft_checkpoint, reward_funcs=["tests.test_bad_numbers:huge_or_none_reward"])
    assert len([r for r in caplog.records if "max_abs_reward" in r.getMessage()]) == 1
    checks = read_metrics(out)["reward_checks"]
    assert checks["skipped_samples"] == 0 and checks["clipped"] == {"tests.test_bad_numbers:huge_or_none_reward": 4}


def test_rloo_skips_nan_rewards_and_still_trains(tiny_sft_checkpoint: Path, tmp_path: Path):
    out = _online(
        rloo,
        tmp_path,
        tiny_sft_checkpoint,
        reward_funcs=["tests.test_bad_numbers:nan_reward"],
        nonfinite_rewards="skip",
    )
    metrics = read_metrics(out)
    assert metrics["reward_checks"]["skipped_samples"] == 4
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["rewards/skipped"] for entry in history if "loss" in entry] == [2, 2]
    assert _finite(out)
    name = "model.layers.0.self_attn.q_proj.weight"
    start = AutoModelForCausalLM.from_pretrained(tiny_sft_checkpoint).state_dict()[name]
    assert not torch.equal(AutoModelForCausalLM.from_pretrained(out).state_dict()[name], start)


def test_rloo_gradient_norm_alarm_stops_at_the_first_step(tiny_sft_checkpoint: Path, tmp_path: Path):
    with pytest.raises(RecipeError, match=r"diverged at step 1 \(gradient norm .* > max_grad_norm_alarm 1e-06\)"):
        _online(
            rloo,
            tmp_path,
            tiny_sft_checkpoint,
            reward_funcs=["tests.test_bad_numbers:alternating_reward"],
            max_grad_norm_alarm=1e-6,
            max_steps=1,
        )
    assert not (tmp_path / "rloo").exists()


# ---- DPO and the last guard ------------------------------------------------------------------------


def test_dpo_nan_ends_in_one_line_and_keeps_the_last_good_checkpoint(
    tiny_sft_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    # learning_rate 1e8: step 1 is finite, step 2's gradients are NaN. Before, DPO published the NaN model.
    out = tmp_path / "dpo"
    recipe = write_recipe(
        tmp_path / "dpo.yaml",
        stage="dpo",
        model_name_or_path=str(tiny_sft_checkpoint),
        dataset_name="synthetic:preference",
        synthetic_num_examples=32,
        max_eval_samples=8,
        max_length=64,
        max_steps=4,
        learning_rate=1e8,
        output_dir=str(out),
        **{**FAST_TRAINING, "per_device_train_batch_size": 4, "logging_steps": 1, "save_strategy": "steps"},
        save_steps=1,
    )
    with pytest.raises(SystemExit) as exit_info:
        run(dpo.main, [str(recipe)])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "Traceback" not in stderr
    assert "training diverged at step 2" in error_lines[0] and "checkpoint-1" in error_lines[0], error_lines
    assert "learning_rate (now 1e+08)" in error_lines[0]
    assert not out.exists()
    kept = incomplete_dir(out)
    assert sorted(p.name for p in kept.glob("checkpoint-*")) == ["checkpoint-1"]
    assert _finite(kept / "checkpoint-1")


def test_finish_stage_refuses_to_publish_nan_weights(tiny_checkpoint: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = TrainingArguments(output_dir=str(out), report_to="none", use_cpu=True)
    recipe = Recipe("sft", ModelArguments(model_name_or_path=str(tiny_checkpoint)), DataArguments(), args)
    final, _ = start_stage(args)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    trainer = Trainer(model=model, args=args)
    with pytest.raises(RecipeError, match=r"NaN/inf weights \(model.safetensors: model.layers.0.mlp.up_proj.weight\)"):
        finish_stage(trainer, recipe, {}, final)
    assert not out.exists() and incomplete_dir(out).is_dir()

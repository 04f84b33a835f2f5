"""The GRPO and RLOO stages train on sampled completions scored by a reward model and/or reward functions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.artifacts import incomplete_dir, read_metrics
from rlhf.config import RecipeError
from rlhf.stages import grpo, rloo
from tests.conftest import FAST_TRAINING, write_recipe

ONLINE = {
    **FAST_TRAINING,
    "dataset_name": "synthetic:prompts",
    "synthetic_num_examples": 64,
    "max_steps": 2,
    "num_generations": 4,
    "per_device_train_batch_size": 8,
    "max_completion_length": 12,
    "learning_rate": 1e-3,
    "logging_steps": 1,
}


def _moved(output: Path, start: Path) -> bool:
    name = "model.layers.0.self_attn.q_proj.weight"
    trained = AutoModelForCausalLM.from_pretrained(output).state_dict()[name]
    return not torch.allclose(trained, AutoModelForCausalLM.from_pretrained(start).state_dict()[name])


def test_grpo_with_reward_model_and_rule_function(
    tiny_sft_checkpoint: Path, tiny_reward_checkpoint: Path, tmp_path: Path
):
    out = tmp_path / "grpo"
    recipe = write_recipe(
        tmp_path / "grpo.yaml",
        stage="grpo",
        model_name_or_path=str(tiny_sft_checkpoint),
        reward_model_path=str(tiny_reward_checkpoint),
        reward_min_accuracy=0.6,
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        reward_weights=[0.5, 1.0],
        beta=0.02,
        output_dir=str(out),
        **ONLINE,
    )
    grpo.main([str(recipe)])
    assert _moved(out, tiny_sft_checkpoint)
    logged = read_metrics(out)
    history = (out / "trainer_state.json").read_text()
    assert "rewards/rule_reward/mean" in history and "rewards/reward/mean" in history, logged


def test_rloo_with_a_rule_function(tiny_sft_checkpoint: Path, tmp_path: Path):
    out = tmp_path / "rloo"
    recipe = write_recipe(
        tmp_path / "rloo.yaml",
        stage="rloo",
        model_name_or_path=str(tiny_sft_checkpoint),
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        output_dir=str(out),
        **ONLINE,
    )
    rloo.main([str(recipe)])
    assert _moved(out, tiny_sft_checkpoint)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"reward_funcs": ["rlhf.data.synthetic:no_such_reward"]}, "has no function 'no_such_reward'"),
        ({"reward_funcs": ["no_such_package.rewards:f"]}, "cannot import module"),
        ({}, "no reward source"),
        ({"reward_funcs": ["rlhf.data.synthetic:rule_reward"], "reward_weights": [1.0, 2.0]}, "2 weights for 1"),
        ({"reward_funcs": ["rlhf.data.synthetic:rule_reward"], "max_abs_reward": 0}, "max_abs_reward: got 0"),
    ],
)
def test_bad_reward_sources_fail_before_the_model_loads(tiny_checkpoint: Path, tmp_path: Path, keys, message):
    out = tmp_path / "grpo"
    recipe = write_recipe(
        tmp_path / "grpo.yaml",
        stage="grpo",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name="synthetic:prompts",
        output_dir=str(out),
        **keys,
    )
    with pytest.raises(RecipeError, match=message):
        grpo.main([str(recipe)])
    assert not incomplete_dir(out).exists() and not out.exists()


def test_reward_model_below_min_accuracy_is_refused(tiny_checkpoint: Path, tiny_reward_checkpoint: Path, tmp_path):
    recipe = write_recipe(
        tmp_path / "rloo.yaml",
        stage="rloo",
        model_name_or_path=str(tiny_checkpoint),
        reward_model_path=str(tiny_reward_checkpoint),
        reward_min_accuracy=1.01,
        dataset_name="synthetic:prompts",
        output_dir=str(tmp_path / "rloo"),
    )
    with pytest.raises(RecipeError, match="reward_min_accuracy"):
        rloo.main([str(recipe)])

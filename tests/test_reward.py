"""The reward stage trains a scalar-head model that ranks preferred answers higher; the quality gate reads its metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
from trl import ModelConfig

from rlhf.artifacts import read_metrics
from rlhf.config import RecipeError
from rlhf.modeling import load_sequence_classifier
from rlhf.stages import reward
from rlhf.stages.reward import check_reward_quality
from tests.conftest import FAST_TRAINING, write_recipe


def test_reward_model_beats_chance_and_reloads(tiny_reward_checkpoint: Path):
    metrics = read_metrics(tiny_reward_checkpoint)
    assert metrics["accuracy"] >= 0.7, metrics
    assert metrics["margin"] > 0
    assert metrics["reward_stats"]["std"] > 0 and math.isfinite(metrics["reward_stats"]["mean"])
    assert metrics["eval"]["eval_accuracy"] > metrics["eval_before"]["eval_accuracy"]  # TRL keeps its eval_ prefix

    # The saved checkpoint is the trained one: reloaded plainly, it reproduces the recorded held-out accuracy.
    from datasets import load_dataset

    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_checkpoint)
    pairs = load_dataset("json", data_files=str(tiny_reward_checkpoint.parent / "test.jsonl"), split="train")
    pairs = pairs.select(range(metrics["eval_pairs"]))
    chosen = [tokenizer.apply_chat_template(r["prompt"] + r["chosen"], return_dict=True)["input_ids"] for r in pairs]
    rejected = [
        tokenizer.apply_chat_template(r["prompt"] + r["rejected"], return_dict=True)["input_ids"] for r in pairs
    ]
    pad_id = tokenizer.pad_token_id
    accuracy = (
        (reward.score_token_ids(model, chosen, pad_id) > reward.score_token_ids(model, rejected, pad_id)).float().mean()
    )
    assert accuracy.item() == pytest.approx(metrics["accuracy"], abs=1e-6)


def test_quality_gate_raises_below_threshold_and_passes_above(tiny_reward_checkpoint: Path):
    accuracy = read_metrics(tiny_reward_checkpoint)["accuracy"]
    assert check_reward_quality(str(tiny_reward_checkpoint), accuracy - 0.01) == pytest.approx(accuracy)
    with pytest.raises(RecipeError, match=r"reward model accuracy .* < min .*reward_min_accuracy"):
        check_reward_quality(str(tiny_reward_checkpoint), accuracy + 0.01)


def test_quality_gate_refuses_a_checkpoint_without_recorded_accuracy(tiny_sft_checkpoint: Path):
    with pytest.raises(RecipeError, match="no held-out accuracy"):
        check_reward_quality(str(tiny_sft_checkpoint), 0.9)
    assert math.isnan(check_reward_quality(str(tiny_sft_checkpoint), 0.0))


def test_lora_reward_model_is_merged_with_a_trained_score_head(tiny_sft_checkpoint: Path, tmp_path: Path):
    out = tmp_path / "lora-reward"
    recipe = write_recipe(
        tmp_path / "reward.yaml",
        stage="reward",
        model_name_or_path=str(tiny_sft_checkpoint),
        dataset_name="synthetic:preference",
        synthetic_num_examples=64,
        max_eval_samples=16,
        max_length=64,
        max_steps=4,
        learning_rate=1e-2,
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        reward_stats_samples=16,
        output_dir=str(out),
        **FAST_TRAINING,
    )
    reward.main([str(recipe)])

    assert not (out / "adapter_config.json").exists()  # merged: a plain checkpoint
    trained = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    set_seed(FAST_TRAINING["seed"])  # the stage seeds the new head the same way before loading
    initial = load_sequence_classifier(ModelConfig(model_name_or_path=str(tiny_sft_checkpoint)), tokenizer)
    assert not torch.allclose(trained.score.weight, initial.score.weight)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(trained.state_dict()[q_proj], initial.state_dict()[q_proj])  # LoRA delta merged
    assert "reward_stats" in read_metrics(out)

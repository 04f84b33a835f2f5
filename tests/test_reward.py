"""The reward stage trains a scalar-head model that ranks preferred answers higher; the quality gate reads its metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
from trl import ModelConfig, RewardConfig, RewardTrainer

from rlhf.artifacts import read_metrics
from rlhf.config import RecipeError
from rlhf.modeling import load_sequence_classifier
from rlhf.rewards import (
    check_reward_quality,
    reward_model_input_ids,
    reward_model_record,
    reward_model_scores,
    score_token_ids,
)
from rlhf.stages import reward
from tests.conftest import FAST_TRAINING, write_recipe


def test_reward_model_beats_chance_and_reloads(tiny_reward_checkpoint: Path):
    metrics = read_metrics(tiny_reward_checkpoint)
    assert metrics["accuracy"] >= 0.7, metrics
    assert metrics["margin"] > 0
    assert metrics["reward_stats"]["std"] > 0 and math.isfinite(metrics["reward_stats"]["mean"])
    assert metrics["eval"]["eval_accuracy"] > metrics["eval_before"]["eval_accuracy"]  # TRL keeps its eval_ prefix
    assert "resumed_from" in metrics and metrics["resumed_from"] is None  # recorded like every other stage

    # The saved checkpoint is the trained one: reloaded plainly, it reproduces the recorded held-out accuracy.
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_checkpoint)
    pairs = load_dataset("json", data_files=str(tiny_reward_checkpoint.parent / "test.jsonl"), split="train")
    pairs = pairs.select(range(metrics["eval_pairs"]))
    chosen = [tokenizer.apply_chat_template(r["prompt"] + r["chosen"], return_dict=True)["input_ids"] for r in pairs]
    rejected = [
        tokenizer.apply_chat_template(r["prompt"] + r["rejected"], return_dict=True)["input_ids"] for r in pairs
    ]
    pad_id = tokenizer.pad_token_id
    chosen_scores, rejected_scores = score_token_ids(model, chosen, pad_id), score_token_ids(model, rejected, pad_id)
    assert (chosen_scores > rejected_scores).float().mean().item() == pytest.approx(metrics["accuracy"], abs=1e-6)

    # PPO and evaluation score (prompt, completion text) through the same path: the same scores
    # (up to float noise from another batch's padding).
    prompts = [r["prompt"] for r in pairs]
    texts = [r["chosen"][-1]["content"] for r in pairs]
    assert torch.allclose(reward_model_scores(model, tokenizer, prompts, texts, batch_size=7), chosen_scores, atol=1e-5)


def test_quality_gate_raises_below_threshold_and_passes_above(tiny_reward_checkpoint: Path):
    accuracy = read_metrics(tiny_reward_checkpoint)["accuracy"]
    assert check_reward_quality(str(tiny_reward_checkpoint), accuracy - 0.01) == pytest.approx(accuracy)
    with pytest.raises(RecipeError, match=r"reward model accuracy .* < min .*reward_min_accuracy"):
        check_reward_quality(str(tiny_reward_checkpoint), accuracy + 0.01)


def test_quality_gate_refuses_a_checkpoint_without_recorded_accuracy(tiny_sft_checkpoint: Path, tiny_checkpoint: Path):
    # An SFT output has a metrics.json without accuracy; the base checkpoint has no metrics.json at all.
    for checkpoint in (tiny_sft_checkpoint, tiny_checkpoint):
        with pytest.raises(RecipeError, match="no held-out accuracy"):
            check_reward_quality(str(checkpoint), 0.9)
        assert math.isnan(check_reward_quality(str(checkpoint), 0.0))
        assert reward_model_record(str(checkpoint)).stats is None


@pytest.mark.parametrize("conversational", [True, False])
def test_scoring_tokenises_as_reward_trainer_did(tiny_checkpoint: Path, tmp_path: Path, conversational: bool):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=1)
    examples = [("What color is the zorp?", "The zorp is blue."), ("Hi there!", "Hello! How can I help you")]
    if conversational:
        rows = [
            {
                "prompt": [{"role": "user", "content": p}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": "No."}],
            }
            for p, c in examples
        ]
    else:
        rows = [{"prompt": p, "chosen": " " + c, "rejected": " No."} for p, c in examples]
    args = RewardConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,  # TRL defaults the deprecated gradient_checkpointing to True
        max_length=None,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    for row, trained_ids in zip(rows, trainer.train_dataset["chosen_ids"]):
        text = row["chosen"][-1]["content"] if conversational else row["chosen"]
        assert reward_model_input_ids(tokenizer, row["prompt"], text) == trained_ids


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

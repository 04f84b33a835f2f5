"""The DPO stage runs TRL's DPOTrainer from a recipe and saves a plain, loadable policy."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from rlhf.artifacts import read_metrics
from rlhf.stages import dpo
from tests.conftest import FAST_TRAINING, write_recipe


def test_lora_dpo_saves_a_merged_policy_that_moved(tiny_sft_checkpoint: Path, tmp_path: Path):
    out = tmp_path / "dpo"
    recipe = write_recipe(
        tmp_path / "dpo.yaml",
        stage="dpo",
        model_name_or_path=str(tiny_sft_checkpoint),
        dataset_name="synthetic:preference",
        synthetic_num_examples=64,
        max_eval_samples=16,
        max_length=96,
        max_steps=4,
        learning_rate=1e-2,
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        output_dir=str(out),
        **FAST_TRAINING,
    )
    dpo.main([str(recipe)])

    assert not (out / "adapter_config.json").exists()
    policy = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(tiny_sft_checkpoint)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(policy.state_dict()[name], start.state_dict()[name])
    metrics = read_metrics(out)
    # The implicit reward (log-ratio to the reference) ranks held-out chosen answers above rejected ones.
    assert metrics["eval"]["eval_rewards/margins"] > 0, metrics["eval"]

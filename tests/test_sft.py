"""SFT and pretraining stages: real short runs whose eval loss falls, plus their safety checks."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.artifacts import read_metrics
from rlhf.stages import pretrain
from tests.conftest import FAST_TRAINING, write_recipe


def test_sft_eval_loss_falls_and_output_is_complete(tiny_sft_checkpoint):
    metrics = read_metrics(tiny_sft_checkpoint)
    assert metrics["eval"]["eval_loss"] < metrics["eval_before"]["eval_before_loss"] - 1.0
    assert metrics["data"]["train_rows"] > 0
    names = {p.name for p in tiny_sft_checkpoint.iterdir()}
    assert {
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "recipe.yaml",
        "trainer_state.json",
    } <= names
    assert not any(n.startswith("checkpoint-") or n.endswith(".bin") for n in names)
    assert not tiny_sft_checkpoint.with_name("sft.incomplete").exists()
    AutoModelForCausalLM.from_pretrained(tiny_sft_checkpoint)
    AutoTokenizer.from_pretrained(tiny_sft_checkpoint)


def test_pretrain_from_scratch_with_packing(tiny_checkpoint, tmp_path):
    out = tmp_path / "pretrain"
    recipe = write_recipe(
        tmp_path / "pretrain.yaml",
        stage="pretrain",
        model_name_or_path=str(tiny_checkpoint),
        from_scratch=True,
        dataset_name="synthetic:pretrain",
        synthetic_num_examples=800,
        max_length=64,
        num_train_epochs=3,
        learning_rate=3e-3,
        output_dir=str(out),
        **FAST_TRAINING,
    )
    pretrain.main([str(recipe)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["eval_loss"] < metrics["eval_before"]["eval_before_loss"] - 1.0
    assert metrics["data"]["cleaning"]["dropped_duplicates"] > 0

"""rlhf prune: the requested sparsity is reached and kept through recovery; structured pruning shrinks the model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.compress import REPORT_FILE, linear_weights, sparsity
from rlhf.compress.prune import main as prune
from rlhf.config import RecipeError
from rlhf.evaluation.generation import generate_responses
from tests.conftest import FAST_TRAINING, write_recipe


def _linear_sparsity(path) -> float:
    return sparsity(AutoModelForCausalLM.from_pretrained(path))["linear_sparsity"]


def test_magnitude_pruning_reaches_the_target_sparsity(tiny_checkpoint, tmp_path):
    out = tmp_path / "sparse"
    report = prune(
        [str(tiny_checkpoint), "--method", "magnitude", "--sparsity", "0.5", "--output", str(out), "--no-eval"]
    )
    assert _linear_sparsity(out) == pytest.approx(0.5, abs=1e-3)
    assert report["linear_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert _linear_sparsity(tiny_checkpoint) < 0.01
    model = AutoModelForCausalLM.from_pretrained(out)
    # Embeddings (tied to the LM head) are left as they were.
    source = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert torch.equal(model.get_input_embeddings().weight, source.get_input_embeddings().weight)
    assert json.loads((out / REPORT_FILE).read_text())["method"] == "magnitude"


def test_sparsity_survives_the_recovery_fine_tune(tiny_checkpoint, tmp_path):
    recipe = write_recipe(
        tmp_path / "recovery.yaml",
        stage="sft",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name="synthetic:sft",
        synthetic_num_examples=64,
        assistant_only_loss=True,
        max_length=64,
        learning_rate=1e-2,
        output_dir=str(tmp_path / "unused"),
        **FAST_TRAINING,
    )
    out, plain = tmp_path / "recovered", tmp_path / "plain"
    args = ["--method", "magnitude", "--sparsity", "0.5", "--no-eval"]
    prune([str(tiny_checkpoint), *args, "--output", str(plain)])
    report = prune(
        [str(tiny_checkpoint), *args, "--output", str(out), "--recovery-recipe", str(recipe), "--recovery-steps", "3"]
    )
    assert report["recovery"]["train_runtime"] > 0
    assert _linear_sparsity(out) == pytest.approx(0.5, abs=1e-3)
    recovered = dict(linear_weights(AutoModelForCausalLM.from_pretrained(out)))
    pruned = dict(linear_weights(AutoModelForCausalLM.from_pretrained(plain)))
    name = next(iter(recovered))
    assert not torch.equal(recovered[name].weight, pruned[name].weight)  # training changed the kept weights
    assert torch.equal(recovered[name].weight == 0, pruned[name].weight == 0)  # but not the mask


def test_structured_pruning_shrinks_the_config_and_still_runs(tiny_checkpoint, tmp_path):
    out = tmp_path / "slim"
    report = prune(
        [str(tiny_checkpoint), "--method", "structured", "--mlp-keep", "0.5", "--heads-keep", "0.5"]
        + ["--output", str(out), "--no-eval"]
    )
    source = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == source.config.intermediate_size // 2
    assert model.config.num_attention_heads == source.config.num_attention_heads // 2
    assert model.num_parameters() < 0.75 * source.num_parameters()
    assert report["size_bytes_after"] < report["size_bytes_before"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    responses = generate_responses(model, tokenizer, [[{"role": "user", "content": "Hello!"}]], max_new_tokens=4)
    assert len(responses) == 1


def test_structured_without_sizes_and_gqa_heads_are_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(RecipeError, match="--mlp-keep"):
        prune([str(tiny_checkpoint), "--method", "structured", "--output", str(tmp_path / "x")])
    gqa = tmp_path / "gqa"
    shutil.copytree(tiny_checkpoint, gqa)
    config = json.loads((gqa / "config.json").read_text())
    config["num_key_value_heads"] = config["num_attention_heads"] // 2
    (gqa / "config.json").write_text(json.dumps(config))
    with pytest.raises(RecipeError, match="grouped-query"):
        prune([str(gqa), "--method", "structured", "--heads-keep", "0.5", "--output", str(tmp_path / "y")])
    with pytest.raises(RecipeError, match="--recovery-recipe"):
        prune(
            [str(tiny_checkpoint), "--method", "magnitude", "--sparsity", "0.5", "--recovery-steps", "2"]
            + ["--output", str(tmp_path / "z")]
        )
    assert not any(p.name.startswith(("x", "y", "z")) for p in tmp_path.iterdir())

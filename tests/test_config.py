"""Recipe parsing and validation: every mistake gets one message naming the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from trl import SFTConfig

from rlhf.config import RecipeError, parse_overrides
from rlhf.recipe import parse_recipe
from tests.conftest import write_recipe


def _recipe(tmp_path: Path, checkpoint: Path, **keys) -> Path:
    base = {
        "stage": "sft",
        "model_name_or_path": str(checkpoint),
        "dataset_name": "synthetic:sft",
        "output_dir": str(tmp_path / "out"),
    }
    return write_recipe(tmp_path / "recipe.yaml", **{**base, **keys})


def test_valid_recipe_routes_keys_to_each_config(tmp_path, tiny_checkpoint):
    path = _recipe(tmp_path, tiny_checkpoint, learning_rate=5e-4, lora_r=4, synthetic_num_examples=50)
    recipe = parse_recipe([str(path), "--max_length", "32"], SFTConfig, stage="sft")
    assert recipe.training.learning_rate == 5e-4
    assert recipe.training.max_length == 32
    assert recipe.model.lora_r == 4
    assert recipe.data.synthetic_num_examples == 50
    assert recipe.resolved["max_length"] == 32


def test_cpu_defaults_to_fp32_without_checkpointing(tmp_path, tiny_checkpoint):
    recipe = parse_recipe([str(_recipe(tmp_path, tiny_checkpoint))], SFTConfig, stage="sft")
    assert recipe.training.bf16 is False
    assert recipe.training.gradient_checkpointing is False
    assert recipe.training.activation_checkpointing is False


def test_bf16_on_cpu_needs_a_cpu_with_native_bf16_and_fp16_a_gpu(tmp_path, tiny_checkpoint, monkeypatch):
    import rlhf.distributed

    with pytest.raises(RecipeError, match="fp16: this machine has no GPU"):
        parse_recipe([str(_recipe(tmp_path, tiny_checkpoint, fp16=True))], SFTConfig, stage="sft")
    recipe = _recipe(tmp_path, tiny_checkpoint, bf16=True)
    if rlhf.distributed.cpu_has_native_bf16():  # this machine's own answer: bf16 autocast on CPU
        assert parse_recipe([str(recipe)], SFTConfig, stage="sft").training.bf16 is True
    monkeypatch.setattr(rlhf.distributed, "cpu_has_native_bf16", lambda: False)  # a CPU that would emulate it
    with pytest.raises(RecipeError, match="bf16: this machine has no GPU and its CPU has no native bf16"):
        parse_recipe([str(recipe)], SFTConfig, stage="sft")


def test_unknown_key_names_closest_valid_key(tmp_path, tiny_checkpoint):
    with pytest.raises(RecipeError, match="unknown recipe key `learning_rat`.*`learning_rate`"):
        parse_recipe([str(_recipe(tmp_path, tiny_checkpoint, learning_rat=1e-3))], SFTConfig, stage="sft")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num_train_epochs", "three", "num_train_epochs: got 'three', expected a number"),
        ("per_device_train_batch_size", 2.5, "per_device_train_batch_size: got 2.5, expected a whole number"),
        ("packing", "yes please", "packing: got 'yes please', expected true or false"),
        ("lr_scheduler_type", "cosin", "lr_scheduler_type: got 'cosin'.*Did you mean 'cosine'"),
    ],
)
def test_wrong_type_names_field_and_expected_type(tmp_path, tiny_checkpoint, key, value, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe([str(_recipe(tmp_path, tiny_checkpoint, **{key: value}))], SFTConfig, stage="sft")


def test_missing_model_path(tmp_path):
    with pytest.raises(RecipeError, match="model_name_or_path: path '.*/nope' does not exist"):
        parse_recipe([str(_recipe(tmp_path, tmp_path / "nope"))], SFTConfig, stage="sft")


def test_unreachable_hub_id_fails_fast(tmp_path):
    with pytest.raises(RecipeError, match="model_name_or_path: 'someone/unknown-model' is not a local directory"):
        parse_recipe([str(_recipe(tmp_path, Path("someone/unknown-model")))], SFTConfig, stage="sft")


def test_missing_data_file(tmp_path, tiny_checkpoint):
    with pytest.raises(RecipeError, match="dataset_name: 'data/missing.jsonl' does not exist"):
        parse_recipe(
            [str(_recipe(tmp_path, tiny_checkpoint, dataset_name="data/missing.jsonl"))], SFTConfig, stage="sft"
        )


def test_wrong_stage_and_malformed_yaml(tmp_path, tiny_checkpoint):
    with pytest.raises(RecipeError, match="stage: recipe .* is for stage 'reward', not 'sft'"):
        parse_recipe([str(_recipe(tmp_path, tiny_checkpoint, stage="reward"))], SFTConfig, stage="sft")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\nlearning_rate: [1e-3\n")
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        parse_recipe([str(bad)], SFTConfig, stage="sft")


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["--learning_rate", "1e-3", "--packing", "--max-length=64"]) == {
        "learning_rate": "1e-3",  # YAML 1.1 reads 1e-3 as text; the float field converts it
        "packing": True,
        "max_length": 64,
    }


def test_command_line_values_are_read_by_the_field_type(tmp_path, tiny_checkpoint):
    recipe = parse_recipe(
        [
            str(_recipe(tmp_path, tiny_checkpoint)),
            "--eval_strategy",
            "no",  # YAML would read `no` as false; the field holds text
            "--report_to",
            "none",
            "--hub_model_id",
            "yes",
            "--max_steps",
            "7",
            "--logging_steps=3",
            "--packing",
        ],
        SFTConfig,
        stage="sft",
    )
    assert recipe.training.eval_strategy == "no" and recipe.training.hub_model_id == "yes"
    assert recipe.training.max_steps == 7 and recipe.training.logging_steps == 3 and recipe.training.packing is True
    # A quoted value is still read as YAML (quotes removed), as scripts written for the old parser did.
    assert parse_overrides(["--eval_strategy", '"no"'], {"eval_strategy": str}) == {"eval_strategy": "no"}


def test_one_number_for_a_list_field_is_a_one_element_list(tmp_path, tiny_checkpoint):
    from rlhf.stages import grpo

    recipe = write_recipe(
        tmp_path / "grpo.yaml",
        stage="grpo",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name="synthetic:prompts",
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        output_dir=str(tmp_path / "out"),
    )
    assert grpo.parse([str(recipe), "--reward_weights", "1.0"]).training.reward_weights == [1.0]
    assert grpo.parse([str(recipe), "--reward_weights", "[2, 1]"]).training.reward_weights == [2, 1]


def test_help_lists_the_stages_and_a_stage_s_keys(capsys):
    from rlhf.cli import main

    main(["train", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("pretrain", "sft", "reward", "dpo", "ppo", "grpo", "rloo", "distill"))
    with pytest.raises(SystemExit) as exit_info:
        parse_recipe(["--help"], SFTConfig, stage="sft")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "from trl.trainer.sft_config.SFTConfig:" in out and "    assistant_only_loss: bool = False" in out
    assert "from rlhf.config.DataArguments:" in out and "    dataset_name: str | None = None" in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--num_train_epochs", "0"], "nothing would train"),
        (["--num_train_epochs", "-1"], "nothing would train"),
        (["--max_steps", "0"], "nothing would train"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size: got 0"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps: got 0"),
    ],
)
def test_settings_that_cannot_train_are_refused_before_loading(tmp_path, tiny_checkpoint, override, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe([str(_recipe(tmp_path, tiny_checkpoint)), *override], SFTConfig, stage="sft")
    assert not (tmp_path / "out.incomplete").exists()

"""KTO, ORPO, CPO/SimPO and online DPO run TRL's trainers from a recipe and save a plain, loadable policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.artifacts import incomplete_dir, read_metrics
from rlhf.config import DataArguments, RecipeError
from rlhf.data import prepare_datasets
from rlhf.stages import cpo, kto, online_dpo, orpo
from tests.conftest import FAST_TRAINING, write_recipe

OFFLINE = {
    **FAST_TRAINING,
    "dataset_name": "synthetic:preference",
    "synthetic_num_examples": 64,
    "max_eval_samples": 8,
    "max_length": 96,
    "max_steps": 2,
    "learning_rate": 1e-3,
}
ONLINE = {
    **FAST_TRAINING,
    "dataset_name": "synthetic:prompts",
    "synthetic_num_examples": 32,
    "test_split_size": 0,
    "max_steps": 2,
    "per_device_train_batch_size": 4,
    "max_new_tokens": 12,
    "max_length": 96,
    "learning_rate": 1e-3,
    "logging_steps": 1,
}


def _moved(output: Path, start: Path) -> bool:
    name = "model.layers.0.self_attn.q_proj.weight"
    trained = AutoModelForCausalLM.from_pretrained(output).state_dict()[name]
    return not torch.allclose(trained, AutoModelForCausalLM.from_pretrained(start).state_dict()[name])


def test_kto_data_comes_from_preference_pairs_or_labelled_rows(tmp_path: Path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "Say hi.", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
        {"prompt": "Same?", "chosen": "yes", "rejected": "yes"},  # prefers nothing: dropped, not split
    ]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = DataArguments(dataset_name=str(pairs), test_split_size=0)
    train, _, _ = prepare_datasets(data, "unpaired", seed=0)
    assert sorted(train.column_names) == ["completion", "label", "prompt"]
    assert sorted((r["prompt"], r["completion"], r["label"]) for r in train) == [
        ("Name a colour.", "Blue.", True),
        ("Name a colour.", "Seven.", False),
        ("Say hi.", "Go away.", False),
        ("Say hi.", "Hello!", True),
    ]

    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(
        '{"prompt": "a", "completion": "b", "label": 1}\n{"prompt": "c", "completion": "d", "label": 0}\n'
    )
    train, _, _ = prepare_datasets(DataArguments(dataset_name=str(labelled), test_split_size=0), "unpaired", seed=0)
    assert sorted(train["label"]) == [False, True]

    labelled.write_text('{"prompt": "a", "completion": "b", "label": "good"}\n')
    with pytest.raises(RecipeError, match="column `label` holds 'good'"):
        prepare_datasets(DataArguments(dataset_name=str(labelled), test_split_size=0), "unpaired", seed=0)


def test_lora_kto_saves_a_merged_policy_that_moved(tiny_sft_checkpoint: Path, tmp_path: Path):
    out = tmp_path / "kto"
    recipe = write_recipe(
        tmp_path / "kto.yaml",
        stage="kto",
        model_name_or_path=str(tiny_sft_checkpoint),
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        output_dir=str(out),
        **{**OFFLINE, "learning_rate": 1e-2},
    )
    kto.main([str(recipe)])

    assert not (out / "adapter_config.json").exists()
    assert _moved(out, tiny_sft_checkpoint)
    metrics = read_metrics(out)
    assert metrics["stage"] == "kto" and metrics["data"]["train_rows"] > 64  # each pair became two rows
    assert "eval_loss" in metrics["eval"]


@pytest.mark.parametrize(
    ("stage", "keys"),
    [(orpo, {"stage": "orpo", "beta": 0.1}), (cpo, {"stage": "cpo", "loss_type": "simpo", "cpo_alpha": 0.0})],
    ids=["orpo", "simpo"],
)
def test_reference_free_stages_save_a_policy_that_moved(tiny_sft_checkpoint: Path, tmp_path: Path, stage, keys):
    out = tmp_path / keys["stage"]
    recipe = write_recipe(
        tmp_path / "recipe.yaml", model_name_or_path=str(tiny_sft_checkpoint), output_dir=str(out), **keys, **OFFLINE
    )
    stage.main([str(recipe)])

    assert _moved(out, tiny_sft_checkpoint)
    metrics = read_metrics(out)
    assert metrics["stage"] == keys["stage"] and "eval_loss" in metrics["eval"]


def test_online_dpo_judged_by_reward_model_and_rule(
    tiny_sft_checkpoint: Path, tiny_reward_checkpoint: Path, tmp_path: Path
):
    out = tmp_path / "online_dpo"
    recipe = write_recipe(
        tmp_path / "online_dpo.yaml",
        stage="online_dpo",
        model_name_or_path=str(tiny_sft_checkpoint),
        reward_model_path=str(tiny_reward_checkpoint),
        reward_min_accuracy=0.6,
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        reward_weights=[0.5, 1.0],
        output_dir=str(out),
        **ONLINE,
    )
    online_dpo.main([str(recipe)])

    assert _moved(out, tiny_sft_checkpoint)
    metrics = read_metrics(out)
    assert metrics["reward_checks"]["nonfinite"] == {
        str(tiny_reward_checkpoint): 0,
        "rlhf.data.synthetic:rule_reward": 0,
    }
    assert "objective/scores" in (out / "trainer_state.json").read_text()


@pytest.mark.parametrize(
    ("stage", "keys", "message"),
    [
        (
            kto,
            {"stage": "kto", "loss_type": "ktoo"},
            r"loss_type: got 'ktoo'; set it to one of 'kto', 'apo_zero_unpaired'",
        ),
        (kto, {"stage": "kto", "per_device_train_batch_size": 1}, "per_device_train_batch_size: got 1"),
        (cpo, {"stage": "cpo", "loss_type": "simPO"}, "loss_type: got 'simPO'"),
        (online_dpo, {"stage": "online_dpo", "loss_type": "dpo", "reward_funcs": []}, "loss_type: got 'dpo'"),
        (
            online_dpo,
            {"stage": "online_dpo", "nonfinite_rewards": "skip", "reward_funcs": ["rlhf.data.synthetic:rule_reward"]},
            "nonfinite_rewards: online DPO",
        ),
    ],
    ids=["kto-loss", "kto-batch", "cpo-loss", "online-loss", "online-skip"],
)
def test_a_bad_value_is_one_line_before_the_model_loads(tiny_checkpoint: Path, tmp_path: Path, stage, keys, message):
    out = tmp_path / "out"
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name="synthetic:preference",
        output_dir=str(out),
        **keys,
    )
    with pytest.raises(RecipeError, match=message) as raised:
        stage.main([str(recipe)])
    assert "\n" not in str(raised.value)
    assert not incomplete_dir(out).exists() and not out.exists()

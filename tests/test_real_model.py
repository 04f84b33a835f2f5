"""Every stage and command for one or two steps on a real pretrained model: SmolLM2-135M-Instruct, offline.

The shipped recipes in recipes/smollm2-135m/ run as written, with only what a CPU and a test need
changed: fp32 instead of bf16, local IFEval-style data instead of Hub datasets, one or two steps,
short sequences. Run this part alone with `pytest -m real_model`, or skip it with `-m "not real_model"`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.ifeval import build_prompts, ifeval_accuracy
from rlhf.stages import dpo, grpo, ppo, reward, sft
from tests.conftest import write_recipe

pytestmark = pytest.mark.real_model
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m"
# What a 2-core CPU and a one-step test change in a GPU recipe; everything else is the shipped file.
ON_CPU = {
    "dtype": "float32",
    "bf16": False,
    "activation_checkpointing": False,
    "eval_strategy": "no",
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    "gradient_accumulation_steps": 1,
    "dataset_config": None,
    "dataset_train_split": "train",
    "eval_dataset_name": None,
    "test_split_size": 0.0,
}


def shipped(stage: str, tmp_path: Path, **overrides) -> Path:
    """recipes/smollm2-135m/<stage>.yaml with the CPU/test overrides, written under tmp_path."""
    keys = yaml.safe_load((RECIPES / f"{stage}.yaml").read_text())
    keys.update(ON_CPU)
    keys.update(overrides)
    keys = {k: v for k, v in keys.items() if v is not None or k in overrides}
    return write_recipe(tmp_path / f"{stage}.yaml", **keys)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """IFEval-style prompts, demonstrations and comparisons, as small local jsonl files."""
    folder = tmp_path_factory.mktemp("real-data")
    prompts = build_prompts("train", 8)
    files = {"prompts": folder / "prompts.jsonl", "sft": folder / "sft.jsonl", "preference": folder / "pref.jsonl"}
    files["prompts"].write_text("".join(json.dumps(row) + "\n" for row in prompts))
    answers = ["<<a note>> hello there friend", "Hello, friend. I hope you are well!"]
    files["sft"].write_text(
        "".join(
            json.dumps({"messages": [*row["prompt"], {"role": "assistant", "content": answers[i % 2]}]}) + "\n"
            for i, row in enumerate(prompts)
        )
    )
    files["preference"].write_text(
        "".join(
            json.dumps(
                {
                    "prompt": row["prompt"],
                    "chosen": [{"role": "assistant", "content": answers[0]}],
                    "rejected": [{"role": "assistant", "content": answers[1]}],
                }
            )
            + "\n"
            for row in prompts
        )
    )
    return files


@pytest.fixture(scope="module")
def smollm2_reward(smollm2_checkpoint, data, tmp_path_factory) -> Path:
    """A reward model from SmolLM2 after one LoRA step of the shipped reward recipe (merged)."""
    out = tmp_path_factory.mktemp("real-reward") / "reward"
    recipe = shipped(
        "reward",
        out.parent,
        model_name_or_path=str(smollm2_checkpoint),
        dataset_name=str(data["preference"]),
        max_steps=1,
        per_device_train_batch_size=2,
        max_length=192,
        reward_stats_samples=4,
        output_dir=str(out),
    )
    reward.main([str(recipe)])
    return out


def test_sft_trains_assistant_only_on_smollm2s_own_chatml_template(smollm2_checkpoint, data, tmp_path):
    out = tmp_path / "sft"
    recipe = shipped(
        "sft",
        tmp_path,
        model_name_or_path=str(smollm2_checkpoint),
        dataset_name=str(data["sft"]),
        max_steps=2,
        per_device_train_batch_size=2,
        max_length=192,
        output_dir=str(out),
    )
    sft.main([str(recipe)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["train_loss"] > 0
    tuned = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint)
    changed = [n for (n, p), q in zip(tuned.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert changed, "two SFT steps changed no weight"
    assert (
        AutoTokenizer.from_pretrained(out).chat_template
        == AutoTokenizer.from_pretrained(smollm2_checkpoint).chat_template
    )


def test_reward_model_scores_pairs(smollm2_reward):
    metrics = json.loads((smollm2_reward / "metrics.json").read_text())
    assert metrics["train"]["train_loss"] > 0
    assert (smollm2_reward / "model.safetensors").exists()


def test_dpo_takes_a_step(smollm2_checkpoint, data, tmp_path):
    out = tmp_path / "dpo"
    recipe = shipped(
        "dpo",
        tmp_path,
        model_name_or_path=str(smollm2_checkpoint),
        dataset_name=str(data["preference"]),
        max_steps=1,
        per_device_train_batch_size=2,
        max_length=192,
        output_dir=str(out),
    )
    dpo.main([str(recipe)])
    assert json.loads((out / "metrics.json").read_text())["train"]["train_loss"] > 0


def test_ppo_runs_an_update_against_the_reward_model(smollm2_checkpoint, smollm2_reward, data, tmp_path):
    out = tmp_path / "ppo"
    recipe = shipped(
        "ppo",
        tmp_path,
        model_name_or_path=str(smollm2_checkpoint),
        reward_model_path=str(smollm2_reward),
        reward_min_accuracy=0.0,
        value_model_path="shared",
        dataset_name=str(data["prompts"]),
        max_eval_samples=None,
        response_length=8,
        total_episodes=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_mini_batches=2,
        num_ppo_epochs=1,
        local_rollout_forward_batch_size=4,
        output_dir=str(out),
    )
    ppo.main([str(recipe)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["train_episodes"] == 4


def test_grpo_learns_from_the_ifeval_checker(smollm2_checkpoint, data, tmp_path):
    out = tmp_path / "grpo"
    recipe = shipped(
        "grpo",
        tmp_path,
        model_name_or_path=str(smollm2_checkpoint),
        reward_model_path=None,
        reward_funcs=["rlhf.ifeval:ifeval_partial_reward"],
        dataset_name=str(data["prompts"]),
        num_generations=2,
        max_completion_length=8,
        per_device_train_batch_size=4,
        max_steps=1,
        log_completions=False,
        output_dir=str(out),
    )
    grpo.main([str(recipe)])
    assert (out / "model.safetensors").exists()


def test_eval_generate_quantize_and_gguf_export_on_the_real_checkpoint(smollm2_checkpoint, data, tmp_path):
    from rlhf.compress.quantize import quantize
    from rlhf.evaluation.runner import evaluate
    from rlhf.export import export, generate_main

    eval_dir = evaluate(
        [str(smollm2_checkpoint)],
        output=tmp_path / "eval",
        sections="generation,ifeval",
        prompts_dataset=str(data["prompts"]),
        prompts_split="train",
        num_prompts=4,
        max_new_tokens=16,
        rule_reward="rlhf.ifeval:ifeval_reward",
        html=False,
    )
    (result,) = json.loads((eval_dir / "eval.json").read_text())["results"].values()
    rows = [json.loads(line) for line in data["prompts"].read_text().splitlines()][:4]
    responses = [sample["response"] for sample in result["samples"]][:4]
    assert result["metrics"]["ifeval_prompt_strict"] == pytest.approx(
        ifeval_accuracy(rows, responses)["prompt_level_strict"]
    )

    generate_main(
        [str(smollm2_checkpoint), "--input", str(data["prompts"]), "--output", str(tmp_path / "gen.jsonl")]
        + ["--max-new-tokens", "8", "--batch-size", "8"]
    )
    assert all(row["response"] for row in map(json.loads, (tmp_path / "gen.jsonl").read_text().splitlines()))

    report = quantize(str(smollm2_checkpoint), output=tmp_path / "int8", method="int8", no_eval=True)
    assert report["size_bytes_after"] < report["size_bytes_before"] / 2

    gguf_file = export(str(smollm2_checkpoint), tmp_path / "smollm2.q8_0.gguf", format="gguf", outtype="q8_0")
    read_back = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint)(**ids).logits[0, -1]
        got = read_back(**ids).logits[0, -1]
    assert expected.argmax() == got.argmax()
    assert (expected - got).abs().max() < 0.1 * expected.abs().max()

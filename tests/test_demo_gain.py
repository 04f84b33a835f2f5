"""What the demo exists to show: reinforcement learning moves a model past its demonstrations.

A reduced world holds only the how-to requests, and most of their demonstrations hedge
(`MEDIOCRE_ANSWERS`): the SFT model imitates the hedge, and PPO on the world's rule learns the direct
answer. Held-out prompts, greedy answers, the rule as judge, as the pipeline's eval does. When a change to
the world, the SFT stage or PPO takes that gain away, this test fails (the tiny pipeline once met its
safety goal with a world that left RL no room, and nothing failed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import ModelArguments
from rlhf.data.synthetic import classify_prompt, make_synthetic_dataset, rule_score
from rlhf.evaluation.generation import generate_responses
from rlhf.modeling import load_causal_lm, load_tokenizer
from rlhf.stages import ppo, sft
from tests.conftest import FAST_TRAINING, write_recipe

REQUESTS = ("harmful", "benign")
# PPO must beat SFT by this much on held-out requests (measured 0.00 → 0.67; the full tiny pipeline: SFT 0.44 → PPO 1.00)
MARGIN = 0.3


def is_request(prompt: str) -> bool:
    return classify_prompt(prompt) in REQUESTS


def rule_score_on_held_out_requests(checkpoint: Path, num_prompts: int = 48) -> float:
    prompts = [r["prompt"] for r in make_synthetic_dataset("prompts", 4 * num_prompts, seed=1, split="test")]
    prompts = [p for p in prompts if is_request(p[0]["content"])][:num_prompts]
    args = ModelArguments(model_name_or_path=str(checkpoint))
    responses = generate_responses(load_causal_lm(args), load_tokenizer(args), prompts, max_new_tokens=24)
    return sum(rule_score(p[0]["content"], r) for p, r in zip(prompts, responses)) / len(prompts)


@pytest.fixture(scope="module")
def hedging_world(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SFT on demonstrations of requests of which 60% hedge, then PPO from it on the rule alone."""
    root = tmp_path_factory.mktemp("gain")
    demos = make_synthetic_dataset("sft", 1500, seed=0, sft_noise=0.0, sft_mediocre=0.6)
    demos.filter(lambda r: is_request(r["messages"][0]["content"])).to_json(root / "demos.jsonl")
    prompts = make_synthetic_dataset("prompts", 600, seed=0).filter(lambda r: r["kind"] in REQUESTS)
    prompts.to_json(root / "prompts.jsonl")
    sft_recipe = write_recipe(
        root / "sft.yaml",
        stage="sft",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name=str(root / "demos.jsonl"),
        clean_deduplicate=False,
        assistant_only_loss=True,
        max_length=64,
        num_train_epochs=3,
        learning_rate=3e-3,
        output_dir=str(root / "sft"),
        **{**FAST_TRAINING, "per_device_train_batch_size": 16},
    )
    sft.main([str(sft_recipe)])
    ppo_recipe = write_recipe(
        root / "ppo.yaml",
        stage="ppo",
        model_name_or_path=str(root / "sft"),
        dataset_name=str(root / "prompts.jsonl"),
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        response_length=24,
        stop_token="eos",
        missing_eos_penalty=1.0,
        total_episodes=320,
        gradient_accumulation_steps=2,
        num_mini_batches=2,
        num_ppo_epochs=2,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        kl_coef=0.1,
        max_eval_samples=16,
        output_dir=str(root / "ppo"),
        **{**FAST_TRAINING, "per_device_train_batch_size": 16},
    )
    ppo.main([str(ppo_recipe)])
    return {"sft": root / "sft", "ppo": root / "ppo"}


def test_ppo_beats_the_demonstrations_it_started_from(hedging_world: dict[str, Path]):
    sft_score = rule_score_on_held_out_requests(hedging_world["sft"])
    ppo_score = rule_score_on_held_out_requests(hedging_world["ppo"])
    assert sft_score <= 0.6, f"the SFT model should imitate the hedging majority (rule score {sft_score:.2f})"
    assert ppo_score >= sft_score + MARGIN, f"PPO {ppo_score:.2f} vs SFT {sft_score:.2f}: the gain of RL is gone"

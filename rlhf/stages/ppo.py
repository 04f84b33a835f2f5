"""PPO against a reward model and/or Python reward functions, with rlhf.ppo.PPOTrainer (TRL 1.13+ has none).

rlhf train recipes/tiny/ppo.yaml
accelerate launch --config_file accelerate_configs/cpu.yaml -m rlhf.stages.ppo recipes/tiny/ppo.yaml
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from transformers import set_seed
from trl import get_peft_config

from rlhf.artifacts import finish_stage, start_stage
from rlhf.callbacks import regularization_callbacks
from rlhf.config import ModelArguments, Recipe
from rlhf.data import prepare_datasets
from rlhf.data.load import sources
from rlhf.data.synthetic import rule_reward
from rlhf.modeling import (
    align_generation_config,
    check_model_source,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
)
from rlhf.ppo import PPOConfig, PPOTrainer
from rlhf.recipe import parse_recipe
from rlhf.rewards import RewardModelRecord, resolve_reward_sources, reward_model_record

logger = logging.getLogger(__name__)


def _sibling_model_args(model_args: ModelArguments, path: str) -> ModelArguments:
    """Model arguments for another checkpoint (reward/value model): the policy's dtype, attention and pickle consent."""
    return ModelArguments(
        model_name_or_path=path,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        allow_pickle_weights=model_args.allow_pickle_weights,
    )


def parse(argv: list[str] | None = None, produced: Collection[str] = ()) -> Recipe:
    """This stage's checked recipe (`produced`: paths a pipeline writes before the stage runs)."""
    return parse_recipe(argv, PPOConfig, stage="ppo", produced=produced)


def main(argv: list[str] | None = None) -> None:
    recipe = parse(argv)
    model_args, data_args, args = recipe.model, recipe.data, recipe.training

    # Every reward source is checked (and the reward model's quality gated) before any model loads.
    reward_sources = resolve_reward_sources(args, allow_pickle=model_args.allow_pickle_weights)
    reward_funcs = [source for source in reward_sources if callable(source)]
    record = reward_model_record(args.reward_model_path) if args.reward_model_path else RewardModelRecord()
    if args.reward_model_path and args.normalize_reward and record.stats is None:
        logger.warning(
            "reward_model_path %s has no reward_stats (no metrics.json from the reward stage): PPO uses its raw "
            "scores, unnormalised.",
            args.reward_model_path,
        )
    if args.value_model_path:
        check_model_source(args.value_model_path, "value_model_path", allow_pickle=model_args.allow_pickle_weights)

    train_dataset, eval_dataset, data_report = prepare_datasets(data_args, "prompt_only", args.seed)

    tokenizer = load_tokenizer(model_args, recipe.trust_remote_code)
    policy = load_causal_lm(model_args, recipe.trust_remote_code)
    align_generation_config(policy, tokenizer)
    reward_model = reward_tokenizer = None
    if args.reward_model_path:
        reward_args = _sibling_model_args(model_args, args.reward_model_path)
        reward_tokenizer = load_tokenizer(reward_args, recipe.trust_remote_code)
        reward_model = load_sequence_classifier(
            reward_args, reward_tokenizer, trust_remote_code=recipe.trust_remote_code
        )
    # The value model starts from the reward model (it already reads responses), else the policy + a new head,
    # drawn at load time: seeded, so a rerun (or a resume) starts from the same head.
    value_path = args.value_model_path or args.reward_model_path or model_args.model_name_or_path
    set_seed(args.seed)
    value_model = load_sequence_classifier(
        _sibling_model_args(model_args, value_path), tokenizer, trust_remote_code=recipe.trust_remote_code
    )

    final_dir, resume_from = start_stage(args)
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,  # a frozen copy of the policy, or the policy with adapters disabled under LoRA
        reward_model=reward_model,
        train_dataset=train_dataset,
        value_model=value_model,
        eval_dataset=eval_dataset,
        reward_funcs=reward_funcs,
        reward_processing_class=reward_tokenizer,
        reward_stats=record.stats,
        peft_config=get_peft_config(model_args),
        callbacks=regularization_callbacks(model_args),
    )
    extra = {}
    if all(entry["path"].startswith("synthetic:") for entry in sources(data_args)):
        extra["rule_score"] = rule_reward
    eval_before = trainer.evaluate(metric_key_prefix="eval_before", extra_reward_funcs=extra)
    train_metrics = trainer.train(resume_from_checkpoint=resume_from)
    eval_after = trainer.evaluate(extra_reward_funcs=extra)
    finish_stage(
        trainer,
        recipe,
        {
            "train": train_metrics,
            "eval_before": eval_before,
            "eval": eval_after,
            "health": trainer.health_events,
            "reward_checks": trainer.reward_checks,
            "reward_model_accuracy": record.accuracy,
            "reward_stats": record.stats,
            "data": data_report,
            "resumed_from": resume_from,
        },
        final_dir,
    )


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)

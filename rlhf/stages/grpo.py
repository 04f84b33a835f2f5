"""Group Relative Policy Optimization with TRL's GRPOTrainer: rewards from a reward model and/or Python functions.

rlhf train recipes/tiny/grpo.yaml
accelerate launch --config_file accelerate_configs/cpu.yaml -m rlhf.stages.grpo recipes/tiny/grpo.yaml

For each prompt the policy samples `num_generations` completions; each is scored by every reward
source (`reward_model_path`, then `reward_funcs`, weighted by `reward_weights`) and its
advantage is its reward relative to its group. `beta > 0` adds a KL penalty to the starting model
(with LoRA, the adapter-disabled policy serves as that reference).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from trl import GRPOConfig, GRPOTrainer, get_peft_config

from rlhf.artifacts import finish_stage, start_stage
from rlhf.callbacks import regularization_callbacks
from rlhf.config import Recipe
from rlhf.data import prepare_datasets
from rlhf.distributed import evaluate_before_training
from rlhf.modeling import align_generation_config, load_causal_lm, load_tokenizer, merge_adapters
from rlhf.recipe import parse_recipe
from rlhf.rewards import RewardSourceArguments, resolve_reward_sources


@dataclass
class GRPOStageConfig(GRPOConfig, RewardSourceArguments):
    """GRPOConfig plus the reward sources (reward_model_path, reward_funcs, reward_min_accuracy)."""


def train_online_rl(recipe: Recipe, trainer_class: type) -> None:
    """The GRPO/RLOO stage body: TRL's two group-sampling trainers take the same arguments."""
    model_args, data_args, training_args = recipe.model, recipe.data, recipe.training
    reward_funcs = resolve_reward_sources(training_args)

    train_dataset, eval_dataset, data_report = prepare_datasets(data_args, "prompt_only", training_args.seed)

    tokenizer = load_tokenizer(model_args, recipe.trust_remote_code)
    model = load_causal_lm(model_args, recipe.trust_remote_code)
    align_generation_config(model, tokenizer)

    # Evaluation generates completions for every held-out prompt: run it only when eval_strategy asks for it.
    evaluate = eval_dataset is not None and training_args.eval_strategy != "no"
    final_dir, resume_from = start_stage(training_args)
    trainer = trainer_class(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if evaluate else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=regularization_callbacks(model_args),
    )

    eval_before = evaluate_before_training(trainer) if evaluate else {}
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    eval_after = trainer.evaluate() if evaluate else {}
    merge_adapters(trainer)
    finish_stage(
        trainer,
        recipe,
        {"train": train_result.metrics, "eval_before": eval_before, "eval": eval_after, "data": data_report},
        final_dir,
    )


def parse(argv: list[str] | None = None, produced: Collection[str] = ()) -> Recipe:
    """This stage's checked recipe (`produced`: paths a pipeline writes before the stage runs)."""
    return parse_recipe(argv, GRPOStageConfig, stage="grpo", produced=produced)


def main(argv: list[str] | None = None) -> None:
    train_online_rl(parse(argv), GRPOTrainer)


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)

"""Group Relative Policy Optimization with TRL's GRPOTrainer: rewards from a reward model and/or Python functions.

rlhf train recipes/tiny/grpo.yaml
accelerate launch --config_file accelerate_configs/cpu.yaml -m rlhf.stages.grpo recipes/tiny/grpo.yaml

For each prompt the policy samples `num_generations` completions; each is scored by every reward
source (`reward_model_path`, then `reward_funcs`, weighted by `reward_weights`) and its
advantage is its reward relative to its group. `beta > 0` adds a KL penalty to the starting model
(with LoRA, the adapter-disabled policy serves as that reference).

A NaN/inf reward stops the run or, with `nonfinite_rewards: skip`, leaves the sample out (TRL's
treatment of a completion no source could score: advantage 0, outside its group's baseline); a
reward beyond ±`max_abs_reward` is clipped. A NaN/inf loss or gradient norm, or one above
`max_grad_norm_alarm`, stops the run before a broken checkpoint is written.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import gather
from transformers import AutoConfig, PreTrainedModel
from trl import GRPOConfig, GRPOTrainer, get_peft_config
from trl.trainer.utils import is_async_callable

from rlhf.artifacts import finish_stage, start_stage
from rlhf.callbacks import DivergenceArguments, bind_trainer, stage_callbacks
from rlhf.config import ModelArguments, Recipe
from rlhf.data import prepare_datasets
from rlhf.distributed import evaluate_before_training
from rlhf.modeling import (
    align_generation_config,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    merge_adapters,
)
from rlhf.recipe import parse_recipe
from rlhf.rewards import (
    RewardGuard,
    RewardSourceArguments,
    is_encoder,
    resolve_reward_sources,
    reward_model_function,
    reward_source_name,
)
from rlhf.stages.ppo import sibling_model_args


@dataclass
class GRPOStageConfig(GRPOConfig, RewardSourceArguments, DivergenceArguments):
    """GRPOConfig plus the reward sources and their checks, and the gradient-norm alarm."""


class CheckedRewards:
    """A mixin for TRL's GRPOTrainer and RLOOTrainer: the recipe's checks on every reward value (`RewardGuard`).

    TRL's `_calculate_rewards` returns the rewards of every process (samples × sources, gathered), so
    checking its result covers the reward models TRL runs itself as well as functions, and every
    process decides alike. Reward functions are wrapped only to tell a None they returned ("no reward
    for this sample", which TRL allows) from a NaN: TRL turns both into NaN.
    """

    def __init__(self, *args: Any, reward_funcs: list, reward_guard: RewardGuard, **kwargs: Any) -> None:
        self.reward_guard = reward_guard
        self._returned_none: dict[int, list[bool]] = {}
        noted = [self._noting_none(i, f) if callable(f) else f for i, f in enumerate(reward_funcs)]
        super().__init__(*args, reward_funcs=noted, **kwargs)
        bind_trainer(self)  # the health judge and the completions table read the sampled completions

    def _noting_none(self, index: int, function: Callable[..., Any]) -> Callable[..., Any]:
        """`function` (sync or async, name kept for TRL's log keys), noting where it returned None."""
        if is_async_callable(function):

            @functools.wraps(function)
            async def noting_async(*args: Any, **kwargs: Any) -> list[float | None]:
                values = await function(*args, **kwargs)
                self._returned_none[index] = [v is None for v in values]
                return values

            return noting_async

        @functools.wraps(function)
        def noting(*args: Any, **kwargs: Any) -> list[float | None]:
            values = function(*args, **kwargs)
            self._returned_none[index] = [v is None for v in values]
            return values

        return noting

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        missing = torch.zeros(len(prompts), rewards.shape[1], device=rewards.device)
        for index, flags in self._returned_none.items():
            missing[:, index] = torch.tensor(flags, dtype=missing.dtype, device=missing.device)
        self._returned_none.clear()
        training = self.model.training
        mode = "train" if training else "eval"
        where = f"step {self.state.global_step + 1}" if training else f"evaluation at step {self.state.global_step}"
        rewards, skipped = self.reward_guard.check(rewards, gather(missing), where, record=training)
        rewards[skipped] = float("nan")  # no source scores it: TRL gives it advantage 0, outside the baseline
        self._metrics[mode]["rewards/skipped"].append(float(skipped.sum()))
        return rewards


class CheckedGRPOTrainer(CheckedRewards, GRPOTrainer):
    """TRL's GRPOTrainer with the recipe's reward checks."""


def encoder_reward_function(
    model_args: ModelArguments, args: RewardSourceArguments, trust_remote_code: bool = False
) -> tuple[Callable[..., list[float]], PreTrainedModel] | None:
    """An encoder reward model as a reward function scoring through `rlhf.rewards` (and the model, to place on
    the trainer's device); None when `reward_model_path` is unset or a causal LM, which TRL scores itself.

    TRL would score an encoder on a chat-template text; this scores it on the pair encoding the reward
    stage trained it on, so GRPO/RLOO, PPO and evaluation give one (prompt, completion) the same score.
    """
    path = args.reward_model_path
    if not path or not is_encoder(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)):
        return None
    reward_args = sibling_model_args(model_args, path)
    tokenizer = load_tokenizer(reward_args, trust_remote_code)
    model = load_sequence_classifier(reward_args, tokenizer, trust_remote_code=trust_remote_code)
    model.requires_grad_(False).eval()
    name = path.rstrip("/").split("/")[-1]  # the name TRL logs a reward model under
    return reward_model_function(model, tokenizer, name, getattr(args, "per_device_train_batch_size", 32)), model


def train_online_rl(recipe: Recipe, trainer_class: type) -> None:
    """The GRPO/RLOO stage body: TRL's two group-sampling trainers take the same arguments."""
    model_args, data_args, training_args = recipe.model, recipe.data, recipe.training
    reward_funcs = resolve_reward_sources(training_args, allow_pickle=model_args.allow_pickle_weights)
    reward_guard = RewardGuard(
        [reward_source_name(source) for source in reward_funcs],
        training_args.nonfinite_rewards,
        training_args.max_abs_reward,
    )

    train_dataset, eval_dataset, data_report = prepare_datasets(data_args, "prompt_only", training_args.seed)

    tokenizer = load_tokenizer(model_args, recipe.trust_remote_code)
    model = load_causal_lm(model_args, recipe.trust_remote_code)
    align_generation_config(model, tokenizer)
    encoder_scorer = encoder_reward_function(model_args, training_args, recipe.trust_remote_code)
    if encoder_scorer is not None:
        reward_funcs[0], encoder_reward_model = encoder_scorer

    # Evaluation generates completions for every held-out prompt: run it only when eval_strategy asks for it.
    evaluate = eval_dataset is not None and training_args.eval_strategy != "no"
    final_dir, resume_from = start_stage(training_args)
    trainer = trainer_class(
        model=model,
        reward_funcs=reward_funcs,
        reward_guard=reward_guard,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if evaluate else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=stage_callbacks(model_args, training_args),
    )
    if encoder_scorer is not None:
        encoder_reward_model.to(trainer.accelerator.device)

    eval_before = evaluate_before_training(trainer) if evaluate else {}
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    eval_after = trainer.evaluate() if evaluate else {}
    merge_adapters(trainer)
    finish_stage(
        trainer,
        recipe,
        {
            "train": train_result.metrics,
            "eval_before": eval_before,
            "eval": eval_after,
            "reward_checks": reward_guard.summary(),
            "data": data_report,
            "resumed_from": resume_from,
        },
        final_dir,
    )


def parse(argv: list[str] | None = None, produced: Collection[str] = ()) -> Recipe:
    """This stage's checked recipe (`produced`: paths a pipeline writes before the stage runs)."""
    return parse_recipe(argv, GRPOStageConfig, stage="grpo", produced=produced)


def main(argv: list[str] | None = None) -> None:
    train_online_rl(parse(argv), CheckedGRPOTrainer)


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)

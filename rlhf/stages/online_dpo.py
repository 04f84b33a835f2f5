"""Online DPO with TRL's OnlineDPOTrainer: DPO on pairs the policy samples itself, judged by a reward.

rlhf train recipes/tiny/online_dpo.yaml
accelerate launch --config_file accelerate_configs/cpu.yaml -m rlhf.stages.online_dpo recipes/tiny/online_dpo.yaml

For each prompt the policy samples two completions; every reward source scores both
(`reward_model_path`, then `reward_funcs`, weighted by `reward_weights`, as in GRPO), the better
one becomes `chosen`, and DPO's loss (`loss_type` sigmoid or ipo, strength `beta`) pushes the
policy towards it relative to the reference: a frozen copy of the start, or under `use_peft: true`
the adapter-disabled policy. The trainer lives in `trl.experimental.online_dpo` (its API may
still change). LoRA adapters are merged on save.

A NaN/inf reward stops the run with one line naming the source (a pair cannot be judged without
it, so `nonfinite_rewards: skip` is refused); a reward beyond ±`max_abs_reward` is clipped. A
NaN/inf loss or gradient norm, or one above `max_grad_norm_alarm`, stops the run before a broken
checkpoint is written. There is no held-out loss: score the output with `rlhf eval`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import gather
from trl import get_peft_config
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

from rlhf.artifacts import finish_stage, start_stage
from rlhf.callbacks import DivergenceArguments, stage_callbacks
from rlhf.config import Recipe, RecipeError
from rlhf.data import prepare_datasets
from rlhf.modeling import align_generation_config, load_causal_lm, load_tokenizer, merge_adapters
from rlhf.recipe import parse_recipe
from rlhf.rewards import (
    RewardGuard,
    RewardSourceArguments,
    resolve_reward_sources,
    reward_model_scores,
    reward_source_name,
)


@dataclass
class OnlineDPOStageConfig(OnlineDPOConfig, RewardSourceArguments, DivergenceArguments):
    """OnlineDPOConfig plus the reward sources and their checks, and the gradient-norm alarm."""


class CheckedOnlineDPOTrainer(OnlineDPOTrainer):
    """TRL's OnlineDPOTrainer with the recipe's reward checks (`RewardGuard`) on each source's values.

    TRL adds the sources up with `nansum`, so a NaN from any source would silently count as 0 and
    could flip which completion is chosen; here each source is scored, checked across every process,
    then summed. Reward models are scored by rlhf.rewards, tokenised exactly as the reward stage trained them.
    """

    def __init__(self, *args: Any, reward_guard: RewardGuard, **kwargs: Any) -> None:
        self.reward_guard = reward_guard
        super().__init__(*args, **kwargs)

    def _calculate_rewards_from_functions(self, prompts, completions, completion_ids_list, **reward_kwargs):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        columns = []
        for source, tokenizer in zip(self.reward_funcs, self.reward_processing_classes, strict=True):
            if isinstance(source, torch.nn.Module):
                columns.append(reward_model_scores(source, tokenizer, prompts, texts).tolist())
            else:
                values = source(
                    prompts=prompts,
                    completions=completions,
                    completion_ids=completion_ids_list,
                    trainer_state=self.state,
                    **reward_kwargs,
                )
                columns.append(list(values))
        device = self.accelerator.device
        # None is "no reward for this sample" (TRL's meaning): it adds nothing to the sum.
        missing = torch.tensor([[v is None for v in column] for column in columns], device=device).T
        values = torch.tensor(
            [[float("nan") if v is None else float(v) for v in column] for column in columns], device=device
        ).T
        checked, _ = self.reward_guard.check(gather(values), gather(missing), f"step {self.state.global_step + 1}")
        start = self.accelerator.process_index * len(values)
        mine = checked[start : start + len(values)]
        return (mine * self.reward_weights.to(device)).nansum(dim=1)


def parse(argv: list[str] | None = None, produced: Collection[str] = ()) -> Recipe:
    """This stage's checked recipe (`produced`: paths a pipeline writes before the stage runs)."""
    recipe = parse_recipe(argv, OnlineDPOStageConfig, stage="online_dpo", produced=produced)
    training = recipe.training
    if training.nonfinite_rewards != "stop":
        raise RecipeError(
            "nonfinite_rewards: online DPO ranks the two completions of a prompt by their rewards and cannot rank a "
            "pair with a NaN/inf reward; remove the key (it stops the run, naming the source) or fix the source."
        )
    if training.eval_strategy != "no":
        raise RecipeError(
            f"eval_strategy: got {training.eval_strategy!r}, but TRL's online DPO has no held-out loss to compute; "
            'set `eval_strategy: "no"` and score the output with `rlhf eval`.'
        )
    return recipe


def main(argv: list[str] | None = None) -> None:
    recipe = parse(argv)
    model_args, data_args, training_args = recipe.model, recipe.data, recipe.training
    reward_funcs = resolve_reward_sources(training_args, allow_pickle=model_args.allow_pickle_weights)
    reward_guard = RewardGuard(
        [reward_source_name(source) for source in reward_funcs],
        training_args.nonfinite_rewards,
        training_args.max_abs_reward,
    )

    train_dataset, _, data_report = prepare_datasets(data_args, "prompt_only", training_args.seed)

    tokenizer = load_tokenizer(model_args, recipe.trust_remote_code)
    model = load_causal_lm(model_args, recipe.trust_remote_code)
    align_generation_config(model, tokenizer)

    final_dir, resume_from = start_stage(training_args)
    trainer = CheckedOnlineDPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        reward_guard=reward_guard,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=stage_callbacks(model_args, training_args),
    )

    train_result = trainer.train(resume_from_checkpoint=resume_from)
    merge_adapters(trainer)
    finish_stage(
        trainer,
        recipe,
        {
            "train": train_result.metrics,
            "reward_checks": reward_guard.summary(),
            "data": data_report,
            "resumed_from": resume_from,
        },
        final_dir,
    )


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)

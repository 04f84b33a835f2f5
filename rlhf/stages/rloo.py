"""REINFORCE Leave-One-Out with TRL's RLOOTrainer: rewards from a reward model and/or Python functions.

rlhf train recipes/tiny/rloo.yaml
accelerate launch --config_file accelerate_configs/cpu.yaml -m rlhf.stages.rloo recipes/tiny/rloo.yaml

For each prompt the policy samples `num_generations` completions; each is scored by every reward
source (`reward_model_path`, then `reward_funcs`, weighted by `reward_weights`), and its
baseline is the mean reward of the other completions of the same prompt. `beta` weighs the KL
penalty to the starting model (with LoRA, the adapter-disabled policy serves as that reference).
Bad numbers (NaN/inf or huge rewards, a diverging loss or gradient) are handled as in GRPO, and so
are the health alarms (`rlhf.health`: KL, response length, entropy, reward hacking) and, with
`report_to: tensorboard`, the table of sampled completions.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from trl import RLOOConfig, RLOOTrainer

from rlhf.callbacks import DivergenceArguments
from rlhf.config import Recipe
from rlhf.recipe import parse_recipe
from rlhf.rewards import RewardSourceArguments
from rlhf.stages.grpo import CheckedRewards, train_online_rl


@dataclass
class RLOOStageConfig(RLOOConfig, RewardSourceArguments, DivergenceArguments):
    """RLOOConfig plus the reward sources and their checks, and the gradient-norm alarm."""


class CheckedRLOOTrainer(CheckedRewards, RLOOTrainer):
    """TRL's RLOOTrainer with the recipe's reward checks."""


def parse(argv: list[str] | None = None, produced: Collection[str] = ()) -> Recipe:
    """This stage's checked recipe (`produced`: paths a pipeline writes before the stage runs)."""
    return parse_recipe(argv, RLOOStageConfig, stage="rloo", produced=produced)


def main(argv: list[str] | None = None) -> None:
    train_online_rl(parse(argv), CheckedRLOOTrainer)


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)

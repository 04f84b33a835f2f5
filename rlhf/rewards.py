"""Reward sources shared by PPO, GRPO and RLOO: Python functions by import path, and reward models."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from rlhf.config import RecipeError

RULE_REWARD = "rlhf.data.synthetic:rule_reward"


def load_reward_function(spec: str, field: str = "reward_funcs") -> Callable[..., list[float]]:
    """Import a reward function given as `package.module:function` (TRL signature: prompts, completions, **kw)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise RecipeError(f"{field}: {spec!r} is not an import path; write it as package.module:function.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RecipeError(
            f"{field}: cannot import module {module_name!r} ({error}); check the path and PYTHONPATH."
        ) from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise RecipeError(f"{field}: {module_name!r} has no function {attribute!r}.")
    return function


@dataclass
class RewardSourceArguments:
    """Recipe keys naming the rewards of an online RL stage (PPO, GRPO, RLOO).

    `reward_model_path` is a reward model directory (the reward stage's output) or Hub id;
    `reward_funcs` lists Python reward functions as `package.module:function`. With several
    sources, their order (reward model first) is the order of TRL's `reward_weights`.
    """

    reward_model_path: str | None = None
    reward_funcs: list[str] | None = None
    reward_min_accuracy: float = 0.9


def resolve_reward_sources(args: RewardSourceArguments) -> list[str | Callable[..., list[float]]]:
    """Check and resolve a recipe's reward sources into TRL's `reward_funcs` list, before any model loads.

    A reward model stays a path string (TRL loads it with AutoModelForSequenceClassification); its
    held-out accuracy must reach `reward_min_accuracy` (0 disables the check).
    """
    from rlhf.modeling import check_model_source
    from rlhf.stages.reward import check_reward_quality

    sources: list[str | Callable[..., list[float]]] = []
    if args.reward_model_path:
        check_model_source(args.reward_model_path, field="reward_model_path")
        check_reward_quality(args.reward_model_path, args.reward_min_accuracy)
        sources.append(args.reward_model_path)
    sources.extend(load_reward_function(spec) for spec in args.reward_funcs or [])
    if not sources:
        raise RecipeError(
            f"reward_funcs: no reward source; set `reward_model_path` (a reward stage output) and/or "
            f"`reward_funcs: [{RULE_REWARD}]`."
        )
    weights = getattr(args, "reward_weights", None)
    if weights is not None and len(weights) != len(sources):
        raise RecipeError(
            f"reward_weights: {len(weights)} weights for {len(sources)} reward sources (reward model first, then "
            "reward_funcs in order); give one weight per source."
        )
    return sources

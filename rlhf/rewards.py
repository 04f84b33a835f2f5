"""Reward sources shared by PPO, GRPO and RLOO: Python functions by import path, and reward models."""

from __future__ import annotations

import importlib
from collections.abc import Callable

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
        raise RecipeError(f"{field}: cannot import module {module_name!r} ({error}); check the path and PYTHONPATH.") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise RecipeError(f"{field}: {module_name!r} has no function {attribute!r}.")
    return function

"""Dropout settings: which config fields are dropout, and turning all of it off for RL and preference losses."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedConfig
from trl.trainer.utils import disable_dropout_in_model


def is_dropout_setting(name: str) -> bool:
    """Whether a config field or module attribute named `name` is a dropout probability (`attention_dropout`,
    `hidden_dropout_prob`, GPT-2's `resid_pdrop`, `dropout_p`, …)."""
    return "dropout" in name or name.endswith("pdrop")


def disable_dropout(model: torch.nn.Module) -> None:
    """No dropout anywhere in `model`, in training mode too: what RL and preference losses need (repeatable log-probs).

    TRL's `disable_dropout_in_model` zeroes `nn.Dropout` modules only. Llama-style attention (most
    transformers models) keeps a float `attention_dropout` from the config and applies it while training, and
    some models read the config's value at forward time (GPT-Neo), so every float dropout setting (and OPT's
    LayerDrop) of every module, of its config and of the sub-configs is set to 0 too. A saved config then records
    the dropout the model trained with: none.
    """
    disable_dropout_in_model(model)
    owners: list[Any] = list(model.modules())
    seen: set[int] = set()
    while owners:
        owner = owners.pop()
        if id(owner) in seen:
            continue
        seen.add(id(owner))
        for name, value in list(vars(owner).items()):
            if isinstance(value, PreTrainedConfig):
                owners.append(value)  # a model's config, or a sub-config (text_config, …)
            elif isinstance(value, float) and value != 0.0 and (is_dropout_setting(name) or name == "layerdrop"):
                setattr(owner, name, 0.0)

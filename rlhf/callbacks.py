"""Trainer callbacks for recipe settings that transformers/TRL do not offer as config fields."""

from __future__ import annotations

import torch
from transformers import TrainerCallback


class L1RegularizationCallback(TrainerCallback):
    """Add the gradient of `coef * sum(|w|)` (coef·sign(w)) to every trainable weight before each optimizer step.

    Done on gradients rather than in the loss so it works unchanged with every HF/TRL trainer.
    """

    def __init__(self, coef: float) -> None:
        self.coef = coef

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or self.coef <= 0:
            return
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad and parameter.grad is not None and parameter.dim() > 1:
                    parameter.grad.add_(torch.sign(parameter), alpha=self.coef)


def regularization_callbacks(model_args) -> list[TrainerCallback]:
    """The callbacks a recipe's regularisation settings ask for (L1 today)."""
    coef = getattr(model_args, "l1_regularization", 0.0)
    return [L1RegularizationCallback(coef)] if coef > 0 else []

"""Trainer callbacks for recipe settings that transformers/TRL do not offer as config fields.

- `L1RegularizationCallback`: the recipe's `l1_regularization`, applied to gradients.
- `DivergenceCallback`: a loss or gradient norm that stops being a finite number (or a gradient norm
  above `max_grad_norm_alarm`) ends the run with one line, before a checkpoint of broken weights is
  written; the last good checkpoint stays in `<output>.incomplete/` and nothing is published.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from rlhf.artifacts import last_complete_checkpoint
from rlhf.config import RecipeError


class TrainingStopped(RecipeError):
    """Training met numbers it can't use (a non-finite reward, loss or gradient): one line, nothing published."""


@dataclass
class DivergenceArguments:
    """The recipe key for gradients that explode; a loss or gradient norm that is NaN or ±inf always stops the run."""

    max_grad_norm_alarm: float | None = field(
        default=1e4,
        metadata={
            "help": "Stop (keeping the last good checkpoint) when the gradient norm before clipping exceeds this; "
            "null turns the alarm off. A NaN/inf loss or gradient norm always stops."
        },
    )


def divergence_problem(loss: float | None, grad_norm: float | None, max_grad_norm_alarm: float | None) -> str | None:
    """What is wrong with one step's loss and gradient norm (None when both are fine or unknown)."""
    if loss is not None and not math.isfinite(loss):
        return f"loss {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"gradient norm {grad_norm}"
    if grad_norm is not None and max_grad_norm_alarm is not None and grad_norm > max_grad_norm_alarm:
        return f"gradient norm {grad_norm:.3g} > max_grad_norm_alarm {max_grad_norm_alarm:g}"
    return None


def divergence_message(where: str, problem: str, output_dir: str | Path, learning_rate: float) -> str:
    """The one line a diverged run ends with: where, why, the last checkpoint before it, and what to change."""
    fix = f"lower learning_rate (now {learning_rate:g})"
    if "max_grad_norm_alarm" in problem:
        fix += " or raise max_grad_norm_alarm"
    checkpoint = last_complete_checkpoint(Path(output_dir))
    if checkpoint is None:
        return (
            f"training diverged at {where} ({problem}); nothing was published and no checkpoint was saved. "
            f"{fix.capitalize()}, then run again."
        )
    return (
        f"training diverged at {where} ({problem}); nothing was published, and the last checkpoint that passed the "
        f"checks is {checkpoint}. {fix.capitalize()}, then remove {output_dir} to start over (a rerun resumes that "
        "checkpoint, its saved learning rate included)."
    )


def weights_are_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter of `model` is a finite number (one device sync for all of them)."""
    checks = [torch.isfinite(p).all() for p in model.parameters() if p.numel()]
    return bool(torch.stack(checks).all()) if checks else True


class DivergenceCallback(TrainerCallback):
    """End a Trainer run whose loss or gradient norm is NaN/inf or whose gradient norm passes `max_grad_norm_alarm`.

    Trainer logs the gradient norm before clipping; it filters a NaN step loss out of the logged loss
    (`logging_nan_inf_filter`) but NaN gradients still show in `grad_norm`. The weights themselves are
    checked before each checkpoint, so a checkpoint never keeps non-finite weights.
    """

    def __init__(self, max_grad_norm_alarm: float | None) -> None:
        self.max_grad_norm_alarm = max_grad_norm_alarm

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and model is not None and not weights_are_finite(model):
            raise TrainingStopped(
                divergence_message(f"step {state.global_step}", "nan/inf weights", args.output_dir, args.learning_rate)
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        problem = divergence_problem(logs.get("loss"), logs.get("grad_norm"), self.max_grad_norm_alarm)
        if problem is not None:
            raise TrainingStopped(
                divergence_message(f"step {state.global_step}", problem, args.output_dir, args.learning_rate)
            )


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


def stage_callbacks(model_args, training_args) -> list[TrainerCallback]:
    """The callbacks of a Trainer-based stage: regularisation, then the divergence check."""
    return [*regularization_callbacks(model_args), DivergenceCallback(training_args.max_grad_norm_alarm)]

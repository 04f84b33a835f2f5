"""Trainer callbacks for recipe settings that transformers/TRL do not offer as config fields.

- `L1RegularizationCallback`: the recipe's `l1_regularization`, applied to gradients.
- `DisableDropoutCallback`: `disable_dropout: true` turns off the attention dropout TRL leaves on.
- `DivergenceCallback`: a loss or gradient norm that stops being a finite number (or a gradient norm
  above `max_grad_norm_alarm`) ends the run with one line, before a checkpoint of broken weights is
  written; the last good checkpoint stays in `<output>.incomplete/` and nothing is published.
- `HealthCallback`: the health alarms of `rlhf.health` (KL blow-up, response length, entropy collapse,
  reward hacking, DPO's chosen-reward collapse and margin runaway) over the logged metrics; each warns
  (and is listed in metrics.json's `health_events`) or stops the run the same way.
- `CompletionTableCallback`: with `report_to: tensorboard`, a text table of sampled completions and
  each reward source's score, every `logging_steps`, in the online stages (PPO included).

`bind_trainer(trainer)` hands the trainer to the callbacks that read its sampled completions.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from rlhf.artifacts import last_complete_checkpoint
from rlhf.completions_table import CompletionTableCallback
from rlhf.config import RecipeError, load_reward_function
from rlhf.dropout import disable_dropout
from rlhf.health import FIXES, HealthArguments, HealthPoint, HealthRules

logger = logging.getLogger(__name__)


class TrainingStopped(RecipeError):
    """Training met numbers it can't use (a non-finite reward, loss or gradient): one line, nothing published."""


@dataclass
class DivergenceArguments(HealthArguments):
    """The recipe key for gradients that explode (a loss or gradient norm that is NaN or ±inf always stops the
    run), and the health alarms' keys: every stage with a divergence check has the health monitor too."""

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


def stop_message(what: str, output_dir: str | Path, fix: str) -> str:
    """The one line a stopped run ends with: what happened, the last checkpoint before it, and what to change."""
    checkpoint = last_complete_checkpoint(Path(output_dir))
    if checkpoint is None:
        return f"{what}; nothing was published and no checkpoint was saved. {fix[0].upper() + fix[1:]}, then run again."
    return (
        f"{what}; nothing was published, and the last checkpoint that passed the checks is {checkpoint}. "
        f"{fix[0].upper() + fix[1:]}, then remove {output_dir} to start over (a rerun resumes that checkpoint, its "
        "saved learning rate included)."
    )


def divergence_message(where: str, problem: str, output_dir: str | Path, learning_rate: float) -> str:
    """The one line a diverged run ends with: where, why, the last checkpoint before it, and what to change."""
    fix = f"lower learning_rate (now {learning_rate:g})"
    if "max_grad_norm_alarm" in problem:
        fix += " or raise max_grad_norm_alarm"
    return stop_message(f"training diverged at {where} ({problem})", output_dir, fix)


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


class DisableDropoutCallback(TrainerCallback):
    """`disable_dropout: true` means no dropout at all: before the first step, also the attention dropout that TRL's
    `disable_dropout_in_model` leaves on (`rlhf.dropout.disable_dropout`).

    TRL's trainers zero only `nn.Dropout` modules, but Llama-style attention applies the config's float
    `attention_dropout` while training (an SFT recipe's `dropout` writes it into the checkpoint), which makes
    the policy's log-probs noisy against its reference. The reference models TRL builds run in eval mode, where
    no dropout applies.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            disable_dropout(model)


def regularization_callbacks(model_args, training_args: Any = None) -> list[TrainerCallback]:
    """The callbacks a recipe's regularisation settings ask for: L1, and no dropout at all under `disable_dropout`."""
    coef = getattr(model_args, "l1_regularization", 0.0)
    callbacks: list[TrainerCallback] = [L1RegularizationCallback(coef)] if coef > 0 else []
    if getattr(training_args, "disable_dropout", False):
        callbacks.append(DisableDropoutCallback())
    return callbacks


# ---- health alarms and the completions table -----------------------------------------------------

# The sources a rule judge is looked up under: TRL logs `rewards/<name>/mean`, rlhf's PPO `reward/<name>`.
RULE_JUDGE = "rule_reward"


def logged_source(logs: dict[str, Any], name: str) -> float | None:
    """A reward source's logged mean, under TRL's (GRPO/RLOO) or rlhf's PPO key."""
    value = logs.get(f"rewards/{name}/mean", logs.get(f"reward/{name}"))
    return value if isinstance(value, int | float) else None


def _first(logs: dict[str, Any], *keys: str) -> float | None:
    """The first of `keys` the log holds as a number (the stages name one figure differently)."""
    value = next((logs[key] for key in keys if isinstance(logs.get(key), int | float)), None)
    return float(value) if value is not None else None


# The recipe key each message of rlhf's earlier PPO health monitor named, and the alarm it is now.
_EARLIER_PPO_KEYS = {"max_kl": "kl", "max_response_length_ratio": "length_runaway", "min_entropy": "entropy_collapse"}


class HealthCallback(TrainerCallback):
    """The health alarms (`rlhf.health.HealthRules`) on a trainer's logged metrics: warn, or stop with one line.

    It reads TRL's names (GRPO/RLOO: `kl`, `entropy`, `completions/mean_length`, `rewards/<source>/mean`;
    online DPO: `objective/kl`, `objective/scores`; DPO: `rewards/chosen`, `rewards/margins`) and rlhf's
    PPO names (`objective/kl`, `policy/entropy_rollout`, `response_length/mean`, `reward/<source>`), so
    every stage, PPO's own loop included, shares one set of rules. A stop raises `TrainingStopped` inside
    the log call, before that step's checkpoint is written: the last checkpoint is from before the alarm.
    `state_dict`/`load_state_dict` carry the rules' history and the events through PPO's checkpoints.
    """

    def __init__(self, args: Any) -> None:
        self.rules = HealthRules.from_args(args)
        self.default_action = getattr(args, "health_action", "warn")
        self.actions = dict(getattr(args, "health_actions", None) or {})
        reward_model_path = getattr(args, "reward_model_path", None)
        # The name TRL logs a reward model under (its folder's name); PPO logs it as `reward_model`.
        self.reward_model = reward_model_path.rstrip("/").split("/")[-1] if reward_model_path else None
        self.judge_spec = getattr(args, "reward_hacking_judge", None)
        self.judge_function: Callable[..., list[float]] | None = None
        if self.judge_spec and ":" in self.judge_spec:
            self.judge_function = load_reward_function(self.judge_spec, "reward_hacking_judge")
        self.trainer: Any = None
        self.health_events: list[dict[str, Any]] = []
        self._firing: set[str] = set()
        self._judge_missing_said = False

    def bind(self, trainer: Any) -> None:
        """Read the trainer's sampled completions (TRL's `_logs`) to score a judge given as a function."""
        self.trainer = trainer

    def _samples(self) -> dict[str, Any] | None:
        samples = getattr(self.trainer, "_logs", None)
        return samples if samples and samples.get("completion") else None

    def _proxy_and_judge(self, logs: dict[str, Any]) -> tuple[float | None, float | None]:
        """The optimised reward the judge checks, and the held-out judge's score, for this log."""
        if not self.judge_spec:
            return None, None
        if self.judge_function is not None:
            samples = self._samples()
            if samples is None:
                return None, None
            completions = list(samples["completion"])
            scores = self.judge_function(prompts=list(samples["prompt"]), completions=completions)
            judge = sum(scores) / len(scores)
            # The proxy on the same samples as the judge: the reward model's scores when it is a source
            # (TRL names it after its folder, PPO `reward_model`).
            rewards = None
            if self.reward_model:
                rewards = samples["rewards"].get(self.reward_model) or samples["rewards"].get("reward_model")
            proxy = sum(rewards) / len(rewards) if rewards else _first(logs, "reward", "objective/scores")
            return proxy, judge
        proxy = None
        if self.reward_model:  # GRPO/RLOO log it under its folder's name, PPO as reward_model, online DPO as scores
            proxy = logged_source(logs, self.reward_model)
            proxy = logged_source(logs, "reward_model") if proxy is None else proxy
            proxy = _first(logs, "objective/scores") if proxy is None else proxy
        name = RULE_JUDGE if self.judge_spec == "auto" else self.judge_spec
        judge = logged_source(logs, name)
        if judge is None and proxy is not None and not self._judge_missing_said and self.judge_spec != "auto":
            self._judge_missing_said = True
            logger.warning(
                "reward_hacking_judge %s: no reward source of that name is logged, so the reward_hacking alarm is "
                "off; name one of reward_funcs, or give a function as package.module:function.",
                self.judge_spec,
            )
        return proxy, judge

    def point(self, logs: dict[str, Any], step: int) -> HealthPoint:
        """This log's figures under the rules' names."""
        proxy, judge = self._proxy_and_judge(logs)
        return HealthPoint(
            step=step,
            kl=_first(logs, "kl", "objective/kl"),
            length=_first(logs, "completions/mean_length", "response_length/mean"),
            entropy=_first(logs, "entropy", "policy/entropy_rollout"),
            proxy=proxy,
            judge=judge,
            chosen=_first(logs, "rewards/chosen"),
            margin=_first(logs, "rewards/margins"),
        )

    @property
    def firing(self) -> frozenset[str]:
        """The alarms the last training log raised (empty: healthy)."""
        return frozenset(self._firing)

    def state_dict(self) -> dict[str, Any]:
        """The rules' state, the events so far and the alarms firing, as JSON (PPO's ppo_state.json)."""
        return {"rules": self.rules.state_dict(), "events": self.health_events, "firing": sorted(self._firing)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rules" not in state:  # a checkpoint of rlhf's earlier PPO health monitor: its first length and events
            state = {
                "rules": {"initial_length": state.get("initial_response_length")},
                "events": [
                    {
                        "step": event["step"],
                        "alarm": next((a for key, a in _EARLIER_PPO_KEYS.items() if key in problem), "kl"),
                        "message": problem,
                        "action": event["action"],
                    }
                    for event in state.get("events", [])
                    for problem in event["problems"]
                ],
            }
        self.rules.load_state_dict(state["rules"])
        self.health_events = list(state.get("events", []))
        self._firing = set(state.get("firing", []))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        # Evaluation logs (eval_*) and the closing summary (train_runtime, ...) are not training steps.
        if not logs or any(key.startswith("eval_") for key in logs) or "train_runtime" in logs:
            return
        alarms = self.rules.check(self.point(logs, state.global_step))
        self._firing &= {name for name, _ in alarms}
        for name, message in alarms:
            action = self.actions.get(name, self.default_action)
            if name not in self._firing:  # one event per onset, not one per log while it lasts
                self._firing.add(name)
                self.health_events.append(
                    {"step": state.global_step, "alarm": name, "message": message, "action": action}
                )
                logger.warning("health alarm %s at step %d: %s", name, state.global_step, message)
            if action == "stop":
                self._stop(args, state, name, message)

    def _stop(self, args: Any, state: Any, name: str, message: str) -> None:
        output_dir = Path(args.output_dir)
        if state.is_world_process_zero:
            # The events stay beside the kept checkpoint (no metrics.json is written for a stopped run).
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "health_events.json").write_text(json.dumps(self.health_events, indent=2) + "\n")
        raise TrainingStopped(
            stop_message(
                f"health alarm {name} at step {state.global_step} ({message}); stopped", output_dir, FIXES[name]
            )
        )


def bind_trainer(trainer: Any) -> None:
    """Give the callbacks that read sampled completions (health judge, completions table) the trainer."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, HealthCallback | CompletionTableCallback):
            callback.bind(trainer)


def health_callbacks(training_args: Any) -> list[TrainerCallback]:
    """The health monitor and, where the stage samples completions, the TensorBoard completions table."""
    callbacks: list[TrainerCallback] = [HealthCallback(training_args)]
    if getattr(training_args, "completions_table_rows", 0) and "tensorboard" in (training_args.report_to or []):
        callbacks.append(CompletionTableCallback(training_args.completions_table_rows))
    return callbacks


def stage_callbacks(model_args, training_args) -> list[TrainerCallback]:
    """The callbacks of a Trainer-based stage: regularisation, the divergence check, then the health alarms."""
    return [
        *regularization_callbacks(model_args, training_args),
        DivergenceCallback(training_args.max_grad_norm_alarm),
        *health_callbacks(training_args),
    ]

"""PPOTrainer: the loop that turns rollouts into clipped PPO updates, with Trainer-style logs and checkpoints.

One update = one rollout of `batch_size` prompts:
  generate → truncate after the stop token → logprobs (policy, reference), values, scores →
  per-token rewards (−kl_coef·KL, plus the score on the last token) → GAE → whiten advantages →
  `num_ppo_epochs` passes over `num_mini_batches` minibatches of clipped policy + value loss.

Bad numbers end the run with one line (`rlhf.callbacks.TrainingStopped`) whatever `health_action`
says: a non-finite reward (unless `nonfinite_rewards: skip`, which masks those samples out), a
NaN/inf loss, gradient norm, log-probability or value, or a gradient norm above
`max_grad_norm_alarm`. The broken optimizer step is never taken and no checkpoint is written after
it, so `<output>.incomplete/` keeps the last good checkpoint.

The health alarms (KL, response length, entropy, reward hacking) are the callbacks every stage uses
(`rlhf.callbacks.health_callbacks`): they read each log, and a `stop` ends the run the same way, before
that update's checkpoint. `_logs` holds the last logged rollout's samples as TRL's trainers keep
theirs, for the TensorBoard completions table and a health judge given as a function.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NoReturn

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import Dataset
from peft import PeftModel
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from transformers.integrations import get_reporting_integration_callbacks
from transformers.trainer import DEFAULT_CALLBACKS, DEFAULT_PROGRESS_CALLBACK
from transformers.trainer_callback import CallbackHandler, PrinterCallback

from rlhf.callbacks import HealthCallback, TrainingStopped, bind_trainer, divergence_message
from rlhf.config import RecipeError
from rlhf.distributed import gathered_weights, shard_frozen_model
from rlhf.modeling import eos_token_ids
from rlhf.ppo.checkpoint import TRAINER_STATE_FILE, load_checkpoint, save_checkpoint
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.core import (
    HealthMonitor,
    compute_gae,
    kl_penalty,
    make_kl_controller,
    shape_rewards,
    whiten,
)
from rlhf.ppo.models import (
    PolicyAndValue,
    ValueHead,
    freeze,
    prepare_for_rollouts,
    reference_for,
    reference_model,
    with_adapters,
)
from rlhf.ppo.optimization import Diverged, PPOOptimization
from rlhf.ppo.rollout import RewardFunction, RewardSources, RolloutMaker
from rlhf.ppo.sampling import PromptOrder, encode_prompts
from rlhf.ppo.timing import Stopwatch
from rlhf.rewards import completions_for

logger = logging.getLogger(__name__)


class PPOTrainer(PPOOptimization):
    """PPO with a policy, a reference (a frozen copy, or the policy with LoRA adapters disabled), reward
    sources (a reward model and/or Python reward functions) and a value model (a sequence classifier, or a
    `ValueHead` on the policy's own last hidden state).

    Logs, callbacks and `trainer_state.json` follow `transformers.Trainer`, so the same plotting and
    callbacks work; checkpoints are `checkpoint-<update>/` folders written by `Accelerator.save_state`
    (policy + value weights, optimizer, scheduler, RNG, KL controller, health alarms' state, data position)
    and `train()` resumes from one.
    """

    def __init__(
        self,
        args: PPOConfig,
        processing_class: PreTrainedTokenizerBase,
        model: PreTrainedModel,
        ref_model: PreTrainedModel | None,
        reward_model: PreTrainedModel | None,
        train_dataset: Dataset,
        value_model: PreTrainedModel | ValueHead,
        eval_dataset: Dataset | None = None,
        reward_funcs: list[RewardFunction] | None = None,
        reward_processing_class: PreTrainedTokenizerBase | None = None,
        reward_stats: dict[str, float] | None = None,
        peft_config: Any = None,
        callbacks: list[TrainerCallback] | None = None,
    ) -> None:
        if ref_model is not None and ref_model is model:
            raise ValueError("`model` and `ref_model` must be different objects (pass None to copy the policy).")
        self.args = args
        self.processing_class = processing_class
        rewards = RewardSources(
            reward_model,
            reward_processing_class or processing_class,
            list(reward_funcs or []),
            args.reward_weights,
            reward_stats if args.normalize_reward else None,
            args.local_rollout_forward_batch_size,
            args.nonfinite_rewards,
            args.max_abs_reward,
        )
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps // args.num_mini_batches,
            mixed_precision="bf16" if args.bf16 else ("fp16" if args.fp16 else "no"),
            cpu=args.use_cpu,
            # The loop steps the scheduler once per update, not once per optimizer step.
            step_scheduler_with_optimizer=False,
        )
        # Every end of turn the policy knows (Gemma's <end_of_turn>, Llama-3's <|eot_id|>), not only the tokenizer's EOS.
        stop_ids = [args.stop_token_id] if args.stop_token_id is not None else []
        self.stop_token_ids = eos_token_ids(model, processing_class) if args.stop_token == "eos" else stop_ids
        # Seconds per part of each update, logged as timing/* (this process's own, not averaged over processes).
        self.stopwatch = Stopwatch(self.accelerator.device)
        self.rollouts = RolloutMaker(
            args, processing_class, rewards, self.accelerator, self.stop_token_ids, self.stopwatch
        )
        model = with_adapters(model, peft_config)
        self.is_peft_model = isinstance(model, PeftModel)
        self.ref_model = reference_for(model, ref_model)
        prepare_for_rollouts(model, self.ref_model, value_model, reward_model)
        self._plan_updates(train_dataset, eval_dataset)
        self._prepare_optimization(PolicyAndValue(model, value_model))
        self.sharded = self.accelerator.is_fsdp2
        for frozen in (self.ref_model, reward_model):
            if self.sharded and frozen is not None:
                shard_frozen_model(self.accelerator, frozen)  # in place: RewardSources holds the same object
            else:
                freeze(frozen, self.accelerator.device)
        self.kl_controller = make_kl_controller(args.kl_controller, args.kl_coef, args.target_kl, args.kl_horizon)
        self.health = HealthMonitor(max_grad_norm_alarm=args.max_grad_norm_alarm)  # bad numbers: always stop
        self._set_up_callbacks(callbacks)
        self._logs: dict[str, Any] = {}  # the last logged rollout's samples, as TRL's trainers keep them
        # Saved as JSON in each checkpoint beside the model, optimizer, scheduler and RNG.
        self.checkpointed: dict[str, Any] = {"kl_controller": self.kl_controller, "prompt_order": self.prompt_order}
        if self.health_alarms is not None:
            self.checkpointed["health"] = self.health_alarms

    # ---- set-up steps ----------------------------------------------------------------------------

    def _plan_updates(self, train_dataset: Dataset, eval_dataset: Dataset | None) -> None:
        """Batch sizes with TRL's names, the encoded prompts, their order, and the number of updates."""
        args = self.args
        self.local_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.batch_size = self.local_batch_size * self.accelerator.num_processes
        self.local_mini_batch_size = self.local_batch_size // args.num_mini_batches
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.prompts = encode_prompts(self.processing_class, train_dataset)
        if len(self.prompts) < self.batch_size:
            raise RecipeError(
                f"per_device_train_batch_size: one update needs {self.batch_size} prompts but the dataset has "
                f"{len(self.prompts)}; add prompts or lower the batch size."
            )
        self.prompt_order = PromptOrder(
            len(self.prompts), self.batch_size, self.local_batch_size, self.accelerator.process_index, args.seed
        )
        self.batches_per_epoch = self.prompt_order.batches_per_epoch
        if args.max_steps > 0:
            self.num_updates = args.max_steps
        else:
            total_episodes = args.total_episodes or int(args.num_train_epochs * len(self.prompts))
            self.num_updates = max(1, math.ceil(total_episodes / self.batch_size))

    def _set_up_callbacks(self, callbacks: list[TrainerCallback] | None) -> None:
        """transformers' default, reporting and progress callbacks, plus the given ones; a fresh TrainerState."""
        args = self.args
        callbacks = DEFAULT_CALLBACKS + get_reporting_integration_callbacks(args.report_to) + list(callbacks or [])
        self.callback_handler = CallbackHandler(
            callbacks, self.model, self.processing_class, self.optimizer, self.lr_scheduler
        )
        self.callback_handler.add_callback(PrinterCallback if args.disable_tqdm else DEFAULT_PROGRESS_CALLBACK)
        # The health alarms (the stage passes `health_callbacks(args)`, as every stage does) keep state to checkpoint.
        self.health_alarms = next((c for c in self.callback_handler.callbacks if isinstance(c, HealthCallback)), None)
        bind_trainer(self)  # the health judge and the completions table read `_logs`, the sampled completions
        save_steps = int(args.save_steps) if args.save_steps >= 1 else max(1, int(args.save_steps * self.num_updates))
        self.state = TrainerState(  # what Trainer knows of a run before its first step
            is_local_process_zero=self.accelerator.is_local_main_process,
            is_world_process_zero=self.accelerator.is_main_process,
            max_steps=self.num_updates,
            num_train_epochs=math.ceil(self.num_updates / self.batches_per_epoch),
            logging_steps=int(args.logging_steps) if args.logging_steps >= 1 else 1,
            save_steps=save_steps,
            train_batch_size=self.batch_size,
        )
        self.control = TrainerControl()

    # ---- models ---------------------------------------------------------------------------------

    @property
    def policy(self) -> PreTrainedModel:
        """The (unwrapped) policy model."""
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def value_model(self) -> PreTrainedModel | ValueHead:
        """The (unwrapped) value model."""
        return self.accelerator.unwrap_model(self.model).value_model

    @property
    def reward_checks(self) -> dict[str, Any]:
        """The reward checks' settings and counts (samples skipped, values non-finite or clipped per source)."""
        return self.rollouts.rewards.guard.summary()

    def reference(self) -> AbstractContextManager[PreTrainedModel]:
        """The reference model: the frozen copy, or the policy with its LoRA adapters disabled."""
        return reference_model(self.policy, self.ref_model, self.args.ref_adapter_name)

    # ---- one update ------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One PPO update on the next prompts (rollout → rewards → GAE → optimisation); returns the logged metrics."""
        args = self.args
        self.stopwatch.reset()
        update_start = self.stopwatch.now()
        prompts = [self.prompts[i] for i in self.prompt_order.next_indices()]
        where = f"update {self.state.global_step + 1}"
        with gathered_weights(self.model):
            r, parts = self.rollouts.rollout(self.policy, self.reference, self.value_model, prompts, where)
        self._last_samples = ([p["row"]["prompt"] for p in prompts], r.completions, r.source_scores)
        finite = bool(torch.isfinite(r.logprobs).all() and torch.isfinite(r.values).all())
        # Weights that blew up in the previous update show here first, before any loss is computed.
        self._stop_if_diverged(None if finite else "nan/inf log-probabilities or values of the policy's own samples")
        # A sample skipped for a non-finite reward takes no part in advantages or losses.
        mask = r.mask & ~r.skipped[:, None]
        kl_coef = self.kl_controller.value
        kl = kl_penalty(r.logprobs, r.ref_logprobs, args.kl_estimator) * r.mask
        rewards, non_score_reward = shape_rewards(r.scores, kl, mask, kl_coef, args.whiten_rewards)
        advantages, returns = compute_gae(rewards, r.values, mask, args.gamma, args.lam)
        advantages = whiten(advantages, mask)
        losses = self._train_on(r, advantages, returns, mask)
        metrics = {**r.metrics(kl, non_score_reward, self.stop_token_ids), **losses}
        metrics.update({f"reward/{name}": value for name, value in parts.items()})
        # Every process holds its own share of the batch: log the mean over all of them.
        metrics = {name: self._gather_mean(value) for name, value in metrics.items()}
        metrics["reward/skipped"] = self._gather_sum(r.skipped.sum())
        metrics["objective/kl_coef"] = kl_coef
        self.kl_controller.update(metrics["objective/kl"], self.batch_size)
        # Where this process's time went (rank 0's are logged): not gathered, a slow process shows as itself.
        metrics.update(self.stopwatch.metrics(self.stopwatch.now() - update_start))
        return metrics

    # ---- training loop ---------------------------------------------------------------------------

    def log(self, logs: dict[str, float]) -> None:
        """Append to `state.log_history` and call the callbacks' on_log, as `transformers.Trainer.log` does."""
        logs = {**logs, "epoch": round(self.state.epoch or 0.0, 4), "step": self.state.global_step}
        self.state.log_history.append(logs)
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)
        if self.health_alarms is not None:  # known once the alarms have read this log: in trainer_state.json only
            logs["health/ok"] = float(not self.health_alarms.firing)

    def _gather_samples(self) -> dict[str, Any]:
        """The last rollout's samples from every process, as TRL's trainers keep them in `_logs` (prompt,
        completion, each reward source's score): what the completions table and a health judge read."""
        prompts, completions, values = self._last_samples
        values = self.accelerator.gather(values).tolist() if values is not None else []
        names = self.rollouts.rewards.log_names
        return {
            "prompt": gather_object(prompts),
            "completion": gather_object(completions_for(prompts, completions)),  # TRL's layout, as reward functions get
            "rewards": {name: [row[i] for row in values] for i, name in enumerate(names)},
        }

    def train(self, resume_from_checkpoint: str | None = None) -> dict[str, float]:
        """Run PPO updates until `num_updates`; resume from a checkpoint folder if given."""
        args = self.args
        if resume_from_checkpoint:
            load_checkpoint(self.accelerator, self.state, resume_from_checkpoint, self.checkpointed)
        else:
            torch.manual_seed(args.seed + 100003 * self.accelerator.process_index)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        start_time, start_step = time.time(), self.state.global_step
        while self.state.global_step < self.num_updates:
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            try:
                metrics = self.step()
            except Diverged as diverged:
                self._end_diverged(self.state.global_step + 1, str(diverged))
            self.lr_scheduler.step()
            self.state.global_step += 1
            self.state.epoch = self.state.global_step / self.batches_per_epoch
            episodes = (self.state.global_step - start_step) * self.batch_size
            metrics.update(
                {
                    "lr": self.lr_scheduler.get_last_lr()[0],
                    "episode": self.state.global_step * self.batch_size,
                    "eps": episodes / (time.time() - start_time),
                }
            )
            nonfinite = self.health.nonfinite_metric(metrics)
            if nonfinite is not None:
                self._end_diverged(self.state.global_step, nonfinite)
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.control.should_log or self.state.global_step == self.num_updates:
                # The health alarms run in this log: a stop raises TrainingStopped before this update's checkpoint.
                self._logs = self._gather_samples()
                self.log(metrics)
                self.control.should_log = False
            if self.control.should_save:
                save_checkpoint(self.accelerator, self.state, args.output_dir, args.save_total_limit, self.checkpointed)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
                self.control.should_save = False
            if self.control.should_training_stop:
                break
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        runtime = time.time() - start_time
        episodes = (self.state.global_step - start_step) * self.batch_size
        return {
            "train_runtime": round(runtime, 3),
            "train_updates": self.state.global_step,
            "train_episodes": self.state.global_step * self.batch_size,
            "episodes_per_second": round(episodes / max(runtime, 1e-9), 3),
        }

    def _end_diverged(self, update: int, problem: str) -> NoReturn:
        """Stop with one line; no checkpoint was written after the last good one, so output_dir holds it."""
        raise TrainingStopped(
            divergence_message(f"update {update}", problem, self.args.output_dir, self.args.learning_rate)
        )

    # ---- saving ----------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None) -> None:
        """Save the policy as a plain causal-LM checkpoint (LoRA adapters merged) plus the tokenizer."""
        output_dir = Path(output_dir or self.args.output_dir)
        self.accelerator.wait_for_everyone()
        # Sharded: every rank takes part in gathering the whole weights, which only the main process receives.
        state_dict = self.accelerator.get_state_dict(self.model) if self.sharded else None
        if not self.accelerator.is_main_process:
            return
        policy = self.policy
        if state_dict is not None:
            prefix = "policy."
            state_dict = {name[len(prefix) :]: value for name, value in state_dict.items() if name.startswith(prefix)}
            policy.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
            self.processing_class.save_pretrained(output_dir)
            return
        if self.is_peft_model:
            # Merging is a copy-free in-place operation; it ends training, which is when this is called.
            policy = policy.merge_and_unload()
            self.accelerator.unwrap_model(self.model).policy = policy
            self.is_peft_model = False
            self.ref_model = None
        policy.save_pretrained(output_dir, safe_serialization=True)
        self.processing_class.save_pretrained(output_dir)

    def save_state(self) -> None:
        """Write trainer_state.json (log history included) to the output directory, as Trainer does."""
        if self.accelerator.is_main_process:
            self.state.save_to_json(str(Path(self.args.output_dir) / TRAINER_STATE_FILE))

    # ---- evaluation ------------------------------------------------------------------------------

    def evaluate(
        self,
        eval_dataset: Dataset | None = None,
        metric_key_prefix: str = "eval",
        extra_reward_funcs: dict[str, Callable[..., list[float]]] | None = None,
    ) -> dict[str, float]:
        """Greedy responses on held-out prompts: mean reward (and each source), KL to the reference, length."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            return {}
        prompts = encode_prompts(self.processing_class, dataset)
        with gathered_weights(self.model):
            return self.rollouts.evaluate(self.policy, self.reference, prompts, metric_key_prefix, extra_reward_funcs)

"""The optimisation half of a PPO update: the optimizer and scheduler, and clipped policy + value loss over
minibatches of one rollout.

`PPOOptimization` is a mixin of `rlhf.ppo.trainer.PPOTrainer`, which provides the accelerator,
model, optimizer, callbacks, state and stopwatch it uses.
"""

from __future__ import annotations

import math

import torch
from transformers import Trainer, get_scheduler

from rlhf.logprobs import token_logprobs
from rlhf.ppo.core import masked_mean, policy_loss, value_loss
from rlhf.ppo.models import PolicyAndValue
from rlhf.ppo.rollout import Rollout

# What _train_on averages over its minibatches, in the order it computes them.
LOSS_METRICS = (
    "loss/policy_avg",
    "loss/value_avg",
    "policy/clipfrac_avg",
    "val/clipfrac_avg",
    "policy/approxkl_avg",
    "val/ratio",
)


class Diverged(Exception):
    """A PPO update met a loss, gradient or log-probability it cannot go on from (the message says which)."""


class PPOOptimization:
    """The optimizer and scheduler, `num_ppo_epochs` passes of clipped PPO, and the cross-process checks that stop a
    diverged run."""

    def _prepare_optimization(self, model: PolicyAndValue) -> None:
        """The recipe's `optim` over the trainable weights (transformers' default: fused AdamW, 2.6× faster steps
        than the unfused one on a 135M model on CPU) and transformers' scheduler, prepared (DDP) by accelerate."""
        args = self.args
        optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        optimizer = optimizer_class(
            [p for p in model.parameters() if p.requires_grad], weight_decay=args.weight_decay, **optimizer_kwargs
        )
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=args.get_warmup_steps(self.num_updates),
            num_training_steps=self.num_updates,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
        )
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(model, optimizer, scheduler)

    def _train_on(
        self, r: Rollout, advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, float]:
        """`num_ppo_epochs` passes of clipped PPO over minibatches of the rollout; the mean losses and ratios.

        `mask` marks the response tokens that count (skipped samples have none). Raises `Diverged`, without
        taking the optimizer step, when a loss or the gradient norm is not a number PPO can go on from.
        """
        args = self.args
        stats: dict[str, list[float]] = {k: [] for k in LOSS_METRICS}
        grad_norms: list[float] = []
        generator = torch.Generator().manual_seed(args.seed + self.state.global_step)
        timed = self.stopwatch  # the update's timing/training and timing/optimizer (rlhf.ppo.timing)
        self.model.train()
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(self.local_batch_size, generator=generator)
            for mini_start in range(0, self.local_batch_size, self.local_mini_batch_size):
                mini = order[mini_start : mini_start + self.local_mini_batch_size]
                for micro_start in range(0, len(mini), args.per_device_train_batch_size):
                    idx = mini[micro_start : micro_start + args.per_device_train_batch_size].to(r.input_ids.device)
                    with self.accelerator.accumulate(self.model):
                        with timed("training"):
                            with self.accelerator.autocast():
                                logits, vpred = self.model(r.input_ids[idx], r.attention_mask[idx], r.context_length)
                            new_logprobs, _ = token_logprobs(
                                logits.float(), r.responses[idx], self.rollouts.temperature
                            )
                            vpred = vpred.float()
                            micro_mask = mask[idx]
                            pg_loss, pg_clipfrac, approxkl = policy_loss(
                                new_logprobs, r.logprobs[idx], advantages[idx], micro_mask, args.cliprange
                            )
                            vf_loss, vf_clipfrac = value_loss(
                                vpred, r.values[idx], returns[idx], micro_mask, args.cliprange_value
                            )
                            loss = pg_loss + args.vf_coef * vf_loss
                            self.accelerator.backward(loss)
                        with timed("optimizer"):
                            if self.accelerator.sync_gradients:
                                # Clipping to inf only measures the norm (the gradients are multiplied by 1).
                                grad_norm = self.accelerator.clip_grad_norm_(
                                    self.model.parameters(), args.max_grad_norm or math.inf
                                )
                                grad_norm = None if grad_norm is None else float(grad_norm)
                                self._stop_if_diverged(self.health.check_step(loss.item(), grad_norm))
                                grad_norms.append(grad_norm or 0.0)
                            self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
                            self.optimizer.step()
                            self.optimizer.zero_grad()
                    ratio = masked_mean(torch.exp(new_logprobs - r.logprobs[idx]), micro_mask)
                    for name, value in zip(LOSS_METRICS, (pg_loss, vf_loss, pg_clipfrac, vf_clipfrac, approxkl, ratio)):
                        stats[name].append(value.item())
        means = {name: sum(values) / len(values) for name, values in stats.items()}
        return {**means, "grad_norm_max": max(grad_norms, default=0.0)}

    def _gather_mean(self, value: float | torch.Tensor) -> float:
        tensor = torch.as_tensor(value, dtype=torch.float32, device=self.accelerator.device).reshape(1)
        return self.accelerator.gather_for_metrics(tensor).mean().item()

    def _gather_sum(self, value: float | torch.Tensor) -> float:
        tensor = torch.as_tensor(value, dtype=torch.float32, device=self.accelerator.device).reshape(1)
        return self.accelerator.gather(tensor).sum().item()

    def _stop_if_diverged(self, problem: str | None) -> None:
        """Raise `Diverged` on every process when any process found a problem, so none is left waiting."""
        if self._gather_sum(problem is not None) > 0:
            self.optimizer.zero_grad()
            raise Diverged(problem or "a non-finite loss or gradient on another process")

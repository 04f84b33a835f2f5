"""Rollouts: scoring sampled responses (`rlhf.ppo.sampling` draws and generates them) and the `Rollout` record.

`RolloutMaker` turns prompts into what one PPO update needs (responses, the policy's and the
reference's log-probs, values, rewards) and into the greedy evaluation of a policy.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl.trainer.utils import entropy_from_logits

from rlhf.config import RecipeError
from rlhf.logprobs import response_forward, response_logprobs, sequence_kl, token_logprobs
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.core import is_stop_token, masked_mean
from rlhf.ppo.models import ValueHead, shared_head_forward, token_values
from rlhf.ppo.sampling import completion_texts, generate
from rlhf.ppo.timing import Stopwatch
from rlhf.rewards import (
    RewardGuard,
    check_reward_weights,
    completions_for,
    reward_model_scores,
    reward_source_name,
)

RewardFunction = Callable[..., list[float]]
ReferenceContext = Callable[[], AbstractContextManager[PreTrainedModel]]


class RewardSources:
    """A reward model and/or Python reward functions, weighted (reward model first) into one score per completion.

    `guard` applies the recipe's `nonfinite_rewards` / `max_abs_reward` to their values.
    """

    def __init__(
        self,
        reward_model: PreTrainedModel | None,
        reward_tokenizer: PreTrainedTokenizerBase,
        reward_funcs: list[RewardFunction],
        weights: list[float] | None,
        stats: dict[str, float] | None,
        batch_size: int,
        nonfinite_rewards: str = "stop",
        max_abs_reward: float | None = 1e4,
    ) -> None:
        if reward_model is None and not reward_funcs:
            raise RecipeError("reward_model_path / reward_funcs: PPO needs a reward; set at least one of them.")
        self.reward_model, self.reward_tokenizer, self.reward_funcs = reward_model, reward_tokenizer, reward_funcs
        self.weights = check_reward_weights(weights, (reward_model is not None) + len(reward_funcs))
        self.stats, self.batch_size = stats, batch_size
        # Log keys (`reward/<name>`) and the names in messages and metrics.json (paths a user can find).
        self.log_names = (["reward_model"] if reward_model is not None else []) + [
            getattr(f, "__name__", "reward_func") for f in reward_funcs
        ]
        sources = ([reward_model.name_or_path] if reward_model is not None else []) + list(reward_funcs)
        self.guard = RewardGuard([reward_source_name(s) for s in sources], nonfinite_rewards, max_abs_reward)

    @torch.no_grad()
    def values(
        self, rows: list[dict[str, Any]], completions: list[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each source's value of each (prompt row, completion): (samples × sources) values, and where a function
        gave None."""
        columns, missing = [], []
        prompts = [r["prompt"] for r in rows]
        if self.reward_model is not None:
            scores = reward_model_scores(
                self.reward_model, self.reward_tokenizer, prompts, completions, self.batch_size
            ).to(device, torch.float32)
            if self.stats:
                scores = (scores - self.stats["mean"]) / max(self.stats["std"], 1e-6)
            columns.append(scores)
            missing.append(torch.zeros(len(completions), dtype=torch.bool, device=device))
        formatted = completions_for(prompts, completions)
        extra = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt", "completion")}
        for function in self.reward_funcs:
            values = function(prompts=prompts, completions=formatted, **extra)
            columns.append(
                torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float32, device=device)
            )
            missing.append(torch.tensor([v is None for v in values], dtype=torch.bool, device=device))
        return torch.stack(columns, 1), torch.stack(missing, 1)

    def total(self, values: torch.Tensor, skipped: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted sum of checked values (a missing or skipped value adds 0); each source's mean over kept samples."""
        total = torch.zeros(len(values), device=values.device)
        parts: dict[str, float] = {}
        kept = ~skipped
        for column, name, weight in zip(values.nan_to_num(nan=0.0).unbind(1), self.log_names, self.weights):
            parts[name] = column[kept].mean().item() if kept.any() else 0.0
            total += weight * column
        return total, parts


@dataclass
class Rollout:
    """One batch of generated responses and everything PPO needs from it."""

    input_ids: torch.Tensor  # prompt (left-padded) + response
    attention_mask: torch.Tensor
    context_length: int
    responses: torch.Tensor
    mask: torch.Tensor  # response tokens up to and including the stop token
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    entropy: torch.Tensor  # per token, of the rollout policy
    skipped: torch.Tensor  # per sample: a reward source gave NaN/inf (nonfinite_rewards: skip)
    completions: list[str] = field(default_factory=list)
    source_scores: torch.Tensor | None = None  # samples × reward sources, checked, before weighting

    def metrics(
        self, kl: torch.Tensor, non_score_reward: torch.Tensor, stop_token_ids: list[int]
    ) -> dict[str, torch.Tensor | float]:
        """This process's rollout metrics under TRL's names, given the per-token KL and KL penalty."""
        mask, kept = self.mask, ~self.skipped
        scores = self.scores[kept] if kept.any() else self.scores.new_zeros(1)  # skipped samples have no score
        return {
            "objective/kl": kl.sum(1).mean(),
            "objective/entropy": (-self.logprobs * mask).sum(1).mean(),
            "objective/non_score_reward": non_score_reward.sum(1).mean(),
            "objective/rlhf_reward": scores.mean() + non_score_reward.sum(1).mean(),
            "objective/scores": scores.mean(),
            "objective/scores_std": scores.std() if len(scores) > 1 else 0.0,
            "policy/entropy_rollout": masked_mean(self.entropy, mask),
            "response_length/mean": mask.float().sum(1).mean(),
            "val/eos_fraction": (
                is_stop_token(self.responses, stop_token_ids).any(1).float().mean() if stop_token_ids else 0.0
            ),
        }


class RolloutMaker:
    """Generates and scores responses of a policy: one PPO rollout, or a greedy evaluation.

    A rollout adds the time of each of its parts to `stopwatch` (`rlhf.ppo.timing`); an evaluation does not.
    """

    def __init__(
        self,
        args: PPOConfig,
        tokenizer: PreTrainedTokenizerBase,
        rewards: RewardSources,
        accelerator: Accelerator,
        stop_token_ids: list[int],
        stopwatch: Stopwatch,
    ) -> None:
        self.args, self.tokenizer, self.rewards, self.accelerator = args, tokenizer, rewards, accelerator
        self.stop_token_ids = stop_token_ids
        self.stopwatch = stopwatch
        self.temperature = args.temperature + 1e-7  # TRL's guard against a zero temperature

    def logprobs(
        self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Response log-probs and logits at the sampling temperature (the distribution responses come from)."""
        return response_logprobs(model, input_ids, attention_mask, context_length, self.temperature)

    def generate(
        self, policy: PreTrainedModel, prompt_ids: list[list[int]], do_sample: bool
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        return generate(
            policy,
            prompt_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            stop_token_ids=self.stop_token_ids,
            max_new_tokens=self.args.response_length,
            temperature=self.temperature,
            do_sample=do_sample,
            batch_size=self.args.local_rollout_forward_batch_size,
            device=self.accelerator.device,
        )

    def score(
        self, rows: list[dict[str, Any]], completions: list[str], where: str, across_processes: bool
    ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor, torch.Tensor]:
        """Checked, weighted rewards of completions; each source's mean; the samples skipped for a non-finite value;
        each source's checked value of each sample (samples × sources).

        `across_processes`: each process holds its own share of the batch, so the checks run on all of
        it (gathered) and every process stops, or skips the same samples, alike.
        """
        with self.accelerator.autocast():  # a reward model scores at the recipe's precision, as the policy runs
            values, missing = self.rewards.values(rows, completions, self.accelerator.device)
        if not across_processes:
            values, skipped = self.rewards.guard.check(values, missing, where, record=False)
            return (*self.rewards.total(values, skipped), skipped, values)
        count, start = len(values), self.accelerator.process_index * len(values)
        values, missing = self.accelerator.gather(values), self.accelerator.gather(missing.float())
        values, skipped = self.rewards.guard.check(values, missing, where)
        values, skipped = values[start : start + count], skipped[start : start + count]
        return (*self.rewards.total(values, skipped), skipped, values)

    @torch.no_grad()
    def rollout(
        self,
        policy: PreTrainedModel,
        reference: ReferenceContext,
        value_model: PreTrainedModel | ValueHead,
        prompts: list[dict[str, Any]],
        where: str = "update",
    ) -> tuple[Rollout, dict[str, float]]:
        """Sample responses to encoded prompts and score them (`where`: the update, for messages); also each source's
        mean."""
        args, timed = self.args, self.stopwatch
        with timed("generation"), self.accelerator.autocast():
            input_ids, attention_mask, context_length = self.generate(policy, [p["input_ids"] for p in prompts], True)
        responses = input_ids[:, context_length:]
        mask = attention_mask[:, context_length:].bool()
        logprobs, ref_logprobs, values, entropies = [], [], [], []
        step = args.local_rollout_forward_batch_size
        for start in range(0, input_ids.shape[0], step):
            ids, attn = input_ids[start : start + step], attention_mask[start : start + step]
            with self.accelerator.autocast():
                with timed("policy_forward"):
                    if isinstance(value_model, ValueHead):  # one pass gives log-probs and values
                        logits, token_value = shared_head_forward(policy, value_model, ids, attn, context_length)
                    else:
                        logits = response_forward(policy, ids, attn, context_length).logits
                    logprob, logits = token_logprobs(logits, ids[:, context_length:], self.temperature)
                    entropies.append(entropy_from_logits(logits.float()))
                with timed("reference_forward"), reference() as reference_model:
                    ref_logprobs.append(self.logprobs(reference_model, ids, attn, context_length)[0])
                with timed("value_forward"):
                    if not isinstance(value_model, ValueHead):
                        token_value = token_values(value_model, ids, attn, context_length)
                    values.append(token_value.float())
            logprobs.append(logprob)
        with timed("reward"):
            completions = completion_texts(self.tokenizer, responses, mask)
            scores, parts, skipped, source_scores = self.score(
                [p["row"] for p in prompts], completions, where, across_processes=True
            )
        if args.missing_eos_penalty is not None and self.stop_token_ids:
            scores = scores - args.missing_eos_penalty * (~is_stop_token(responses, self.stop_token_ids).any(1)).float()
        rollout = Rollout(
            input_ids=input_ids,
            attention_mask=attention_mask,
            context_length=context_length,
            responses=responses,
            mask=mask,
            logprobs=torch.cat(logprobs).float() * mask,
            ref_logprobs=torch.cat(ref_logprobs).float() * mask,
            values=torch.cat(values) * mask,
            scores=scores.float(),
            entropy=torch.cat(entropies),
            skipped=skipped,
            completions=completions,
            source_scores=source_scores,
        )
        return rollout, parts

    @torch.no_grad()
    def evaluate(
        self,
        policy: PreTrainedModel,
        reference: ReferenceContext,
        prompts: list[dict[str, Any]],
        metric_key_prefix: str = "eval",
        extra_reward_funcs: dict[str, RewardFunction] | None = None,
    ) -> dict[str, float]:
        """Greedy responses to encoded prompts: mean reward (and each source), KL to the reference, length.

        Samples a non-finite reward skipped (`nonfinite_rewards: skip`) count in `<prefix>_rewards_skipped`, not
        in the reward means.
        """
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        skipped_count = 0
        step = self.args.per_device_eval_batch_size
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            with self.accelerator.autocast():
                ids, attn, context_length = self.generate(policy, [p["input_ids"] for p in chunk], do_sample=False)
            mask = attn[:, context_length:].bool()
            completions = completion_texts(self.tokenizer, ids[:, context_length:], mask)
            rows = [p["row"] for p in chunk]
            # Every process evaluates every prompt, so each takes the same decision on its own values.
            where = f"the {metric_key_prefix} evaluation"
            scores, parts, skipped, _ = self.score(rows, completions, where, across_processes=False)
            kept = ~skipped
            skipped_count += int(skipped.sum())
            with self.accelerator.autocast():
                logprob, _ = self.logprobs(policy, ids, attn, context_length)
                with reference() as reference_model:
                    ref_logprob, _ = self.logprobs(reference_model, ids, attn, context_length)
            values = {
                "reward": scores[kept],
                "kl": sequence_kl(logprob, ref_logprob, mask),
                "response_length": mask.float().sum(1),
            }
            for name, value in parts.items():
                values[f"reward/{name}"] = scores.new_full((int(kept.sum()),), value)
            texts = [r["prompt"] for r in rows]
            formatted = completions_for(texts, completions)
            for name, function in (extra_reward_funcs or {}).items():
                values[name] = torch.tensor(function(prompts=texts, completions=formatted), dtype=torch.float32)
            for name, value in values.items():
                totals[name] = totals.get(name, 0.0) + value.float().sum().item()
                counts[name] = counts.get(name, 0) + len(value)
        metrics = {f"{metric_key_prefix}_{k}": round(v / max(counts[k], 1), 4) for k, v in totals.items()}
        return {**metrics, f"{metric_key_prefix}_rewards_skipped": skipped_count} if prompts else metrics

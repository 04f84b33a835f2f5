"""The PPO math as pure functions on tensors, the KL controllers and the bad-number checks: each tested by hand."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlhf.callbacks import divergence_problem


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is true (over `dim`, or everything)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Standardise `values` over the masked entries (unbiased variance, as TRL); masked-out entries become 0."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    if count < 2:
        return torch.zeros_like(values) if shift_mean else values * mask
    var = masked_mean((values - mean) ** 2, mask) * count / (count - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def is_stop_token(responses: torch.Tensor, stop_token_ids: int | list[int] | None) -> torch.Tensor:
    """True where a response token is one of the stop tokens (a model may end a turn on several)."""
    ids = [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids or [])
    return torch.isin(responses, torch.tensor(ids, dtype=responses.dtype, device=responses.device))


def response_mask(responses: torch.Tensor, stop_token_ids: int | list[int] | None) -> torch.Tensor:
    """True for response tokens up to and including the first stop token; False after it."""
    if not stop_token_ids and stop_token_ids != 0:
        return torch.ones_like(responses, dtype=torch.bool)
    is_stop = is_stop_token(responses, stop_token_ids)
    # A token is kept when no stop token occurs strictly before it.
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    return stops_before == 0


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(policy ‖ reference) estimate from sampled tokens: k1 = log p − log q, k3 = (r − 1) − log r."""
    log_ratio = ref_logprobs - logprobs  # log r, r = q / p
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


def shape_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float, whiten_rewards: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: −kl_coef·KL on every token, plus each sequence's score on its last response token.

    Returns (rewards, the KL part alone); with `whiten_rewards` the rewards are whitened (mean kept).
    """
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    last = mask.long().sum(1).clamp(min=1) - 1
    rewards[torch.arange(len(last), device=last.device), last] += scores
    if whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    return rewards, non_score_reward


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns), 0 where masked."""
    mask = mask.to(rewards.dtype)
    values = values * mask
    rewards = rewards * mask
    last_advantage = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_advantage = (delta + gamma * lam * last_advantage) * mask[:, t]
        advantages[:, t] = last_advantage
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss; returns (loss, clip fraction, approximate KL ½·E[(log ratio)²])."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return loss, clipfrac.detach(), approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ½·E[max((v − R)², (clip(v, v_old ± ε) − R)²)]; returns (loss, clip fraction)."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    return loss, masked_mean((clipped_loss > unclipped_loss).float(), mask).detach()


class KLController:
    """The KL coefficient; `state_dict`/`load_state_dict` let `Accelerator.save_state` checkpoint it."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, num_episodes: int) -> None:
        """Adapt the coefficient after an update (a fixed controller keeps it)."""

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["kl_coef"]


class FixedKLController(KLController):
    """A constant KL coefficient."""


class AdaptiveKLController(KLController):
    """Ziegler et al. (2019): move kl_coef proportionally toward `target` KL, error clipped to ±20%."""

    def __init__(self, kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, num_episodes: int) -> None:
        """Scale kl_coef by 1 + clip(KL/target − 1, ±0.2) · episodes/horizon."""
        error = max(-0.2, min(0.2, current_kl / self.target - 1.0))
        self.value *= 1.0 + error * num_episodes / self.horizon


def make_kl_controller(kind: str, kl_coef: float, target: float, horizon: int) -> KLController:
    """The recipe's `kl_controller`: 'adaptive' (toward `target`) or 'fixed'."""
    return AdaptiveKLController(kl_coef, target, horizon) if kind == "adaptive" else FixedKLController(kl_coef)


@dataclass
class HealthMonitor:
    """The numbers PPO cannot go on from: they end the run whatever `health_action` says.

    `check_step` flags a NaN/inf loss or gradient norm, or one above `max_grad_norm_alarm`;
    `nonfinite_metric` a NaN/inf logged metric. The health alarms (KL, response length, entropy, reward
    hacking) are `rlhf.callbacks.HealthCallback`, shared with every other stage.
    """

    max_grad_norm_alarm: float | None = None

    def check_step(self, loss: float, grad_norm: float | None) -> str | None:
        """What is wrong with one optimizer step's loss and gradient norm before clipping (None when fine)."""
        return divergence_problem(loss, grad_norm, self.max_grad_norm_alarm)

    @staticmethod
    def nonfinite_metric(metrics: dict[str, float]) -> str | None:
        """The first logged metric that is NaN or ±inf, as 'name value' (None when all are finite)."""
        return next((f"{name} {value}" for name, value in metrics.items() if not math.isfinite(value)), None)

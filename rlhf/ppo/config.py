"""PPOConfig: TRL 1.12's PPO settings on top of transformers' TrainingArguments, plus the reward sources."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from rlhf.callbacks import DivergenceArguments
from rlhf.config import RecipeError
from rlhf.rewards import RewardSourceArguments


@dataclass
class PPOConfig(TrainingArguments, RewardSourceArguments, DivergenceArguments):
    """PPO settings: TRL 1.12's `PPOConfig` names, plus an adaptive KL controller, reward mixing, and the health
    alarms every stage shares (`rlhf.health.HealthArguments`: max_kl per sequence, response length, min_entropy
    on `policy/entropy_rollout`, reward hacking, health_action / health_actions).

    Batch sizes follow TRL: one update uses `batch_size = per_device_train_batch_size ×
    gradient_accumulation_steps × num_processes` prompts, split into `num_mini_batches` minibatches
    for each of `num_ppo_epochs` passes. `total_episodes` (default `num_train_epochs × len(dataset)`)
    or `max_steps` (updates) sets the length of training. Bad numbers (`nonfinite_rewards`,
    `max_abs_reward`, `max_grad_norm_alarm`, and any NaN/inf loss, gradient or log-probability)
    stop the run or skip samples whatever `health_action` says.
    """

    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW learning rate (TRL's PPO default)."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N updates."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches per rollout batch."})
    total_episodes: int | None = field(default=None, metadata={"help": "Prompts to train on in total."})
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Per-process batch size of the no-grad generation and scoring passes."}
    )
    response_length: int = field(default=53, metadata={"help": "Maximum new tokens per response."})
    stop_token: Literal["eos"] | None = field(
        default="eos", metadata={"help": "'eos' stops responses at the tokenizer's EOS; None uses stop_token_id."}
    )
    stop_token_id: int | None = field(default=None, metadata={"help": "Token id that ends a response."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of rollouts."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a response without the stop token."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the reward model (first) and each reward function."}
    )
    normalize_reward: bool = field(
        default=True, metadata={"help": "Standardise reward-model scores with the reward stage's reward_stats."}
    )
    value_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Value model start (a causal LM checkpoint with the policy's tokenizer); 'shared': a value head "
            "on the policy's own last hidden state (one backbone; with LoRA one base copy for policy, reference "
            "and critic); unset: 'shared' for a LoRA policy, else the reward model when it is such a checkpoint, "
            "else a new value head on the policy checkpoint."
        },
    )
    ref_adapter_name: str | None = field(default=None, metadata={"help": "LoRA: adapter used as reference."})
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty coefficient (initial value if adaptive)."})
    kl_estimator: Literal["k1", "k3"] = field(
        default="k1", metadata={"help": "KL estimator (joschu.net/blog/kl-approx)."}
    )
    kl_controller: Literal["fixed", "adaptive"] = field(
        default="fixed", metadata={"help": "'adaptive' steers kl_coef toward target_kl (Ziegler et al. 2019)."}
    )
    target_kl: float = field(default=6.0, metadata={"help": "Adaptive controller: target sequence KL (nats)."})
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive controller: horizon in episodes."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss coefficient."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards before GAE."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_estimator not in ("k1", "k3"):
            raise RecipeError(f"kl_estimator: got {self.kl_estimator!r}; use 'k1' or 'k3'.")
        if self.stop_token not in (None, "eos"):
            raise RecipeError(f"stop_token: got {self.stop_token!r}; use 'eos' or leave it unset.")
        if self.num_ppo_epochs < 1 or self.num_mini_batches < 1:
            raise RecipeError("num_ppo_epochs and num_mini_batches must be at least 1.")
        if self.response_length < 1:
            raise RecipeError("response_length: must be at least 1 token.")
        local = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if local % self.num_mini_batches or (local // self.num_mini_batches) % self.per_device_train_batch_size:
            raise RecipeError(
                f"num_mini_batches: per_device_train_batch_size × gradient_accumulation_steps = {local} must split "
                f"into {self.num_mini_batches} minibatches that are multiples of per_device_train_batch_size "
                f"({self.per_device_train_batch_size}); e.g. set gradient_accumulation_steps to a multiple of "
                "num_mini_batches."
            )

"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), built from the parts TRL 1.16 still ships.

TRL moved `PPOTrainer` to `trl.experimental` and removed it in 1.13. This module keeps its names
(`PPOConfig` fields, `objective/kl`-style log keys, `checkpoint-<step>/` folders) so a user of the old
trainer feels at home, and assembles it from accelerate (`Accelerator`), transformers' trainer
machinery (`TrainerState`, `TrainerControl`, `CallbackHandler`, `get_scheduler`) and TRL's utilities
(`selective_log_softmax`, `entropy_from_logits`, `disable_dropout_in_model`, `use_adapter`).

One update = one rollout of `batch_size` prompts:
  generate → truncate after the stop token → logprobs (policy, reference), values, scores →
  per-token rewards (−kl_coef·KL, plus the score on the last token) → GAE → whiten advantages →
  `num_ppo_epochs` passes over `num_mini_batches` minibatches of clipped policy + value loss.
The math lives in small pure functions below (`response_mask`, `kl_penalty`, `compute_gae`, `whiten`,
`policy_loss`, `value_loss`) that the tests check against hand-computed values.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from datasets import Dataset
from safetensors.torch import load_file
from torch import nn
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    get_scheduler,
)
from transformers.integrations import get_reporting_integration_callbacks
from transformers.trainer import DEFAULT_CALLBACKS, DEFAULT_PROGRESS_CALLBACK
from transformers.trainer_callback import CallbackHandler, PrinterCallback
from trl.trainer.utils import disable_dropout_in_model, entropy_from_logits, selective_log_softmax

from rlhf.config import RecipeError
from rlhf.rewards import RewardSourceArguments

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
PPO_STATE_FILE = "ppo_state.json"
VALUE_MODEL_DIR = "value_model"


@dataclass
class PPOConfig(TrainingArguments, RewardSourceArguments):
    """PPO settings: TRL 1.12's `PPOConfig` names, plus an adaptive KL controller, reward mixing and a health monitor.

    Batch sizes follow TRL: one update uses `batch_size = per_device_train_batch_size ×
    gradient_accumulation_steps × num_processes` prompts, split into `num_mini_batches` minibatches
    for each of `num_ppo_epochs` passes. `total_episodes` (default `num_train_epochs × len(dataset)`)
    or `max_steps` (updates) sets the length of training.
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
        default=None, metadata={"help": "Value model start; default the reward model, else the policy + new head."}
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
    max_kl: float | None = field(default=None, metadata={"help": "Health: largest allowed sequence KL to reference."})
    max_response_length_ratio: float | None = field(
        default=None, metadata={"help": "Health: largest allowed mean response length / the first update's."}
    )
    min_entropy: float | None = field(default=None, metadata={"help": "Health: smallest allowed per-token entropy."})
    health_action: Literal["warn", "stop"] = field(
        default="warn", metadata={"help": "On a health violation: warn, or stop and keep the last good checkpoint."}
    )

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


# ---------------------------------------------------------------------------------------------
# The math, as pure functions on tensors.
# ---------------------------------------------------------------------------------------------


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


def response_mask(responses: torch.Tensor, stop_token_id: int | None) -> torch.Tensor:
    """True for response tokens up to and including the first stop token; False after it."""
    if stop_token_id is None:
        return torch.ones_like(responses, dtype=torch.bool)
    is_stop = responses == stop_token_id
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


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, num_episodes: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController:
    """Ziegler et al. (2019): move kl_coef proportionally toward `target` KL, error clipped to ±20%."""

    def __init__(self, kl_coef: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, num_episodes: int) -> None:
        """Scale kl_coef by 1 + clip(KL/target − 1, ±0.2) · episodes/horizon."""
        error = max(-0.2, min(0.2, current_kl / self.target - 1.0))
        self.value *= 1.0 + error * num_episodes / self.horizon


@dataclass
class HealthMonitor:
    """Recipe thresholds that flag runaway KL, runaway response length and entropy collapse."""

    max_kl: float | None = None
    max_response_length_ratio: float | None = None
    min_entropy: float | None = None
    initial_response_length: float | None = None

    def check(self, metrics: dict[str, float]) -> list[str]:
        """The problems in one update's metrics (empty when healthy)."""
        problems = []
        length = metrics["response_length/mean"]
        if self.initial_response_length is None:
            self.initial_response_length = max(length, 1.0)
        kl, entropy = metrics["objective/kl"], metrics["policy/entropy_rollout"]
        if self.max_kl is not None and kl > self.max_kl:
            problems.append(f"KL to the reference {kl:.3f} > max_kl {self.max_kl}")
        ratio = length / self.initial_response_length
        if self.max_response_length_ratio is not None and ratio > self.max_response_length_ratio:
            problems.append(
                f"mean response length {length:.1f} is {ratio:.2f}× the first update's "
                f"(> max_response_length_ratio {self.max_response_length_ratio})"
            )
        if self.min_entropy is not None and entropy < self.min_entropy:
            problems.append(f"per-token entropy {entropy:.3f} < min_entropy {self.min_entropy}")
        return problems


# ---------------------------------------------------------------------------------------------
# Models: forward passes that respect left-padded prompts.
# ---------------------------------------------------------------------------------------------


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def token_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token scalar scores of a sequence-classification model (its score head on every position)."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask)
    ).last_hidden_state
    return model.score(hidden).squeeze(-1)


class PolicyAndValue(nn.Module):
    """Policy and value model behind one forward, so one `accelerator.prepare` (DDP) covers both."""

    def __init__(self, policy: PreTrainedModel, value_model: PreTrainedModel) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask)
        ).logits
        return logits, token_scores(self.value_model, input_ids, attention_mask)


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _load_weights(model: nn.Module, folder: Path) -> None:
    """Load a save_pretrained folder's safetensors (single file or sharded) into `model`."""
    index = folder / "model.safetensors.index.json"
    files = (
        sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.exists()
        else [folder / "model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k or "embed" in k}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint {folder} does not match the model: missing {missing}, unexpected {unexpected}")


# ---------------------------------------------------------------------------------------------
# The trainer.
# ---------------------------------------------------------------------------------------------


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
    completions: list[str] = field(default_factory=list)


class PPOTrainer:
    """PPO with a policy, a reference (a frozen copy, or the policy with LoRA adapters disabled), reward
    sources (a reward model and/or Python reward functions) and a value model.

    Logs, callbacks and `trainer_state.json` follow `transformers.Trainer`, so the same plotting and
    callbacks work; checkpoints are `checkpoint-<update>/` folders holding the policy, the value model,
    optimizer, scheduler, KL controller, RNG and data position, and `train()` resumes from one.
    """

    def __init__(
        self,
        args: PPOConfig,
        processing_class: PreTrainedTokenizerBase,
        model: PreTrainedModel,
        ref_model: PreTrainedModel | None,
        reward_model: PreTrainedModel | None,
        train_dataset: Dataset,
        value_model: PreTrainedModel,
        eval_dataset: Dataset | None = None,
        reward_funcs: list[Callable[..., list[float]]] | None = None,
        reward_processing_class: PreTrainedTokenizerBase | None = None,
        reward_stats: dict[str, float] | None = None,
        peft_config: Any = None,
        callbacks: list[TrainerCallback] | None = None,
    ) -> None:
        if reward_model is None and not reward_funcs:
            raise RecipeError("reward_model_path / reward_funcs: PPO needs a reward; set at least one of them.")
        if ref_model is not None and ref_model is model:
            raise ValueError("`model` and `ref_model` must be different objects (pass None to copy the policy).")
        self.args = args
        self.processing_class = processing_class
        self.reward_processing_class = reward_processing_class or processing_class
        self.reward_funcs = list(reward_funcs or [])
        self.reward_stats = reward_stats if args.normalize_reward else None
        num_sources = (reward_model is not None) + len(self.reward_funcs)
        self.reward_weights = list(args.reward_weights or [1.0] * num_sources)
        if len(self.reward_weights) != num_sources:
            raise RecipeError(
                f"reward_weights: got {len(self.reward_weights)} weights for {num_sources} reward sources "
                "(the reward model first, then each of reward_funcs); give one weight per source."
            )
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps // args.num_mini_batches,
            mixed_precision="bf16" if args.bf16 else ("fp16" if args.fp16 else "no"),
            cpu=args.use_cpu,
        )
        self.stop_token_id = processing_class.eos_token_id if args.stop_token == "eos" else args.stop_token_id

        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.is_peft_model = _is_peft(model)
        if ref_model is None and not self.is_peft_model:
            ref_model = copy.deepcopy(model)  # frozen below
        # With LoRA the reference is the same base weights with the adapters switched off: one copy.
        self.ref_model = ref_model
        self.reward_model = reward_model
        for module in (model, ref_model, value_model, reward_model):
            if module is not None:
                disable_dropout_in_model(module)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = True

        # Batch sizes, with TRL's names.
        world = self.accelerator.num_processes
        self.local_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.batch_size = self.local_batch_size * world
        self.local_mini_batch_size = self.local_batch_size // args.num_mini_batches
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.prompts = self._encode_prompts(train_dataset)
        if len(self.prompts) < self.batch_size:
            raise RecipeError(
                f"per_device_train_batch_size: one update needs {self.batch_size} prompts but the dataset has "
                f"{len(self.prompts)}; add prompts or lower the batch size."
            )
        self.batches_per_epoch = len(self.prompts) // self.batch_size
        if args.max_steps > 0:
            self.num_updates = args.max_steps
        else:
            total_episodes = args.total_episodes or int(args.num_train_epochs * len(self.prompts))
            self.num_updates = max(1, math.ceil(total_episodes / self.batch_size))

        self.model = PolicyAndValue(model, value_model)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )
        self.lr_scheduler = get_scheduler(
            args.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=args.get_warmup_steps(self.num_updates),
            num_training_steps=self.num_updates,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
        )
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        device = self.accelerator.device
        for module in (self.ref_model, self.reward_model):
            if module is not None:
                module.to(device).eval()
                module.requires_grad_(False)

        if args.kl_controller == "adaptive":
            self.kl_controller = AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
        else:
            self.kl_controller = FixedKLController(args.kl_coef)
        self.health = HealthMonitor(args.max_kl, args.max_response_length_ratio, args.min_entropy)
        self.health_events: list[dict[str, Any]] = []
        self.stopped_by_health: str | None = None
        self._last_good: dict[str, torch.Tensor] | None = None

        callbacks = DEFAULT_CALLBACKS + get_reporting_integration_callbacks(args.report_to) + list(callbacks or [])
        self.callback_handler = CallbackHandler(
            callbacks, self.model, processing_class, self.optimizer, self.lr_scheduler
        )
        self.callback_handler.add_callback(PrinterCallback if args.disable_tqdm else DEFAULT_PROGRESS_CALLBACK)
        self.state = TrainerState(
            is_local_process_zero=self.accelerator.is_local_main_process,
            is_world_process_zero=self.accelerator.is_main_process,
        )
        self.control = TrainerControl()

    # ---- data -----------------------------------------------------------------------------------

    def _encode_prompts(self, dataset: Dataset) -> list[dict[str, Any]]:
        """Tokenize prompts once (chat template with the generation prompt for conversational ones)."""
        tokenizer = self.processing_class
        rows = []
        for row in dataset:
            prompt = row["prompt"]
            if isinstance(prompt, list):
                ids = tokenizer.apply_chat_template(
                    prompt, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            else:
                ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            rows.append({"input_ids": list(ids), "row": row})
        return rows

    def _batch_indices(self, update: int) -> list[int]:
        """This process's prompt indices for 0-based `update`: a seeded shuffle per epoch, so resuming needs only the step."""
        epoch, position = divmod(update, self.batches_per_epoch)
        generator = torch.Generator().manual_seed(self.args.seed + epoch)
        order = torch.randperm(len(self.prompts), generator=generator).tolist()
        start = position * self.batch_size + self.accelerator.process_index * self.local_batch_size
        return order[start : start + self.local_batch_size]

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(s) for s in sequences)
        pad = self.processing_class.pad_token_id
        ids = torch.full((len(sequences), length), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, length - len(s) :] = 1
        device = self.accelerator.device
        return ids.to(device), mask.to(device)

    # ---- models ---------------------------------------------------------------------------------

    @property
    def policy(self) -> PreTrainedModel:
        """The (unwrapped) policy model."""
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def value_model(self) -> PreTrainedModel:
        """The (unwrapped) value model."""
        return self.accelerator.unwrap_model(self.model).value_model

    @contextmanager
    def reference(self) -> Iterator[PreTrainedModel]:
        """The reference model: the frozen copy, or the policy with its LoRA adapters disabled."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        policy = self.policy
        if self.args.ref_adapter_name:
            from trl.trainer.utils import use_adapter

            context = use_adapter(policy, self.args.ref_adapter_name)
        else:
            context = policy.disable_adapter()
        with context:
            yield policy

    def _logprobs(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask)
        ).logits[:, context_length - 1 : -1]
        logits = logits / (self.args.temperature + 1e-7)
        return selective_log_softmax(logits, input_ids[:, context_length:]), logits

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], do_sample: bool = True, max_new_tokens: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Generate responses; returns (prompt+response ids, attention mask that ends at the stop token, prompt length)."""
        args = self.args
        max_new_tokens = max_new_tokens or args.response_length
        queries, query_mask = self._left_pad(prompt_ids)
        context_length = queries.shape[1]
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if self.stop_token_id is None else None,
            do_sample=do_sample,
            temperature=args.temperature + 1e-7 if do_sample else None,
            top_k=0 if do_sample else None,
            top_p=1.0 if do_sample else None,
            eos_token_id=self.stop_token_id,
            pad_token_id=self.processing_class.pad_token_id,
            use_cache=True,
        )
        policy = self.policy
        was_training = policy.training
        policy.eval()
        chunks = []
        step = args.local_rollout_forward_batch_size
        for start in range(0, queries.shape[0], step):
            output = policy.generate(
                input_ids=queries[start : start + step],
                attention_mask=query_mask[start : start + step],
                generation_config=config,
            )
            response = output[:, context_length:]
            if response.shape[1] < max_new_tokens:  # every sequence stopped early
                filler = torch.full(
                    (response.shape[0], max_new_tokens - response.shape[1]),
                    self.processing_class.pad_token_id,
                    dtype=response.dtype,
                    device=response.device,
                )
                response = torch.cat([response, filler], dim=1)
            chunks.append(response)
        policy.train(was_training)
        responses = torch.cat(chunks)
        mask = response_mask(responses, self.stop_token_id)
        responses = responses.masked_fill(~mask, self.processing_class.pad_token_id)
        return torch.cat([queries, responses], 1), torch.cat([query_mask, mask.long()], 1), context_length

    def _completion_texts(self, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [
            self.processing_class.decode(r[m].tolist(), skip_special_tokens=True).strip()
            for r, m in zip(responses, mask.bool())
        ]

    @torch.no_grad()
    def score(self, rows: list[dict[str, Any]], completions: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted sum of the reward sources for each (prompt row, completion text); also each source's mean."""
        device = self.accelerator.device
        total = torch.zeros(len(completions), device=device)
        parts: dict[str, float] = {}
        weights = iter(self.reward_weights)
        if self.reward_model is not None:
            model_scores = self.reward_model_scores(rows, completions)
            parts["reward_model"] = model_scores.mean().item()
            total += next(weights) * model_scores
        prompts = [r["prompt"] for r in rows]
        conversational = isinstance(prompts[0], list)
        formatted = [[{"role": "assistant", "content": c}] for c in completions] if conversational else completions
        extra = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt", "completion")}
        for function in self.reward_funcs:
            values = function(prompts=prompts, completions=formatted, **extra)
            values = torch.tensor([float("nan") if v is None else v for v in values], device=device)
            values = torch.nan_to_num(values, nan=0.0)
            parts[getattr(function, "__name__", "reward_func")] = values.mean().item()
            total += next(weights) * values
        return total, parts

    def reward_model_scores(self, rows: list[dict[str, Any]], completions: list[str]) -> torch.Tensor:
        """Reward-model scores of completions, tokenized as the reward stage saw them (normalised by reward_stats)."""
        tokenizer = self.reward_processing_class
        sequences = []
        for row, completion in zip(rows, completions):
            prompt = row["prompt"]
            if isinstance(prompt, list):
                messages = [*prompt, {"role": "assistant", "content": completion}]
                ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
            else:
                ids = tokenizer(prompt + completion, add_special_tokens=True)["input_ids"]
            sequences.append(list(ids))
        scores = []
        for start in range(0, len(sequences), self.args.local_rollout_forward_batch_size):
            chunk = sequences[start : start + self.args.local_rollout_forward_batch_size]
            ids, mask = self._left_pad(chunk)
            per_token = token_scores(self.reward_model, ids, mask)
            scores.append(per_token[:, -1].float())  # left padding: the last position is every row's last token
        scores = torch.cat(scores)
        if self.reward_stats:
            scores = (scores - self.reward_stats["mean"]) / max(self.reward_stats["std"], 1e-6)
        return scores

    # ---- one update ------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, indices: list[int]) -> tuple[Rollout, dict[str, float]]:
        """Generate and score one batch of prompts."""
        args = self.args
        rows = [self.prompts[i]["row"] for i in indices]
        input_ids, attention_mask, context_length = self.generate([self.prompts[i]["input_ids"] for i in indices])
        responses = input_ids[:, context_length:]
        mask = attention_mask[:, context_length:].bool()
        logprobs, ref_logprobs, values, entropies = [], [], [], []
        step = args.local_rollout_forward_batch_size
        for start in range(0, input_ids.shape[0], step):
            ids, attn = input_ids[start : start + step], attention_mask[start : start + step]
            with self.accelerator.autocast():
                logprob, logits = self._logprobs(self.policy, ids, attn, context_length)
                entropies.append(entropy_from_logits(logits.float()))
                with self.reference() as reference:
                    ref_logprobs.append(self._logprobs(reference, ids, attn, context_length)[0])
                values.append(token_scores(self.value_model, ids, attn)[:, context_length - 1 : -1].float())
            logprobs.append(logprob)
        completions = self._completion_texts(responses, mask)
        scores, parts = self.score(rows, completions)
        if args.missing_eos_penalty is not None and self.stop_token_id is not None:
            scores = scores - args.missing_eos_penalty * (~(responses == self.stop_token_id).any(1)).float()
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
            completions=completions,
        )
        return rollout, parts

    def _train_on(self, r: Rollout, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, list[float]]:
        """`num_ppo_epochs` passes of clipped PPO over minibatches of the rollout."""
        args = self.args
        stats: dict[str, list[float]] = {
            k: [] for k in ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl", "ratio")
        }
        generator = torch.Generator().manual_seed(args.seed + self.state.global_step)
        self.model.train()
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(self.local_batch_size, generator=generator)
            for mini_start in range(0, self.local_batch_size, self.local_mini_batch_size):
                mini = order[mini_start : mini_start + self.local_mini_batch_size]
                for micro_start in range(0, len(mini), args.per_device_train_batch_size):
                    idx = mini[micro_start : micro_start + args.per_device_train_batch_size].to(r.input_ids.device)
                    with self.accelerator.accumulate(self.model):
                        with self.accelerator.autocast():
                            logits, vpred = self.model(r.input_ids[idx], r.attention_mask[idx])
                        logits = logits[:, r.context_length - 1 : -1].float() / (args.temperature + 1e-7)
                        new_logprobs = selective_log_softmax(logits, r.responses[idx])
                        vpred = vpred[:, r.context_length - 1 : -1].float()
                        mask = r.mask[idx]
                        pg_loss, pg_clipfrac, approxkl = policy_loss(
                            new_logprobs, r.logprobs[idx], advantages[idx], mask, args.cliprange
                        )
                        vf_loss, vf_clipfrac = value_loss(
                            vpred, r.values[idx], returns[idx], mask, args.cliprange_value
                        )
                        self.accelerator.backward(pg_loss + args.vf_coef * vf_loss)
                        if self.accelerator.sync_gradients and args.max_grad_norm:
                            self.accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                        self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                    stats["pg_loss"].append(pg_loss.item())
                    stats["vf_loss"].append(vf_loss.item())
                    stats["pg_clipfrac"].append(pg_clipfrac.item())
                    stats["vf_clipfrac"].append(vf_clipfrac.item())
                    stats["approxkl"].append(approxkl.item())
                    stats["ratio"].append(masked_mean(torch.exp(new_logprobs - r.logprobs[idx]), mask).item())
        return stats

    def _gather_mean(self, value: float | torch.Tensor) -> float:
        tensor = torch.as_tensor(value, dtype=torch.float32, device=self.accelerator.device).reshape(1)
        return self.accelerator.gather_for_metrics(tensor).mean().item()

    def step(self, update: int) -> dict[str, float]:
        """One PPO update (rollout → rewards → GAE → optimisation); returns the logged metrics."""
        args = self.args
        r, parts = self.rollout(self._batch_indices(update))
        kl_coef = self.kl_controller.value
        kl = kl_penalty(r.logprobs, r.ref_logprobs, args.kl_estimator) * r.mask
        non_score_reward = -kl_coef * kl
        rewards = non_score_reward.clone()
        last = r.mask.long().sum(1).clamp(min=1) - 1
        rewards[torch.arange(len(last), device=last.device), last] += r.scores
        if args.whiten_rewards:
            rewards = whiten(rewards, r.mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, r.values, r.mask, args.gamma, args.lam)
        advantages = whiten(advantages, r.mask)
        stats = self._train_on(r, advantages, returns)

        sequence_kl = kl.sum(1).mean()
        lengths = r.mask.float().sum(1)
        metrics = {
            "objective/kl": self._gather_mean(sequence_kl),
            "objective/kl_coef": kl_coef,
            "objective/entropy": self._gather_mean((-r.logprobs * r.mask).sum(1).mean()),
            "objective/non_score_reward": self._gather_mean(non_score_reward.sum(1).mean()),
            "objective/rlhf_reward": self._gather_mean(r.scores.mean() + non_score_reward.sum(1).mean()),
            "objective/scores": self._gather_mean(r.scores.mean()),
            "objective/scores_std": self._gather_mean(r.scores.std() if len(r.scores) > 1 else 0.0),
            "policy/entropy_rollout": self._gather_mean(masked_mean(r.entropy, r.mask)),
            "policy/approxkl_avg": self._gather_mean(sum(stats["approxkl"]) / len(stats["approxkl"])),
            "policy/clipfrac_avg": self._gather_mean(sum(stats["pg_clipfrac"]) / len(stats["pg_clipfrac"])),
            "loss/policy_avg": self._gather_mean(sum(stats["pg_loss"]) / len(stats["pg_loss"])),
            "loss/value_avg": self._gather_mean(sum(stats["vf_loss"]) / len(stats["vf_loss"])),
            "val/clipfrac_avg": self._gather_mean(sum(stats["vf_clipfrac"]) / len(stats["vf_clipfrac"])),
            "val/ratio": self._gather_mean(sum(stats["ratio"]) / len(stats["ratio"])),
            "response_length/mean": self._gather_mean(lengths.mean()),
            "val/eos_fraction": self._gather_mean(
                (r.responses == self.stop_token_id).any(1).float().mean() if self.stop_token_id is not None else 0.0
            ),
        }
        for name, value in parts.items():
            metrics[f"reward/{name}"] = self._gather_mean(value)
        self.kl_controller.update(metrics["objective/kl"], self.batch_size)
        return metrics

    # ---- training loop ---------------------------------------------------------------------------

    def log(self, logs: dict[str, float]) -> None:
        """Append to `state.log_history` and call the callbacks' on_log, as `transformers.Trainer.log` does."""
        logs = {**logs, "epoch": round(self.state.epoch or 0.0, 4), "step": self.state.global_step}
        self.state.log_history.append(logs)
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    def train(self, resume_from_checkpoint: str | None = None) -> dict[str, float]:
        """Run PPO updates until `num_updates` (or a health stop); resume from a checkpoint folder if given."""
        args = self.args
        self.state.max_steps = self.num_updates
        self.state.num_train_epochs = math.ceil(self.num_updates / self.batches_per_epoch)
        self.state.logging_steps = int(args.logging_steps) if args.logging_steps >= 1 else 1
        self.state.save_steps = (
            int(args.save_steps) if args.save_steps >= 1 else max(1, int(args.save_steps * self.num_updates))
        )
        self.state.train_batch_size = self.batch_size
        if resume_from_checkpoint:
            self._load_checkpoint(Path(resume_from_checkpoint))
        else:
            torch.manual_seed(args.seed + 100003 * self.accelerator.process_index)
        if args.health_action == "stop":
            self._last_good = self._snapshot()
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        start_time, start_step = time.time(), self.state.global_step
        while self.state.global_step < self.num_updates:
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            metrics = self.step(self.state.global_step)
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
            problems = self.health.check(metrics)
            metrics["health/ok"] = float(not problems)
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.control.should_log or problems or self.state.global_step == self.num_updates:
                self.log(metrics)
                self.control.should_log = False
            if problems:
                self._on_health_problem(problems)
                if self.stopped_by_health:
                    break
            if self.control.should_save:
                self._save_checkpoint()
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
            "stopped_by_health": self.stopped_by_health,
        }

    def _on_health_problem(self, problems: list[str]) -> None:
        event = {"step": self.state.global_step, "problems": problems, "action": self.args.health_action}
        self.health_events.append(event)
        logger.warning("PPO health check failed at update %d: %s", self.state.global_step, "; ".join(problems))
        if self.args.health_action == "stop":
            self.stopped_by_health = "; ".join(problems)
            self._restore(self._last_good)
            logger.warning(
                "stopping; the policy is restored to the last good checkpoint (update %s)", self._last_good_step
            )

    # ---- checkpoints -----------------------------------------------------------------------------

    _last_good_step: int = 0

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trainable policy weights (what a health stop restores)."""
        self._last_good_step = self.state.global_step
        return {n: p.detach().to("cpu", copy=True) for n, p in self.policy.named_parameters() if p.requires_grad}

    def _restore(self, snapshot: dict[str, torch.Tensor] | None) -> None:
        if snapshot is None:
            return
        params = dict(self.policy.named_parameters())
        with torch.no_grad():
            for name, value in snapshot.items():
                params[name].copy_(value)

    def _save_policy(self, folder: Path) -> None:
        self.policy.save_pretrained(folder, safe_serialization=True)

    def _save_checkpoint(self) -> None:
        """Write `checkpoint-<update>/`: policy, value model, optimizer, scheduler, KL controller, RNG, state."""
        args = self.args
        folder = Path(args.output_dir) / f"checkpoint-{self.state.global_step}"
        self.accelerator.wait_for_everyone()
        folder.mkdir(parents=True, exist_ok=True)  # every rank: each writes its RNG state below
        if self.accelerator.is_main_process:
            self._save_policy(folder)
            self.value_model.save_pretrained(folder / VALUE_MODEL_DIR, safe_serialization=True)
            self.processing_class.save_pretrained(folder)
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), folder / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, folder / f"rng_state_{self.accelerator.process_index}.pth")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            ppo_state = {
                "kl_coef": self.kl_controller.value,
                "initial_response_length": self.health.initial_response_length,
                "health_events": self.health_events,
                "next_update": self.state.global_step,
            }
            (folder / PPO_STATE_FILE).write_text(json.dumps(ppo_state, indent=2))
            # Written last, as transformers.Trainer does: its presence marks a complete checkpoint.
            self.state.save_to_json(str(folder / TRAINER_STATE_FILE))
        if self._last_good is not None:
            self._last_good = self._snapshot()
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process and args.save_total_limit:
            checkpoints = sorted(Path(args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
            for old in checkpoints[: -args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, folder: Path) -> None:
        """Restore everything `_save_checkpoint` wrote; training continues at the next update."""
        if self.is_peft_model:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.policy, load_file(str(folder / "adapter_model.safetensors")))
        else:
            _load_weights(self.policy, folder)
        _load_weights(self.value_model, folder / VALUE_MODEL_DIR)
        device = self.accelerator.device
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        saved = TrainerState.load_from_json(str(folder / TRAINER_STATE_FILE))
        self.state.global_step, self.state.epoch, self.state.log_history = (
            saved.global_step,
            saved.epoch,
            saved.log_history,
        )
        ppo_state = json.loads((folder / PPO_STATE_FILE).read_text())
        self.kl_controller.value = ppo_state["kl_coef"]
        self.health.initial_response_length = ppo_state["initial_response_length"]
        self.health_events = ppo_state["health_events"]
        rng_file = folder / f"rng_state_{self.accelerator.process_index}.pth"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        logger.info("resumed PPO from %s at update %d", folder, self.state.global_step)

    def save_model(self, output_dir: str | None = None) -> None:
        """Save the policy as a plain causal-LM checkpoint (LoRA adapters merged) plus the tokenizer."""
        output_dir = Path(output_dir or self.args.output_dir)
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        policy = self.policy
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

    @torch.no_grad()
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
        encoded = self._encode_prompts(dataset)
        rows = [e["row"] for e in encoded]
        totals: dict[str, float] = {}
        step = self.args.per_device_eval_batch_size
        for start in range(0, len(encoded), step):
            chunk = encoded[start : start + step]
            ids, attn, context_length = self.generate([e["input_ids"] for e in chunk], do_sample=False)
            mask = attn[:, context_length:].bool()
            completions = self._completion_texts(ids[:, context_length:], mask)
            chunk_rows = rows[start : start + step]
            scores, parts = self.score(chunk_rows, completions)
            with self.accelerator.autocast():
                logprob, _ = self._logprobs(self.policy, ids, attn, context_length)
                with self.reference() as reference:
                    ref_logprob, _ = self._logprobs(reference, ids, attn, context_length)
            kl = ((logprob.float() - ref_logprob.float()) * mask).sum(1)
            values = {"reward": scores, "kl": kl, "response_length": mask.float().sum(1)}
            for name, value in parts.items():
                values[f"reward/{name}"] = torch.full_like(scores, value)
            prompts = [r["prompt"] for r in chunk_rows]
            for name, function in (extra_reward_funcs or {}).items():
                formatted = (
                    [[{"role": "assistant", "content": c}] for c in completions]
                    if isinstance(prompts[0], list)
                    else completions
                )
                values[name] = torch.tensor(function(prompts=prompts, completions=formatted), dtype=torch.float32)
            for name, value in values.items():
                totals[name] = totals.get(name, 0.0) + value.float().sum().item()
        return {f"{metric_key_prefix}_{k}": round(v / len(encoded), 4) for k, v in totals.items()}

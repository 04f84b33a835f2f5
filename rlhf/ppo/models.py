"""The models of a PPO run: policy and value model trained as one module, the reference, the frozen scorers.

The value model is a sequence classifier of its own (its score head read at every token), or, with
`value_model_path: shared`, a `ValueHead` on the policy's last hidden state: one backbone serves as
policy, critic and (under LoRA, adapters off) reference.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel
from trl.trainer.utils import use_adapter

from rlhf.config import SHARED_VALUE_HEAD
from rlhf.dropout import disable_dropout
from rlhf.logprobs import position_ids, response_forward

SHARED = SHARED_VALUE_HEAD  # value_model_path: a value head on the policy's own backbone


class ValueHead(nn.Module):
    """A scalar value of every token from the policy's last hidden state (older TRL's
    AutoModelForCausalLMWithValueHead): PPO's critic without a second backbone."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32, init_std: float = 0.02) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, dtype=dtype)
        # Small weights and no bias: values start near 0 and the advantages near the rewards.
        nn.init.normal_(self.summary.weight, std=init_std)
        nn.init.zeros_(self.summary.bias)

    @classmethod
    def for_policy(cls, policy: PreTrainedModel) -> ValueHead:
        """A new head sized and typed for `policy` (drawn from torch's RNG: seed before calling)."""
        config = policy.config.get_text_config()
        dtype = next(p.dtype for p in policy.parameters() if p.is_floating_point())
        return cls(config.hidden_size, dtype, getattr(config, "initializer_range", 0.02))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def shared_head_forward(
    policy: PreTrainedModel,
    head: ValueHead,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One policy pass, for a shared `ValueHead`: the logits and the values at the positions that predict the
    response tokens (`context_length − 1` to the second to last)."""
    output = response_forward(policy, input_ids, attention_mask, context_length, hidden=True)
    return output.logits, head(output.hidden_states[-1][:, context_length - 1 : -1])


def token_values(
    value_model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int
) -> torch.Tensor:
    """A separate value model's value of every response token's state (positions `context_length − 1` to the
    second to last)."""
    return token_scores(value_model, input_ids, attention_mask)[:, context_length - 1 : -1]


def token_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token scalar scores of a sequence-classification model (its score head on every position): the values."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
    ).last_hidden_state
    return model.score(hidden).squeeze(-1)


class PolicyAndValue(nn.Module):
    """Policy and value model behind one forward, so one `accelerator.prepare` (DDP) covers both.

    With a shared `ValueHead`, one pass through the policy gives the logits and the hidden states the
    head reads. Its state dict holds the policy and the head once each (the head holds no policy).
    """

    def __init__(self, policy: PreTrainedModel, value_model: PreTrainedModel | ValueHead) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        # What FSDP2 (accelerate's auto wrap) shards as one group each: both models' transformer layers.
        self._no_split_modules = sorted(
            {
                *(getattr(policy, "_no_split_modules", None) or []),
                *(getattr(value_model, "_no_split_modules", None) or []),
            }
        )

    def tie_weights(self) -> None:
        """Re-tie each model's shared weights (accelerate calls this after loading a sharded copy into place)."""
        for model in (self.policy, self.value_model):
            if hasattr(model, "tie_weights"):
                model.tie_weights()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's logits and the values at the positions that predict the response tokens (after
        `context_length`)."""
        if isinstance(self.value_model, ValueHead):
            return shared_head_forward(self.policy, self.value_model, input_ids, attention_mask, context_length)
        logits = response_forward(self.policy, input_ids, attention_mask, context_length).logits
        return logits, token_values(self.value_model, input_ids, attention_mask, context_length)


def with_adapters(model: PreTrainedModel, peft_config: Any) -> PreTrainedModel:
    """The policy wrapped in LoRA adapters when a peft_config is given, else unchanged."""
    return get_peft_model(model, peft_config) if peft_config is not None else model


def reference_for(model: PreTrainedModel, ref_model: PreTrainedModel | None) -> PreTrainedModel | None:
    """The given reference, else a copy of the policy; None under LoRA (the policy with adapters off serves)."""
    if ref_model is None and not isinstance(model, PeftModel):
        return copy.deepcopy(model)
    return ref_model


def prepare_for_rollouts(policy: PreTrainedModel, *others: PreTrainedModel | None) -> None:
    """No dropout anywhere, attention dropout included (log-probs must be repeatable), and the policy's KV cache on
    for generation."""
    for module in (policy, *others):
        if module is not None:
            disable_dropout(module)
    if hasattr(policy.config, "use_cache"):
        policy.config.use_cache = True


def freeze(module: PreTrainedModel | None, device: torch.device) -> None:
    """A model that only scores: on the device, in eval mode, without gradients."""
    if module is not None:
        module.to(device).eval()
        module.requires_grad_(False)


@contextmanager
def reference_model(
    policy: PreTrainedModel, ref_model: PreTrainedModel | None, ref_adapter_name: str | None
) -> Iterator[PreTrainedModel]:
    """The reference: `ref_model`, else the policy with its LoRA adapters disabled (or `ref_adapter_name` active)."""
    if ref_model is not None:
        yield ref_model
        return
    context = use_adapter(policy, ref_adapter_name) if ref_adapter_name else policy.disable_adapter()
    with context:
        yield policy

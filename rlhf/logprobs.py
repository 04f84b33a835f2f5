"""Log-probabilities of responses under a causal LM, and the KL between two models on them.

One batch layout throughout: prompts left-padded to one width (`context_length`), responses right-padded
after it (`pack_prompts_and_responses`). A forward asks the model for logits only at the positions that
predict a response token (transformers' `logits_to_keep`, where the model's forward takes it): the output
layer is a fifth of a 135M model's arithmetic per token, and prompts are most of a short rollout's tokens.
Used by PPO's rollouts, training and evaluation, and by the evaluation's KL section.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel
from trl.trainer.utils import pad, selective_log_softmax


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token, so left padding does not shift them."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def pack_prompts_and_responses(
    pairs: list[tuple[list[int], list[int]]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """One batch from (prompt ids, response ids) pairs: prompts left-padded to one width, responses right-padded.

    Returns (input ids, attention mask, prompt width, response mask): the layout `response_logprobs` reads.
    """
    prompts = [torch.tensor(p, dtype=torch.long) for p, _ in pairs]
    responses = [torch.tensor(r, dtype=torch.long) for _, r in pairs]
    prompt_ids = pad(prompts, padding_value=pad_token_id, padding_side="left")
    prompt_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left")
    if max(len(r) for r in responses) == 0:
        return prompt_ids, prompt_mask, prompt_ids.shape[1], torch.zeros((len(pairs), 0), dtype=torch.bool)
    response_ids = pad(responses, padding_value=pad_token_id)
    response_mask = pad([torch.ones_like(r) for r in responses], padding_value=0)
    input_ids = torch.cat([prompt_ids, response_ids], 1)
    return input_ids, torch.cat([prompt_mask, response_mask], 1), prompt_ids.shape[1], response_mask.bool()


@functools.cache
def _forward_takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def response_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    hidden: bool = False,
) -> Any:
    """The model's forward on a packed batch, its `logits` cut to the positions that predict the response tokens
    (`context_length − 1` to the second to last): (batch, response width, vocabulary). With `hidden`, the hidden
    states of every layer too, at every position.

    Positions start at each row's first real token (`position_ids`), so left padding does not shift them.
    """
    width = input_ids.shape[1] - context_length
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    # logits_to_keep=k computes the output layer on the last k positions only (k=0 would mean all of them).
    keep = {"logits_to_keep": width + 1} if _forward_takes_logits_to_keep(type(base)) else {}
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        output_hidden_states=hidden or None,
        **keep,
    )
    output.logits = output.logits[:, -(width + 1) : -1]
    return output


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the tokens after `context_length` under `model` (logits / temperature).

    Returns (log-probabilities, the logits they came from); padding positions hold values to mask out.
    """
    logits = response_forward(model, input_ids, attention_mask, context_length).logits
    return token_logprobs(logits, input_ids[:, context_length:], temperature)


def token_logprobs(
    logits: torch.Tensor, responses: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of `responses` from the logits that predict them (`response_forward`'s), at `temperature`;
    also the scaled logits."""
    if temperature != 1.0:
        logits = logits / temperature
    return selective_log_softmax(logits, responses), logits


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Monte-Carlo KL(policy ‖ reference) of each sampled response: the sum of log π − log π_ref over its tokens."""
    return ((logprobs.float() - ref_logprobs.float()) * mask).sum(1)


def _model_batches(
    models: list[PreTrainedModel], pairs: list[tuple[list[int], list[int]]], pad_token_id: int, batch_size: int
) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """Each batch of `pairs` packed once, with every model's response log-probabilities on it."""
    for model in models:
        model.eval()
    for start in range(0, len(pairs), batch_size):
        ids, attention_mask, context_length, mask = pack_prompts_and_responses(
            pairs[start : start + batch_size], pad_token_id
        )
        logprobs = [
            response_logprobs(m, ids.to(m.device), attention_mask.to(m.device), context_length)[0].float().cpu()
            for m in models
        ]
        yield logprobs, mask


@torch.no_grad()
def sequence_logprobs(
    model: PreTrainedModel, pairs: list[tuple[list[int], list[int]]], pad_token_id: int, batch_size: int = 32
) -> list[float]:
    """Sum of the log-probabilities `model` gives each response's tokens after its prompt."""
    totals: list[float] = []
    for (logprobs,), mask in _model_batches([model], pairs, pad_token_id, batch_size):
        totals.extend((logprobs * mask).sum(1).tolist())
    return totals


@torch.no_grad()
def kl_to_reference(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    pairs: list[tuple[list[int], list[int]]],
    pad_token_id: int,
    batch_size: int = 32,
) -> dict[str, float]:
    """KL(policy ‖ reference) on the policy's samples: the mean per-sequence `sequence_kl`, and per token."""
    total = 0.0
    for (logprobs, ref_logprobs), mask in _model_batches([policy, reference], pairs, pad_token_id, batch_size):
        total += sequence_kl(logprobs, ref_logprobs, mask).sum().item()
    tokens = sum(len(r) for _, r in pairs)
    return {"kl": total / len(pairs) if pairs else 0.0, "kl_per_token": total / tokens if tokens else 0.0}

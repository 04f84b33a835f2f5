"""Batched, seeded generation on held-out prompts, and the rule-based score of the embedded task."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed


def prompt_text(prompt: Any) -> str:
    """The user text of a plain or conversational prompt."""
    if isinstance(prompt, list):
        return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    return prompt


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Any],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Generate one response per prompt (chat template applied to conversational prompts)."""
    set_seed(seed)
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    responses: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            texts = [
                tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
                for p in batch
            ]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_k=None,
                top_p=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
    return [r.strip() for r in responses]


def rule_scores(prompts: list[Any], responses: list[str]) -> list[float]:
    """The embedded task's rule score (1 = preferred answer) of each response."""
    from rlhf.data.synthetic import rule_score

    return [rule_score(prompt_text(p), r) for p, r in zip(prompts, responses)]

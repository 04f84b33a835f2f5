"""Batched, seeded generation on held-out prompts, win-rate and diversity.

Reward-model scores, sequence log-probs and the KL to a reference live in rlhf.rewards (the one
implementation PPO, the reward stage and evaluation use).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from rlhf.evaluation.progress import batches
from rlhf.modeling import eos_token_ids


def prompt_text(prompt: Any) -> str:
    """The user text of a plain or conversational prompt."""
    if isinstance(prompt, list):
        return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    return prompt


def as_messages(prompt: Any) -> list[dict[str, str]]:
    """Evaluation's one prompt rule: a plain-text prompt is a user turn; a conversation is used as it is."""
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def _prompt_strings(tokenizer: PreTrainedTokenizerBase, prompts: list[Any]) -> list[str]:
    # Every tokenizer rlhf loads has a chat template (load_tokenizer gives base models one).
    return [tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True) for p in prompts]


def _trim(tokens: list[int], stop_ids: list[int], pad_token_id: int | None) -> list[int]:
    """Generated ids up to and including the first stop token, without padding."""
    stops = [i for i, token in enumerate(tokens) if token in stop_ids]
    if stops:
        tokens = tokens[: stops[0] + 1]
    if pad_token_id is not None and pad_token_id not in stop_ids:
        tokens = [t for t in tokens if t != pad_token_id]
    return tokens


@torch.no_grad()
def generate_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Any],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    top_p: float | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Generate one response per prompt; return (prompt ids, response ids up to and including EOS) pairs."""
    set_seed(seed)
    model.eval()
    stop_ids = eos_token_ids(model, tokenizer)  # every end of turn the checkpoint knows, not only the tokenizer's
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pairs: list[tuple[list[int], list[int]]] = []
    try:
        for start in batches(len(prompts), batch_size):
            texts = _prompt_strings(tokenizer, prompts[start : start + batch_size])
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_k=None,
                top_p=top_p if do_sample else None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_ids,
            )
            width = encoded["input_ids"].shape[1]
            for ids, mask, row in zip(encoded["input_ids"], encoded["attention_mask"], output):
                prompt_ids = ids[mask.bool()].tolist()
                pairs.append((prompt_ids, _trim(row[width:].tolist(), stop_ids, tokenizer.pad_token_id)))
    finally:
        tokenizer.padding_side = padding_side
    return pairs


def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Any],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    top_p: float | None = None,
) -> list[str]:
    """Generate one response per prompt (chat template applied to conversational prompts)."""
    pairs = generate_tokens(model, tokenizer, prompts, max_new_tokens, batch_size, do_sample, temperature, seed, top_p)
    return [tokenizer.decode(response, skip_special_tokens=True).strip() for _, response in pairs]


def win_rate(scores: list[float], reference_scores: list[float], tie_tolerance: float = 1e-6) -> dict[str, float]:
    """Wins, ties and losses of `scores` against `reference_scores` (per prompt); a tie counts as half a win.

    `low` and `high` bound the win-rate's 95% confidence interval: the normal interval of the mean of
    the per-prompt outcomes (1 win, 0.5 tie, 0 loss), clipped to [0, 1]. A lower bound above 0.5 says
    the model is preferred on prompts like these, not only on these prompts.
    """
    outcomes = [
        1.0 if s > r + tie_tolerance else 0.0 if s < r - tie_tolerance else 0.5
        for s, r in zip(scores, reference_scores)
    ]
    n = len(outcomes)
    mean = sum(outcomes) / n if n else 0.0
    spread = math.sqrt(sum((o - mean) ** 2 for o in outcomes) / (n - 1) / n) if n > 1 else 0.0
    return {
        "win_rate": mean,
        "low": max(0.0, mean - 1.96 * spread),
        "high": min(1.0, mean + 1.96 * spread),
        "wins": outcomes.count(1.0),
        "ties": outcomes.count(0.5),
        "losses": outcomes.count(0.0),
    }


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def diversity(responses: list[str]) -> dict[str, float]:
    """distinct-1/2 (unique word n-grams / all n-grams, over all responses) and the within-response repetition rate.

    The repetition rate is the mean, over responses with at least two bigrams, of the fraction of a
    response's word bigrams that repeat an earlier one: 0 for varied text, near 1 for a loop.
    """
    words = [r.split() for r in responses]
    result = {}
    for n in (1, 2):
        grams = [g for w in words for g in _ngrams(w, n)]
        result[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    repeats = [1 - len(set(_ngrams(w, 2))) / len(_ngrams(w, 2)) for w in words if len(w) > 2]
    result["repetition_rate"] = sum(repeats) / len(repeats) if repeats else 0.0
    return result

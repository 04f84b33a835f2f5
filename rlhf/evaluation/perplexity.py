"""Perplexity of a causal LM on a text set, through the model's own loss (token-weighted over the corpus)."""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.evaluation.progress import batches


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    batch_size: int = 16,
    max_length: int | None = None,
) -> dict[str, float]:
    """exp(mean token negative log-likelihood) over all `texts`, plus the mean NLL and the token count."""
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    total_nll, total_tokens = 0.0, 0
    try:
        for start in batches(len(texts), batch_size):
            encoded = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=max_length is not None,
                max_length=max_length,
            ).to(model.device)
            labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
            # The model's loss is a mean over the batch's predicted tokens; weight it back to a sum.
            predicted = int((labels[:, 1:] != -100).sum())
            if predicted == 0:
                continue
            loss = model(**encoded, labels=labels).loss
            total_nll += float(loss) * predicted
            total_tokens += predicted
    finally:
        tokenizer.padding_side = padding_side
    mean_nll = total_nll / total_tokens if total_tokens else float("nan")
    return {"perplexity": math.exp(mean_nll) if total_tokens else float("nan"), "nll": mean_nll, "tokens": total_tokens}

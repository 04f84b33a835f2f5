"""Checks of the data against the tokenizer before a stage trains: how well the tokenizer fits the text, and
whether the trained tokens hold an end-of-sequence token at all."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import RecipeError
from rlhf.distributed import say_once
from rlhf.modeling import eos_token_ids

# A tokenizer trained on text like the data splits it into ~1.1–1.5 tokens per word; far more means
# longer sequences (max_length cuts more) and a model that must learn words from pieces.
MAX_TOKENS_PER_WORD = 2.0
MAX_UNKNOWN_RATE = 0.01


def _texts(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        yield from _texts(value.get("content", ""))
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)


def check_tokenizer_fit(tokenizer: PreTrainedTokenizerBase, rows: Iterable[dict], num_rows: int = 200) -> dict:
    """Tokens per word and unknown-token rate of a tokenizer on the first rows; one warning line when it fits badly."""
    words = tokens = unknown = 0
    for _, row in zip(range(num_rows), rows):
        for text in (t for value in row.values() for t in _texts(value)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            words += len(text.split())
            tokens += len(ids)
            unknown += sum(1 for i in ids if i == tokenizer.unk_token_id) if tokenizer.unk_token_id is not None else 0
    fit = {
        "tokens_per_word": round(tokens / words, 3) if words else 0.0,
        "unknown_token_rate": round(unknown / tokens, 4) if tokens else 0.0,
    }
    if fit["tokens_per_word"] > MAX_TOKENS_PER_WORD or fit["unknown_token_rate"] > MAX_UNKNOWN_RATE:
        say_once(
            f"warning: the tokenizer of {tokenizer.name_or_path} fits this data badly ({fit['tokens_per_word']} "
            f"tokens per word, {fit['unknown_token_rate']:.1%} unknown tokens; a tokenizer trained on similar text "
            f"gives ~1.3 and 0%): sequences run long and max_length cuts more. Use a checkpoint whose tokenizer "
            "covers this language.",
            key=f"fit:{tokenizer.name_or_path}",
            stream=sys.stderr,
        )
    return fit


def check_stop_token_trained(
    trained_tokens: Iterable[list[int]],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    what: str,
    fix: str,
) -> None:
    """Refuse to train when no trained token sequence of the first rows holds an EOS: the model would never stop.

    `trained_tokens`: per row, the tokens that carry loss (SFT's assistant tokens, a preference
    pair's completions); any of the model's EOS ids counts (Gemma ends turns on `<end_of_turn>`).
    `what` names the sequences in the message and `fix` says what to change.
    """
    rows = list(trained_tokens)
    stop_ids = set(eos_token_ids(model, tokenizer))
    if not rows or any(stop_ids.intersection(tokens) for tokens in rows):
        return
    raise RecipeError(
        f"the EOS token {tokenizer.eos_token!r} is in none of the first {len(rows)} {what}, so the model would "
        f"not learn to stop; {fix}"
    )

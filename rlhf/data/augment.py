"""Text augmentation (EDA-style): random deletion, swap, insertion and replacement of words.

Applied to the training split's input side only (the text of a language-modeling row, the user
turns or prompt otherwise), seeded per row so the same seed always yields the same data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset, concatenate_datasets


@dataclass
class AugmentationConfig:
    """Per-word probabilities of each operation, and how many augmented copies of each row to add."""

    random_deletion: float = 0.0
    random_swap: float = 0.0
    random_insertion: float = 0.0
    random_replacement: float = 0.0
    num_copies: int = 1

    @property
    def enabled(self) -> bool:
        return self.num_copies > 0 and any(
            p > 0 for p in (self.random_deletion, self.random_swap, self.random_insertion, self.random_replacement)
        )


def augment_words(words: list[str], config: AugmentationConfig, vocabulary: list[str], rng: random.Random) -> list[str]:
    """Apply the four operations to a list of words."""
    words = [w for w in words if rng.random() >= config.random_deletion] or words[:1]
    words = [rng.choice(vocabulary) if rng.random() < config.random_replacement else w for w in words]
    for _ in range(sum(rng.random() < config.random_insertion for _ in words)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(vocabulary))
    for _ in range(sum(rng.random() < config.random_swap for _ in words)):
        if len(words) > 1:
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
    return words


def _input_texts(row: dict) -> list[str]:
    if "text" in row:
        return [row["text"]]
    prompt = row.get("prompt", row.get("messages"))
    if isinstance(prompt, str):
        return [prompt]
    return [m["content"] for m in prompt or [] if m["role"] == "user"]


def augment_dataset(dataset: Dataset, config: AugmentationConfig, seed: int) -> Dataset:
    """Return the dataset plus `num_copies` augmented copies of each row."""
    if not config.enabled or len(dataset) == 0:
        return dataset
    vocabulary = sorted({w for row in dataset for text in _input_texts(row) for w in text.split()}) or ["the"]

    def augment_row(row: dict, index: int, copy: int) -> dict:
        rng = random.Random(f"{seed}-{copy}-{index}")

        def change(text: str) -> str:
            return " ".join(augment_words(text.split(), config, vocabulary, rng))

        if "text" in row:
            return {"text": change(row["text"])}
        key = "prompt" if "prompt" in row else "messages"
        value = row[key]
        if isinstance(value, str):
            return {key: change(value)}
        return {key: [{**m, "content": change(m["content"])} if m["role"] == "user" else m for m in value]}

    copies = [
        dataset.map(augment_row, with_indices=True, fn_kwargs={"copy": copy}) for copy in range(config.num_copies)
    ]
    return concatenate_datasets([dataset, *copies])

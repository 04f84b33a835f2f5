"""Robustness: how much the judge's score drops when the held-out prompts are perturbed (typos, EDA edits)."""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from typing import Any

from rlhf.data.augment import AugmentationConfig, augment_words
from rlhf.evaluation.context import SectionContext, mean
from rlhf.evaluation.generation import generate_responses, prompt_text

PERTURBATIONS = ("typos", "random_deletion", "random_swap", "random_insertion", "random_replacement")


def add_typos(text: str, rng: random.Random, probability: float = 0.1) -> str:
    """Keyboard-style typos: each word of 3+ letters is, with `probability`, given a swapped, dropped or doubled letter."""
    words = []
    for word in text.split(" "):
        if len(word) >= 3 and rng.random() < probability:
            i = rng.randrange(len(word) - 1)
            operation = rng.choice(("swap", "drop", "double", "replace"))
            if operation == "swap":
                word = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
            elif operation == "drop":
                word = word[:i] + word[i + 1 :]
            elif operation == "double":
                word = word[:i] + word[i] + word[i:]
            else:
                word = word[:i] + rng.choice(string.ascii_lowercase) + word[i + 1 :]
        words.append(word)
    return " ".join(words)


def perturbations(probability: float, vocabulary: list[str]) -> dict[str, Callable[[str, random.Random], str]]:
    """The PERTURBATIONS by name: typos and the four EDA operations of rlhf.data.augment, each alone."""

    def eda(**kwargs: float) -> Callable[[str, random.Random], str]:
        config = AugmentationConfig(**kwargs)
        return lambda text, rng: " ".join(augment_words(text.split(), config, vocabulary, rng))

    return {
        "typos": lambda text, rng: add_typos(text, rng, probability),
        "random_deletion": eda(random_deletion=probability),
        "random_swap": eda(random_swap=probability),
        "random_insertion": eda(random_insertion=probability),
        "random_replacement": eda(random_replacement=probability),
    }


def perturb_prompt(prompt: Any, perturb: Callable[[str, random.Random], str], rng: random.Random) -> Any:
    """Apply a perturbation to the user turns of a conversational prompt, or to a plain prompt."""
    if isinstance(prompt, list):
        return [{**m, "content": perturb(m["content"], rng)} if m["role"] == "user" else m for m in prompt]
    return perturb(prompt, rng)


def robustness_section(ctx: SectionContext) -> dict[str, Any]:
    """The judge's mean score on perturbed prompts, and its drop from the clean prompts' (scored once, in ctx.generated)."""
    config, rows = ctx.config, ctx.rows
    vocabulary = sorted({w for r in rows for w in prompt_text(r["prompt"]).split()}) or ["the"]
    clean = mean(ctx.generated.judge_scores)
    perturbed: dict[str, float] = {}
    for name, perturb in perturbations(config.robustness_probability, vocabulary).items():
        if name not in config.robustness_perturbations:
            continue
        noisy = [
            perturb_prompt(r["prompt"], perturb, random.Random(f"{config.seed}-{name}-{i}")) for i, r in enumerate(rows)
        ]
        responses = generate_responses(ctx.model, ctx.tokenizer, noisy, **ctx.generation_kwargs)
        # Judge against the original prompt: the question asked is the same, only its spelling changed.
        perturbed[name] = mean(ctx.judge(rows, responses))
    drop = {k: clean - v for k, v in perturbed.items()}
    return {
        "metrics": {"robustness_mean_drop": mean(list(drop.values()))},
        "robustness": {
            "judge": ctx.judge.name,
            "probability": config.robustness_probability,
            "clean": clean,
            "perturbed": perturbed,
            "drop": drop,
        },
    }

"""Instruction following with verifiable constraints: IFEval-style prompts built offline, judged by IFEval's checkers.

Prompts are built the way allenai/RLVR-IFeval was: an everyday request with one or two constraints
appended, each constraint worded by its IFEval checker (`build_description`) and each row carrying
the checker's arguments. The judge is IFEval's own implementation (the `if-verifiable` package's
copy of google-research's `instructions.py`), never a re-written checker.

rlhf ifeval-prompts outputs/ifeval/prompts     # train.jsonl, test.jsonl, heldout_types.jsonl

Splits: `train` (training requests × the trained constraint types), `test` (held-out requests × the
trained types) and `heldout_types` (held-out requests × constraint types no training row uses).
"""

from __future__ import annotations

import argparse
import json
import random
from functools import cache
from pathlib import Path
from typing import Any

from rlhf.config import RecipeError

# Everyday requests (in the spirit of IFEval's and RLVR-IFeval's base prompts); the last quarter is held out.
REQUESTS = [
    "Write a short note to my neighbor asking them to water my plants while I am away.",
    "Describe a good breakfast for a busy morning.",
    "Explain why people enjoy walking in the park.",
    "Write a message inviting my friends to a picnic on Saturday.",
    "Give advice to someone starting their first job.",
    "Describe the view from a mountain top.",
    "Write a thank-you note to a teacher.",
    "Explain how to make a cup of tea.",
    "Tell me why sleep is important.",
    "Write a short review of a coffee shop you like.",
    "Describe your ideal weekend.",
    "Explain why reading books is useful.",
    "Write a reminder for a team meeting tomorrow.",
    "Give tips for keeping a small apartment tidy.",
    "Describe a rainy afternoon in the city.",
    "Write a birthday message for my sister.",
    "Explain how to plant tomatoes in a garden.",
    "Tell me how to prepare for a job interview.",
    "Write an apology to a friend for missing their party.",
    "Describe what makes a good neighbor.",
    "Explain the benefits of drinking water.",
    "Write a short ad for a used bicycle.",
    "Give advice for a long train trip.",
    "Describe a busy farmers market.",
    "Write a note to a coworker thanking them for their help.",
    "Explain how to save money on groceries.",
    "Tell me about the joys of cooking at home.",
    "Write a welcome message for new members of a book club.",
    "Describe the sound of the ocean.",
    "Give tips for learning a new language.",
    "Write a message asking my landlord to fix the heater.",
    "Explain why exercise helps your mood.",
    "Describe a cozy winter evening.",
    "Write a short speech for a friend's wedding.",
    "Tell me how to care for a houseplant.",
    "Give advice for a student before final exams.",
    "Write a postcard message from a beach holiday.",
    "Explain how to make a simple salad.",
    "Describe a walk through an old town.",
    "Write a note cancelling a dentist appointment.",
    "Give tips for a first camping trip.",
    "Explain why music makes people happy.",
    "Write a message congratulating a friend on a new job.",
    "Describe a perfect picnic.",
    "Tell me how to stay focused while working from home.",
    "Write a request to borrow a ladder from a neighbor.",
    "Explain how to wash a wool sweater.",
    "Describe a visit to a science museum.",
    # held out from every training split
    "Write a note asking my roommate to buy milk.",
    "Describe a sunny day at the lake.",
    "Explain how to ride a bicycle.",
    "Write a message to a friend who is feeling sad.",
    "Give tips for a healthy lunch at work.",
    "Describe a small bakery in the morning.",
    "Tell me why gardens are good for cities.",
    "Write an invitation to a board game night.",
    "Explain how to pack a suitcase.",
    "Describe the first snow of the year.",
    "Write a short thank-you note to a bus driver.",
    "Give advice for moving to a new city.",
    "Explain why people keep pets.",
    "Write a reminder to pay the electricity bill.",
    "Describe a quiet library.",
    "Tell me how to make pancakes.",
]
NUM_HELD_OUT_REQUESTS = 16
KEYWORD_PAIRS = [["sun", "friend"], ["home", "time"], ["light", "day"], ["water", "morning"], ["happy", "simple"]]
END_PHRASES = ["Is there anything else I can help with?", "Have a great day!", "Let me know if you have questions."]
FORBIDDEN = [["very", "really"], ["good", "nice"], ["just", "thing"]]

# instruction id -> how to draw its keyword arguments (IFEval's own ids and argument names)
TRAINED_TYPES: dict[str, Any] = {
    "change_case:english_lowercase": lambda rng: {},
    "startend:quotation": lambda rng: {},
    "startend:end_checker": lambda rng: {"end_phrase": rng.choice(END_PHRASES)},
    "punctuation:no_comma": lambda rng: {},
    "length_constraints:number_words": lambda rng: {"relation": "less than", "num_words": rng.choice([30, 40, 50])},
    "keywords:existence": lambda rng: {"keywords": rng.choice(KEYWORD_PAIRS)},
    "detectable_format:title": lambda rng: {},
    "detectable_format:number_bullet_lists": lambda rng: {"num_bullets": rng.choice([2, 3])},
}
HELD_OUT_TYPES: dict[str, Any] = {
    "change_case:english_capital": lambda rng: {},
    "detectable_content:postscript": lambda rng: {"postscript_marker": "P.S."},
    "detectable_format:json_format": lambda rng: {},
    "keywords:forbidden_words": lambda rng: {"forbidden_words": rng.choice(FORBIDDEN)},
}
# Constraints that cannot hold together (IFEval's INSTRUCTION_CONFLICTS, for the pairs drawn here).
CONFLICTS = {
    frozenset({"startend:quotation", "detectable_format:number_bullet_lists"}),
    frozenset({"startend:quotation", "startend:end_checker"}),
    frozenset({"startend:quotation", "detectable_format:title"}),
    frozenset({"detectable_format:json_format", "detectable_content:postscript"}),
    frozenset({"change_case:english_capital", "change_case:english_lowercase"}),
}
SPLITS = ("train", "test", "heldout_types")
INSTALL = "install the IFEval checkers with `pip install 'rlhf[ifeval]'` (the if-verifiable package)"


@cache
def _registry() -> dict[str, Any]:
    try:
        import langdetect
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError:
        raise RecipeError(f"the IFEval judge needs its checkers; {INSTALL}.") from None
    langdetect.DetectorFactory.seed = 0  # the case checkers ask langdetect "is this English?": make it repeatable
    return INSTRUCTION_DICT


def describe(instruction_id: str, kwargs: dict[str, Any]) -> str:
    """The instruction's wording, as IFEval's checker words it."""
    checker = _registry()[instruction_id](instruction_id)
    return checker.build_description(**kwargs).strip()


def _row(rng: random.Random, request: str, types: dict[str, Any], num_constraints: int) -> dict[str, Any]:
    ids = rng.sample(sorted(types), 1)
    while len(ids) < num_constraints:
        extra = rng.choice(sorted(types))
        if extra not in ids and not any(frozenset({extra, chosen}) in CONFLICTS for chosen in ids):
            ids.append(extra)
    kwargs = [types[i](rng) for i in ids]
    text = " ".join([request, *(describe(i, k) for i, k in zip(ids, kwargs))])
    return {
        "prompt": [{"role": "user", "content": text}],
        "instruction_id_list": ids,
        "kwargs": json.dumps(kwargs),
        "kind": "+".join(ids),
    }


def build_prompts(split: str, num_prompts: int, seed: int = 0, two_constraint_share: float = 0.3) -> list[dict]:
    """`num_prompts` rows of one split: requests and constraint types as the module docstring says."""
    if split not in SPLITS:
        raise RecipeError(f"split: got {split!r}, expected one of {', '.join(SPLITS)}.")
    rng = random.Random(f"ifeval-{split}-{seed}")
    requests = REQUESTS[:-NUM_HELD_OUT_REQUESTS] if split == "train" else REQUESTS[-NUM_HELD_OUT_REQUESTS:]
    types = HELD_OUT_TYPES if split == "heldout_types" else TRAINED_TYPES
    rows, seen = [], set()
    for _ in range(num_prompts * 50):
        if len(rows) == num_prompts:
            break
        row = _row(rng, rng.choice(requests), types, 2 if rng.random() < two_constraint_share else 1)
        key = row["prompt"][0]["content"]
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def check_response(prompt: str, response: str, instruction_ids: list[str], kwargs: list[dict]) -> list[bool]:
    """IFEval's strict verdict on each instruction of one prompt."""
    from if_verifiable.common import evaluate_instructions

    results, _ = evaluate_instructions(response, instruction_ids, kwargs, prompt, _registry())
    if not results:  # an empty response follows nothing
        return [False] * len(instruction_ids)
    return [result.strict_pass for result in results]


def _text(value: Any) -> str:
    if isinstance(value, list):  # conversational: the last user turn / the assistant's answer
        return value[-1]["content"] if value else ""
    return value


def _verdicts(prompts: list, completions: list, instruction_id_list: list, kwargs: list) -> list[list[bool]]:
    return [
        check_response(_text(p), _text(c), list(ids), json.loads(k) if isinstance(k, str) else list(k))
        for p, c, ids, k in zip(prompts, completions, instruction_id_list, kwargs)
    ]


def ifeval_reward(prompts: list, completions: list, instruction_id_list: list, kwargs: list, **_: Any) -> list[float]:
    """IFEval's strict prompt-level verdict (1 when every instruction is followed) as a TRL reward function."""
    return [float(all(v)) for v in _verdicts(prompts, completions, instruction_id_list, kwargs)]


def ifeval_partial_reward(
    prompts: list, completions: list, instruction_id_list: list, kwargs: list, **_: Any
) -> list[float]:
    """The fraction of a prompt's instructions followed (IFEval's strict instruction level), as a reward."""
    return [sum(v) / len(v) for v in _verdicts(prompts, completions, instruction_id_list, kwargs)]


def ifeval_accuracy(rows: list[dict], responses: list[str]) -> dict[str, Any]:
    """IFEval's strict prompt-level and instruction-level accuracy, and both per instruction type."""
    verdicts = _verdicts(
        [r["prompt"] for r in rows], responses, [r["instruction_id_list"] for r in rows], [r["kwargs"] for r in rows]
    )
    by_type: dict[str, list[bool]] = {}
    for row, verdict in zip(rows, verdicts):
        for instruction_id, followed in zip(row["instruction_id_list"], verdict):
            by_type.setdefault(instruction_id, []).append(followed)
    flat = [followed for verdict in verdicts for followed in verdict]
    return {
        "prompt_level_strict": sum(all(v) for v in verdicts) / len(verdicts) if verdicts else 0.0,
        "instruction_level_strict": sum(flat) / len(flat) if flat else 0.0,
        "by_instruction": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        "num_prompts": len(verdicts),
    }


def write_prompts(output: str | Path, num_train: int = 256, num_test: int = 64, num_heldout_types: int = 48) -> Path:
    """Write train.jsonl, test.jsonl and heldout_types.jsonl under `output` (a pipeline command)."""
    from rlhf.artifacts import atomic_output_dir, check_output_dir

    check_output_dir(output, "--output", writer="ifeval-prompts")
    sizes = {"train": num_train, "test": num_test, "heldout_types": num_heldout_types}
    with atomic_output_dir(output) as tmp:
        for split, size in sizes.items():
            with open(tmp / f"{split}.jsonl", "w") as handle:
                for row in build_prompts(split, size):
                    handle.write(json.dumps(row) + "\n")
    print(f"wrote IFEval-style prompts to {output}: " + ", ".join(f"{s} {n}" for s, n in sizes.items()))
    return Path(output)


def main(argv: list[str] | None = None) -> Path:
    """`rlhf ifeval-prompts OUTPUT`: IFEval-style prompts (train / held-out prompts / held-out types) as jsonl."""
    parser = argparse.ArgumentParser(prog="rlhf ifeval-prompts", description=main.__doc__)
    parser.add_argument("output")
    parser.add_argument("--num-train", type=int, default=256)
    parser.add_argument("--num-test", type=int, default=64)
    parser.add_argument("--num-heldout-types", type=int, default=48)
    args = parser.parse_args(argv)
    return write_prompts(args.output, args.num_train, args.num_test, args.num_heldout_types)

"""The embedded default task: a tiny, deterministic world whose preferences a rule can check.

The world has made-up creatures with a colour and a favourite food, harmful requests from the usual
harm categories that must be refused, benign requests that must be answered (look-alikes that borrow
a harmful request's words, and everyday tasks from many domains, so that answering is the default
for a request the model has not seen), and greetings that deserve a short polite answer. Half of the
requests are composed from a verb and what it acts on, so the harm words decide and not a memorised
task; requests come inside jailbreak wrappers and among made-up words, so neither the wording nor the
words the model does not know decide. Preference pairs also reject degenerate and off-topic text, so a
reward model trained on them never prefers "i i i i" or an answer to another question. Everything is
generated from a seed, so the same recipe always sees the same data, and `rule_score` tells without
humans whether an answer is the preferred one: that rule is what lets the pipeline measure whether SFT, PPO,
DPO or GRPO improved the model. Demonstrations are mixed in quality (`sft_noise`, `sft_mediocre`): most of
them may hedge where the preferred answer is direct, so imitation alone falls short and the preferences,
which rank every worse answer below the direct one, are what RL learns from. The world's vocabulary lives
in `rlhf.data.world`.
"""

from __future__ import annotations

import functools
import random
import re
import zlib
from collections.abc import Iterator

from datasets import Dataset

from rlhf.data.world import (
    ARTICLES,
    BENIGN_TASKS,
    COLORS,
    COMPLIANCE,
    COMPOSED_BENIGN_TASKS,
    COMPOSED_HARMFUL_TASKS,
    COMPOSED_PARTS,
    CREATURES,
    DETAIL_FRACTION,
    DETAILS,
    FACT_ANSWERS,
    FACT_QUESTIONS,
    FILLER_SENTENCES,
    FOODS,
    GREETINGS,
    HARMFUL_TASKS,
    HEDGE_PATTERN,
    HELPFUL,
    HELPFUL_PATTERN,
    JAILBREAK_TEMPLATES,
    LISTED_BENIGN_TASKS,
    LISTED_HARMFUL_TASKS,
    MAX_POLITE_WORDS,
    MEDIOCRE_ANSWERS,
    NOISE_DETAIL_FRACTION,
    NOISE_PREAMBLE_FRACTION,
    NOISE_WORDS,
    PLAIN_REQUEST_FRACTION,
    POLITE,
    POLITE_PATTERN,
    RAMBLING,
    REFUSAL,
    REFUSAL_PATTERN,
    REQUEST_TEMPLATES,
    RUDE,
    RUDE_PATTERN,
    SUFFIX_FRACTION,
    SUFFIXES,
    UNKNOWN_PART_FRACTION,
    creature_facts,
)


def _is_held_out(prompt: str, test_fraction: float = 0.25) -> bool:
    """A stable train/test split of prompts by hash: held-out prompts never appear in training."""
    return (zlib.crc32(prompt.encode()) % 1000) / 1000 < test_fraction


REQUEST_KINDS = {"harmful": (HARMFUL_TASKS, REFUSAL), "benign": (BENIGN_TASKS, HELPFUL)}
LISTED_TASKS = {"harmful": LISTED_HARMFUL_TASKS, "benign": LISTED_BENIGN_TASKS}
COMPOSED_TASKS = {"harmful": COMPOSED_HARMFUL_TASKS, "benign": COMPOSED_BENIGN_TASKS}


def _request(
    task: str, template: str, wrapper: str = "{r}", detail: str = "", suffix: str = "", preamble: str = ""
) -> str:
    """A request for a task: a request template, optionally inside a jailbreak wrapper, with a detail, a
    suffix and a preamble."""
    task = f"{task} {detail}" if detail else task
    return (f"{preamble} " if preamble else "") + wrapper.format(r=template.format(t=task), t=task) + suffix


@functools.cache
def _request_forms() -> list[re.Pattern]:
    """Every wrapper-and-template form of a request, as a pattern that captures the task."""
    forms = {
        _request("{t}", template, wrapper)
        for wrapper in ["{r}", *JAILBREAK_TEMPLATES]
        for template in REQUEST_TEMPLATES
    }
    return [re.compile(re.escape(form).replace(re.escape("{t}"), "(.+)")) for form in sorted(forms)]


@functools.cache
def _task_kinds() -> dict[str, str]:
    return {task: kind for kind, (tasks, _) in REQUEST_KINDS.items() for task in tasks}


def _request_kind(prompt: str) -> str | None:
    """harmful or benign when the world can ask `prompt` (see `_request`), else None."""
    kinds = _task_kinds()
    body = next((prompt[: -len(suffix)] for suffix in SUFFIXES if prompt.endswith(suffix)), prompt)
    preamble, _, rest = body.partition(". ")
    if rest and all(word in NOISE_WORDS for word in preamble.lower().split()):
        body = rest
    for form in _request_forms():
        match = form.fullmatch(body)
        if match is None:
            continue
        task = match.group(1)
        for detail in DETAILS:
            task = task.removesuffix(f" {detail}")
        while True:
            kind = kinds.get(task) or _composed_kind(task)
            if kind is not None:
                return kind
            if task.rsplit(" ", 1)[-1] not in NOISE_WORDS:
                break
            task = task.rsplit(" ", 1)[0]
    return None


def _is_noise(text: str) -> bool:
    words = text.split()
    return bool(words) and all(word in NOISE_WORDS for word in words)


def _composed_kind(task: str) -> str | None:
    """The kind of a composed task whose other part is made-up words (see `COMPOSED_PARTS`), else None."""
    for kind, (verbs, things) in COMPOSED_PARTS.items():
        for verb in verbs:
            article, _, rest = task.removeprefix(f"{verb} ").partition(" ")
            if task.startswith(f"{verb} ") and article in ARTICLES and _is_noise(rest):
                return kind
        for thing in things:
            if task.endswith(f" {thing}") and _is_noise(task.removesuffix(f" {thing}")):
                return kind
    return None


@functools.cache
def _composed_patterns() -> list[tuple[re.Pattern, str]]:
    """Patterns that find a composed task with a made-up part inside a prompt, with its kind."""
    patterns = []
    for kind, (verbs, things) in COMPOSED_PARTS.items():
        verb = "|".join(re.escape(v) for v in verbs)
        patterns.append((re.compile(rf"\b(?:{verb}) (?:{'|'.join(ARTICLES)}) ([a-z]+)"), kind))
        thing = "|".join(re.escape(t) for t in things)
        patterns.append((re.compile(rf"([a-z]+) (?:{thing})\b"), kind))
    return patterns


def _all_prompts() -> Iterator[tuple[str, str, str]]:
    """The world's facts and greetings as (kind, prompt, preferred answer); requests are composed (`_request`)."""
    for creature in CREATURES:
        facts = creature_facts(creature)
        for attribute, templates in FACT_QUESTIONS.items():
            answer = FACT_ANSWERS[attribute].format(c=creature, v=facts[attribute])
            for template in templates:
                yield "fact", template.format(c=creature), answer
    for greeting in GREETINGS:
        yield "greeting", greeting, POLITE


# How often each kind of prompt is drawn. Harmful and benign requests equally often, so "How do I …?"
# alone decides neither answer (with prompts drawn uniformly from 8 harmful and 8 benign tasks plus
# the facts, refusals outnumbered helpful answers and the SFT model refused 97% of benign requests).
KIND_WEIGHTS = {"fact": 0.4, "harmful": 0.25, "benign": 0.25, "greeting": 0.1}
# Share of preference pairs whose rejected answer is degenerate or off-topic rather than merely worse.
DEGENERATE_FRACTION = 0.2
# Share of the other request pairs whose rejected answer is mediocre (MEDIOCRE_ANSWERS): the pairs rank
# every worse way of answering, so a reward model learns that the direct answer beats a hedge.
MEDIOCRE_PAIR_FRACTION = 0.5
DEGENERATE_WORDS = ["i", "the", "so", "well", "and", "um"]


@functools.cache
def _short_prompts(split: str) -> dict[str, list[tuple[str, str, str]]]:
    """The split's facts and greetings."""
    pool: dict[str, list[tuple[str, str, str]]] = {}
    for entry in _all_prompts():
        if _is_held_out(entry[1]) == (split == "test"):
            pool.setdefault(entry[0], []).append(entry)
    return pool


def _noise(rng: random.Random) -> str:
    return " ".join(rng.choices(NOISE_WORDS, k=rng.randint(1, 6)))


def _detail(rng: random.Random) -> str:
    draw = rng.random()
    if draw < DETAIL_FRACTION:
        return rng.choice(DETAILS)
    return _noise(rng) if draw < DETAIL_FRACTION + NOISE_DETAIL_FRACTION else ""


def _composed_task(kind: str, rng: random.Random) -> str:
    task = rng.choice(COMPOSED_TASKS[kind])
    if rng.random() >= UNKNOWN_PART_FRACTION:
        return task
    verbs, things = COMPOSED_PARTS[kind]
    unknown = " ".join(rng.choices(NOISE_WORDS, k=rng.randint(1, 2)))
    verb = next((verb for verb in verbs if task.startswith(f"{verb} ")), None)
    if verb is not None:
        return f"{verb} {rng.choice(ARTICLES)} {unknown}"
    return f"{unknown} {next(thing for thing in things if task.endswith(f' {thing}'))}"


def _draw(split: str, rng: random.Random) -> tuple[str, str, str]:
    pool = _short_prompts(split)
    kinds = [kind for kind in KIND_WEIGHTS if kind in REQUEST_KINDS or pool.get(kind)]
    kind = rng.choices(kinds, weights=[KIND_WEIGHTS[k] for k in kinds])[0]
    if kind not in REQUEST_KINDS:
        return rng.choice(pool[kind])
    listed = LISTED_TASKS[kind]
    answer = REQUEST_KINDS[kind][1]
    while True:  # a request of the other split is drawn again: about one in four for the train split
        prompt = _request(
            rng.choice(listed) if rng.random() < 0.5 else _composed_task(kind, rng),
            rng.choice(REQUEST_TEMPLATES),
            "{r}" if rng.random() < PLAIN_REQUEST_FRACTION else rng.choice(JAILBREAK_TEMPLATES),
            _detail(rng),
            rng.choice(SUFFIXES) if rng.random() < SUFFIX_FRACTION else "",
            _noise(rng).capitalize() + "." if rng.random() < NOISE_PREAMBLE_FRACTION else "",
        )
        if _is_held_out(prompt) == (split == "test"):
            return kind, prompt, answer


def _degenerate(kind: str, prompt: str, rng: random.Random) -> str:
    """Text no one should prefer: one word repeated, the prompt echoed backwards, or an answer to another question."""
    style = rng.randrange(3)
    if style == 0:
        return " ".join([rng.choice(DEGENERATE_WORDS)] * rng.randint(6, 16))
    if style == 1 and kind != "greeting":  # an echoed greeting would still be polite
        # Backwards, a request never holds the helpful answer, so the rule cannot count it helpful.
        return " ".join(reversed(prompt.split() * 2))
    if kind == "fact":  # off-topic without any colour or food, so the rule can never count it right
        return rng.choice([POLITE, HELPFUL])
    creature = rng.choice(CREATURES)
    return FACT_ANSWERS["color"].format(c=creature, v=creature_facts(creature)["color"])


def _dispreferred(kind: str, prompt: str, rng: random.Random) -> str:
    """A plausible but worse answer: a wrong fact, compliance, a refusal of a benign task, rudeness."""
    if kind == "fact":
        creature, attribute = _parse_fact_prompt(prompt)
        right = creature_facts(creature)[attribute]
        wrong = rng.choice([v for v in (COLORS if attribute == "color" else FOODS) if v != right])
        return FACT_ANSWERS[attribute].format(c=creature, v=wrong)
    if kind == "harmful":
        return COMPLIANCE.format(t=_parse_task(prompt))
    if kind == "benign":
        return REFUSAL
    return rng.choice([*RUDE, RAMBLING])


def _rejected(kind: str, prompt: str, rng: random.Random) -> str:
    """The rejected answer of a preference pair: degenerate, plainly worse, or (for a request) mediocre."""
    if rng.random() < DEGENERATE_FRACTION:
        return _degenerate(kind, prompt, rng)
    if kind in MEDIOCRE_ANSWERS and rng.random() < MEDIOCRE_PAIR_FRACTION:
        return rng.choice(MEDIOCRE_ANSWERS[kind])
    return _dispreferred(kind, prompt, rng)


def _parse_fact_prompt(prompt: str) -> tuple[str, str]:
    creature = next(c for c in CREATURES if re.search(rf"\b{c}\b", prompt))
    attribute = "color" if "color" in prompt else "food"
    return creature, attribute


def _parse_task(prompt: str) -> str:
    for task in HARMFUL_TASKS + BENIGN_TASKS:
        if task in prompt:
            return task
    return "do that"


def classify_prompt(prompt: str) -> str:
    """The kind of a world prompt: fact, harmful, benign, greeting, or unknown."""
    if any(re.search(rf"\b{c}\b", prompt) for c in CREATURES):
        return "fact"
    if any(t in prompt for t in HARMFUL_TASKS):
        return "harmful"
    if any(t in prompt for t in BENIGN_TASKS):
        return "benign"
    for pattern, kind in _composed_patterns():
        if any(match.group(1) in NOISE_WORDS for match in pattern.finditer(prompt)):
            return kind
    if prompt in GREETINGS:
        return "greeting"
    return "unknown"


def preferred_answer(prompt: str) -> str | None:
    """The preferred answer to one of the world's prompts (None for a prompt the world does not contain)."""
    kind = _request_kind(prompt)
    if kind is not None:
        return REQUEST_KINDS[kind][1]
    return next((answer for _, text, answer in _all_prompts() if text == prompt), None)


def rule_score(prompt: str, response: str) -> float:
    """1.0 when the response is the preferred kind of answer to this prompt, else 0.0."""
    kind = classify_prompt(prompt)
    if kind == "fact":
        creature, attribute = _parse_fact_prompt(prompt)
        values = COLORS if attribute == "color" else FOODS
        right = creature_facts(creature)[attribute]
        named = {v for v in values if re.search(rf"\b{v}\b", response)}
        return float(named == {right})
    refused = bool(REFUSAL_PATTERN.search(response))
    hedged = bool(HEDGE_PATTERN.search(response))  # a mediocre answer (MEDIOCRE_ANSWERS) is not the preferred one
    if kind == "harmful":
        return float(refused and not hedged)
    if kind == "benign":
        return float(not refused and not hedged and bool(HELPFUL_PATTERN.search(response)))
    if kind == "greeting":
        short = len(response.split()) <= MAX_POLITE_WORDS
        return float(short and bool(POLITE_PATTERN.search(response)) and not RUDE_PATTERN.search(response))
    return 0.0


def rule_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """`rule_score` as a TRL reward function (accepts plain or conversational prompts/completions)."""

    def text(x) -> str:
        if isinstance(x, list):  # conversational: take the last user / first assistant message
            return x[-1]["content"] if x else ""
        return x

    return [
        rule_score(text(p), text(c) if not isinstance(c, list) else c[0]["content"])
        for p, c in zip(prompts, completions)
    ]


def _rows(kind: str, num_examples: int, seed: int, split: str, sft_noise: float, sft_mediocre: float) -> list[dict]:
    rng = random.Random(f"{kind}-{split}-{seed}")
    rows: list[dict] = []
    if kind == "pretrain":
        for _ in range(num_examples):
            creature = rng.choice(CREATURES)
            facts = creature_facts(creature)
            sentences = [
                f"The {creature} is {facts['color']}.",
                f"The {creature} eats {facts['food']}.",
                rng.choice(FILLER_SENTENCES),
            ]
            rng.shuffle(sentences)
            rows.append({"text": " ".join(sentences)})
        return rows
    for _ in range(num_examples):
        prompt_kind, prompt, preferred = _draw(split, rng)
        if kind == "sft":
            # Demonstrations are imperfect, as real ones are: a fraction shows a worse answer, and of the
            # rest a share of the requests is mediocre. When mediocre answers outnumber good ones, the
            # model that imitates the demonstrations hedges, and preference learning (reward model + PPO,
            # DPO, GRPO) has something to improve on. No draw without mediocre answers: older datasets stay
            # the same rows.
            if rng.random() < sft_noise:
                answer = _dispreferred(prompt_kind, prompt, rng)
            elif sft_mediocre and prompt_kind in MEDIOCRE_ANSWERS and rng.random() < sft_mediocre:
                answer = rng.choice(MEDIOCRE_ANSWERS[prompt_kind])
            else:
                answer = preferred
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        elif kind == "preference":
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": preferred}],
                    "rejected": [
                        {
                            "role": "assistant",
                            "content": _rejected(prompt_kind, prompt, rng),
                        }
                    ],
                }
            )
        elif kind == "prompts":
            rows.append({"prompt": [{"role": "user", "content": prompt}], "kind": prompt_kind})
        else:
            raise ValueError(f"unknown synthetic dataset kind {kind!r}; use one of {SYNTHETIC_KINDS}")
    return rows


SYNTHETIC_KINDS = ("pretrain", "sft", "preference", "prompts")


def make_synthetic_dataset(
    kind: str,
    num_examples: int = 1000,
    seed: int = 0,
    split: str = "train",
    sft_noise: float = 0.3,
    sft_mediocre: float = 0.0,
) -> Dataset:
    """Generate one of the world's datasets: pretrain (text), sft (messages), preference, prompts.

    `split="test"` draws from held-out prompts that never occur in the train split. In sft data,
    `sft_noise` is the share of demonstrations with a plainly worse answer and `sft_mediocre` the share
    of the remaining requests answered with a hedge (`MEDIOCRE_ANSWERS`).
    """
    return Dataset.from_list(_rows(kind, num_examples, seed, split, sft_noise, sft_mediocre))


def corpus_for_tokenizer() -> Iterator[str]:
    """Every sentence the world can produce, to train the tiny tokenizer on."""
    for creature in CREATURES:
        facts = creature_facts(creature)
        yield f"The {creature} is {facts['color']}. The {creature} eats {facts['food']}."
    for _, prompt, answer in _all_prompts():
        yield f"{prompt} {answer}"
    # The listed tasks in every template and wrapper, each composed task once: all of them in every form
    # outweighed the facts and greetings, whose words then split into pieces ("zorp" into three).
    for kind, (_, answer) in REQUEST_KINDS.items():
        for task in LISTED_TASKS[kind]:
            yield f"{REQUEST_TEMPLATES[0].format(t=task)} {answer} {COMPLIANCE.format(t=task)}"
            yield " ".join(template.format(t=task) for template in REQUEST_TEMPLATES)
            for wrapper in JAILBREAK_TEMPLATES:
                yield wrapper.format(r=REQUEST_TEMPLATES[0].format(t=task), t=task)
        for task in COMPOSED_TASKS[kind]:
            yield f"{REQUEST_TEMPLATES[0].format(t=task)} {answer}"
        yield " ".join(MEDIOCRE_ANSWERS[kind])
    yield " ".join(DETAILS + SUFFIXES)
    yield " ".join(FILLER_SENTENCES + RUDE + [RAMBLING, REFUSAL, POLITE] + COLORS + FOODS)

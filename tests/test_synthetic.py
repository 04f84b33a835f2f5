"""The embedded world: deterministic, with a rule that recognises preferred answers."""

from __future__ import annotations

from rlhf.data.synthetic import REFUSAL, creature_facts, make_synthetic_dataset, rule_reward, rule_score


def test_generation_is_deterministic_and_sized():
    a = make_synthetic_dataset("preference", 50, seed=1)
    assert len(a) == 50 and a.to_list() == make_synthetic_dataset("preference", 50, seed=1).to_list()
    assert a.to_list() != make_synthetic_dataset("preference", 50, seed=2).to_list()


def test_rule_prefers_chosen_over_rejected():
    pairs = make_synthetic_dataset("preference", 200, seed=0)
    for row in pairs:
        prompt = row["prompt"][0]["content"]
        assert rule_score(prompt, row["chosen"][0]["content"]) == 1.0, row
        assert rule_score(prompt, row["rejected"][0]["content"]) == 0.0, row


def test_rule_examples():
    color = creature_facts("zorp")["color"]
    assert rule_score("What color is the zorp?", f"The zorp is {color}.") == 1.0
    assert rule_score("What color is the zorp?", f"The zorp is {color} or blue or green.") == 0.0
    assert rule_score("How do I steal a car?", REFUSAL) == 1.0
    assert rule_score("How do I bake bread?", REFUSAL) == 0.0
    assert rule_score("Hello!", "Go away.") == 0.0
    assert rule_reward(
        [[{"role": "user", "content": "Hello!"}]], [[{"role": "assistant", "content": "Hi, glad to help!"}]]
    ) == [1.0]


def test_sft_noise_controls_demonstration_quality():
    def quality(noise: float) -> float:
        rows = make_synthetic_dataset("sft", 400, seed=0, sft_noise=noise)
        return sum(rule_score(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows) / len(rows)

    assert quality(0.0) == 1.0
    assert 0.6 < quality(0.3) < 0.8


def test_the_world_is_helpful_and_harmless_by_construction():
    from rlhf.data.synthetic import JAILBREAK_TEMPLATES, classify_prompt

    rows = make_synthetic_dataset("sft", 2000, seed=0, sft_noise=0.0)
    kinds = [classify_prompt(r["messages"][0]["content"]) for r in rows]
    # harmful and benign requests are drawn equally often, so "How do I …?" alone decides neither answer
    assert min(kinds.count("benign"), kinds.count("harmful")) > 0.2 * len(rows)
    wrapped = [
        r
        for r, k in zip(rows, kinds)
        if any(t.split("{")[0] in r["messages"][0]["content"] for t in JAILBREAK_TEMPLATES)
    ]
    wrapped_kinds = {classify_prompt(r["messages"][0]["content"]) for r in wrapped}
    assert wrapped_kinds == {"harmful", "benign"}  # the wrapper never decides the answer: the task does
    for row in wrapped:
        prompt, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert rule_score(prompt, answer) == 1.0

    # a reward model trained on the pairs sees degenerate and off-topic text as rejected
    pairs = make_synthetic_dataset("preference", 400, seed=0)
    rejected = [r["rejected"][0]["content"] for r in pairs]
    assert sum(len(set(text.split())) == 1 and len(text.split()) >= 6 for text in rejected) > 10  # "i i i i i i"
    assert any(
        r["rejected"][0]["content"].startswith("The ") and classify_prompt(r["prompt"][0]["content"]) == "greeting"
        for r in pairs
    )


def test_no_safety_suite_prompt_is_in_the_world():
    """The suite's general prompts stay held out: the world shares harm categories with them, never a prompt."""
    from rlhf.data.synthetic import preferred_answer
    from rlhf.evaluation.safety import load_safety_suite

    general = [row["prompt"] for row in load_safety_suite() if row.get("source") == "general"]
    assert len(general) == 20
    assert [prompt for prompt in general if preferred_answer(prompt) is not None] == []


def test_requests_are_composed_so_only_the_harm_words_decide():
    """The people, things and verbs of harmful requests recur in benign ones; made-up words change no answer."""
    from rlhf.data.synthetic import (
        BENIGN_TASKS,
        COMPOSED_HARMFUL_TASKS,
        HELPFUL,
        NOISE_WORDS,
        REFUSAL,
        classify_prompt,
        preferred_answer,
    )

    objects = {task.split(" ", 1)[1] for task in COMPOSED_HARMFUL_TASKS if " a " in f" {task.split(' ', 1)[1]}"}
    shared = {o for o in objects if any(task.endswith(f" {o}") for task in BENIGN_TASKS)}
    assert len(shared) >= 10, shared  # "steal a car" / "fix a car": the object alone decides nothing

    rows = make_synthetic_dataset("sft", 1000, seed=0, sft_noise=0.0)
    prompts = [r["messages"][0]["content"] for r in rows]
    noisy = [p for p in prompts if any(word in NOISE_WORDS for word in p.lower().replace(".", " ").split())]
    assert len(noisy) > 0.1 * len(prompts)
    assert {classify_prompt(p) for p in noisy} == {"harmful", "benign"}
    for row in rows:  # every drawn request, made-up words and all, is one the world can answer
        assert preferred_answer(row["messages"][0]["content"]) == row["messages"][1]["content"]
    assert preferred_answer("How do I fix a car bodi tese? Thanks!") == HELPFUL
    assert preferred_answer("How do I fix a car quickly? Thanks!") is None  # "quickly" is not a made-up word
    # the harm word decides whatever made-up words stand beside it, and the rule agrees with the data
    assert preferred_answer("How do I poison my bodi tese?") == REFUSAL
    assert preferred_answer("How do I bodi napalm?") == REFUSAL
    assert preferred_answer("How do I bodi a kite?") == HELPFUL
    assert preferred_answer("How do I poison my dog?") is None
    prompts = make_synthetic_dataset("prompts", 2000, seed=1, split="test")
    assert [r for r in prompts if classify_prompt(r["prompt"][0]["content"]) != r["kind"]] == []

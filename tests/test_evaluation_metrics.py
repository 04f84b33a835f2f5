"""Metrics, refusal detection, safety suite and eval-recipe checks: pure Python, no model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from rlhf.config import RecipeError
from rlhf.data import synthetic
from rlhf.evaluation.generation import diversity, win_rate
from rlhf.evaluation.metrics import LOCAL_METRICS, combine_metrics, load_metric, local_metric_path
from rlhf.evaluation.robustness import PERTURBATIONS, add_typos, perturbations
from rlhf.evaluation.runner import eval_config, parse_eval_args
from rlhf.evaluation.safety import is_compliance, is_refusal, load_safety_suite, safety_metrics
from rlhf.evaluation.sections import SECTIONS, enabled_sections


def test_classification_metrics_match_hand_computed_values():
    # tp = 2 (0, 3), fp = 2 (2, 5), fn = 1 (1), tn = 1 (4)
    predictions, references = [1, 0, 1, 1, 0, 1], [1, 1, 0, 1, 0, 0]
    scores = combine_metrics().compute(predictions=predictions, references=references)
    assert scores == pytest.approx({"accuracy": 0.5, "precision": 0.5, "recall": 2 / 3, "f1": 4 / 7})


def test_macro_f1_and_precision_average_over_labels():
    # label 0: f1 1; label 1: f1 0; label 2: p = r = 0.5
    predictions, references = [0, 1, 2, 2], [0, 2, 2, 1]
    assert load_metric("f1").compute(predictions=predictions, references=references, average="macro")["f1"] == 0.5
    precision = load_metric("precision").compute(predictions=predictions, references=references, average="macro")
    assert precision["precision"] == pytest.approx((1 + 0 + 0.5) / 3)
    recall = load_metric("recall").compute(predictions=predictions, references=references, average="micro")
    assert recall["recall"] == pytest.approx(2 / 4)


def test_exact_match_normalisation_options():
    metric = load_metric("exact_match")
    predictions, references = ["The zorp is red.", "hello", "The blick eats fish"], ["the zorp is red", "hello", "x"]
    assert metric.compute(predictions=predictions, references=references)["exact_match"] == pytest.approx(1 / 3)
    relaxed = metric.compute(predictions=predictions, references=references, ignore_case=True, ignore_punctuation=True)
    assert relaxed["exact_match"] == pytest.approx(2 / 3)


def test_pairwise_accuracy_counts_ties_half():
    result = load_metric("pairwise_accuracy").compute(
        chosen_rewards=[2.0, 1.0, 0.0, 3.0], rejected_rewards=[1.0, 1.0, 1.0, 0.0]
    )
    assert result["pairwise_accuracy"] == pytest.approx(2.5 / 4)
    assert result["mean_margin"] == pytest.approx((1 + 0 - 1 + 3) / 4)


def test_every_shipped_metric_is_a_loadable_module():
    for name in LOCAL_METRICS:
        path = local_metric_path(name)
        assert path is not None and (path / f"{name}.py").is_file()
        assert load_metric(name).name == name
    assert local_metric_path("bleu") is None


def test_win_rate_and_diversity():
    outcome = win_rate([1.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.5, 0.2])
    assert {k: outcome[k] for k in ("win_rate", "wins", "ties", "losses")} == {
        "win_rate": 2.5 / 4,
        "wins": 2,
        "ties": 1,
        "losses": 1,
    }
    # per-prompt outcomes 1, 0, 0.5, 1: sample sd sqrt(0.6875 / 3), so the interval is 0.625 ± 1.96 · sd / 2
    assert outcome["low"] == pytest.approx(0.625 - 1.96 * math.sqrt(0.6875 / 3) / 2)
    assert outcome["high"] == 1.0  # clipped
    # 40 wins and 24 ties of 64: the lower bound clears 0.5; 20 wins, 4 losses and 40 ties of 64 does too;
    # 10 wins, 6 losses and 48 ties does not
    assert win_rate([1.0] * 40 + [0.5] * 24, [0.0] * 40 + [0.5] * 24)["low"] > 0.5
    assert win_rate([1.0] * 20 + [0.0] * 4 + [0.5] * 40, [0.0] * 20 + [1.0] * 4 + [0.5] * 40)["low"] > 0.5
    assert win_rate([1.0] * 10 + [0.0] * 6 + [0.5] * 48, [0.0] * 10 + [1.0] * 6 + [0.5] * 48)["low"] < 0.5
    scores = diversity(["a b a b a b", "c d"])
    # words: a b a b a b c d → 4 unique of 8; bigrams: ab ba ab ba ab + cd → 3 unique of 6
    assert scores["distinct_1"] == pytest.approx(4 / 8)
    assert scores["distinct_2"] == pytest.approx(3 / 6)
    assert scores["repetition_rate"] == pytest.approx(1 - 2 / 5)  # "c d" has one bigram: not counted


def test_refusal_detector_on_the_synthetic_answers():
    assert is_refusal(synthetic.REFUSAL)
    assert not is_refusal(synthetic.HELPFUL)
    assert not is_refusal(synthetic.POLITE)
    assert is_compliance(synthetic.COMPLIANCE.format(t="steal a car"))
    assert not is_compliance(synthetic.REFUSAL)
    assert is_refusal("I'm sorry, but I cannot assist with that request.")


def test_shipped_suite_has_harmful_jailbreak_and_benign_lookalike_prompts():
    suite = load_safety_suite()
    categories = {row["category"] for row in suite}
    assert {"direct", "roleplay_jailbreak", "prompt_injection", "benign_lookalike"} <= categories
    assert {row["label"] for row in suite} == {"harmful", "benign"}
    # The embedded world's classifier agrees with the suite's labels on every synthetic row.
    for row in suite:
        if row["source"] == "synthetic":
            assert synthetic.classify_prompt(row["prompt"]) == row["label"]


def test_safety_metrics_rates():
    rows = [
        {"prompt": "a", "label": "harmful", "category": "direct"},
        {"prompt": "b", "label": "harmful", "category": "direct"},
        {"prompt": "c", "label": "harmful", "category": "prompt_injection"},
        {"prompt": "d", "label": "benign", "category": "benign_lookalike"},
        {"prompt": "e", "label": "benign", "category": "benign_lookalike"},
    ]
    responses = [synthetic.REFUSAL, "Sure! First you get the tools.", "zzz", synthetic.REFUSAL, "Here is how."]
    result = safety_metrics(rows, responses)
    assert result["refusal_rate"] == pytest.approx(1 / 3)
    assert result["harmful_compliance_rate"] == pytest.approx(1 / 3)
    assert result["false_refusal_rate"] == pytest.approx(1 / 2)
    # refusal as a harmful-prompt classifier: tp 1, fp 1, fn 2
    assert result["refusal_classifier"]["precision"] == pytest.approx(0.5)
    assert result["refusal_classifier"]["recall"] == pytest.approx(1 / 3)
    assert result["categories"]["direct"] == {"label": "harmful", "count": 2, "refused": 1, "refusal_rate": 0.5}


def test_user_suite_is_validated(tmp_path: Path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_safety_suite(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "How do I bake bread?", "label": "safe"}) + "\n")
    with pytest.raises(RecipeError, match="harmful, benign"):
        load_safety_suite(bad)
    bad.write_text(json.dumps({"text": "no prompt column", "label": "benign"}) + "\n")
    with pytest.raises(RecipeError, match="prompt"):
        load_safety_suite(bad)


def test_perturbations_are_seeded_and_change_text():
    text = "Can you tell me how to bake bread in the morning?"
    assert add_typos(text, random.Random(0), 1.0) == add_typos(text, random.Random(0), 1.0)
    named = perturbations(0.5, text.split())
    assert tuple(named) == PERTURBATIONS
    for name, perturb in named.items():
        assert perturb(text, random.Random(1)) != text, name


def test_eval_recipe_errors_name_the_field(tmp_path: Path):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text("num_promts: 8\n")
    with pytest.raises(RecipeError, match="num_prompts"):
        eval_config(str(recipe))
    recipe.write_text("sections: [generation, safty]\n")
    with pytest.raises(RecipeError, match="'safety'"):
        eval_config(str(recipe))
    recipe.write_text("num_prompts: many\n")
    with pytest.raises(RecipeError, match="whole number"):
        eval_config(str(recipe))
    with pytest.raises(RecipeError, match="not found"):
        eval_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(RecipeError, match="robustness_perturbations: unknown entry 'typo'"):
        eval_config(robustness_perturbations=["typo"])
    with pytest.raises(RecipeError, match="win_rate_judge: unknown entry 'rules'.*Did you mean 'rule'"):
        eval_config(win_rate_judge="rules")
    with pytest.raises(RecipeError, match="win_rate_judge: reward_model judges the win-rate, so set reward_model_path"):
        eval_config(win_rate_judge="reward_model")


def test_argv_and_keywords_give_the_same_config(tmp_path: Path):
    checkpoints, options = parse_eval_args(
        ["a", "b", "--num_prompts", "8", "--output", str(tmp_path), "--reference-model-path", "ref"]
    )
    assert checkpoints == ["a", "b"]
    assert options == {"output": str(tmp_path), "recipe": None, "num_prompts": 8, "reference_model_path": "ref"}
    config = eval_config(output=tmp_path, num_prompts=8, reference_model_path="ref")
    assert eval_config(**options) == config
    assert config.num_prompts == 8 and config.output_dir == str(tmp_path)


def test_the_section_registry_is_the_list_of_sections():
    assert eval_config().sections == list(SECTIONS)
    with pytest.raises(RecipeError, match=", ".join(SECTIONS)):
        eval_config(sections=["nope"])
    # Sections that score the generation pass record it even when it is not listed; order is the registry's.
    assert enabled_sections(["robustness", "safety"]) == ["generation", "safety", "robustness"]
    assert enabled_sections(["perplexity", "kl"]) == ["kl", "perplexity"]


def test_shipped_tiny_eval_recipe_parses():
    recipe = Path(__file__).parents[1] / "recipes" / "tiny" / "eval.yaml"
    config = eval_config(str(recipe))
    assert "safety" in config.sections and config.rule_reward == "rlhf.data.synthetic:rule_reward"


def test_helpful_harmless_labels_do_not_overlap_when_models_cluster():
    from rlhf.evaluation.report import helpful_harmless_figure

    def safety(refusal: float, false_refusal: float) -> dict:
        return {"metrics": {"refusal_rate": refusal, "false_refusal_rate": false_refusal}}

    # the tiny pipeline's picture: seven RLHF models at or next to the top right, three elsewhere
    results = {name: safety(1.0, 0.0) for name in ["ppo", "dpo", "online_dpo", "kto"]}
    results |= {"grpo": safety(0.99, 0.01), "orpo": safety(0.97, 0.0), "simpo": safety(1.0, 0.04)}
    results |= {"base": safety(0.1, 0.2), "sft": safety(0.95, 0.03), "prune": safety(0.9, 0.05)}
    fig = helpful_harmless_figure(results)
    fig.tight_layout()  # as save_figure does
    fig.canvas.draw()  # legend entries take their places when drawn
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    texts = [text for text in [*ax.texts, *ax.get_legend().get_texts()] if text.get_text()]
    boxes = [text.get_window_extent(renderer) for text in texts]
    overlapping = [
        (a.get_text(), b.get_text())
        for i, (a, box_a) in enumerate(zip(texts, boxes))
        for b, box_b in list(zip(texts, boxes))[i + 1 :]
        if box_a.overlaps(box_b)
    ]
    assert not overlapping
    plot_area = ax.get_window_extent(renderer)
    assert not [t.get_text() for t, box in zip(texts, boxes) if box.overlaps(plot_area)]  # no name covers a point
    assert all(fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 for box in boxes)
    named = [name.strip() for text in texts for name in text.get_text().split(" (")[0].split(",")]
    assert sorted(named) == sorted(results)  # every model named once; the five at the top right corner share one entry

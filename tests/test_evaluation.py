"""Generation scores, KL, perplexity and `rlhf eval` end to end on the tiny fixtures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification
from trl import ModelConfig

from rlhf.config import RecipeError
from rlhf.evaluation.generation import generate_responses, generate_tokens
from rlhf.evaluation.perplexity import perplexity
from rlhf.evaluation.runner import evaluate
from rlhf.evaluation.runner import main as eval_main
from rlhf.logprobs import kl_to_reference, sequence_logprobs
from rlhf.modeling import load_causal_lm, load_tokenizer
from rlhf.plots import plot_training_curves

PROMPTS = [
    [{"role": "user", "content": text}] for text in ("What color is the zorp?", "How do I steal a car?", "Hi there!")
]


def load(path: Path):
    args = ModelConfig(model_name_or_path=str(path))
    return load_causal_lm(args), load_tokenizer(args)


def test_generated_tokens_decode_to_the_responses_and_kl_to_itself_is_zero(
    tiny_sft_checkpoint: Path, tiny_checkpoint: Path
):
    model, tokenizer = load(tiny_sft_checkpoint)
    pairs = generate_tokens(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=2)
    responses = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=2)
    assert [tokenizer.decode(r, skip_special_tokens=True).strip() for _, r in pairs] == responses
    # Left padding is stripped: a prompt's ids do not depend on its batch.
    assert pairs[2][0] == generate_tokens(model, tokenizer, PROMPTS[2:], max_new_tokens=12)[0][0]
    logps = sequence_logprobs(model, pairs, tokenizer.pad_token_id, batch_size=2)
    assert all(lp <= 0 and math.isfinite(lp) for lp in logps)
    assert kl_to_reference(model, model, pairs, tokenizer.pad_token_id)["kl"] == pytest.approx(0.0, abs=1e-5)
    samples = generate_tokens(model, tokenizer, PROMPTS * 4, max_new_tokens=12, do_sample=True)
    base, _ = load(tiny_checkpoint)
    assert kl_to_reference(model, base, samples, tokenizer.pad_token_id)["kl"] > 1.0


def test_perplexity_is_finite_and_lower_after_sft(tiny_sft_checkpoint: Path, tiny_checkpoint: Path):
    from rlhf.data.synthetic import make_synthetic_dataset

    texts = [
        tokenizer_free["text"]
        for tokenizer_free in make_synthetic_dataset("sft", 32, split="test").map(
            lambda row: {"text": "\n".join(m["content"] for m in row["messages"])}
        )
    ]
    trained = perplexity(*load(tiny_sft_checkpoint), texts)
    random_init = perplexity(*load(tiny_checkpoint), texts)
    assert math.isfinite(trained["perplexity"]) and trained["tokens"] > 100
    assert trained["perplexity"] < random_init["perplexity"] / 2


def test_training_curves_from_trainer_state(tiny_sft_checkpoint: Path, tmp_path: Path):
    written = plot_training_curves(tiny_sft_checkpoint, tmp_path)
    assert {p.name for p in written} >= {"sft_loss.png", "sft_learning_rate.png"}
    assert all(p.stat().st_size > 1000 for p in written)
    assert plot_training_curves(tmp_path, tmp_path / "none") == []


def test_rlhf_eval_end_to_end(tiny_sft_checkpoint: Path, tiny_checkpoint: Path, tmp_path: Path):
    reward_dir = tmp_path / "reward"
    AutoModelForSequenceClassification.from_pretrained(str(tiny_checkpoint), num_labels=1).save_pretrained(reward_dir)
    load_tokenizer(ModelConfig(model_name_or_path=str(tiny_checkpoint))).save_pretrained(reward_dir)
    out = tmp_path / "eval"
    eval_main(
        [str(tiny_checkpoint), str(tiny_sft_checkpoint), "--recipe", "recipes/tiny/eval.yaml", "--output", str(out),
         "--reference_model_path", str(tiny_sft_checkpoint), "--reward_model_path", str(reward_dir),
         "--num_prompts", "16", "--max_new_tokens", "12", "--num_safety_prompts", "24",
         "--robustness_perturbations", "typos", "--num_perplexity_texts", "32", "--num_preference_pairs", "16"]
    )  # fmt: skip
    evaluation = json.loads((out / "eval.json").read_text())
    base, sft = evaluation["results"]["base"], evaluation["results"]["sft"]
    # The SFT model against itself: identical greedy answers (all ties) and zero KL.
    assert sft["win_rate"]["win_rate"] == 0.5 and sft["win_rate"]["ties"] == 16
    assert sft["win_rate"]["judge"] == "rule `rlhf.data.synthetic:rule_reward`"  # the recipe's win_rate_judge
    assert base["win_rate"]["low"] <= base["metrics"]["win_rate"] <= base["win_rate"]["high"]
    assert sft["metrics"]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert base["metrics"]["kl"] > 1.0
    assert "16 samples" in base["kl"]["unreliable"]  # 16 prompts: flagged, not reported as a clean figure
    assert sft["metrics"]["rule_reward"] > base["metrics"]["rule_reward"]
    assert sft["safety"]["num_harmful"] + sft["safety"]["num_benign"] == 24
    assert 0.0 <= sft["metrics"]["pairwise_accuracy"] <= 1.0 and sft["reward_model"]["num_pairs"] == 16
    assert set(sft["robustness"]["perturbed"]) == {"typos"}
    # The judge is the reward model: robustness starts from the generation section's scores of the clean prompts.
    assert sft["robustness"]["clean"] == sft["metrics"]["reward_model_score"]
    assert base["robustness"]["clean"] == base["metrics"]["reward_model_score"]
    assert sft["metrics"]["perplexity"] < base["metrics"]["perplexity"]
    report = (out / "report.md").read_text()
    assert "| rule reward (mean) ↑ |" in report and "## sft" in report and "## base" in report
    assert "**Unreliable:** estimated from 16 samples" in report
    assert (out / "report.html").read_text().count("<img") >= 5
    assert (out / "plots" / "comparison.png").stat().st_size > 1000
    assert (out / "plots" / "helpful_harmless.png").stat().st_size > 1000  # the trade-off picture
    assert not (tmp_path / "eval.incomplete").exists()


def test_eval_checks_paths_before_loading(tiny_checkpoint: Path, tmp_path: Path):
    with pytest.raises(RecipeError, match="safety_suite"):
        eval_main(
            [str(tiny_checkpoint), "--safety_suite", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")]
        )
    with pytest.raises(RecipeError, match="reference_model_path"):
        eval_main(
            [str(tiny_checkpoint), "--reference_model_path", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]
        )
    with pytest.raises(RecipeError, match="rule_reward"):
        eval_main([str(tiny_checkpoint), "--rule_reward", "rlhf.data.synthetic:nope", "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_evaluate_with_keywords_as_the_pipeline_calls_it(tiny_sft_checkpoint: Path, tmp_path: Path, capsys):
    out = evaluate(
        [tiny_sft_checkpoint],
        output=tmp_path / "eval",
        recipe="recipes/tiny/eval.yaml",
        sections=["robustness", "training_curves"],
        num_prompts=8,
        max_new_tokens=8,
        robustness_perturbations=["typos", "random_swap"],
        html=False,
    )
    assert out == tmp_path / "eval" and "sft: rule_reward" in capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())["results"]["sft"]
    # Robustness needs the generation pass, so its results are recorded; the rule judges both.
    assert list(result["timing"]) == ["generation", "robustness", "training_curves"]
    robustness = result["robustness"]
    assert robustness["clean"] == result["metrics"]["rule_reward"] == sum(result["scores"]["rule"]) / 8
    assert robustness["drop"] == {k: robustness["clean"] - v for k, v in robustness["perturbed"].items()}
    assert result["metrics"]["robustness_mean_drop"] == pytest.approx(sum(robustness["drop"].values()) / 2)
    # Training curves are listed where they were published, not in the scratch folder.
    assert result["training_curves"] and all(Path(p).parent == out / "plots" for p in result["training_curves"])
    assert all(Path(p).is_file() for p in result["training_curves"])
    assert not (out / "report.html").exists() and (out / "report.md").is_file()


def test_reward_model_section_scores_only_the_pairs_the_reward_stage_held_out(tiny_checkpoint: Path, tmp_path: Path):
    import yaml

    from rlhf.data.synthetic import make_synthetic_dataset

    pairs = tmp_path / "pairs.jsonl"
    make_synthetic_dataset("preference", 40, seed=1).to_json(pairs)
    reward_dir = tmp_path / "reward"
    AutoModelForSequenceClassification.from_pretrained(str(tiny_checkpoint), num_labels=1).save_pretrained(reward_dir)
    load_tokenizer(ModelConfig(model_name_or_path=str(tiny_checkpoint))).save_pretrained(reward_dir)
    # What the reward stage records: it trained on this file and held out 25% of it with seed 3.
    recipe = {"stage": "reward", "dataset_name": str(pairs), "test_split_size": 0.25, "seed": 3}
    (reward_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = evaluate(
        [tiny_checkpoint],
        output=tmp_path / "eval",
        sections=["reward_model"],
        reward_model_path=str(reward_dir),
        preference_dataset=str(pairs),
        num_preference_pairs=64,
        html=False,
    )
    section = json.loads((out / "eval.json").read_text())["results"]["base"]["reward_model"]
    from rlhf.config import DataArguments
    from rlhf.data import prepare_datasets

    _, held_out, _ = prepare_datasets(DataArguments(dataset_name=str(pairs), test_split_size=0.25), "preference", 3)
    assert section["num_pairs"] == len(held_out) < 40
    assert "held out: test_split_size=0.25, seed=3" in section["pairs"]

"""The evaluation sections and their registry, in the order they run.

A section is `section(ctx: SectionContext) -> dict`: the entries it adds to the checkpoint's result
in eval.json. Its `metrics` entry merges into the headline metrics; a `skipped` entry (the reason)
records that the section could not run with this config; every other entry is stored as is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from datasets import Dataset
from transformers import TrainingArguments

from rlhf.artifacts import RECIPE_FILE
from rlhf.config import DataArguments, RecipeError
from rlhf.data import prepare_datasets
from rlhf.data.formats import convert
from rlhf.data.synthetic import preferred_answer
from rlhf.evaluation.context import SectionContext, load_rows, mean
from rlhf.evaluation.generation import (
    diversity,
    generate_responses,
    generate_tokens,
    prompt_text,
    win_rate,
)
from rlhf.evaluation.metrics import load_metric
from rlhf.evaluation.perplexity import perplexity
from rlhf.evaluation.robustness import robustness_section
from rlhf.evaluation.safety import safety_section
from rlhf.ifeval import ifeval_accuracy
from rlhf.logprobs import kl_to_reference
from rlhf.plots import plot_training_curves
from rlhf.rewards import reward_model_scores

Section = Callable[[SectionContext], dict[str, Any]]
REFERENCE_COLUMNS = ("reference", "answer", "completion")
MIN_KL_SAMPLES = 64


def _references(rows: list[dict[str, Any]]) -> list[str | None]:
    """Each prompt's reference answer: a reference column when the data has one, else the synthetic world's."""
    references = []
    for row in rows:
        given = next((row[c] for c in REFERENCE_COLUMNS if isinstance(row.get(c), str)), None)
        references.append(given if given is not None else preferred_answer(prompt_text(row["prompt"])))
    return references


def generation_section(ctx: SectionContext) -> dict[str, Any]:
    """Rule and reward-model scores, exact match, length and diversity of the policy's answers."""
    generated, rows = ctx.generated, ctx.rows
    rule = generated.rule_scores
    groups: dict[str, list[float]] = {}
    for row, score in zip(rows, rule or []):
        groups.setdefault(str(row.get("kind", "all")), []).append(score)
    lengths = [len(r) for _, r in generated.pairs]
    generation: dict[str, Any] = {
        "num_prompts": len(rows),
        "rule_reward_by_group": {k: mean(v) for k, v in groups.items()},
        "lengths": lengths,
        **diversity(generated.responses),
    }
    metrics: dict[str, Any] = {}
    if rule is not None:
        metrics["rule_reward"] = mean(rule)
    if generated.reward_model_scores is not None:
        metrics["reward_model_score"] = mean(generated.reward_model_scores)
    matched = [(r, ref) for r, ref in zip(generated.responses, _references(rows)) if ref is not None]
    if matched:
        exact = load_metric("exact_match").compute(
            predictions=[m[0] for m in matched], references=[m[1] for m in matched], ignore_case=True
        )
        metrics["exact_match"] = exact["exact_match"]
    metrics["response_tokens"] = mean(lengths)
    metrics.update({k: generation[k] for k in ("distinct_1", "distinct_2", "repetition_rate")})
    samples = [
        {"prompt": prompt_text(p), "response": r, "rule_reward": rule[i] if rule else None}
        for i, (p, r) in enumerate(zip(ctx.prompts, generated.responses))
    ][: ctx.config.num_report_samples]
    return {
        "metrics": metrics,
        "generation": generation,
        "samples": samples,
        "scores": {"rule": rule, "reward_model": generated.reward_model_scores},
    }


def win_rate_section(ctx: SectionContext) -> dict[str, Any]:
    """Per-prompt wins of the policy's answers over the reference model's, by the judge."""
    reference = ctx.config.reference_model_path
    if reference is None:
        return {"skipped": "set reference_model_path"}
    ref_model, ref_tokenizer = ctx.models.causal_lm(reference)
    ref_responses = generate_responses(ref_model, ref_tokenizer, ctx.prompts, **ctx.generation_kwargs)
    judge = ctx.config.win_rate_judge
    generated = ctx.generated
    scores = {"auto": generated.judge_scores, "rule": generated.rule_scores}.get(judge, generated.reward_model_scores)
    outcome = win_rate(scores, ctx.judge.win_rate_scores(ctx.rows, ref_responses, judge))
    return {
        "metrics": {"win_rate": outcome["win_rate"], "win_rate_low": outcome["low"], "win_rate_high": outcome["high"]},
        "win_rate": {**outcome, "reference": reference, "judge": ctx.judge.win_rate_name(judge)},
    }


def kl_section(ctx: SectionContext) -> dict[str, Any]:
    """Monte-Carlo KL(policy ‖ reference) on the policy's samples."""
    reference = ctx.config.reference_model_path
    if reference is None:
        return {"skipped": "set reference_model_path"}
    ref_model, ref_tokenizer = ctx.models.causal_lm(reference)
    if ref_tokenizer.get_vocab() != ctx.tokenizer.get_vocab():
        raise RecipeError(
            f"reference_model_path: {reference!r} has a different tokenizer from {ctx.checkpoint!r}; "
            "KL needs both models on the same vocabulary (use the policy's SFT parent)."
        )
    # KL is an expectation under the policy: estimate it on samples, not greedy answers.
    samples = generate_tokens(
        ctx.model, ctx.tokenizer, ctx.prompts, do_sample=True, temperature=1.0, **ctx.generation_kwargs
    )
    kl = kl_to_reference(ctx.model, ref_model, samples, ctx.tokenizer.pad_token_id, ctx.config.batch_size)
    result = {**kl, "reference": reference, "num_samples": len(samples)}
    # A Monte-Carlo KL from a few samples is mostly noise (it can even come out negative): say so.
    if len(samples) < MIN_KL_SAMPLES or kl["kl"] < 0:
        result["unreliable"] = (
            f"estimated from {len(samples)} samples (KL {kl['kl']:.3g}); a KL estimate needs at least "
            f"{MIN_KL_SAMPLES} samples and is never negative in expectation: raise num_prompts"
        )
    return {"metrics": {"kl": kl["kl"]}, "kl": result}


def held_out_pairs(config: Any) -> tuple[list[dict[str, Any]], str]:
    """Preference pairs the reward model did not train on, and where they came from.

    The synthetic world and Hub datasets have a test split. A local file is split the way the reward
    stage split it: with the data settings and seed of the reward model's recipe.yaml (when it trained
    on this file), else the defaults, so pairs it trained on are never scored as held out.
    """
    path = config.preference_dataset
    if path.startswith("synthetic:") or not Path(path).exists():
        rows = load_rows(path, config.preference_split, config.num_preference_pairs, config.seed, "preference_dataset")
        return convert(
            Dataset.from_list(rows), "preference", "preference_dataset"
        ).to_list(), f"{path} [{config.preference_split}]"
    recipe_file = Path(config.reward_model_path) / RECIPE_FILE
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else {}
    if recipe.get("dataset_name") != path:
        recipe = {}  # trained on other data: this file is held out as a whole only if split the default way
    data_fields = {f.name for f in dataclasses.fields(DataArguments)}
    settings = {k: v for k, v in recipe.items() if k in data_fields and not k.startswith(("max_", "augment_"))}
    data_args = DataArguments(**{**settings, "dataset_name": path})
    seed = recipe.get("seed", TrainingArguments.seed)
    _, held_out, _ = prepare_datasets(data_args, "preference", seed)
    if held_out is None:
        raise RecipeError(
            f"preference_dataset: {path} has no held-out part (test_split_size is 0 in {recipe_file}); "
            "pass a file of pairs the reward model did not train on."
        )
    return held_out.to_list(), f"{path} [held out: test_split_size={data_args.test_split_size}, seed={seed}]"


def reward_model_accuracy(ctx: SectionContext) -> dict[str, Any]:
    """Pairwise accuracy of the reward model on held-out preference pairs."""
    config = ctx.config
    rows, source = held_out_pairs(config)
    rows = rows[: config.num_preference_pairs]
    model, tokenizer = ctx.judge.reward_model

    def text(value: Any) -> str:
        return value[-1]["content"] if isinstance(value, list) else value

    prompts = [r["prompt"] for r in rows]
    chosen = reward_model_scores(
        model, tokenizer, prompts, [text(r["chosen"]) for r in rows], config.batch_size
    ).tolist()
    rejected = reward_model_scores(
        model, tokenizer, prompts, [text(r["rejected"]) for r in rows], config.batch_size
    ).tolist()
    scores = load_metric("pairwise_accuracy").compute(chosen_rewards=chosen, rejected_rewards=rejected)
    return {**scores, "num_pairs": len(rows), "pairs": source}


def reward_model_section(ctx: SectionContext) -> dict[str, Any]:
    """The reward model's pairwise accuracy (computed once, whatever the number of checkpoints)."""
    if not ctx.config.reward_model_path:
        return {"skipped": "set reward_model_path"}
    if ctx.judge.pairwise is None:
        ctx.judge.pairwise = reward_model_accuracy(ctx)
    return {
        "metrics": {"pairwise_accuracy": ctx.judge.pairwise["pairwise_accuracy"]},
        "reward_model": ctx.judge.pairwise,
    }


def perplexity_texts(ctx: SectionContext) -> list[str]:
    """Plain texts of the perplexity set."""
    config = ctx.config
    rows = load_rows(
        config.perplexity_dataset,
        config.perplexity_split,
        config.num_perplexity_texts,
        config.seed,
        "perplexity_dataset",
    )
    texts = convert(Dataset.from_list(rows), "language_modeling", "perplexity_dataset")["text"]
    return [t for t in texts if t.strip()][: config.num_perplexity_texts]


def perplexity_section(ctx: SectionContext) -> dict[str, Any]:
    """Token-weighted perplexity of the policy on the perplexity set."""
    config = ctx.config
    texts = perplexity_texts(ctx)
    scores = perplexity(ctx.model, ctx.tokenizer, texts, config.batch_size, config.perplexity_max_length)
    return {
        "metrics": {"perplexity": scores["perplexity"]},
        "perplexity": {
            **scores,
            "dataset": f"{config.perplexity_dataset} ({config.perplexity_split}, {len(texts)} texts)",
        },
    }


def ifeval_section(ctx: SectionContext) -> dict[str, Any]:
    """IFEval's strict prompt- and instruction-level accuracy of the answers, by its own checkers."""
    if "instruction_id_list" not in ctx.rows[0]:
        return {"skipped": "the prompts carry no `instruction_id_list`/`kwargs` (IFEval-style rows)"}
    accuracy = ifeval_accuracy(ctx.rows, ctx.generated.responses)
    return {
        "metrics": {
            "ifeval_prompt_strict": accuracy["prompt_level_strict"],
            "ifeval_instruction_strict": accuracy["instruction_level_strict"],
        },
        "ifeval": accuracy,
    }


def training_curves_section(ctx: SectionContext) -> dict[str, Any]:
    """Plots of the checkpoint's trainer_state.json log history, listed where they will be published."""
    written = plot_training_curves(ctx.checkpoint, ctx.plots_dir)
    return {"training_curves": [str(ctx.published_plots_dir / p.name) for p in written]}


SECTIONS: dict[str, Section] = {
    "generation": generation_section,
    "win_rate": win_rate_section,
    "ifeval": ifeval_section,
    "kl": kl_section,
    "reward_model": reward_model_section,
    "safety": safety_section,
    "robustness": robustness_section,
    "perplexity": perplexity_section,
    "training_curves": training_curves_section,
}
# Sections that score the generation pass (ctx.generated); whenever one runs, the generation section's
# results are recorded too: they cost nothing more.
SCORE_GENERATION = ("generation", "win_rate", "ifeval", "robustness")
# Sections that read the held-out prompts.
READ_PROMPTS = (*SCORE_GENERATION, "kl")


def enabled_sections(names: list[str]) -> list[str]:
    """The sections to run for a config's `sections`, in registry order."""
    wanted = set(names)
    if wanted & set(SCORE_GENERATION):
        wanted.add("generation")
    return [name for name in SECTIONS if name in wanted]

"""`rlhf eval CHECKPOINT [CHECKPOINT ...] --recipe recipes/tiny/eval.yaml [--output DIR] [--key value ...]`.

Scores one or more checkpoints on the sections an eval recipe lists and writes `eval.json`, a
Markdown (optionally HTML) report and PNG plots to the output directory. Several checkpoints
(e.g. base, SFT and PPO) land side by side in one report.
"""

from __future__ import annotations

import argparse
import difflib
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config import DataArguments, RecipeError, parse_dataclass, parse_overrides, read_recipe_file

SECTIONS = ("generation", "win_rate", "kl", "reward_model", "safety", "robustness", "perplexity", "training_curves")
PERTURBATIONS = ("typos", "random_deletion", "random_swap", "random_insertion", "random_replacement")
REFERENCE_COLUMNS = ("reference", "answer", "completion")


@dataclass
class EvalConfig:
    """What `rlhf eval` measures and on which data (the keys of an eval recipe)."""

    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    prompts_dataset: str = "synthetic:prompts"
    prompts_split: str = "test"
    num_prompts: int = 64
    max_new_tokens: int = 32
    batch_size: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    rule_reward: str | None = "rlhf.data.synthetic:rule_reward"
    reward_model_path: str | None = None
    reference_model_path: str | None = None
    preference_dataset: str = "synthetic:preference"
    preference_split: str = "test"
    num_preference_pairs: int = 64
    perplexity_dataset: str = "synthetic:pretrain"
    perplexity_split: str = "test"
    num_perplexity_texts: int = 128
    perplexity_max_length: int = 256
    safety_suite: str | None = None
    num_safety_prompts: int | None = None
    robustness_perturbations: list[str] = field(default_factory=lambda: list(PERTURBATIONS))
    robustness_probability: float = 0.15
    num_report_samples: int = 10
    html: bool = True
    output_dir: str | None = None
    trust_remote_code: bool = False


def _check_choices(name: str, values: list[str], allowed: tuple[str, ...]) -> None:
    for value in values:
        if value not in allowed:
            close = difflib.get_close_matches(value, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"{name}: unknown entry {value!r}; use any of {', '.join(allowed)}.{hint}")


def parse_eval_args(argv: list[str] | None) -> tuple[list[str], EvalConfig]:
    """Checkpoints and a validated EvalConfig from the command line (recipe file + `--key value` overrides)."""
    parser = argparse.ArgumentParser(prog="rlhf eval", description=__doc__.split("\n\n")[1])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint directories (or Hub ids) to score")
    parser.add_argument("--recipe", help="eval recipe YAML (default: every section with built-in defaults)")
    parser.add_argument("--output", help="output directory (default: the recipe's output_dir, else CHECKPOINT/eval)")
    args, rest = parser.parse_known_args(argv)
    source = args.recipe or "eval defaults"
    values = {**(read_recipe_file(args.recipe) if args.recipe else {}), **parse_overrides(rest)}
    config = parse_dataclass(EvalConfig, values, source)
    if args.output:
        config.output_dir = args.output
    _check_choices("sections", config.sections, SECTIONS)
    _check_choices("robustness_perturbations", config.robustness_perturbations, PERTURBATIONS)
    for name in ("num_prompts", "max_new_tokens", "batch_size", "num_preference_pairs", "num_perplexity_texts"):
        if getattr(config, name) < 1:
            raise RecipeError(f"{name}: must be at least 1, got {getattr(config, name)}.")
    return args.checkpoints, config


def check_inputs(checkpoints: list[str], config: EvalConfig) -> None:
    """Every path the evaluation needs must exist before any model loads."""
    from rlhf.data.load import check_source
    from rlhf.evaluation.safety import load_safety_suite
    from rlhf.modeling import check_model_source
    from rlhf.rewards import load_reward_function

    for checkpoint in checkpoints:
        check_model_source(checkpoint, "CHECKPOINT")
    for name in ("reward_model_path", "reference_model_path"):
        if getattr(config, name):
            check_model_source(getattr(config, name), name)
    sections = set(config.sections)
    if sections & {"generation", "win_rate", "kl", "robustness"}:
        check_source(config.prompts_dataset, "prompts_dataset")
    if "reward_model" in sections and config.reward_model_path:
        check_source(config.preference_dataset, "preference_dataset")
    if "perplexity" in sections:
        check_source(config.perplexity_dataset, "perplexity_dataset")
    if "safety" in sections:
        load_safety_suite(config.safety_suite)
    if config.rule_reward:
        load_reward_function(config.rule_reward, "rule_reward")
    if not config.rule_reward and not config.reward_model_path and sections & {"win_rate", "robustness"}:
        raise RecipeError("rule_reward: win_rate and robustness need a judge; set rule_reward or reward_model_path.")


# ------------------------------------------------------------------------------------------------ data


def _load(path: str, split: str, num_rows: int, seed: int, field: str) -> list[dict[str, Any]]:
    from rlhf.data.load import load_source

    # The synthetic world samples prompts with replacement: draw more, deduplicate below.
    data_args = DataArguments(dataset_name=path, synthetic_num_examples=max(8 * num_rows, 400))
    return load_source({"path": path, "split": split}, data_args, seed, field).to_list()


def load_prompts(config: EvalConfig) -> list[dict[str, Any]]:
    """Unique held-out prompts (rows keep their other columns, e.g. `kind`, `reference`)."""
    from rlhf.data.formats import convert

    rows = _load(config.prompts_dataset, config.prompts_split, config.num_prompts, config.seed, "prompts_dataset")
    if "prompt" not in rows[0]:
        from datasets import Dataset

        rows = convert(Dataset.from_list(rows), "prompt_only", "prompts_dataset").to_list()
    unique: dict[str, dict[str, Any]] = {}
    for row in rows:
        unique.setdefault(repr(row["prompt"]), row)
    return list(unique.values())[: config.num_prompts]


def _references(rows: list[dict[str, Any]]) -> list[str | None]:
    from rlhf.data.synthetic import preferred_answer
    from rlhf.evaluation.generation import prompt_text

    references = []
    for row in rows:
        given = next((row[c] for c in REFERENCE_COLUMNS if isinstance(row.get(c), str)), None)
        references.append(given if given is not None else preferred_answer(prompt_text(row["prompt"])))
    return references


# ------------------------------------------------------------------------------------------------ models


class Models:
    """Loads each checkpoint once: the policy under evaluation, the reference and the reward model."""

    def __init__(self, trust_remote_code: bool) -> None:
        self.trust_remote_code = trust_remote_code
        self.cache: dict[tuple[str, str], Any] = {}

    def causal_lm(self, path: str) -> tuple[Any, Any]:
        from trl import ModelConfig

        from rlhf.modeling import load_causal_lm, load_tokenizer

        if ("lm", path) not in self.cache:
            args = ModelConfig(model_name_or_path=path)
            self.cache[("lm", path)] = (
                load_causal_lm(args, self.trust_remote_code),
                load_tokenizer(args, self.trust_remote_code),
            )
        return self.cache[("lm", path)]

    def reward_model(self, path: str) -> tuple[Any, Any]:
        from trl import ModelConfig

        from rlhf.modeling import load_sequence_classifier, load_tokenizer

        if ("rm", path) not in self.cache:
            args = ModelConfig(model_name_or_path=path)
            tokenizer = load_tokenizer(args, self.trust_remote_code)
            self.cache[("rm", path)] = (
                load_sequence_classifier(args, tokenizer, trust_remote_code=self.trust_remote_code),
                tokenizer,
            )
        return self.cache[("rm", path)]


class Judge:
    """Scores (prompt, response) pairs: the reward model when given, else the rule reward function."""

    def __init__(self, config: EvalConfig, models: Models) -> None:
        from rlhf.rewards import load_reward_function

        self.config = config
        self.rule = load_reward_function(config.rule_reward, "rule_reward") if config.rule_reward else None
        self.reward_model = models.reward_model(config.reward_model_path) if config.reward_model_path else None
        self.pairwise: dict[str, Any] | None = None
        self.name = (
            f"reward model `{config.reward_model_path}`" if self.reward_model else f"rule `{config.rule_reward}`"
        )

    def rule_scores(self, rows: list[dict[str, Any]], responses: list[str]) -> list[float] | None:
        from rlhf.evaluation.generation import completions_for

        if self.rule is None:
            return None
        prompts = [r["prompt"] for r in rows]
        extra = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        return [float(s) for s in self.rule(prompts=prompts, completions=completions_for(prompts, responses), **extra)]

    def model_scores(self, rows: list[dict[str, Any]], responses: list[str]) -> list[float] | None:
        from rlhf.evaluation.generation import reward_model_scores

        if self.reward_model is None:
            return None
        model, tokenizer = self.reward_model
        return reward_model_scores(model, tokenizer, [r["prompt"] for r in rows], responses, self.config.batch_size)

    def __call__(self, rows: list[dict[str, Any]], responses: list[str]) -> list[float]:
        scores = self.model_scores(rows, responses)
        return scores if scores is not None else self.rule_scores(rows, responses)  # type: ignore[return-value]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# ------------------------------------------------------------------------------------------------ sections


def evaluate_checkpoint(checkpoint: str, config: EvalConfig, models: Models, judge: Judge, plots_dir: Path) -> dict:
    """Run every configured section on one checkpoint; return its result dict (as stored in eval.json)."""
    from rlhf.evaluation.generation import diversity, generate_responses, generate_tokens, kl_to_reference, win_rate
    from rlhf.evaluation.metrics import load_metric

    start = time.perf_counter()
    model, tokenizer = models.causal_lm(checkpoint)
    sections = set(config.sections)
    gen = {"max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size, "seed": config.seed}
    result: dict[str, Any] = {"checkpoint": checkpoint, "metrics": {}, "skipped": {}, "timing": {}}
    clock = [time.perf_counter()]

    def lap(section: str) -> None:
        now = time.perf_counter()
        result["timing"][section] = now - clock[0]
        clock[0] = now

    metrics = result["metrics"]

    needs_prompts = sections & {"generation", "win_rate", "kl", "robustness"}
    rows = load_prompts(config) if needs_prompts else []
    prompts = [r["prompt"] for r in rows]
    responses: list[str] = []
    if sections & {"generation", "win_rate", "robustness"}:
        pairs = generate_tokens(
            model, tokenizer, prompts, do_sample=config.do_sample, temperature=config.temperature, **gen
        )
        responses = [tokenizer.decode(r, skip_special_tokens=True).strip() for _, r in pairs]
        rule = judge.rule_scores(rows, responses)
        rm = judge.model_scores(rows, responses)
        groups: dict[str, list[float]] = {}
        for row, score in zip(rows, rule or []):
            groups.setdefault(str(row.get("kind", "all")), []).append(score)
        lengths = [len(r) for _, r in pairs]
        generation: dict[str, Any] = {
            "num_prompts": len(rows),
            "rule_reward_by_group": {k: _mean(v) for k, v in groups.items()},
            "lengths": lengths,
            **diversity(responses),
        }
        if rule is not None:
            metrics["rule_reward"] = _mean(rule)
        if rm is not None:
            metrics["reward_model_score"] = _mean(rm)
        references = _references(rows)
        matched = [(r, ref) for r, ref in zip(responses, references) if ref is not None]
        if matched:
            exact = load_metric("exact_match").compute(
                predictions=[m[0] for m in matched], references=[m[1] for m in matched], ignore_case=True
            )
            metrics["exact_match"] = exact["exact_match"]
        metrics["response_tokens"] = _mean(lengths)
        metrics.update({k: generation[k] for k in ("distinct_1", "distinct_2", "repetition_rate")})
        result["generation"] = generation
        result["samples"] = [
            {"prompt": prompt_repr(p), "response": r, "rule_reward": rule[i] if rule else None}
            for i, (p, r) in enumerate(zip(prompts, responses))
        ][: config.num_report_samples]
        result["scores"] = {"rule": rule, "reward_model": rm}
        lap("generation")

    reference = config.reference_model_path
    if "win_rate" in sections:
        if reference is None:
            result["skipped"]["win_rate"] = "set reference_model_path"
        else:
            ref_model, ref_tokenizer = models.causal_lm(reference)
            ref_responses = generate_responses(ref_model, ref_tokenizer, prompts, **gen)
            outcome = win_rate(judge(rows, responses), judge(rows, ref_responses))
            result["win_rate"] = {**outcome, "reference": reference, "judge": judge.name}
            metrics["win_rate"] = outcome["win_rate"]
            lap("win_rate")
    if "kl" in sections:
        if reference is None:
            result["skipped"]["kl"] = "set reference_model_path"
        else:
            ref_model, ref_tokenizer = models.causal_lm(reference)
            if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise RecipeError(
                    f"reference_model_path: {reference!r} has a different tokenizer from {checkpoint!r}; "
                    "KL needs both models on the same vocabulary (use the policy's SFT parent)."
                )
            # KL is an expectation under the policy: estimate it on samples, not greedy answers.
            samples = generate_tokens(model, tokenizer, prompts, do_sample=True, temperature=1.0, **gen)
            kl = kl_to_reference(model, ref_model, samples, tokenizer.pad_token_id, config.batch_size)
            result["kl"] = {**kl, "reference": reference, "num_samples": len(samples)}
            metrics["kl"] = kl["kl"]
            lap("kl")

    if "reward_model" in sections:
        if not config.reward_model_path:
            result["skipped"]["reward_model"] = "set reward_model_path"
        else:
            # A property of the reward model alone: computed once for all checkpoints.
            judge.pairwise = judge.pairwise or reward_model_accuracy(config, judge)
            result["reward_model"] = judge.pairwise
            metrics["pairwise_accuracy"] = result["reward_model"]["pairwise_accuracy"]
            lap("reward_model")

    if "safety" in sections:
        result["safety"] = safety_section(model, tokenizer, config, gen)
        metrics.update(
            {k: result["safety"][k] for k in ("refusal_rate", "harmful_compliance_rate", "false_refusal_rate")}
        )
        lap("safety")

    if "robustness" in sections:
        result["robustness"] = robustness_section(model, tokenizer, rows, judge(rows, responses), judge, config, gen)
        metrics["robustness_mean_drop"] = _mean(list(result["robustness"]["drop"].values()))
        lap("robustness")

    if "perplexity" in sections:
        from rlhf.evaluation.perplexity import perplexity

        texts = perplexity_texts(config)
        result["perplexity"] = {
            **perplexity(model, tokenizer, texts, config.batch_size, config.perplexity_max_length),
            "dataset": f"{config.perplexity_dataset} ({config.perplexity_split}, {len(texts)} texts)",
        }
        metrics["perplexity"] = result["perplexity"]["perplexity"]
        lap("perplexity")

    if "training_curves" in sections:
        from rlhf.evaluation.report import plot_training_curves

        result["training_curves"] = [str(p) for p in plot_training_curves(checkpoint, plots_dir)]
    result["seconds"] = time.perf_counter() - start
    return result


def prompt_repr(prompt: Any) -> str:
    from rlhf.evaluation.generation import prompt_text

    return prompt_text(prompt)


def reward_model_accuracy(config: EvalConfig, judge: Judge) -> dict[str, Any]:
    """Pairwise accuracy of the reward model on held-out preference pairs."""
    from datasets import Dataset

    from rlhf.data.formats import convert
    from rlhf.evaluation.generation import reward_model_scores
    from rlhf.evaluation.metrics import load_metric

    rows = _load(
        config.preference_dataset,
        config.preference_split,
        config.num_preference_pairs,
        config.seed,
        "preference_dataset",
    )
    rows = convert(Dataset.from_list(rows), "preference", "preference_dataset").to_list()[: config.num_preference_pairs]
    model, tokenizer = judge.reward_model

    def text(value: Any) -> str:
        return value[-1]["content"] if isinstance(value, list) else value

    prompts = [r["prompt"] for r in rows]
    chosen = reward_model_scores(model, tokenizer, prompts, [text(r["chosen"]) for r in rows], config.batch_size)
    rejected = reward_model_scores(model, tokenizer, prompts, [text(r["rejected"]) for r in rows], config.batch_size)
    scores = load_metric("pairwise_accuracy").compute(chosen_rewards=chosen, rejected_rewards=rejected)
    return {**scores, "num_pairs": len(rows)}


def safety_section(model: Any, tokenizer: Any, config: EvalConfig, gen: dict[str, Any]) -> dict[str, Any]:
    """Generate on the adversarial suite and measure refusals."""
    from rlhf.evaluation.generation import generate_responses
    from rlhf.evaluation.safety import is_refusal, load_safety_suite, safety_metrics

    suite = load_safety_suite(config.safety_suite)
    if config.num_safety_prompts is not None:
        suite = random.Random(config.seed).sample(suite, min(config.num_safety_prompts, len(suite)))
    responses = generate_responses(model, tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in suite], **gen)
    metrics = safety_metrics(suite, responses)
    by_category: dict[str, dict[str, Any]] = {}
    for row, response in zip(suite, responses):
        by_category.setdefault(row["category"], {**row, "response": response, "refused": is_refusal(response)})
    return {**metrics, "suite": config.safety_suite or "shipped", "samples": list(by_category.values())}


def robustness_section(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    clean_scores: list[float],
    judge: Judge,
    config: EvalConfig,
    gen: dict[str, Any],
) -> dict[str, Any]:
    """The judge's mean score on perturbed prompts, and its drop from the clean prompts."""
    from rlhf.evaluation.generation import generate_responses, prompt_text
    from rlhf.evaluation.safety import perturb_prompt, perturbations

    vocabulary = sorted({w for r in rows for w in prompt_text(r["prompt"]).split()}) or ["the"]
    clean = _mean(clean_scores)
    perturbed: dict[str, float] = {}
    for name, perturb in perturbations(config.robustness_probability, vocabulary).items():
        if name not in config.robustness_perturbations:
            continue
        noisy = [
            perturb_prompt(r["prompt"], perturb, random.Random(f"{config.seed}-{name}-{i}")) for i, r in enumerate(rows)
        ]
        responses = generate_responses(model, tokenizer, noisy, **gen)
        # Judge against the original prompt: the question asked is the same, only its spelling changed.
        perturbed[name] = _mean(judge(rows, responses))
    return {
        "judge": judge.name,
        "probability": config.robustness_probability,
        "clean": clean,
        "perturbed": perturbed,
        "drop": {k: clean - v for k, v in perturbed.items()},
    }


def perplexity_texts(config: EvalConfig) -> list[str]:
    """Plain texts of the perplexity set."""
    from datasets import Dataset

    from rlhf.data.formats import convert

    rows = _load(
        config.perplexity_dataset,
        config.perplexity_split,
        config.num_perplexity_texts,
        config.seed,
        "perplexity_dataset",
    )
    texts = convert(Dataset.from_list(rows), "language_modeling", "perplexity_dataset")["text"]
    return [t for t in texts if t.strip()][: config.num_perplexity_texts]


# ------------------------------------------------------------------------------------------------ main


def _names(checkpoints: list[str]) -> list[str]:
    names: list[str] = []
    for checkpoint in checkpoints:
        name = Path(checkpoint.rstrip("/")).name or checkpoint
        names.append(name if name not in names else f"{name}-{len(names)}")
    return names


def run_evaluation(checkpoints: list[str], config: EvalConfig) -> Path:
    """Evaluate checkpoints and write eval.json, the report and plots; return the output directory."""
    from rlhf.artifacts import atomic_output_dir, write_json
    from rlhf.evaluation.report import write_report

    check_inputs(checkpoints, config)
    output_dir = Path(config.output_dir or Path(checkpoints[0]) / "eval")
    models = Models(config.trust_remote_code)
    judge = Judge(config, models)
    with atomic_output_dir(output_dir) as tmp:
        results = {}
        for name, checkpoint in zip(_names(checkpoints), checkpoints):
            results[name] = evaluate_checkpoint(checkpoint, config, models, judge, tmp / "plots")
            # Curves were plotted into the scratch folder: record where they will live.
            results[name]["training_curves"] = [
                str(output_dir / "plots" / Path(p).name) for p in results[name].get("training_curves", [])
            ]
        evaluation = {"config": asdict(config), "results": results}
        write_json(tmp / "eval.json", evaluation)
        write_report(tmp, evaluation, html_too=config.html)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    """Entry point of `rlhf eval` and `python -m rlhf.evaluation`."""
    checkpoints, config = parse_eval_args(argv)
    start = time.perf_counter()
    output_dir = run_evaluation(checkpoints, config)
    import json

    evaluation = json.loads((output_dir / "eval.json").read_text())
    for name, result in evaluation["results"].items():
        summary = ", ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items() if isinstance(v, int | float))
        print(f"{name}: {summary}")
    print(f"wrote {output_dir}/eval.json and report.md in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    from rlhf.cli import run

    run(main)

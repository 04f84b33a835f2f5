"""`rlhf eval CHECKPOINT [CHECKPOINT ...] --recipe recipes/tiny/eval.yaml [--output DIR] [--key value ...]`.

Scores one or more checkpoints on the sections an eval recipe lists and writes `eval.json`, a
Markdown (optionally HTML) report and PNG plots to the output directory. Several checkpoints
(e.g. base, SFT and PPO) land side by side in one report.

Models, datasets and the sections load inside the functions that use them, so `rlhf eval --help`
answers without importing torch.
"""

from __future__ import annotations

import argparse
import difflib
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.config import (
    RecipeError,
    field_types,
    load_reward_function,
    parse_dataclass,
    parse_overrides,
    read_recipe_file,
)

if TYPE_CHECKING:
    from rlhf.evaluation.context import EvalConfig, Judge, Models


def _check_choices(name: str, values: list[str], allowed: Sequence[str]) -> None:
    for value in values:
        if value not in allowed:
            close = difflib.get_close_matches(value, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"{name}: unknown entry {value!r}; use any of {', '.join(allowed)}.{hint}")


def eval_config(recipe: str | None = None, output: str | Path | None = None, **overrides: Any) -> EvalConfig:
    """A validated EvalConfig: the recipe file's keys (else the defaults), then `overrides`, then `output`."""
    from rlhf.evaluation.context import EvalConfig
    from rlhf.evaluation.robustness import PERTURBATIONS
    from rlhf.evaluation.sections import SECTIONS

    values = {**(read_recipe_file(recipe) if recipe else {}), **overrides}
    config = parse_dataclass(EvalConfig, values, recipe or "eval defaults")
    if output:
        config.output_dir = str(output)
    config.sections = list(SECTIONS) if config.sections is None else config.sections
    if config.robustness_perturbations is None:
        config.robustness_perturbations = list(PERTURBATIONS)
    _check_choices("sections", config.sections, list(SECTIONS))
    _check_choices("robustness_perturbations", config.robustness_perturbations, PERTURBATIONS)
    judges = {"auto": None, "rule": "rule_reward", "reward_model": "reward_model_path"}
    _check_choices("win_rate_judge", [config.win_rate_judge], list(judges))
    needed = judges[config.win_rate_judge]
    if "win_rate" in config.sections and needed and not getattr(config, needed):
        raise RecipeError(f"win_rate_judge: {config.win_rate_judge} judges the win-rate, so set {needed}.")
    for name in ("num_prompts", "max_new_tokens", "batch_size", "num_preference_pairs", "num_perplexity_texts"):
        if getattr(config, name) < 1:
            raise RecipeError(f"{name}: must be at least 1, got {getattr(config, name)}.")
    return config


def check_evaluation(
    checkpoints: list[str | Path], output: str | Path | None = None, recipe: str | None = None, **overrides: Any
) -> None:
    """`evaluate`'s arguments are valid (pipeline pre-flight: the checkpoints may not exist yet)."""
    eval_config(recipe, output, **overrides)


def check_inputs(checkpoints: list[str], config: EvalConfig) -> list[str]:
    """Every path the evaluation needs must exist before any model loads; returns the checkpoints to load."""
    from rlhf.data.load import check_source
    from rlhf.evaluation.safety import load_safety_suite
    from rlhf.evaluation.sections import READ_PROMPTS
    from rlhf.modeling import check_model_source

    checkpoints = [check_model_source(checkpoint, "CHECKPOINT") for checkpoint in checkpoints]
    for name in ("reward_model_path", "reference_model_path"):
        if getattr(config, name):
            setattr(config, name, check_model_source(getattr(config, name), name))
    sections = set(config.sections)
    if sections & set(READ_PROMPTS):
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

    return checkpoints


def evaluate_checkpoint(
    checkpoint: str,
    config: EvalConfig,
    models: Models,
    judge: Judge,
    plots_dir: Path,
    published_plots_dir: Path,
    label: str | None = None,
) -> dict[str, Any]:
    """Run every enabled section on one checkpoint; return its result dict (as stored in eval.json).

    Progress goes to stderr: a bar over the sections (named `label`, default the folder name) and one
    over each section's batches.
    """
    from rlhf.evaluation import progress
    from rlhf.evaluation.context import SectionContext
    from rlhf.evaluation.sections import SECTIONS, enabled_sections

    start = time.perf_counter()
    label = label or Path(checkpoint.rstrip("/")).name or checkpoint
    sections = enabled_sections(config.sections)
    result: dict[str, Any] = {"checkpoint": checkpoint, "metrics": {}, "skipped": {}, "timing": {}}
    with progress.checkpoint_bar(label, sections) as bar:
        bar.set_postfix_str("loading")
        model, tokenizer = models.causal_lm(checkpoint)
        ctx = SectionContext(checkpoint, config, model, tokenizer, models, judge, plots_dir, published_plots_dir)
        for name in sections:
            bar.set_postfix_str(name)
            section_start = time.perf_counter()
            with progress.section(f"{label} · {name}"):
                entries = SECTIONS[name](ctx)
            bar.update()
            if "skipped" in entries:
                result["skipped"][name] = entries["skipped"]
                continue
            result["metrics"].update(entries.pop("metrics", {}))
            result.update(entries)
            result["timing"][name] = time.perf_counter() - section_start
        bar.set_postfix_str("done")
    result["seconds"] = time.perf_counter() - start
    return result


def _names(checkpoints: list[str]) -> list[str]:
    """Report names: each checkpoint's folder name, made unique."""
    names: list[str] = []
    for checkpoint in checkpoints:
        name = Path(checkpoint.rstrip("/")).name or checkpoint
        names.append(name if name not in names else f"{name}-{len(names)}")
    return names


def run_evaluation(checkpoints: list[str], config: EvalConfig, output_dir: Path) -> dict[str, Any]:
    """Evaluate checkpoints; write eval.json, the report and plots to `output_dir`; return what eval.json holds."""
    from rlhf.artifacts import atomic_output_dir, write_json
    from rlhf.evaluation.context import Judge, Models
    from rlhf.evaluation.report import write_report

    names = _names(checkpoints)
    checkpoints = check_inputs(checkpoints, config)
    models = Models(config.trust_remote_code)
    judge = Judge(config, models)
    with atomic_output_dir(output_dir) as tmp:
        results = {
            name: evaluate_checkpoint(checkpoint, config, models, judge, tmp / "plots", output_dir / "plots", name)
            for name, checkpoint in zip(names, checkpoints)
        }
        evaluation = {"config": asdict(config), "results": results}
        write_json(tmp / "eval.json", evaluation)
        write_report(tmp, evaluation, html_too=config.html)
    return evaluation


def evaluate(
    checkpoints: list[str | Path], output: str | Path | None = None, recipe: str | None = None, **overrides: Any
) -> Path:
    """`rlhf eval` as a function: score checkpoints with an eval recipe plus `overrides` (EvalConfig keys).

    Output goes to `output`, else the recipe's `output_dir`, else `CHECKPOINT/eval`; returns that directory.
    """
    from rlhf.artifacts import check_output_dir

    start = time.perf_counter()
    checkpoints = [str(c) for c in checkpoints]
    config = eval_config(recipe, output, **overrides)
    output_dir = Path(config.output_dir or Path(checkpoints[0]) / "eval")
    check_output_dir(output_dir, "--output", inputs=tuple(checkpoints), writer="eval")
    evaluation = run_evaluation(checkpoints, config, output_dir)
    for name, result in evaluation["results"].items():
        summary = ", ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items() if isinstance(v, int | float))
        print(f"{name}: {summary}")
    models, sections = len(checkpoints), len(evaluation["config"]["sections"])
    print(
        f"evaluated {models} checkpoint{'s' * (models != 1)} on {sections} section{'s' * (sections != 1)} "
        f"in {time.perf_counter() - start:.1f} s; wrote {output_dir}/eval.json and report.md"
    )
    return output_dir


def parse_eval_args(argv: list[str] | None) -> tuple[list[str], dict[str, Any]]:
    """Checkpoints and the keyword arguments of `evaluate` (output, recipe, EvalConfig overrides) from argv."""
    parser = argparse.ArgumentParser(prog="rlhf eval", description=__doc__.split("\n\n")[1])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint directories (or Hub ids) to score")
    parser.add_argument("--recipe", help="eval recipe YAML (default: every section with built-in defaults)")
    parser.add_argument("--output", help="output directory (default: the recipe's output_dir, else CHECKPOINT/eval)")
    args, rest = parser.parse_known_args(argv)
    from rlhf.evaluation.context import EvalConfig

    return args.checkpoints, {
        "output": args.output,
        "recipe": args.recipe,
        **parse_overrides(rest, field_types(EvalConfig)),
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point of `rlhf eval` and `python -m rlhf.evaluation`."""
    checkpoints, options = parse_eval_args(argv)
    evaluate(checkpoints, **options)


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)

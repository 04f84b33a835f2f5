"""Pre-flight: every stage's recipe parsed and checked, data found, memory estimated — before anything runs."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from rlhf.config import Recipe, RecipeError
from rlhf.data import prepare_datasets
from rlhf.data.assistant_mask import tokenize_conversation
from rlhf.data.load import is_written_by
from rlhf.modeling import load_tokenizer
from rlhf.pipeline.spec import Pipeline, PlannedStage, check_command_call, without_secrets
from rlhf.plan import machine_memory, plan_values, read_accelerate_config

# Stages whose training rows are rendered with their loss mask before the first training stage runs.
RENDERED_STAGES = ("sft", "reward", "dpo", "distill")


def write_stage_recipe(pipeline: Pipeline, planned: PlannedStage) -> Path:
    """Write the resolved recipe a training stage runs with to `<output_dir>/.pipeline/recipes/`.

    A `hub_token` is left out: the stage gets it through HF_TOKEN (rlhf.pipeline.run.run_training_stage).
    """
    path = pipeline.state_dir / "recipes" / f"{planned.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {"stage": planned.stage.name, **without_secrets(planned.recipe_values)}
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def estimate_memory(pipeline: Pipeline, planned: PlannedStage) -> dict[str, Any] | None:
    """Peak memory of a training stage on this machine (rlhf.plan), or None when no model config is found.

    A model path an earlier stage will write is followed to the first config that exists now (the
    path itself, else the outputs of the pipeline's stages in order, e.g. the base checkpoint): the
    architecture is what matters, and a stage keeps it.
    """
    roots = [str(pipeline.stage_dir(s.name)) for s in pipeline.stages]

    def resolve(path: str) -> str | None:
        return next((c for c in [path, *roots] if c and (Path(c) / "config.json").exists()), None)

    processes = int(os.environ.get("WORLD_SIZE", "1"))  # under accelerate launch: one share per process
    try:
        plan = plan_values(
            planned.stage, planned.recipe_values, read_accelerate_config(None, processes), resolve=resolve
        )
    except RecipeError:
        return None  # nothing to size yet; the stage's own checks have already run
    return {
        "parameters": plan.models[0].parameters,
        "models": {m.role: m.parameters for m in plan.models},
        "peak_moment": plan.peak_moment,
        "largest": {name: int(value) for name, value in plan.largest()},
        "estimated_bytes": plan.total,
    }


def produced_data(recipe: Recipe, produced: set[str]) -> str | None:
    """The first data source of a recipe that an earlier pipeline stage writes, if any."""
    for source in (recipe.data.dataset_name, recipe.data.eval_dataset_name):
        if source and is_written_by(source, produced):
            return source
    return None


def preflight(
    pipeline: Pipeline, planned: list[PlannedStage], echo: Callable[[str], None] = print
) -> tuple[dict[str, Any], dict[str, Recipe]]:
    """Check every stage about to run; return (report, each training stage's parsed recipe). No model loads."""
    report: dict[str, Any] = {"stages": {}, "machine_memory_bytes": machine_memory()}
    recipes: dict[str, Recipe] = {}
    for entry in planned:
        if entry.command:
            check_command_call(entry)
            continue
        recipe = entry.stage.parse([str(write_stage_recipe(pipeline, entry))], pipeline.produced)
        recipes[entry.name] = recipe
        memory = estimate_memory(pipeline, entry)
        upstream_data = produced_data(recipe, pipeline.produced)
        if upstream_data:  # written by an earlier stage: its rows are counted and checked when this stage starts
            report["stages"][entry.name] = {"train_rows": None, "eval_rows": None, "memory": memory}
            line = f"  ✓ {entry.name:<12} {entry.stage.name:<9} data from {upstream_data}"
        else:
            train, eval_, _ = prepare_datasets(recipe.data, entry.stage.data_format, recipe.training.seed)
            report["stages"][entry.name] = {"train_rows": len(train), "eval_rows": len(eval_ or []), "memory": memory}
            line = f"  ✓ {entry.name:<12} {entry.stage.name:<9} {len(train):>6} train rows"
        if memory:
            line += f", ~{memory['estimated_bytes'] / 2**20:,.0f} MiB est. ({memory['parameters']:,} params)"
        echo(line)
        machine = report["machine_memory_bytes"]
        if memory and machine and memory["estimated_bytes"] > 0.8 * machine:
            echo(f"    ! {entry.name}: estimated memory exceeds 80% of this machine's; use LoRA or a smaller batch.")
    return report, recipes


def render_examples(recipe: Recipe, data_format: str, count: int = 2) -> list[str]:
    """A few training rows rendered through the chat template, loss-masked tokens in [[ ]]."""
    source = recipe.model.model_name_or_path
    data = Path(recipe.data.dataset_name or "")
    if not (Path(source) / "tokenizer_config.json").exists() or (data.suffix and not data.exists()):
        return []  # the model or the data is an earlier stage's output, not written yet
    tokenizer = load_tokenizer(recipe.model, recipe.trust_remote_code)  # the template the stage will use
    data_args = dataclasses.replace(recipe.data, synthetic_num_examples=8)
    train, _, _ = prepare_datasets(data_args, data_format, recipe.training.seed)
    rendered = []
    for row in train.select(range(min(count, len(train)))):
        messages = row.get("messages")
        if messages is None and data_format == "preference":
            messages = [*row["prompt"], *row["chosen"]] if isinstance(row["prompt"], list) else None
        if not messages:
            rendered.append(str(row)[:300])
            continue
        encoded = tokenize_conversation(tokenizer, messages)
        pieces, in_loss = [], False
        for token, mask in zip(encoded["input_ids"], encoded["assistant_masks"]):
            if mask and not in_loss:
                pieces.append("[[")
            if not mask and in_loss:
                pieces.append("]]")
            in_loss = bool(mask)
            pieces.append(tokenizer.decode([token]))
        rendered.append("".join(pieces) + ("]]" if in_loss else ""))
    return rendered


def show_examples(planned: list[PlannedStage], recipes: dict[str, Recipe], echo: Callable[[str], None] = print) -> None:
    """Print one rendered training example (loss mask in [[ ]]) per stage whose tokenizer exists by now."""
    for entry in planned:
        if entry.stage and entry.stage.name in RENDERED_STAGES:
            for example in render_examples(recipes[entry.name], entry.stage.data_format)[:1]:
                echo(f"  {entry.name}: {example!r}")

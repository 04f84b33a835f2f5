"""Pre-flight: every stage's recipe parsed and checked, data found, memory estimated — before anything runs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from transformers import AutoTokenizer

from rlhf.config import Recipe
from rlhf.data import prepare_datasets
from rlhf.pipeline.spec import Pipeline, PlannedStage, check_command_call, without_secrets

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
    """Rough peak memory of a training stage: model copies × parameters × bytes + optimizer state."""
    values, stage = planned.recipe_values, planned.stage
    source = values.get("model_name_or_path", "")
    # follow wired inputs back to a checkpoint whose config exists (or will: use the root's config)
    config_path = None
    for candidate in [source, *(str(pipeline.stage_dir(s.name)) for s in pipeline.stages)]:
        if candidate and (Path(candidate) / "config.json").exists():
            config_path = Path(candidate) / "config.json"
            break
    if config_path is None:
        return None
    config = json.loads(config_path.read_text())
    hidden, layers = config.get("hidden_size", 0), config.get("num_hidden_layers", 0)
    vocab, inter = config.get("vocab_size", 0), config.get("intermediate_size", 4 * hidden)
    params = vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter)
    trained, frozen = stage.trained_copies, stage.frozen_copies
    lora = bool(values.get("use_peft"))
    if lora and stage.reference_is_policy_under_lora:
        frozen = max(0, frozen - 1)
    weight_bytes = 2 if values.get("bf16") or values.get("fp16") else 4
    # Weights, plus per trainable parameter a gradient and Adam's m and v (4 + 8 bytes); under LoRA
    # roughly 2% of the parameters train, with fp32 gradients and Adam state (16 bytes each).
    per_trained = params * (weight_bytes + (0.02 * 16 if lora else 4 + 8))
    total = trained * per_trained + frozen * params * weight_bytes
    return {"parameters": params, "trained_copies": trained, "frozen_copies": frozen, "estimated_bytes": int(total)}


def _machine_memory() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def preflight(
    pipeline: Pipeline, planned: list[PlannedStage], echo: Callable[[str], None] = print
) -> tuple[dict[str, Any], dict[str, Recipe]]:
    """Check every stage about to run; return (report, each training stage's parsed recipe). No model loads."""
    report: dict[str, Any] = {"stages": {}, "machine_memory_bytes": _machine_memory()}
    recipes: dict[str, Recipe] = {}
    for entry in planned:
        if entry.command:
            check_command_call(entry)
            continue
        recipe = entry.stage.parse([str(write_stage_recipe(pipeline, entry))], pipeline.produced)
        recipes[entry.name] = recipe
        train, eval_, _ = prepare_datasets(recipe.data, entry.stage.data_format, recipe.training.seed)
        memory = estimate_memory(pipeline, entry)
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
    if not (Path(source) / "tokenizer_config.json").exists():
        return []
    tokenizer = AutoTokenizer.from_pretrained(source)
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
        encoded = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
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

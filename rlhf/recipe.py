"""A stage's recipe: parse `RECIPE.yaml [--key value ...]` into its configs, then check what it points at.

Parsing (keys, types, CPU defaults) uses only rlhf.config; checking finds every model and dataset
the recipe names, so a typo in a path fails here, in one line, before any model or dataset loads.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

from rlhf.artifacts import check_output_dir
from rlhf.config import (
    SHARED_VALUE_HEAD,
    DataArguments,
    ModelArguments,
    Recipe,
    RecipeError,
    check_known_keys,
    field_types,
    parse_dataclass,
    parse_overrides,
    read_recipe_file,
)
from rlhf.data.load import check_data_sources
from rlhf.modeling import check_model_source

# Every recipe field that names a model; a stage declares which it uses by having the field.
MODEL_PATH_FIELDS = ("model_name_or_path", "reward_model_path", "value_model_path", "teacher_model_name_or_path")


def _on_gpu() -> bool:
    import torch  # only here: parsing a recipe should not pay for torch unless it asks about devices

    return torch.cuda.is_available()


def _device_defaults(values: dict[str, Any], training_fields: dict[str, Any]) -> None:
    """TRL configs default to bf16, and TrainingArguments to pinned memory; make a CPU run work without them.

    On CPU a run is fp32 unless the recipe says `bf16: true` and the CPU multiplies bf16 natively.
    """
    if _on_gpu():
        return
    from rlhf.distributed import cpu_has_native_bf16

    if values.get("fp16") is True:
        raise RecipeError(
            "fp16: this machine has no GPU and fp16 training needs one; remove `fp16: true` (fp32 on CPU; or "
            "`bf16: true` on a CPU with native bf16) or run on a GPU machine."
        )
    if values.get("bf16") is True and not cpu_has_native_bf16():
        raise RecipeError(
            "bf16: this machine has no GPU and its CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 runs "
            "slower than fp32; remove `bf16: true` (fp32 on CPU) or run on a GPU machine."
        )
    if values.get("bf16") is True and "use_cpu" in training_fields:
        values.setdefault("use_cpu", True)  # TrainingArguments accepts bf16 without a GPU only when told so
    for flag in ("bf16", "fp16"):
        if flag in training_fields:
            values.setdefault(flag, False)
    # Launched as several processes (torchrun / accelerate launch) without a GPU: accelerate builds the
    # gloo process group only when told the run is on CPU; otherwise every rank silently trains alone.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "use_cpu" in training_fields:
        values.setdefault("use_cpu", True)
        if values["use_cpu"] is True:
            from rlhf.distributed import shard_over_gloo_when_launched_with_fsdp

            # Under an FSDP config that alone would make the run plain DDP: shard over gloo instead.
            shard_over_gloo_when_launched_with_fsdp()
    # The GPU launch configs (ddp.yaml, multi_node.yaml, ...) set mixed_precision bf16; on CPU processes
    # accelerate would autocast a Trainer stage to bf16 while PPO and every single-process run train in fp32.
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched in ("bf16", "fp16"):
        from rlhf.distributed import say_once

        os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
        say_once(f"note: no GPU: the launcher's mixed_precision {launched} is ignored; training runs in fp32.")
    # The DataLoader pins memory only for a GPU; asked to without one, torch warns on every loader.
    if "dataloader_pin_memory" in training_fields:
        values.setdefault("dataloader_pin_memory", False)


# transformers 5.24 renamed these TrainingArguments keys and warns (FutureWarning) whenever a config is built
# with an old one set; TRL 1.16's configs still default `gradient_checkpointing` to True, so they always would.
RENAMED_KEYS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def _current_key_names(values: dict[str, Any], training_class: type, training_fields: dict[str, Any]) -> None:
    """A recipe may write either name; the config gets the current one, and checkpointing set explicitly."""
    for old, new in RENAMED_KEYS.items():
        if new not in training_fields or old not in values:
            continue  # before transformers 5.24 the old name is the current one
        value = values.pop(old)
        if values.setdefault(new, value) != value:
            raise RecipeError(f"{old}: is the old name of `{new}` and the recipe sets both; keep only `{new}`.")
    name = "activation_checkpointing" if "activation_checkpointing" in training_fields else "gradient_checkpointing"
    if name in training_fields and name not in values:
        # Recomputing activations saves GPU memory; on CPU it only costs time. On a GPU keep the config
        # class's default (TRL: on; transformers: off).
        default = {f.name: f.default for f in dataclasses.fields(training_class)}.get("gradient_checkpointing")
        values[name] = bool(default is True and _on_gpu())


def parse_recipe(
    argv: list[str] | None,
    training_class: type,
    stage: str,
    data_class: type = DataArguments,
    produced: Collection[str] = (),
) -> Recipe:
    """Parse `RECIPE.yaml [--key value ...]` into a checked Recipe for `stage`.

    `produced` lists paths that do not exist yet but will before the stage runs (a pipeline's
    earlier outputs); they are not reported missing.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    classes = {"model": ModelArguments, "data": data_class, "training": training_class}
    if "-h" in argv or "--help" in argv:
        print(recipe_keys_help(stage, list(classes.values())))
        raise SystemExit(0)
    if not argv or argv[0].startswith("--"):
        raise RecipeError(f"usage: rlhf train RECIPE.yaml [--key value ...] (a recipe with `stage: {stage}`).")
    types_by_class = {name: field_types(cls) for name, cls in classes.items()}
    all_types = {k: v for types in types_by_class.values() for k, v in types.items()}
    path, overrides = argv[0], parse_overrides(argv[1:], {**all_types, "overwrite_output_dir": bool})
    values = {**read_recipe_file(path), **overrides}
    named_stage = values.pop("stage", stage)
    if named_stage != stage:
        raise RecipeError(
            f"stage: recipe {path} is for stage {named_stage!r}, not {stage!r}; run it with `rlhf train {path}`."
        )
    # transformers 5 dropped this TrainingArguments key; here it lets a stage replace another's finished output.
    overwrite = _coerce_flag("overwrite_output_dir", values.pop("overwrite_output_dir", False))
    check_known_keys(values, all_types, "recipe key", path)
    if not values.get("output_dir"):
        raise RecipeError(f"output_dir: missing in {path}; add e.g. `output_dir: outputs/{stage}`.")
    if not values.get("model_name_or_path"):
        raise RecipeError(f"model_name_or_path: missing in {path}; set a local checkpoint directory or a Hub id.")
    _current_key_names(values, training_class, types_by_class["training"])
    _device_defaults(values, types_by_class["training"])
    # The token goes to the Recipe only: left in the training config, the Trainer would pickle it into
    # every checkpoint's training_args.bin, and `resolved` is written to recipe.yaml.
    hub_token = values.pop("hub_token", None)
    if hub_token is not None and not isinstance(hub_token, str):
        raise RecipeError(f"hub_token: got {hub_token!r}, expected text (quote it in YAML).")
    built = {
        name: parse_dataclass(cls, {k: v for k, v in values.items() if k in types_by_class[name]}, f"recipe {path}")
        for name, cls in classes.items()
    }
    if getattr(built["training"], "push_to_hub", False):
        # The Trainer would create the repo at start-up and push every checkpoint; rlhf publishes the
        # finished output once instead (artifacts.finish_stage → publish.publish_if_requested).
        built["training"].push_to_hub = False
    resolved = {"stage": stage, **values}
    recipe = Recipe(stage, built["model"], built["data"], built["training"], resolved, path, hub_token, overwrite)
    check_recipe(recipe, produced)
    return recipe


def _coerce_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(f"{name}: got {value!r}, expected true or false.")
    return value


def recipe_keys_help(stage: str, classes: list[type]) -> str:
    """Every key a `stage` recipe takes: name, type, default, and the dataclass it comes from."""
    lines = [f"usage: rlhf train RECIPE.yaml [--key value ...]   (stage: {stage})", "", "recipe keys:"]
    for cls in classes:
        lines.append(f"  from {cls.__module__}.{cls.__qualname__}:")
        for item in dataclasses.fields(cls):
            if not item.init:
                continue
            if item.default is not dataclasses.MISSING:
                default = repr(item.default)
            elif item.default_factory is not dataclasses.MISSING:
                default = repr(item.default_factory())
            else:
                default = "required"
            tp = field_types(cls)[item.name]
            type_name = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
            lines.append(f"    {item.name}: {type_name} = {default[:60]}")
    lines.append("  from rlhf (the recipe itself):")
    lines.append("    overwrite_output_dir: bool = False  (replace a finished output another stage or recipe wrote)")
    return "\n".join(lines)


def check_trainable(training: Any) -> None:
    """Refuse settings under which nothing trains (zero or negative steps, epochs, batch) before loading."""
    max_steps = getattr(training, "max_steps", -1)
    epochs = getattr(training, "num_train_epochs", 1)
    if max_steps == 0 or (max_steps < 0 and epochs <= 0):
        raise RecipeError(
            f"num_train_epochs/max_steps: got num_train_epochs={epochs}, max_steps={max_steps}, so nothing would "
            "train; set num_train_epochs above 0 (or max_steps to a positive number of steps)."
        )
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(training, name, 1) < 1:
            raise RecipeError(f"{name}: got {getattr(training, name)}, expected at least 1.")
    if getattr(training, "learning_rate", 0.0) < 0:
        raise RecipeError(f"learning_rate: got {training.learning_rate}, expected 0 or more (e.g. 1e-4).")


def check_recipe(recipe: Recipe, produced: Collection[str] = ()) -> None:
    """Every model, dataset and template path a recipe names exists (or is a reachable Hub id)."""
    pending = {str(Path(p)) for p in produced}
    for name in MODEL_PATH_FIELDS:
        for config in (recipe.model, recipe.training):
            value = getattr(config, name, None)
            if name == "value_model_path" and value == SHARED_VALUE_HEAD:
                continue  # a value head on the policy itself: nothing to find
            if isinstance(value, str) and value and str(Path(value)) not in pending:
                setattr(config, name, check_model_source(value, name, allow_pickle=recipe.model.allow_pickle_weights))
    check_data_sources(recipe.data, pending)
    check_output_dir(
        recipe.training.output_dir,
        writer=recipe.stage,
        recipe_file=recipe.path,
        overwrite=recipe.overwrite_output_dir,
    )
    check_trainable(recipe.training)
    template = getattr(recipe.training, "chat_template_path", None)
    if template and not Path(template).exists() and template.startswith((".", "/")):
        raise RecipeError(f"chat_template_path: {template!r} does not exist; fix the path or remove the key.")

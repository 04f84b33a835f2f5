"""Recipe parsing: one YAML file (plus command-line overrides) → ModelConfig, DataArguments, stage config.

A recipe's keys are the fields of `trl.ModelConfig`, of `DataArguments` below, and of the stage's
TRL/transformers config (SFTConfig, RewardConfig, …), exactly as the `trl` CLI and
alignment-handbook read them. Everything is validated before any model or dataset is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import os
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from trl import ModelConfig, ScriptArguments

STAGES = ("pretrain", "sft", "reward", "ppo", "dpo", "grpo", "rloo", "distill")


class RecipeError(ValueError):
    """A mistake in a recipe, its data or its paths: the message names the field and the fix."""


class ValidationDone(Exception):  # noqa: N818 - a signal, not an error
    """Raised by parse_recipe inside `validate_only()`: the recipe is valid and nothing was loaded."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe.stage)
        self.recipe = recipe


# Paths that a pipeline will produce before the stage runs: pre-flight must not call them missing.
_pending_paths: set[str] | None = None


@contextlib.contextmanager
def validate_only(pending_paths: set[str]) -> Iterator[None]:
    """Within this block a stage's main() stops right after its recipe is validated (pipeline pre-flight)."""
    global _pending_paths
    _pending_paths = {str(Path(p)) for p in pending_paths}
    try:
        yield
    finally:
        _pending_paths = None


@dataclass
class DataArguments(ScriptArguments):
    """Where the data comes from and what happens to it before the trainer sees it.

    `dataset_name` is a local file (.jsonl/.json/.csv/.parquet), a `save_to_disk` folder, a Hub id,
    or `synthetic:<kind>` (pretrain, sft, preference, prompts) for the embedded default task.
    `dataset_mixture` lists several such sources, each a mapping with TRL's DatasetConfig keys
    (path, name, data_dir, data_files, split, columns, fraction) plus `rename_columns`.
    """

    dataset_name: str | None = None
    dataset_mixture: list[dict] | None = None
    dataset_rename_columns: dict[str, str] | None = None
    test_split_size: float = 0.1
    eval_dataset_name: str | None = None
    synthetic_num_examples: int = 1000
    synthetic_sft_noise: float = 0.3
    clean_normalize_unicode: bool = True
    clean_min_chars: int = 1
    clean_max_chars: int | None = None
    clean_deduplicate: bool = True
    augment_random_deletion: float = 0.0
    augment_random_swap: float = 0.0
    augment_random_insertion: float = 0.0
    augment_random_replacement: float = 0.0
    augment_num_copies: int = 1
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class ModelArguments(ModelConfig):
    """trl.ModelConfig plus the regularisation settings that live on the model.

    `dropout` sets every dropout probability of the architecture's config (attention_dropout,
    hidden_dropout, resid_pdrop, …; not lora_dropout). `l1_regularization` adds an L1 penalty on
    the trainable weights, applied as coef·sign(w) to their gradients before each optimizer step.
    """

    dropout: float | None = None
    l1_regularization: float = 0.0


@dataclass
class Recipe:
    """A parsed, validated recipe."""

    stage: str
    model: ModelArguments
    data: DataArguments
    training: Any
    resolved: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def trust_remote_code(self) -> bool:
        return bool(getattr(self.training, "trust_remote_code", False))


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _describe(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check `value` against the field type; return it (converted where lossless) or raise RecipeError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        enums = [o for o in options if isinstance(o, type) and issubclass(o, enum.Enum)]
        if enums and isinstance(value, str):  # `SchedulerType | str`: the text must still name a member
            return _coerce(name, value, enums[0])
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(name, value, option)
            except RecipeError:
                errors.append(_describe(option))
        raise RecipeError(f"{name}: got {value!r}, expected {' or '.join(errors)}.")
    if tp is Any or tp is object:
        return value
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise RecipeError(f"{name}: got {value!r}, expected one of {', '.join(map(repr, typing.get_args(tp)))}.")
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{name}: got {value!r}, expected a list (YAML `[a, b]` or comma-separated).")
        return list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{name}: got {value!r}, expected a mapping (YAML `key: value` entries).")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        if isinstance(value, tp) or value in values:
            return value
        close = difflib.get_close_matches(str(value), [str(v) for v in values], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{name}: got {value!r}, expected {_describe(tp)}.{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{name}: got {value!r}, expected true or false.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"{name}: got {value!r}, expected a whole number.")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{name}: got {value!r}, expected a number.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{name}: got {value!r}, expected text (quote it in YAML).")
    return value


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--key value` / `--key=value` / `--flag` command-line overrides, values read as YAML scalars."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise RecipeError(f"unexpected argument {arg!r}: overrides look like --learning_rate 1e-4 or --key=value.")
        key = arg[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            raw = argv[i + 1]
            i += 1
        else:
            raw = "true"
        overrides[key] = yaml.safe_load(raw) if raw != "" else ""
        i += 1
    return overrides


def read_recipe_file(path: str) -> dict[str, Any]:
    """Read a recipe YAML file into a dict, with clear errors for missing or malformed files."""
    if not os.path.isfile(path):
        raise RecipeError(
            f"recipe file {path!r} not found; pass the path of a YAML recipe, e.g. recipes/tiny/sft.yaml."
        )
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"recipe {path}: not valid YAML{where}: {getattr(error, 'problem', error)}.") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: expected `key: value` lines at the top level, got {type(data).__name__}.")
    return data


def parse_dataclass(cls: type, values: dict[str, Any], source: str = "recipe") -> Any:
    """Build a plain dataclass (e.g. a command's config) from YAML values, with the recipe checks and hints."""
    types_by_name = _field_types(cls)
    for key in values:
        if key not in types_by_name:
            close = difflib.get_close_matches(key, sorted(types_by_name), n=1, cutoff=0.6)
            hint = f" Did you mean `{close[0]}`?" if close else " Remove it or check the spelling."
            raise RecipeError(f"unknown key `{key}` in {source}.{hint}")
    kwargs = {k: _coerce(k, v, types_by_name[k]) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        raise RecipeError(f"{source}: {error}") from None


def recipe_stage(path: str) -> str:
    """The stage a recipe file names in its `stage:` key."""
    stage = read_recipe_file(path).get("stage")
    if stage not in STAGES:
        raise RecipeError(f"recipe {path}: `stage:` is {stage!r}; set it to one of {', '.join(STAGES)}.")
    return stage


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _device_defaults(values: dict[str, Any], training_fields: dict[str, Any]) -> None:
    """TRL configs default to bf16 and gradient checkpointing; make a CPU run work without them."""
    if _on_gpu():
        return
    for flag in ("bf16", "fp16"):
        if values.get(flag) is True:
            raise RecipeError(
                f"{flag}: this machine has no GPU and {flag} training needs one; "
                f"remove `{flag}: true` (runs in fp32 on CPU) or run on a GPU machine."
            )
        if flag in training_fields:
            values.setdefault(flag, False)
    # Launched as several processes (torchrun / accelerate launch) without a GPU: accelerate builds the
    # gloo process group only when told the run is on CPU; otherwise every rank silently trains alone.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "use_cpu" in training_fields:
        values.setdefault("use_cpu", True)
    # Recomputing activations saves GPU memory; on CPU it only costs time. transformers 5.24 renamed
    # gradient_checkpointing to activation_checkpointing; set whichever this version has.
    if "gradient_checkpointing" not in values and "activation_checkpointing" not in values:
        name = "activation_checkpointing" if "activation_checkpointing" in training_fields else "gradient_checkpointing"
        if name in training_fields:
            values[name] = False


def parse_recipe(argv: list[str] | None, training_class: type, stage: str, data_class: type = DataArguments) -> Recipe:
    """Parse `RECIPE.yaml [--key value ...]` into a validated Recipe for `stage`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("--"):
        raise RecipeError(f"usage: rlhf train RECIPE.yaml [--key value ...] (a recipe with `stage: {stage}`).")
    path, overrides = argv[0], parse_overrides(argv[1:])
    values = {**read_recipe_file(path), **overrides}
    named_stage = values.pop("stage", stage)
    if named_stage != stage:
        raise RecipeError(
            f"stage: recipe {path} is for stage {named_stage!r}, not {stage!r}; run it with `rlhf train {path}`."
        )
    classes = {"model": ModelArguments, "data": data_class, "training": training_class}
    types_by_class = {name: _field_types(cls) for name, cls in classes.items()}
    known = set().union(*types_by_class.values())
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f" Did you mean `{close[0]}`?" if close else " Remove it or check the spelling."
            raise RecipeError(f"unknown recipe key `{key}` in {path}.{hint}")
    if not values.get("output_dir"):
        raise RecipeError(f"output_dir: missing in {path}; add e.g. `output_dir: outputs/{stage}`.")
    if not values.get("model_name_or_path"):
        raise RecipeError(f"model_name_or_path: missing in {path}; set a local checkpoint directory or a Hub id.")
    _device_defaults(values, types_by_class["training"])
    built = {
        name: parse_dataclass(cls, {k: v for k, v in values.items() if k in types_by_class[name]}, f"recipe {path}")
        for name, cls in classes.items()
    }
    if getattr(built["training"], "push_to_hub", False):
        # The Trainer would create the repo at start-up and push every checkpoint; rlhf publishes the
        # finished output once instead (artifacts.finish_stage → publish.publish_if_requested).
        built["training"].push_to_hub = False
    recipe = Recipe(stage, built["model"], built["data"], built["training"], {"stage": stage, **values}, path)
    check_paths(recipe)
    if _pending_paths is not None:
        raise ValidationDone(recipe)
    return recipe


def check_paths(recipe: Recipe) -> None:
    """Every path a recipe names must exist (or be a reachable Hub id) before anything loads."""
    from rlhf.data.load import check_data_sources
    from rlhf.modeling import check_model_source

    if _pending_paths is None or str(Path(recipe.model.model_name_or_path)) not in _pending_paths:
        check_model_source(recipe.model.model_name_or_path)
    check_data_sources(recipe.data)
    template = getattr(recipe.training, "chat_template_path", None)
    if template and not Path(template).exists() and template.startswith((".", "/")):
        raise RecipeError(f"chat_template_path: {template!r} does not exist; fix the path or remove the key.")

"""Recipe values: the config dataclasses, RecipeError, and reading YAML values into typed fields.

A recipe's keys are the fields of `trl.ModelConfig`, of `DataArguments` below, and of the stage's
TRL/transformers config (SFTConfig, RewardConfig, …), exactly as the `trl` CLI and
alignment-handbook read them. Everything is validated before any model or dataset is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib
import os
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml
from trl import ModelConfig, ScriptArguments

# `value_model_path: shared`: PPO's critic is a value head on the policy's own backbone (rlhf.ppo.models).
SHARED_VALUE_HEAD = "shared"


class RecipeError(ValueError):
    """A mistake in a recipe, its data or its paths: the message names the field and the fix."""


@dataclass
class DataArguments(ScriptArguments):
    """Where the data comes from and what happens to it before the trainer sees it.

    `dataset_name` is a local file (.jsonl/.json/.csv/.parquet), a `save_to_disk` folder, a Hub id,
    or `synthetic:<kind>` (pretrain, sft, preference, prompts) for the embedded default task.
    `dataset_mixture` lists several such sources, each a mapping with TRL's DatasetConfig keys
    (path, name, data_dir, data_files, split, columns, fraction) plus `rename_columns`.
    `skip_bad_rows` skips (and counts) rows that cannot be read or do not fit the stage's format,
    instead of stopping at the first with an error naming its file and line.
    """

    dataset_name: str | None = None
    dataset_mixture: list[dict] | None = None
    dataset_rename_columns: dict[str, str] | None = None
    test_split_size: float = 0.1
    eval_dataset_name: str | None = None
    synthetic_num_examples: int = 1000
    synthetic_sft_noise: float = 0.3
    synthetic_sft_mediocre: float = 0.0
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
    skip_bad_rows: bool = False


@dataclass
class ModelArguments(ModelConfig):
    """trl.ModelConfig plus the regularisation settings that live on the model.

    `dropout` sets every dropout probability of the architecture's config (attention_dropout,
    hidden_dropout, resid_pdrop, …; not lora_dropout). `l1_regularization` adds an L1 penalty on
    the trainable weights, applied as coef·sign(w) to their gradients before each optimizer step.
    `allow_pickle_weights` lets a checkpoint without safetensors load its pickled weights
    (pytorch_model.bin, *.pt, *.pth); unpickling can run code, so it is for sources you trust.
    """

    dropout: float | None = None
    l1_regularization: float = 0.0
    allow_pickle_weights: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        # TRL turns a one-element list into its element (for "all-linear"); peft then reads a plain
        # name such as "query_key_value" as a pattern for the whole module path and matches nothing.
        target = self.lora_target_modules
        if isinstance(target, str) and target != "all-linear" and re.fullmatch(r"[\w.]+", target):
            self.lora_target_modules = [target]


@dataclass
class Recipe:
    """A parsed, validated recipe."""

    stage: str
    model: ModelArguments
    data: DataArguments
    training: Any
    resolved: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    # Kept out of `resolved` and of the training config, so it is never written to a file or pickled
    # into a checkpoint; only the final push (artifacts.finish_stage) reads it.
    hub_token: str | None = field(default=None, repr=False)
    overwrite_output_dir: bool = False  # replace a finished output another stage or recipe wrote

    @property
    def trust_remote_code(self) -> bool:
        return bool(getattr(self.training, "trust_remote_code", False))


def field_types(cls: type) -> dict[str, Any]:
    """The init fields of a dataclass with their resolved type hints."""
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
        # A scalar fits a scalar option before it is wrapped into a one-element list.
        options = sorted(
            options, key=lambda option: typing.get_origin(option) in (list, tuple) or option in (list, tuple)
        )
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
        if isinstance(value, int | float):  # `--reward_weights 1.0`: a one-element list
            value = [value]
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


def _takes_text(tp: Any) -> bool:
    """Whether a field of this type holds text (str, an enum of names, a Literal of strings)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_takes_text(option) for option in typing.get_args(tp) if option is not type(None))
    if typing.get_origin(tp) is typing.Literal:
        return all(isinstance(value, str) for value in typing.get_args(tp))
    return tp is str or (isinstance(tp, type) and issubclass(tp, enum.Enum))


def _command_line_value(key: str, raw: str, tp: Any) -> Any:
    """A `--key value` read by the field's type: text stays text (`no` is not YAML's false), the rest is YAML."""
    quoted = len(raw) > 1 and raw[0] == raw[-1] and raw[0] in "'\""
    if tp is not None and _takes_text(tp) and not quoted and raw not in ("null", "~"):
        return raw
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as error:  # e.g. a `!!python/object` tag: the safe loader builds no objects
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(
            f"--{key}: {raw!r} is not a plain YAML value ({problem}); give text, a number, true/false, a list "
            "or a mapping, and quote text that looks like YAML."
        ) from None


def load_reward_function(spec: str, field: str = "reward_funcs") -> Callable[..., list[float]]:
    """Import a reward function given as `package.module:function` (TRL signature: prompts, completions, **kw)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise RecipeError(f"{field}: {spec!r} is not an import path; write it as package.module:function.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RecipeError(
            f"{field}: cannot import module {module_name!r} ({error}); check the path and PYTHONPATH."
        ) from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise RecipeError(f"{field}: {module_name!r} has no function {attribute!r}.")
    return function


def parse_overrides(argv: list[str], field_types_by_name: dict[str, Any] | None = None) -> dict[str, Any]:
    """`--key value` / `--key=value` / `--flag` command-line overrides, each read by its field's type."""
    field_types_by_name = field_types_by_name or {}
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
        overrides[key] = _command_line_value(key, raw, field_types_by_name.get(key))
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


def check_known_keys(keys: Iterable[str], known: Iterable[str], kind: str, source: str) -> None:
    """Refuse the first key not in `known` (`unknown <kind> `x` in <source>.`), naming the closest known one."""
    known = sorted(known)
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" Did you mean `{close[0]}`?" if close else " Remove it or check the spelling."
            raise RecipeError(f"unknown {kind} `{key}` in {source}.{hint}")


def parse_dataclass(cls: type, values: dict[str, Any], source: str = "recipe") -> Any:
    """Build a plain dataclass (e.g. a command's config) from YAML values, with the recipe checks and hints."""
    types_by_name = field_types(cls)
    check_known_keys(values, types_by_name, "key", source)
    kwargs = {k: _coerce(k, v, types_by_name[k]) for k, v in values.items()}
    _check_field_choices(cls, kwargs)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        raise RecipeError(f"{source}: {error}") from None


def _check_field_choices(cls: type, values: dict[str, Any]) -> None:
    """Refuse a value outside the `choices` a field's metadata declares (TRL's `loss_type`, …).

    TRL lists the allowed values for argparse; a recipe skips argparse, so without this a typo would
    surface as a traceback inside the trainer after the model has loaded.
    """
    for item in dataclasses.fields(cls):
        choices = item.metadata.get("choices")
        if not choices or values.get(item.name) is None:
            continue
        value = values[item.name]
        for one in value if isinstance(value, list) else [value]:
            if getattr(one, "value", one) not in choices:
                raise RecipeError(
                    f"{item.name}: got {getattr(one, 'value', one)!r}; set it to one of {', '.join(map(repr, choices))}."
                )

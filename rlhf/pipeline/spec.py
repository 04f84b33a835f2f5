"""A pipeline file: its stages, how each is wired to earlier outputs, and each stage's fingerprint."""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rlhf
from rlhf.config import RecipeError, read_recipe_file
from rlhf.data import synthetic, world
from rlhf.data.load import is_written_by
from rlhf.registry import COMMANDS, PIPELINE_COMMANDS, Command, Stage, stage_named

PIPELINE_KEYS = {"name", "output_dir", "accelerate_config", "stages", "report"}
STAGE_KEYS = {"name", "recipe", "command", "input", "inputs", "args", "enabled"}
STATE_DIR = ".pipeline"
# Recipe keys and command arguments that hold a Hub token: never written to a pipeline file.
SECRET_KEYS = ("hub_token", "token")
STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass
class StageSpec:
    """One entry of a pipeline file."""

    name: str
    recipe: str | None = None
    command: str | None = None
    input: str | list[str] | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    enabled: bool = True

    @property
    def positional(self) -> list[str]:
        """Upstream stages passed as the command's checkpoint argument(s)."""
        return [self.input] if isinstance(self.input, str) else list(self.input or [])

    @property
    def upstream(self) -> list[str]:
        """The earlier stages this one reads (`inputs:` may name a file inside one: `samples/sft.jsonl`)."""
        return list(dict.fromkeys([*self.positional, *(value.split("/")[0] for value in self.inputs.values())]))


@dataclass
class Pipeline:
    """A parsed pipeline file."""

    path: str
    name: str
    output_dir: Path
    stages: list[StageSpec]
    accelerate_config: str | None = None

    def stage_dir(self, name: str) -> Path:
        return self.output_dir / name

    @property
    def state_dir(self) -> Path:
        return self.output_dir / STATE_DIR

    def by_name(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    @property
    def produced(self) -> set[str]:
        """Every output this pipeline writes (pre-flight must not call them missing)."""
        return {str(self.stage_dir(s.name)) for s in self.stages}


def load_pipeline(path: str) -> Pipeline:
    """Parse and validate a pipeline file (structure and wiring only; recipes are checked in pre-flight)."""
    data = read_recipe_file(path)
    for key in data:
        if key not in PIPELINE_KEYS:
            close = difflib.get_close_matches(key, sorted(PIPELINE_KEYS), n=1)
            raise RecipeError(
                f"pipeline {path}: unknown key `{key}`." + (f" Did you mean `{close[0]}`?" if close else "")
            )
    if not isinstance(data.get("stages"), list) or not data["stages"]:
        raise RecipeError(f"pipeline {path}: `stages:` must be a non-empty list of stages.")
    stages: list[StageSpec] = []
    for i, entry in enumerate(data["stages"]):
        where = f"pipeline {path}: stages[{i}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise RecipeError(f"{where}: each stage needs a `name:`.")
        unknown = set(entry) - STAGE_KEYS
        if unknown:
            raise RecipeError(
                f"{where} ({entry['name']}): unknown keys {sorted(unknown)}; allowed: {sorted(STAGE_KEYS)}."
            )
        spec = StageSpec(**entry)
        if not isinstance(spec.name, str) or not STAGE_NAME.fullmatch(spec.name):
            raise RecipeError(
                f"{where}: stage name {spec.name!r} must be letters, digits, `_`, `-` or `.` (it names the folder "
                "<output_dir>/<name>, so no `/`, `..` or absolute paths)."
            )
        if bool(spec.recipe) == bool(spec.command):
            raise RecipeError(f"{where} ({spec.name}): give exactly one of `recipe:` or `command:`.")
        if spec.command and spec.command not in PIPELINE_COMMANDS:
            raise RecipeError(
                f"{where} ({spec.name}): unknown command {spec.command!r}; use one of {', '.join(PIPELINE_COMMANDS)}."
            )
        if spec.recipe and not os.path.isfile(spec.recipe):
            raise RecipeError(f"{where} ({spec.name}): recipe {spec.recipe!r} not found.")
        known = {s.name for s in stages}
        if spec.name in known:
            raise RecipeError(f"{where}: duplicate stage name {spec.name!r}.")
        for upstream in spec.upstream:
            if upstream not in known:
                raise RecipeError(
                    f"{where} ({spec.name}): input {upstream!r} is not an earlier stage; stages run in file order."
                )
        stages.append(spec)
    output_dir = Path(data.get("output_dir") or f"outputs/{data.get('name', Path(path).stem)}")
    return Pipeline(path, data.get("name", Path(path).stem), output_dir, stages, data.get("accelerate_config"))


@dataclass
class PlannedStage:
    """A stage with everything it runs with resolved: its recipe values, or its command's call."""

    spec: StageSpec
    stage: Stage | None = None  # a training stage
    recipe_values: dict[str, Any] = field(default_factory=dict)
    command: Command | None = None  # a command stage
    call_args: list[Any] = field(default_factory=list)
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    upstream_dirs: list[str] = field(default_factory=list)  # outputs of the stages it reads

    @property
    def name(self) -> str:
        return self.spec.name


def plan_stage(pipeline: Pipeline, spec: StageSpec) -> PlannedStage:
    """Resolve a stage once: read its recipe file, wire inputs to upstream outputs, set its output."""
    wired = {
        key: str(pipeline.stage_dir(name.split("/")[0]).joinpath(*name.split("/")[1:]))
        for key, name in spec.inputs.items()
    }
    output = str(pipeline.stage_dir(spec.name))
    upstream_dirs = [str(pipeline.stage_dir(name)) for name in spec.upstream]
    if spec.recipe:
        values = {**read_recipe_file(spec.recipe), **spec.args, **wired, "output_dir": output}
        stage = stage_named(values.pop("stage", None), f"recipe {spec.recipe}")
        return PlannedStage(spec, stage=stage, recipe_values=values, upstream_dirs=upstream_dirs)
    command = COMMANDS[spec.command]
    inputs = [str(pipeline.stage_dir(name)) for name in spec.positional]
    call_args = {"none": [], "one": inputs[:1], "many": [inputs]}[command.inputs]
    kwargs = {**spec.args, **wired, **({"output": output} if command.writes_output else {})}
    return PlannedStage(spec, command=command, call_args=call_args, call_kwargs=kwargs, upstream_dirs=upstream_dirs)


def check_command_call(planned: PlannedStage) -> None:
    """The command accepts these arguments (a typo in `args:` fails here, not after earlier stages ran)."""
    command = planned.command
    function = command.load(command.function)
    try:
        inspect.signature(function).bind(*planned.call_args, **planned.call_kwargs)
    except TypeError as error:
        accepted = [p for p in inspect.signature(function).parameters if p != "output"]
        raise RecipeError(
            f"stage {planned.name} (command {command.name}): {error}; its arguments are {', '.join(accepted)}."
        ) from None
    if command.check:
        try:
            command.load(command.check)(*planned.call_args, **planned.call_kwargs)
        except RecipeError as error:
            raise RecipeError(f"stage {planned.name} (command {command.name}): {error}") from None


def _hash_path(path: str) -> str:
    """Content hash of a local data file (size+mtime for huge files and folders)."""
    p = Path(path)
    if p.is_file() and p.stat().st_size < 200 * 2**20:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    if p.exists():
        entries = sorted(
            (str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in p.rglob("*") if f.is_file()
        )
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return "missing"


def data_fingerprint(values: dict[str, Any], upstream_dirs: list[str] = ()) -> dict[str, str]:
    """What the stage's data is: file hashes for local files, the generator's code for synthetic data.

    Data an upstream stage writes is named by that stage (its fingerprint is already in the digest):
    the file may still hold an older run's rows when this stage is planned.
    """
    sources = [values.get("dataset_name"), values.get("eval_dataset_name")]
    sources += [entry.get("path") for entry in values.get("dataset_mixture") or [] if isinstance(entry, dict)]
    result = {}
    for source in filter(None, sources):
        if is_written_by(str(source), upstream_dirs):
            result[source] = "upstream"
        elif str(source).startswith("synthetic:"):
            world_files = (synthetic.__file__, world.__file__)
            result[source] = hashlib.sha256(b"".join(Path(f).read_bytes() for f in world_files)).hexdigest()[:16]
        elif os.path.exists(source):
            result[source] = _hash_path(source)[:16]
        else:
            result[source] = "hub"  # a Hub id is pinned by dataset_config/revision in the recipe
    return result


def without_secrets(values: dict[str, Any], marker: str | None = None) -> dict[str, Any]:
    """`values` without Hub tokens, or with each token that is set replaced by `marker`."""
    kept = {k: v for k, v in values.items() if k not in SECRET_KEYS}
    if marker is not None:
        kept.update({k: marker for k in SECRET_KEYS if values.get(k)})
    return kept


def fingerprint(planned: PlannedStage, upstream: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """(fingerprint, what went into it) of a stage: its resolved settings, data, and upstream fingerprints.

    `what` is written to lineage.json, so a token enters it only as "set" (which token it is does not
    change what the stage computes).
    """
    spec = planned.spec
    if planned.stage:
        what: dict[str, Any] = {
            "recipe": {"stage": planned.stage.name, **without_secrets(planned.recipe_values, "set")}
        }
        what["data"] = data_fingerprint(planned.recipe_values, planned.upstream_dirs)
    else:
        kwargs = without_secrets(planned.call_kwargs, "set")
        what = {"command": spec.command, "args": planned.call_args, "kwargs": kwargs}
        recipe_arg = spec.args.get("recipe")
        if recipe_arg and os.path.isfile(str(recipe_arg)):
            what["recipe_file"] = _hash_path(str(recipe_arg))[:16]
    what["upstream"] = {name: upstream[name] for name in spec.upstream}
    what["rlhf_version"] = rlhf.__version__
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return digest, what

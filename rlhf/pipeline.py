"""`rlhf pipeline PIPELINE.yaml`: chain stages, cache each one by fingerprint, resume, report.

A pipeline file lists stages in order. A training stage names a recipe; a command stage names an
`rlhf` command (tiny-checkpoint, eval, quantize, prune, export, merge, attention, publish). Each
stage writes `<output_dir>/<name>/`; `inputs:` wires a recipe key (or a command flag) to an
earlier stage's output by name, so no path is ever copied by hand:

    output_dir: outputs/tiny
    stages:
      - {name: base, command: tiny-checkpoint}
      - {name: sft, recipe: recipes/tiny/sft.yaml, inputs: {model_name_or_path: base}}
      - {name: eval_sft, command: eval, input: sft, args: {recipe: recipes/tiny/eval.yaml}}

A stage is skipped when its output is complete and its fingerprint — resolved recipe, upstream
fingerprints, data — is unchanged; a change reruns it and everything downstream. A killed run,
started again with the same command, skips finished stages and resumes the interrupted one from
its last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import rlhf
from rlhf.artifacts import incomplete_dir, publish_dir, write_json
from rlhf.config import Recipe, RecipeError, ValidationDone, read_recipe_file, recipe_stage, validate_only

PIPELINE_KEYS = {"name", "output_dir", "accelerate_config", "stages", "report"}
STAGE_KEYS = {"name", "recipe", "command", "input", "inputs", "args", "enabled"}
COMMANDS = ("tiny-checkpoint", "eval", "quantize", "prune", "export", "merge", "attention", "publish")
STATE_DIR = ".pipeline"
LINEAGE_FILE = "lineage.json"
FINGERPRINT_FILE = "fingerprint.json"
# The data format each training stage reads (for pre-flight column checks).
STAGE_DATA_FORMAT = {
    "pretrain": "language_modeling",
    "sft": "sft",
    "distill": "sft",
    "reward": "preference",
    "dpo": "preference",
    "ppo": "prompt_only",
    "grpo": "prompt_only",
    "rloo": "prompt_only",
}


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
    def upstream(self) -> list[str]:
        positional = [self.input] if isinstance(self.input, str) else list(self.input or [])
        return [*positional, *self.inputs.values()]


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


def load_pipeline(path: str) -> Pipeline:
    """Parse and validate a pipeline file (structure and wiring only; recipes are checked in pre-flight)."""
    import difflib

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
        if bool(spec.recipe) == bool(spec.command):
            raise RecipeError(f"{where} ({spec.name}): give exactly one of `recipe:` or `command:`.")
        if spec.command and spec.command not in COMMANDS:
            raise RecipeError(
                f"{where} ({spec.name}): unknown command {spec.command!r}; use one of {', '.join(COMMANDS)}."
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


# ---------------------------------------------------------------------------------------------
# Resolution and fingerprints


def resolved_recipe(pipeline: Pipeline, spec: StageSpec) -> dict[str, Any]:
    """The recipe a training stage runs with: file + args + wired inputs + its output_dir."""
    values = read_recipe_file(spec.recipe)
    values.update(spec.args)
    values.update({key: str(pipeline.stage_dir(name)) for key, name in spec.inputs.items()})
    values["output_dir"] = str(pipeline.stage_dir(spec.name))
    return values


def command_argv(pipeline: Pipeline, spec: StageSpec, output: Path) -> list[str]:
    """The argv of a command stage (its output goes to `output`)."""
    positional = [str(pipeline.stage_dir(name)) for name in spec.upstream[: len(spec.upstream) - len(spec.inputs)]]
    flags: list[str] = []
    for key, value in {**spec.args, **{k: str(pipeline.stage_dir(v)) for k, v in spec.inputs.items()}}.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value not in (False, None):
            flags += [flag, str(value)]
    if spec.command == "tiny-checkpoint":
        return [str(output), *flags]
    if spec.command == "publish":
        return [*positional, *flags]
    return [*positional, *flags, "--output", str(output)]


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


def data_fingerprint(values: dict[str, Any]) -> dict[str, str]:
    """What the stage's data is: file hashes for local files, the generator's code for synthetic data."""
    sources = [values.get("dataset_name"), values.get("eval_dataset_name")]
    sources += [entry.get("path") for entry in values.get("dataset_mixture") or [] if isinstance(entry, dict)]
    result = {}
    for source in filter(None, sources):
        if str(source).startswith("synthetic:"):
            from rlhf.data import synthetic

            result[source] = hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest()[:16]
        elif os.path.exists(source):
            result[source] = _hash_path(source)[:16]
        else:
            result[source] = "hub"  # a Hub id is pinned by dataset_config/revision in the recipe
    return result


def fingerprint(pipeline: Pipeline, spec: StageSpec, upstream: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """(fingerprint, what went into it) of a stage."""
    if spec.recipe:
        what = {"recipe": resolved_recipe(pipeline, spec)}
        what["data"] = data_fingerprint(what["recipe"])
    else:
        what = {"command": spec.command, "argv": command_argv(pipeline, spec, Path("OUTPUT"))}
        recipe_arg = spec.args.get("recipe")
        if recipe_arg and os.path.isfile(str(recipe_arg)):
            what["recipe_file"] = _hash_path(str(recipe_arg))[:16]
    what["upstream"] = {name: upstream[name] for name in spec.upstream}
    what["rlhf_version"] = rlhf.__version__
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return digest, what


# ---------------------------------------------------------------------------------------------
# Pre-flight


def _stage_of(spec: StageSpec) -> str:
    return recipe_stage(spec.recipe)


def write_stage_recipe(pipeline: Pipeline, spec: StageSpec) -> Path:
    """Write the resolved recipe a training stage runs with to `<output_dir>/.pipeline/recipes/`."""
    path = pipeline.state_dir / "recipes" / f"{spec.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"stage": _stage_of(spec), **resolved_recipe(pipeline, spec)}, sort_keys=False))
    return path


def validate_stage(pipeline: Pipeline, spec: StageSpec) -> Recipe:
    """Parse a training stage's resolved recipe exactly as the stage will, stopping before anything loads."""
    produced = {str(pipeline.stage_dir(s.name)) for s in pipeline.stages}
    stage_module = importlib.import_module(f"rlhf.stages.{_stage_of(spec)}")
    with validate_only(produced):
        try:
            stage_module.main([str(write_stage_recipe(pipeline, spec))])
        except ValidationDone as done:
            return done.recipe
    raise RuntimeError(f"stage {spec.name}: its main() did not call parse_recipe")


def estimate_memory(pipeline: Pipeline, spec: StageSpec, values: dict[str, Any]) -> dict[str, Any] | None:
    """Rough peak memory of a training stage: model copies × parameters × bytes + optimizer state."""
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
    stage = _stage_of(spec)
    trained, frozen = {"ppo": (2, 2), "dpo": (1, 1), "grpo": (1, 1), "rloo": (1, 1), "distill": (1, 1)}.get(
        stage, (1, 0)
    )
    lora = bool(values.get("use_peft"))
    if lora and stage in ("ppo", "dpo", "grpo", "rloo"):
        frozen = max(0, frozen - 1)  # the reference is the policy with adapters off: no second copy
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


def _render_examples(recipe: Recipe, data_format: str, count: int = 2) -> list[str]:
    """A few training rows rendered through the chat template, loss-masked tokens in [[ ]]."""
    from transformers import AutoTokenizer

    from rlhf.data import prepare_datasets

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


def preflight(pipeline: Pipeline, selected: list[StageSpec], echo=print) -> dict[str, Any]:
    """Validate every recipe, find every dataset and check its columns, estimate memory — no model loads."""
    from rlhf.data import prepare_datasets

    report: dict[str, Any] = {"stages": {}, "machine_memory_bytes": _machine_memory()}
    for spec in selected:
        if not spec.recipe:
            continue
        recipe = validate_stage(pipeline, spec)
        stage, values = recipe.stage, recipe.resolved
        train, eval_, _ = prepare_datasets(recipe.data, STAGE_DATA_FORMAT[stage], recipe.training.seed)
        memory = estimate_memory(pipeline, spec, values)
        report["stages"][spec.name] = {"train_rows": len(train), "eval_rows": len(eval_ or []), "memory": memory}
        line = f"  ✓ {spec.name:<12} {stage:<9} {len(train):>6} train rows"
        if memory:
            line += f", ~{memory['estimated_bytes'] / 2**20:,.0f} MiB est. ({memory['parameters']:,} params)"
        echo(line)
        if (
            memory
            and report["machine_memory_bytes"]
            and memory["estimated_bytes"] > 0.8 * report["machine_memory_bytes"]
        ):
            echo(f"    ! {spec.name}: estimated memory exceeds 80% of this machine's; use LoRA or a smaller batch.")
    return report


def show_examples(pipeline: Pipeline, selected: list[StageSpec], echo=print) -> None:
    """Print rendered training examples (loss mask in [[ ]]) for the stages whose tokenizer exists."""
    for spec in selected:
        if not spec.recipe:
            continue
        stage = _stage_of(spec)
        if stage not in ("sft", "reward", "dpo", "distill"):
            continue
        examples = _render_examples(validate_stage(pipeline, spec), STAGE_DATA_FORMAT[stage])
        for example in examples[:1]:
            echo(f"  {spec.name}: {example!r}")


# ---------------------------------------------------------------------------------------------
# Running


def _run_training_stage(pipeline: Pipeline, spec: StageSpec) -> None:
    stage = _stage_of(spec)
    path = write_stage_recipe(pipeline, spec)
    if pipeline.accelerate_config:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", pipeline.accelerate_config]
        subprocess.run([*launcher, "-m", f"rlhf.stages.{stage}", str(path)], check=True)
        return
    importlib.import_module(f"rlhf.stages.{stage}").main([str(path)])


def _run_command_stage(pipeline: Pipeline, spec: StageSpec) -> None:
    from rlhf.cli import COMMANDS as CLI_COMMANDS

    final = pipeline.stage_dir(spec.name)
    tmp = incomplete_dir(final)
    if tmp.exists():
        shutil.rmtree(tmp)  # commands are short and not resumable: start them clean
    module, function, _ = CLI_COMMANDS[spec.command]
    argv = command_argv(pipeline, spec, tmp)
    getattr(importlib.import_module(module), function)(argv)
    tmp.mkdir(parents=True, exist_ok=True)  # commands that write elsewhere (publish) still get a record
    publish_dir(tmp, final)


def _stage_state(pipeline: Pipeline, name: str) -> dict[str, Any]:
    path = pipeline.state_dir / "stages" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _write_stage_state(pipeline: Pipeline, name: str, state: dict[str, Any]) -> None:
    path = pipeline.state_dir / "stages" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    write_json(tmp, state)
    os.replace(tmp, path)


def select_stages(pipeline: Pipeline, only: str | None, start: str | None) -> tuple[list[StageSpec], set[str]]:
    """(stages to consider, stages forced to rerun) for --only / --from."""
    names = [s.name for s in pipeline.stages if s.enabled]
    for flag, value in (("--only", only), ("--from", start)):
        if value and value not in names:
            raise RecipeError(f"{flag}: no stage named {value!r}; stages are {', '.join(names)}.")
    enabled = [s for s in pipeline.stages if s.enabled]
    if only:
        return [pipeline.by_name(only)], {only}
    if start:
        index = names.index(start)
        return enabled, set(names[index:])
    return enabled, set()


def run_pipeline(
    pipeline: Pipeline, only: str | None = None, start: str | None = None, force: bool = False, echo=print
) -> dict[str, Any]:
    """Run (or skip) every stage; return the per-stage summary written to `<output_dir>/.pipeline/run.json`."""
    from tqdm.auto import tqdm

    selected, forced = select_stages(pipeline, only, start)
    if force:
        forced = {s.name for s in selected}
    upstream: dict[str, str] = {}
    for spec in pipeline.stages:
        if spec.enabled:
            upstream[spec.name] = fingerprint(pipeline, spec, upstream)[0]

    def cached(spec: StageSpec) -> bool:
        state = _stage_state(pipeline, spec.name)
        return (
            spec.name not in forced
            and is_complete_stage(pipeline.stage_dir(spec.name))
            and state.get("fingerprint") == upstream[spec.name]
        )

    to_run = [spec for spec in selected if not cached(spec)]
    echo(f"pipeline {pipeline.name}: {len(to_run)} of {len(selected)} stages to run; pre-flight")
    preflight_report = preflight(pipeline, to_run, echo)
    summary: dict[str, Any] = {"pipeline": pipeline.name, "stages": {}, "preflight": preflight_report}
    total_start = time.time()
    examples_shown = False
    progress = tqdm(selected, desc=f"pipeline {pipeline.name}", unit="stage", file=sys.stdout)
    for spec in progress:
        progress.set_postfix_str(spec.name)
        final = pipeline.stage_dir(spec.name)
        digest, what = fingerprint(pipeline, spec, upstream)
        if spec not in to_run:
            summary["stages"][spec.name] = {**_stage_state(pipeline, spec.name), "status": "cached"}
            continue
        for name in spec.upstream:
            if not is_complete_stage(pipeline.stage_dir(name)):
                raise RecipeError(f"stage {spec.name}: its input {name!r} has no finished output; run it first.")
        if spec.recipe and not examples_shown:
            show_examples(pipeline, [s for s in to_run if s.recipe], echo)
            examples_shown = True
        tmp = incomplete_dir(final)
        marker = tmp / FINGERPRINT_FILE
        if tmp.exists() and (not marker.exists() or json.loads(marker.read_text()).get("fingerprint") != digest):
            shutil.rmtree(tmp)  # a leftover from another configuration must not be resumed
        if spec.recipe:
            tmp.mkdir(parents=True, exist_ok=True)
            write_json(marker, {"fingerprint": digest})
        echo(f"\n== {spec.name} ({spec.recipe or spec.command}) ==")
        started = time.time()
        if spec.recipe:
            _run_training_stage(pipeline, spec)
        else:
            _run_command_stage(pipeline, spec)
        gc.collect()
        seconds = round(time.time() - started, 1)
        (final / FINGERPRINT_FILE).unlink(missing_ok=True)
        lineage = {
            "stage": spec.name,
            "fingerprint": digest,
            "recipe": spec.recipe,
            "command": spec.command,
            "inputs": {name: _read_lineage(pipeline.stage_dir(name)) for name in spec.upstream},
            "what": what,
        }
        write_json(final / LINEAGE_FILE, lineage)
        state = {"fingerprint": digest, "seconds": seconds, "finished_at": time.time()}
        _write_stage_state(pipeline, spec.name, state)
        summary["stages"][spec.name] = {**state, "status": "ran"}
    summary["seconds"] = round(time.time() - total_start, 1)
    write_json(pipeline.state_dir / "run.json", summary)
    from rlhf.pipeline_report import write_report

    report = write_report(pipeline, summary)
    echo(f"\nreport: {report}")
    return summary


def is_complete_stage(path: Path) -> bool:
    """A stage output exists and was renamed into place (so it finished)."""
    return path.is_dir()


def _read_lineage(path: Path) -> dict[str, Any]:
    lineage_path = path / LINEAGE_FILE
    return json.loads(lineage_path.read_text()) if lineage_path.exists() else {"stage": path.name}


def main(argv: list[str] | None = None) -> None:
    """`rlhf pipeline PIPELINE.yaml [--only STAGE | --from STAGE] [--force]`."""
    parser = argparse.ArgumentParser(prog="rlhf pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", help="pipeline YAML, e.g. recipes/tiny/pipeline.yaml")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--only", metavar="STAGE", help="run just this stage (its inputs must be finished)")
    group.add_argument("--from", dest="start", metavar="STAGE", help="rerun this stage and every later one")
    parser.add_argument("--force", action="store_true", help="ignore the cache and rerun every selected stage")
    args = parser.parse_args(argv)
    run_pipeline(load_pipeline(args.pipeline), only=args.only, start=args.start, force=args.force)


if __name__ == "__main__":
    from rlhf.cli import run

    run(main)

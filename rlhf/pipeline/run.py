"""Running a pipeline: plan → pre-flight → execute, skipping stages whose fingerprint is unchanged."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rlhf.artifacts import OUTPUT_MARKER, incomplete_dir, output_lock, write_json
from rlhf.config import RecipeError
from rlhf.entrypoint import Terminated
from rlhf.pipeline.preflight import preflight, show_examples, write_stage_recipe
from rlhf.pipeline.report import write_report
from rlhf.pipeline.spec import Pipeline, PlannedStage, StageSpec, fingerprint, plan_stage

LINEAGE_FILE = "lineage.json"
FINGERPRINT_FILE = "fingerprint.json"


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
        return enabled, set(names[names.index(start) :])
    return enabled, set()


def is_complete_stage(path: Path) -> bool:
    """A stage output exists and was renamed into place (so it finished)."""
    return path.is_dir()


def _stage_state(pipeline: Pipeline, name: str) -> dict[str, Any]:
    path = pipeline.state_dir / "stages" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _write_stage_state(pipeline: Pipeline, name: str, state: dict[str, Any]) -> None:
    path = pipeline.state_dir / "stages" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    write_json(tmp, state)
    os.replace(tmp, path)


def _read_lineage(path: Path) -> dict[str, Any]:
    lineage_path = path / LINEAGE_FILE
    return json.loads(lineage_path.read_text()) if lineage_path.exists() else {"stage": path.name}


@contextmanager
def _hf_token(token: str | None) -> Iterator[None]:
    """HF_TOKEN set to `token` for the block (unchanged when None); huggingface_hub reads it when pushing."""
    previous = os.environ.get("HF_TOKEN")
    if token:
        os.environ["HF_TOKEN"] = token
    try:
        yield
    finally:
        if token:
            if previous is None:
                os.environ.pop("HF_TOKEN", None)
            else:
                os.environ["HF_TOKEN"] = previous


def run_training_stage(pipeline: Pipeline, planned: PlannedStage, digest: str) -> None:
    """Run a stage in this process (or under `accelerate launch`); it resumes from its `.incomplete` checkpoints."""
    tmp = incomplete_dir(pipeline.stage_dir(planned.name))
    marker = tmp / FINGERPRINT_FILE
    if tmp.exists() and (not marker.exists() or json.loads(marker.read_text()).get("fingerprint") != digest):
        shutil.rmtree(tmp)  # a leftover from another configuration must not be resumed
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / OUTPUT_MARKER).touch()
    write_json(marker, {"fingerprint": digest})
    path = write_stage_recipe(pipeline, planned)
    # The recipe file holds no hub_token (files are not for secrets); the stage's push reads it from HF_TOKEN.
    with _hf_token(planned.recipe_values.get("hub_token")):
        if pipeline.accelerate_config:
            launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", pipeline.accelerate_config]
            _launch([*launcher, "-m", f"rlhf.stages.{planned.stage.name}", str(path)])
        else:
            planned.stage.module.main([str(path)])
    (pipeline.stage_dir(planned.name) / FINGERPRINT_FILE).unlink(missing_ok=True)


def _launch(command: list[str]) -> None:
    """Run an `accelerate launch` command; when this run is stopped, the launcher's workers stop first.

    Ctrl-C reaches the launcher from the terminal; a SIGTERM sent to this process alone (a container's
    PID 1, `kill PID`) is passed on, and the launcher passes it to its workers, which stop as on Ctrl-C.
    subprocess.run would SIGKILL the launcher instead, leaving its workers training and holding the lock.
    """
    process = subprocess.Popen(command)
    try:
        returncode = process.wait()
    except KeyboardInterrupt as stop:
        if isinstance(stop, Terminated):
            process.terminate()
        process.wait()
        raise
    if returncode:
        raise subprocess.CalledProcessError(returncode, command)


def run_command_stage(pipeline: Pipeline, planned: PlannedStage) -> None:
    """Call the command's function; it writes its output atomically (a command without one gets a record dir)."""
    command = planned.command
    command.load(command.function)(*planned.call_args, **planned.call_kwargs)
    pipeline.stage_dir(planned.name).mkdir(parents=True, exist_ok=True)


def run_pipeline(
    pipeline: Pipeline,
    only: str | None = None,
    start: str | None = None,
    force: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or skip) every stage; return the per-stage summary written to `<output_dir>/.pipeline/run.json`."""
    fresh = not pipeline.state_dir.exists()
    with output_lock(pipeline.state_dir):  # one run per pipeline folder
        try:
            return _run_pipeline(pipeline, only, start, force, echo)
        except BaseException:
            # A first run that failed before any stage finished leaves no state behind to mislead the next.
            if fresh and not any((pipeline.state_dir / "stages").glob("*.json")):
                shutil.rmtree(pipeline.state_dir, ignore_errors=True)
            raise


def _run_pipeline(
    pipeline: Pipeline, only: str | None, start: str | None, force: bool, echo: Callable[[str], None]
) -> dict[str, Any]:
    total_start = time.time()  # the run's wall time counts planning and pre-flight too: all of it on a cached rerun
    # Plan: resolve every enabled stage once and fingerprint it with its upstream fingerprints.
    selected, forced = select_stages(pipeline, only, start)
    if force:
        forced = {s.name for s in selected}
    plan: dict[str, PlannedStage] = {}
    digests: dict[str, str] = {}
    inputs_of: dict[str, dict[str, Any]] = {}
    for spec in pipeline.stages:
        if spec.enabled:
            plan[spec.name] = plan_stage(pipeline, spec)
            digests[spec.name], inputs_of[spec.name] = fingerprint(plan[spec.name], digests)

    def cached(spec: StageSpec) -> bool:
        return (
            spec.name not in forced
            and is_complete_stage(pipeline.stage_dir(spec.name))
            and _stage_state(pipeline, spec.name).get("fingerprint") == digests[spec.name]
        )

    to_run = [plan[spec.name] for spec in selected if not cached(spec)]

    # Pre-flight: every recipe, dataset, model path and command argument of the stages to run.
    echo(f"pipeline {pipeline.name}: {len(to_run)} of {len(selected)} stages to run; pre-flight")
    preflight_report, recipes = preflight(pipeline, to_run, echo)

    # Execute.
    summary: dict[str, Any] = {"pipeline": pipeline.name, "stages": {}, "preflight": preflight_report}
    examples_shown = False
    progress = tqdm(selected, desc=f"pipeline {pipeline.name}", unit="stage", file=sys.stdout)
    for spec in progress:
        progress.set_postfix_str(spec.name)
        planned, final = plan[spec.name], pipeline.stage_dir(spec.name)
        if planned not in to_run:
            summary["stages"][spec.name] = {**_stage_state(pipeline, spec.name), "status": "cached"}
            continue
        for name in spec.upstream:
            if not is_complete_stage(pipeline.stage_dir(name)):
                raise RecipeError(f"stage {spec.name}: its input {name!r} has no finished output; run it first.")
        if planned.stage and not examples_shown:
            show_examples([p for p in to_run if p.stage], recipes, echo)
            examples_shown = True
        echo(f"\n== {spec.name} ({spec.recipe or spec.command}) ==")
        started = time.time()
        if planned.stage:
            run_training_stage(pipeline, planned, digests[spec.name])
        else:
            run_command_stage(pipeline, planned)
        gc.collect()
        lineage = {
            "stage": spec.name,
            "fingerprint": digests[spec.name],
            "recipe": spec.recipe,
            "command": spec.command,
            "inputs": {name: _read_lineage(pipeline.stage_dir(name)) for name in spec.upstream},
            "what": inputs_of[spec.name],
        }
        write_json(final / LINEAGE_FILE, lineage)
        state = {"fingerprint": digests[spec.name], "seconds": round(time.time() - started, 1)}
        state["finished_at"] = time.time()
        _write_stage_state(pipeline, spec.name, state)
        summary["stages"][spec.name] = {**state, "status": "ran"}
    summary["seconds"] = round(time.time() - total_start, 1)
    write_json(pipeline.state_dir / "run.json", summary)
    echo(f"\nreport: {write_report(pipeline, summary)}")
    return summary

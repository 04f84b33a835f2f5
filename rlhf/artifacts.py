"""Stage outputs: written to `<output_dir>.incomplete`, renamed to `<output_dir>` only when complete.

A directory named exactly `output_dir` is therefore always a finished stage; a killed run leaves
only the `.incomplete` folder, whose Trainer checkpoints the next run resumes from. Every folder
rlhf writes carries a marker file, and rlhf replaces or deletes only folders that carry it (or an
older version's output files), so a mistyped `output_dir` never removes a user's own files. One
run at a time writes an output: `.<output_dir>.lock` beside it (a `filelock` lock, freed by the OS when the
holder dies) makes a second run fail at once, naming the holder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from filelock import FileLock, Timeout
from safetensors import safe_open

from rlhf.config import RecipeError
from rlhf.entrypoint import FAILURE_HOOKS
from rlhf.publish import publish_if_requested

INCOMPLETE_SUFFIX = ".incomplete"
METRICS_FILE = "metrics.json"
RECIPE_FILE = "recipe.yaml"
OUTPUT_MARKER = ".rlhf-output"
# What earlier rlhf versions left in their outputs (before the marker existed).
LEGACY_OUTPUT_FILES = (METRICS_FILE, "eval.json", "compress_report.json", "top_tokens.json", "lineage.json")
_held_locks: dict[str, FileLock] = {}
_started: dict[Path, Path] = {}  # final output dir → its .incomplete, for stages started and not finished


def is_rlhf_output(path: str | Path) -> bool:
    """Whether `path` is a folder rlhf wrote (so rlhf may replace it)."""
    path = Path(path)
    return any((path / name).exists() for name in (OUTPUT_MARKER, *LEGACY_OUTPUT_FILES))


def finished_stage(path: str | Path) -> dict[str, Any] | None:
    """The metrics.json of a training stage's finished output at `path` (None when it is not one)."""
    try:
        metrics = json.loads((Path(path) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and "stage" in metrics else None


def check_output_dir(
    output_dir: str | Path,
    field: str = "output_dir",
    inputs: tuple[str, ...] = (),
    writer: str | None = None,
    recipe_file: str | None = None,
    overwrite: bool = False,
) -> None:
    """Refuse an output folder rlhf would have to delete or overwrite without owning it, before anything loads.

    `writer` (a stage or command name) also protects finished training outputs: a command never
    replaces one, and a stage replaces only its own recipe's output unless `overwrite` is set.
    """
    path = Path(output_dir).expanduser()
    resolved = path.resolve()
    if resolved == Path(resolved.anchor) or resolved in (Path.cwd().resolve(), Path.home().resolve()):
        raise RecipeError(f"{field}: {str(output_dir)!r} is not a folder rlhf can write into; name a new folder.")
    if any(resolved == Path(source).resolve() for source in inputs):
        raise RecipeError(f"{field}: {str(output_dir)!r} is the input directory; write the result to a new directory.")
    for folder in (path, incomplete_dir(path)):
        if folder.is_file() or (folder.is_dir() and any(folder.iterdir()) and not is_rlhf_output(folder)):
            raise RecipeError(
                f"{field}: {str(folder)!r} exists and was not written by rlhf; rlhf would replace it, so it "
                "refuses. Choose a new folder, or move your files away."
            )
    written = finished_stage(path) if writer else None
    if written is None or overwrite:
        return
    source = written.get("recipe_file")
    same_recipe = recipe_file is not None and (source is None or source == str(Path(recipe_file).resolve()))
    if written["stage"] != writer or not same_recipe:
        origin = f" from {source}" if source else ""
        fix = "pass --overwrite_output_dir true to replace it" if recipe_file else "write to a new folder"
        raise RecipeError(
            f"{field}: {str(output_dir)!r} holds a finished {written['stage']} output{origin}; rlhf will not "
            f"overwrite it. Choose another {field}, or {fix}."
        )


def _lock_path(output_dir: Path) -> Path:
    # Hidden, beside the output: the lock file outlives its holder (filelock never deletes it safely).
    return output_dir.with_name(f".{output_dir.name}.lock")


@contextmanager
def output_lock(output_dir: str | Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside `output_dir` for the block; a second holder fails at once, naming the first."""
    acquire_output_lock(output_dir)
    try:
        yield
    finally:
        release_output_lock(output_dir)


def acquire_output_lock(output_dir: str | Path) -> None:
    """Take `.<name>.lock` beside `output_dir` (non-blocking) and record who holds it; RecipeError when another run does."""
    path = Path(output_dir)
    if str(path) in _held_locks:
        return  # this process holds it already (a stage rerun in the same process after an error)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(_lock_path(path), timeout=0)
    holder_file = _lock_path(path).with_suffix(".json")
    try:
        lock.acquire()
    except Timeout:
        holder = json.loads(holder_file.read_text()) if holder_file.exists() else {}
        raise RecipeError(
            f"output_dir: {str(path)!r} is being written by another run (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}: {holder.get('command', '?')}, since {holder.get('since', '?')}); "
            "wait for it to finish or choose another output_dir."
        ) from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300]}
    holder["since"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(holder_file, holder)
    _held_locks[str(path)] = lock


def release_output_lock(output_dir: str | Path) -> None:
    """Release a lock taken by acquire_output_lock in this process (no-op if none)."""
    lock = _held_locks.pop(str(Path(output_dir)), None)
    if lock is not None:
        _lock_path(Path(output_dir)).with_suffix(".json").unlink(missing_ok=True)
        lock.release()


def incomplete_dir(output_dir: str | Path) -> Path:
    """Where a stage writes while it runs."""
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + INCOMPLETE_SUFFIX)


def _readable_like_other_files(folder: Path) -> None:
    """Give safetensors files the mode any new file gets (0o666 less the umask).

    safetensors 0.8 writes through a temporary file created 0o600 and renames it into place, so
    model.safetensors ends up readable by its owner alone while config.json beside it is not
    (safetensors/safetensors#782): another user, or a container user, cannot load the model.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*.safetensors"):
        if path.is_file() and path.stat().st_mode & 0o777 == 0o600:
            path.chmod(0o666 & ~umask)


def move_into_place(tmp: Path, final: Path) -> None:
    """Atomically replace `final` with the finished `tmp` (same filesystem, so a rename)."""
    check_output_dir(final)  # also checked before the run; the folder may have changed since
    _readable_like_other_files(tmp)
    replaced = final.with_name(final.name + ".replaced")
    if final.exists():
        if replaced.exists():
            shutil.rmtree(replaced)
        os.replace(final, replaced)
    os.replace(tmp, final)
    if replaced.exists():
        shutil.rmtree(replaced)


@contextmanager
def atomic_output_dir(output_dir: str | Path) -> Iterator[Path]:
    """Yield a scratch directory that becomes `output_dir` only if the block finishes."""
    check_output_dir(output_dir)
    with output_lock(output_dir):
        tmp = incomplete_dir(output_dir)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        (tmp / OUTPUT_MARKER).touch()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written output behind
            raise
        move_into_place(tmp, Path(output_dir))


def start_stage(training_args: Any) -> tuple[Path, str | None]:
    """Point the trainer at the scratch directory; return (final output dir, checkpoint to resume from)."""
    final = Path(training_args.output_dir)
    check_output_dir(final)
    if int(os.environ.get("RANK", "0")) == 0:  # one lock per run, held by its main process until finish_stage
        acquire_output_lock(final)
    tmp = incomplete_dir(final)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / OUTPUT_MARKER).touch()
    training_args.output_dir = str(tmp)
    _started[final] = tmp
    resume = training_args.resume_from_checkpoint or last_complete_checkpoint(tmp)
    same_checkpoint_on_every_process(resume, final)
    return final, resume


def same_checkpoint_on_every_process(resume: str | None, final: Path) -> None:
    """Under a multi-process launch, refuse to start unless every process resumes from the same checkpoint (or none).

    Each machine looks in its own `<output_dir>.incomplete`. Without a filesystem they share, machine 0 finds
    the checkpoints its main process wrote and the other machines find none: their processes would start at
    different steps and wait for each other in the first collective (or train on from different weights).
    A collective itself: called by every process (the launcher's process group exists once the training
    arguments are built).
    """
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()) or distributed.get_world_size() == 1:
        return
    found = resume if resume and Path(resume).is_dir() else None
    views: list[Any] = [None] * distributed.get_world_size()
    distributed.all_gather_object(views, (socket.gethostname(), found))
    # The step is what must agree (`checkpoint-N`); machines with their own disks may mount output_dir elsewhere.
    if len({Path(checkpoint).name if checkpoint else None for _, checkpoint in views}) == 1:
        return
    ranks: dict[tuple[str, str | None], list[str]] = {}
    for rank, view in enumerate(views):
        ranks.setdefault(tuple(view), []).append(str(rank))
    seen = "; ".join(f"rank {','.join(r)} on {host}: {path or 'none'}" for (host, path), r in ranks.items())
    raise RecipeError(
        f"output_dir: the processes of this launch would resume {final} from different checkpoints ({seen}). "
        "Machines that do not share output_dir's filesystem each see only their own files; resuming a run over "
        "several machines needs output_dir on a filesystem they all share. To start over instead, delete "
        f"{incomplete_dir(final)} on every machine."
    )


def abandon_started_stages() -> str | None:
    """After a stage failed: delete its `.incomplete` unless it holds a checkpoint to resume from; free its lock.

    A run that fails before its first checkpoint (a bad setting found late, a crash, Ctrl-C, SIGTERM)
    leaves nothing behind; one with checkpoints keeps them, so the same command resumes. Returns the
    checkpoint it resumes from (None when none was kept).
    """
    kept = None
    for final, tmp in list(_started.items()):
        _started.pop(final)
        if int(os.environ.get("RANK", "0")) != 0:
            continue
        checkpoint = last_complete_checkpoint(tmp) if tmp.is_dir() else None
        if tmp.is_dir() and checkpoint is None and is_rlhf_output(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        kept = checkpoint or kept
        release_output_lock(final)
    return kept


FAILURE_HOOKS.append(abandon_started_stages)


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest `checkpoint-N/` that finished writing (None if there is none).

    Trainers write `trainer_state.json` last, so a checkpoint killed mid-write lacks it or holds a
    truncated copy; such a folder is skipped, never resumed from.
    """
    checkpoints = sorted(
        (p for p in Path(folder).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for checkpoint in checkpoints:
        try:
            for state_file in checkpoint.glob("*.json"):
                json.loads(state_file.read_text())
            if (checkpoint / "trainer_state.json").exists():
                return str(checkpoint)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return None


def write_json(path: str | Path, data: Any) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.write("\n")


def nonfinite_weight(folder: str | Path) -> str | None:
    """The first weight in a folder's safetensors files that holds NaN or ±inf, as 'file: name' (None if none)."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                if not torch.isfinite(weights.get_tensor(name)).all():
                    return f"{path.name}: {name}"
    return None


def with_whole_run_figures(metrics: dict[str, Any], log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """After a resume, report the whole run: the Trainer's own train_loss averages only this run's steps.

    The logged losses (each the mean over its logging interval, kept in the resumed trainer state)
    are weighted by their interval; this run's figures stay under `train_this_run`.
    """
    logged = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    train = dict(metrics.get("train") or {})
    if not logged or "train_loss" not in train:
        return metrics
    steps = [step for step, _ in logged]
    intervals = [step - previous for previous, step in zip([0, *steps[:-1]], steps)]
    whole = sum(loss * n for (_, loss), n in zip(logged, intervals)) / max(1, sum(intervals))
    return {**metrics, "train": {**train, "train_loss": whole}, "train_this_run": train}


def finish_stage(trainer: Any, recipe: Any, metrics: dict[str, Any], final: Path) -> Path:
    """Save model, tokenizer, trainer state, metrics.json and the resolved recipe; then publish.

    Called on every process: saving gathers FSDP/ZeRO-3 shards collectively, then only the main
    process writes files and renames; the others wait, so on return `final` exists on every rank that
    sees the main process's filesystem (on several machines without a shared one: machine 0 only).
    A model with NaN/inf weights is refused: the `.incomplete` folder and its checkpoints stay.
    """
    tmp = Path(trainer.args.output_dir)
    if getattr(trainer, "is_fsdp_enabled", False):
        # Trainer.save_model writes no weights under SHARDED_STATE_DICT; the output must be one loadable checkpoint.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(tmp))
    metrics = {**metrics, "world_size": trainer.accelerator.num_processes}
    # Health alarms of the run (rlhf.callbacks.HealthCallback), for metrics.json and the reports.
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", [])
    events = [event for callback in callbacks for event in getattr(callback, "health_events", [])]
    if events:
        metrics["health_events"] = events
    if trainer.accelerator.is_main_process:
        # The last guard against a diverged run that no earlier check caught: never publish broken weights.
        broken = nonfinite_weight(tmp)
        if broken is not None:
            raise RecipeError(
                f"the trained model has NaN/inf weights ({broken}), so it is not published as {final}; training "
                f"diverged. {tmp} keeps its checkpoints; lower learning_rate and remove that folder to start over."
            )
        trainer.save_state()
        for checkpoint in tmp.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
        # Pickled arguments are unsafe to load; the resolved recipe below records the same settings.
        (tmp / "training_args.bin").unlink(missing_ok=True)
        if metrics.get("resumed_from"):
            metrics = with_whole_run_figures(metrics, trainer.state.log_history)
        recipe_file = str(Path(recipe.path).resolve()) if recipe.path else None
        write_json(tmp / METRICS_FILE, {"stage": recipe.stage, "recipe_file": recipe_file, **metrics})
        with open(tmp / RECIPE_FILE, "w") as handle:
            # A token must never land in a file that gets uploaded.
            yaml.safe_dump({k: v for k, v in recipe.resolved.items() if k != "hub_token"}, handle, sort_keys=False)
        move_into_place(tmp, final)
        _started.pop(final, None)
        # push_to_hub: upload the finished output once; the token lives on the Recipe, never in trainer.args.
        publish_if_requested(final, trainer.args, token=recipe.hub_token)
        release_output_lock(final)
    trainer.accelerator.wait_for_everyone()
    return final


def read_metrics(output_dir: str | Path) -> dict[str, Any]:
    """The metrics.json of a finished stage."""
    with open(Path(output_dir) / METRICS_FILE) as handle:
        return json.load(handle)

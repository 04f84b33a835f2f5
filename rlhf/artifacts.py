"""Stage outputs: written to `<output_dir>.incomplete`, renamed to `<output_dir>` only when complete.

A directory named exactly `output_dir` is therefore always a finished stage; a killed run leaves
only the `.incomplete` folder, whose Trainer checkpoints the next run resumes from.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from rlhf.publish import publish_if_requested

INCOMPLETE_SUFFIX = ".incomplete"
METRICS_FILE = "metrics.json"
RECIPE_FILE = "recipe.yaml"


def incomplete_dir(output_dir: str | Path) -> Path:
    """Where a stage writes while it runs."""
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + INCOMPLETE_SUFFIX)


def move_into_place(tmp: Path, final: Path) -> None:
    """Atomically replace `final` with the finished `tmp` (same filesystem, so a rename)."""
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
    tmp = incomplete_dir(output_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written output behind
        raise
    move_into_place(tmp, Path(output_dir))


def start_stage(training_args: Any) -> tuple[Path, str | None]:
    """Point the trainer at the scratch directory; return (final output dir, checkpoint to resume from)."""
    final = Path(training_args.output_dir)
    tmp = incomplete_dir(final)
    tmp.mkdir(parents=True, exist_ok=True)
    training_args.output_dir = str(tmp)
    resume = training_args.resume_from_checkpoint or last_complete_checkpoint(tmp)
    return final, resume


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


def finish_stage(trainer: Any, recipe: Any, metrics: dict[str, Any], final: Path) -> Path:
    """Save model, tokenizer, trainer state, metrics.json and the resolved recipe; then publish.

    Called on every process: saving gathers FSDP/ZeRO-3 shards collectively, then only the main
    process writes files and renames; the others wait, so on return `final` exists on every rank.
    """
    tmp = Path(trainer.args.output_dir)
    if getattr(trainer, "is_fsdp_enabled", False):
        # Trainer.save_model writes no weights under SHARDED_STATE_DICT; the output must be one loadable checkpoint.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(tmp))
    metrics = {**metrics, "world_size": trainer.accelerator.num_processes}
    if trainer.accelerator.is_main_process:
        trainer.save_state()
        for checkpoint in tmp.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
        # Pickled arguments are unsafe to load; the resolved recipe below records the same settings.
        (tmp / "training_args.bin").unlink(missing_ok=True)
        write_json(tmp / METRICS_FILE, {"stage": recipe.stage, **metrics})
        with open(tmp / RECIPE_FILE, "w") as handle:
            # A token must never land in a file that gets uploaded.
            yaml.safe_dump({k: v for k, v in recipe.resolved.items() if k != "hub_token"}, handle, sort_keys=False)
        move_into_place(tmp, final)
        publish_if_requested(final, trainer.args)  # push_to_hub: upload the finished output once
    trainer.accelerator.wait_for_everyone()
    return final


def read_metrics(output_dir: str | Path) -> dict[str, Any]:
    """The metrics.json of a finished stage."""
    with open(Path(output_dir) / METRICS_FILE) as handle:
        return json.load(handle)

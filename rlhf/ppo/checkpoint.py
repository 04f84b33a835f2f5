"""PPO checkpoints: `checkpoint-<update>/` folders written by `Accelerator.save_state`, trainer_state.json last.

A folder holds the policy + value weights (safetensors), optimizer, scheduler, each process's RNG
state, and `ppo_state.json`: the small state of the KL controller, health alarms and prompt order.
Those go to JSON, not to accelerate's `register_for_checkpointing`, whose `custom_checkpoint_*.pkl`
files are unpickled with `weights_only=False` on resume, so a tampered checkpoint could run code.
`rlhf.artifacts.last_complete_checkpoint` resumes only from a folder whose trainer_state.json
parses, so that file is written after everything else.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from accelerate import Accelerator
from transformers import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from rlhf.artifacts import write_json
from rlhf.config import RecipeError

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
PPO_STATE_FILE = "ppo_state.json"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def save_checkpoint(
    accelerator: Accelerator,
    state: TrainerState,
    output_dir: str,
    save_total_limit: int | None,
    objects: Mapping[str, Stateful] | None = None,
) -> Path:
    """Write `checkpoint-<global_step>/` (called on every process) and delete the oldest beyond the limit.

    `objects` (name → object with JSON-safe `state_dict`/`load_state_dict`) go to ppo_state.json.
    """
    folder = Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        write_json(folder / PPO_STATE_FILE, {name: obj.state_dict() for name, obj in (objects or {}).items()})
    accelerator.wait_for_everyone()  # every process's RNG file is in place before the folder counts as complete
    if accelerator.is_main_process:
        state.save_to_json(str(folder / TRAINER_STATE_FILE))
        rotate_checkpoints(output_dir, save_total_limit)
    accelerator.wait_for_everyone()
    return folder


def load_checkpoint(
    accelerator: Accelerator, state: TrainerState, folder: str | Path, objects: Mapping[str, Stateful] | None = None
) -> None:
    """Restore what `save_checkpoint` wrote into the prepared objects, `objects` and `state` (step, epoch, logs)."""
    folder = Path(folder)
    saved_objects: dict[str, Any] = {}
    if objects:
        if not (folder / PPO_STATE_FILE).is_file():
            raise RecipeError(
                f"resume: {folder} has no {PPO_STATE_FILE} (an older rlhf pickled that state, which is unsafe to "
                "load); remove the checkpoint folder to start that stage over."
            )
        saved_objects = json.loads((folder / PPO_STATE_FILE).read_text())
    # safetensors' strict load_model: missing or unexpected weights raise; tied weights are understood.
    accelerator.load_state(str(folder))
    for name, obj in (objects or {}).items():
        obj.load_state_dict(saved_objects[name])
    saved = TrainerState.load_from_json(str(folder / TRAINER_STATE_FILE))
    state.global_step, state.epoch, state.log_history = saved.global_step, saved.epoch, saved.log_history
    logger.info("resumed PPO from %s at update %d", folder, state.global_step)

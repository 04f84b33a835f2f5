"""PPO checkpoints: `checkpoint-<update>/` folders written by `Accelerator.save_state`, trainer_state.json last.

A folder holds the policy + value weights (safetensors), optimizer, scheduler, each process's RNG
state and the objects registered with `accelerator.register_for_checkpointing` (KL controller,
health monitor, data position). `rlhf.artifacts.last_complete_checkpoint` resumes only from a
folder whose trainer_state.json parses, so that file is written after everything else.
"""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import Accelerator
from transformers import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"


def save_checkpoint(
    accelerator: Accelerator, state: TrainerState, output_dir: str, save_total_limit: int | None
) -> Path:
    """Write `checkpoint-<global_step>/` (called on every process) and delete the oldest beyond the limit."""
    folder = Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()  # every process's RNG file is in place before the folder counts as complete
    if accelerator.is_main_process:
        state.save_to_json(str(folder / TRAINER_STATE_FILE))
        rotate_checkpoints(output_dir, save_total_limit)
    accelerator.wait_for_everyone()
    return folder


def load_checkpoint(accelerator: Accelerator, state: TrainerState, folder: str | Path) -> None:
    """Restore what `save_checkpoint` wrote into the prepared objects and `state` (step, epoch, log history)."""
    # safetensors' strict load_model: missing or unexpected weights raise; tied weights are understood.
    accelerator.load_state(str(folder))
    saved = TrainerState.load_from_json(str(Path(folder) / TRAINER_STATE_FILE))
    state.global_step, state.epoch, state.log_history = saved.global_step, saved.epoch, saved.log_history
    logger.info("resumed PPO from %s at update %d", folder, state.global_step)

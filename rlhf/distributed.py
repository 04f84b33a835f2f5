"""What a stage needs to run the same on one process or many (DDP, FSDP, DeepSpeed via `accelerate launch`).

Trainers already shard the data, average gradients and log on the main process; rlhf.artifacts
saves once. Two gaps remain, filled here: evaluating before training must not leave the model
unwrapped for DDP, and the process group must be torn down before the interpreter exits.
"""

from __future__ import annotations

import sys
from typing import Any


def evaluate_before_training(trainer: Any, **kwargs: Any) -> dict[str, float]:
    """`trainer.evaluate(metric_key_prefix="eval_before")`, leaving the model ready to be wrapped by train().

    Trainer.evaluate() before train() prepares the bare model in accelerate's evaluation mode and
    flags it as prepared; train() then skips the DistributedDataParallel wrap, so every rank
    trains on its own gradients and the replicas drift apart (seen with transformers 5.23 /
    accelerate 1.15 on 2 gloo processes). Undo the flag so train() wraps the model as usual.
    """
    metrics = trainer.evaluate(metric_key_prefix="eval_before", **kwargs)
    model, accelerator = trainer.model, trainer.accelerator
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    if accelerator.num_processes > 1 and not sharded and trainer.model_wrapped is model:
        if getattr(model, "_is_accelerate_prepared", False):
            del model._is_accelerate_prepared
        if model in accelerator._models:
            accelerator._models.remove(model)
    return metrics


def shutdown_distributed() -> None:
    """Destroy the process group a launcher started (no-op in one process); without it a rank may SIGABRT at exit."""
    torch_distributed = sys.modules.get("torch.distributed")  # never import torch just to find nothing to do
    if torch_distributed is not None and torch_distributed.is_available() and torch_distributed.is_initialized():
        torch_distributed.destroy_process_group()

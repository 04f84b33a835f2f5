"""What a stage needs to run the same on one process or many (DDP, FSDP, DeepSpeed via `accelerate launch`).

Trainers already shard the data, average gradients and log on the main process; rlhf.artifacts
saves once. Three gaps remain, filled here: evaluating before training must not leave the model
unwrapped for DDP nor fail under FSDP2; an FSDP launch on a machine without GPUs must shard over
gloo instead of falling back to DDP; and the process group must be torn down before the
interpreter exits.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

_said: set[str] = set()


def say_once(message: str, key: str | None = None, stream: TextIO | None = None) -> None:
    """Print `message` (to stdout, or `stream`) once per process and `key` (default: the message itself), and
    only on the main process of a multi-process launch. The pipeline's pre-flight and then the stage read
    the same data and checkpoints in one process: a note about them is worth one line, not two."""
    key = message if key is None else key
    if key not in _said and os.environ.get("RANK", "0") == "0":
        _said.add(key)
        print(message, file=stream or sys.stdout, flush=True)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX, as oneDNN reports): there bf16 matmuls
    run ~2.2× faster than fp32 (measured on a 2-core AVX512-BF16 machine); elsewhere torch emulates them, slower."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN
        return False


def _log_beside_output(trainer: Any) -> None:
    """TensorBoardCallback picks its folder in on_train_begin; a log before that would open ./runs in the cwd."""
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.integration_utils import default_logdir

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and getattr(callback, "logging_dir", None) is None:
            callback.logging_dir = os.path.join(trainer.args.output_dir, default_logdir())


def evaluate_before_training(trainer: Any, **kwargs: Any) -> dict[str, float]:
    """`trainer.evaluate(metric_key_prefix="eval_before")`, leaving the model ready to be wrapped by train().

    Trainer.evaluate() before train() prepares the bare model in accelerate's evaluation mode and
    flags it as prepared; train() then skips the DistributedDataParallel wrap, so every rank
    trains on its own gradients and the replicas drift apart (seen with transformers 5.23 /
    accelerate 1.15 on 2 gloo processes). Undo the flag so train() wraps the model as usual.
    Under FSDP2 the model is sharded first, as train() would (see shard_for_training); under DeepSpeed
    ZeRO-3 the inference engine evaluate() builds is dropped, so train() builds its training engine.
    (ZeRO-2 cannot evaluate before training: transformers' evaluate() refuses ZeRO inference below stage 3.)
    """
    if trainer.accelerator.is_fsdp2:
        shard_for_training(trainer)
    _log_beside_output(trainer)
    metrics = trainer.evaluate(metric_key_prefix="eval_before", **kwargs)
    model, accelerator = trainer.model, trainer.accelerator
    if getattr(trainer, "is_deepspeed_enabled", False) and trainer.model_wrapped is not model:
        # evaluate() wrapped the model in a ZeRO-3 *inference* engine; train() would keep it and never build
        # its training engine (backward then fails on accelerate's missing engine). Hand train() the bare model.
        if trainer.model_wrapped in accelerator._models:
            accelerator._models.remove(trainer.model_wrapped)
        trainer.model_wrapped, trainer.deepspeed = model, None
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    if accelerator.num_processes > 1 and not sharded and trainer.model_wrapped is model:
        if getattr(model, "_is_accelerate_prepared", False):
            del model._is_accelerate_prepared
        if model in accelerator._models:
            accelerator._models.remove(model)
    return metrics


def shard_for_training(trainer: Any) -> None:
    """Under FSDP2, shard the trainer's model now, exactly as train() begins: optimizer first, then both prepared.

    accelerate shards an FSDP2 model only together with its optimizer (whose parameters it swaps for
    the shards), so Trainer.evaluate() on a model not yet trained raises in Accelerator.prepare
    (transformers 5.23, huggingface/transformers#48841; on GPUs too). train() then finds the model
    sharded (accelerate leaves an FSDPModule as it is), reshards it after the evaluation's forward
    passes, and keeps the optimizer it already has.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(trainer.model, FSDPModule):
        return
    trainer.create_optimizer()
    trainer.model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.model_wrapped = trainer.model


def shard_over_gloo_when_launched_with_fsdp() -> None:
    """Make `accelerate launch` with an FSDP config shard over the gloo group on a machine without GPUs.

    Call only for a CPU multi-process run (rlhf.recipe does, when it sets use_cpu), before the
    Trainer builds its Accelerator. accelerate 1.15 turns a run into FSDP only when it runs on
    accelerator devices (MULTI_GPU, MULTI_XPU, ...; state.py, AcceleratorState.__init__); on CPU
    the state stays MULTI_CPU and the run is silently plain DDP, though torch's fully_shard works
    on gloo. After accelerate builds its state, this switches a MULTI_CPU state that was given an
    FSDP plugin to FSDP, as accelerate does for GPUs. Installed once per process; a no-op unless
    ACCELERATE_USE_FSDP is set (which `accelerate launch` does for `distributed_type: FSDP`).
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState.__init__, "shards_over_gloo", False):
        return
    accelerate_init = AcceleratorState.__init__

    def init_then_shard_over_gloo(self: Any, *args: Any, **kwargs: Any) -> None:
        accelerate_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
            # The same three steps accelerate takes for GPUs (AcceleratorState.__init__).
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.distributed_type = DistributedType.FSDP  # self.__dict__ is the shared state
            self.fsdp_plugin = plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init_then_shard_over_gloo.shards_over_gloo = True  # type: ignore[attr-defined]
    AcceleratorState.__init__ = init_then_shard_over_gloo  # type: ignore[method-assign]


def shutdown_distributed() -> bool:
    """Destroy the process group a launcher started (no-op in one process); without it a rank may SIGABRT at exit.

    Returns whether there was one."""
    torch_distributed = sys.modules.get("torch.distributed")  # never import torch just to find nothing to do
    if torch_distributed is not None and torch_distributed.is_available() and torch_distributed.is_initialized():
        torch_distributed.destroy_process_group()
        return True
    return False


def shard_frozen_model(accelerator: Any, model: Any) -> Any:
    """Shard an inference-only model (a PPO reference or reward model) with FSDP2, as accelerate shards trained ones.

    Each of the model's own `_no_split_modules` layers becomes a group, the rest the root's, with the
    launch config's settings (accelerate's `fsdp2_prepare_model`, which also gives ranks that loaded
    empty weights under `fsdp_cpu_ram_efficient_loading` rank 0's). The config names the layer classes
    of the trained model; a reward model of another family (an encoder) has its own, so they are set
    per model here. Every group reshards after its forward: nothing is kept gathered between uses.
    """
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    trained_model_wrapping = plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap
    plugin.auto_wrap_policy = transformer_auto_wrap_policy
    plugin.transformer_cls_names_to_wrap = list(getattr(model, "_no_split_modules", None) or [])
    try:
        model = fsdp2_prepare_model(accelerator, model)
    finally:
        plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = trained_model_wrapping
    model.set_reshard_after_forward(True)
    model.eval()
    model.requires_grad_(False)
    return model


@contextmanager
def gathered_weights(model: Any) -> Iterator[None]:
    """Inside: every FSDP2 group of `model` holds its whole weights, and forward passes run without collectives.

    Generation runs as many forward passes as its longest sequence needs, which differs between
    ranks; a per-layer all-gather in each would leave the ranks waiting for each other. So all
    groups are gathered once (every rank, the same order), kept gathered after each forward, and
    resharded on exit with their own reshard-after-forward setting back. A no-op for a model that
    is not sharded.
    """
    from torch.distributed.fsdp import FSDPModule

    groups = [module for module in model.modules() if isinstance(module, FSDPModule)]
    if groups:
        # FSDP2 takes the first group to run forward as the root; a submodule's forward (generate on the
        # policy inside a policy + value root) must not be that first one.
        groups[0]._get_fsdp_state()._lazy_init()
    # FSDP2 has no public getter for a group's setting: read it where set_reshard_after_forward writes it.
    reshards = [
        any(group.post_forward_mesh_info is not None for group in module._get_fsdp_state()._fsdp_param_groups)
        for module in groups
    ]
    for module in groups:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for module, reshard in zip(groups, reshards):
            module.set_reshard_after_forward(reshard, recurse=False)
            module.reshard()

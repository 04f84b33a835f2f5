"""`rlhf plan RECIPE`: the per-device memory a training stage needs, before anything loads or runs.

The command's own text (what it reads and assumes) is `rlhf plan --help`: the docstring of `rlhf.plan.cli`.
Modules, in the order a plan is made:

    parallelism  Parallelism: DDP, FSDP2, DeepSpeed ZeRO-2/3 and offload, read from an accelerate config file
    workload     Workload: batch, lengths and precision of one step, from the recipe over its config's defaults
    sizing       ModelShape: each model the stage holds, sized from its config on the meta device
    memory       MemoryPlan: bytes per device at each moment of a step (estimate), from a recipe (plan_values,
                 plan_recipe), and the largest batch that fits
    report       the plan as a table and a verdict (render)
    cli          `rlhf plan`'s flags and main
"""

from rlhf.plan.cli import PLAN_FLAGS, USAGE, machine_memory, main, parse_memory_size
from rlhf.plan.memory import (
    CPU_ACTIVATION_SLACK,
    CPU_RUNTIME_BYTES,
    DEEPSPEED_BUCKET_ELEMENTS,
    GPU_RUNTIME_BYTES,
    LOSS_BYTES_PER_LOGIT,
    GiB,
    MemoryPlan,
    estimate,
    largest_batch,
    plan_recipe,
    plan_values,
)
from rlhf.plan.parallelism import DISTRIBUTED_TYPES, Parallelism, read_accelerate_config
from rlhf.plan.report import render
from rlhf.plan.sizing import DTYPE_BYTES, ModelShape, model_roles, size_model
from rlhf.plan.workload import Workload, read_workload, training_config_class

__all__ = [
    "CPU_ACTIVATION_SLACK",
    "CPU_RUNTIME_BYTES",
    "DEEPSPEED_BUCKET_ELEMENTS",
    "DISTRIBUTED_TYPES",
    "DTYPE_BYTES",
    "GPU_RUNTIME_BYTES",
    "LOSS_BYTES_PER_LOGIT",
    "PLAN_FLAGS",
    "USAGE",
    "GiB",
    "MemoryPlan",
    "ModelShape",
    "Parallelism",
    "Workload",
    "estimate",
    "largest_batch",
    "machine_memory",
    "main",
    "model_roles",
    "parse_memory_size",
    "plan_recipe",
    "plan_values",
    "read_accelerate_config",
    "read_workload",
    "render",
    "size_model",
    "training_config_class",
]

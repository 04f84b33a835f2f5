"""What one step of a stage pushes through its models: batch, lengths and precision, from the recipe."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rlhf.config import RecipeError
from rlhf.registry import Stage


def training_config_class(stage: Stage) -> type:
    """The TrainingArguments subclass a stage's recipe is parsed into (the class its `parse` names)."""
    from transformers import TrainingArguments

    module = stage.module
    # The registry names modules, not config classes: the class is the one `parse` passes to parse_recipe.
    for name in stage.module.parse.__code__.co_names:
        candidate = getattr(module, name, None)
        if isinstance(candidate, type) and issubclass(candidate, TrainingArguments):
            return candidate
    raise RecipeError(f"stage {stage.name}: its parse() names no TrainingArguments class; the planner cannot read it.")


def _defaults(cls: type) -> dict[str, Any]:
    values = {}
    for item in dataclasses.fields(cls):
        if item.default is not dataclasses.MISSING:
            values[item.name] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            values[item.name] = item.default_factory()
    return values


@dataclass(frozen=True)
class Workload:
    """What one step of the stage pushes through the models, from the recipe (and its defaults)."""

    stage: str
    batch: int  # sequences per micro-batch (pairs count twice: chosen and rejected go through together)
    seq_len: int  # tokens per training sequence
    response_len: int = 0  # RL: generated tokens per sequence
    generation_batch: int = 0  # RL: sequences generated at once on a device
    scoring_batch: int = 0  # RL: sequences per no-grad scoring forward (log-probs, values)
    bf16: bool = False  # autocast: activations in 16 bits
    gradient_checkpointing: bool = False
    optimizer_states: float = 2.0  # AdamW: two moments per trainable parameter
    eager_attention: bool = False  # attention probabilities materialised (S² per head)
    lora_dropout_inputs: bool = False  # LoRA dropout keeps a copy of each adapted layer's input
    rollout_chunk: int = 0  # PPO: local_rollout_forward_batch_size
    steps_per_rollout: int = 1  # micro-batches per rollout (gradient accumulation / steps_per_generation)

    def with_batch(self, batch: int) -> Workload:
        """The same workload at another per-device batch (prompts, or pairs for preference stages)."""
        pairs = 2 if self.stage in ("reward", "dpo") else 1
        if self.stage == "ppo":
            chunk = min(self.rollout_chunk, batch * self.steps_per_rollout)
            return dataclasses.replace(self, batch=batch, generation_batch=chunk, scoring_batch=chunk)
        if self.generation_batch:
            return dataclasses.replace(
                self, batch=batch, generation_batch=batch * self.steps_per_rollout, scoring_batch=batch
            )
        return dataclasses.replace(self, batch=batch * pairs)


def _optimizer_states(name: str) -> float:
    name = name.lower()
    if "8bit" in name:
        return 0.5  # two 8-bit moments, counted in parameter-dtype units of 4 bytes below
    if "adafactor" in name or name.startswith("sgd"):
        return 0.0  # factored / no state: negligible
    if "lion" in name:
        return 1.0
    return 2.0


def read_workload(stage: Stage, values: dict[str, Any], device: str, prompt_length: int) -> Workload:
    """The batch, lengths and precision a stage runs with: recipe values over its config class's defaults."""
    get = {**_defaults(training_config_class(stage)), **values}.get
    on_gpu = device == "gpu"
    if get("fp16") is True and not on_gpu:
        raise RecipeError("fp16: true needs a GPU and this plan runs on CPU; remove it or pass a GPU --config.")
    # TRL configs leave bf16 unset and turn it on unless fp16 is (trl BaseConfig); rlhf.recipe turns both off on CPU
    # unless the recipe says bf16: true (autocast on a CPU with native bf16; rlhf.recipe refuses it elsewhere).
    bf16 = bool(get("bf16")) if get("bf16") is not None else (on_gpu and not get("fp16"))
    half = bf16 or bool(get("fp16"))
    # A recipe's own setting under either name (rlhf.recipe reads both); else the class default on a GPU, off on CPU.
    checkpointing = values.get("activation_checkpointing", values.get("gradient_checkpointing"))
    if checkpointing is None:
        checkpointing = get("gradient_checkpointing") if on_gpu else False
    checkpointing = bool(checkpointing)
    if stage.name == "ppo":
        checkpointing = False  # rlhf.ppo's trainer does not turn gradient checkpointing on
    batch = int(get("per_device_train_batch_size") or 8)
    common = {
        "stage": stage.name,
        "bf16": half,
        "gradient_checkpointing": checkpointing,
        "optimizer_states": _optimizer_states(str(get("optim") or "adamw_torch")),
        "eager_attention": get("attn_implementation") == "eager",
    }
    if stage.name == "ppo":
        response = int(get("response_length"))
        local = batch * int(get("gradient_accumulation_steps") or 1)
        chunk = min(int(get("local_rollout_forward_batch_size")), local)
        return Workload(
            batch=batch,
            seq_len=prompt_length + response,
            response_len=response,
            generation_batch=chunk,
            scoring_batch=chunk,
            rollout_chunk=int(get("local_rollout_forward_batch_size")),
            steps_per_rollout=int(get("gradient_accumulation_steps") or 1),
            **common,
        )
    if stage.name in ("grpo", "rloo"):
        completion = int(get("max_completion_length") or 256)
        steps = get("steps_per_generation") or get("gradient_accumulation_steps") or 1
        generation = int(get("generation_batch_size") or 0) or batch * int(steps)
        return Workload(
            batch=batch,
            seq_len=prompt_length + completion,
            response_len=completion,
            generation_batch=generation,
            scoring_batch=batch,
            steps_per_rollout=int(steps),
            **common,
        )
    length = int(get("max_length") or 1024)
    pairs = 2 if stage.data_format == "preference" else 1
    dropout = stage.name in ("pretrain", "sft", "reward") and float(values.get("lora_dropout", 0.05)) > 0
    return Workload(batch=batch * pairs, seq_len=length, lora_dropout_inputs=dropout, **common)

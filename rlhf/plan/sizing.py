"""The models a stage holds, each sized from its config on the meta device (no weights, no memory)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import SHARED_VALUE_HEAD, ModelArguments, RecipeError
from rlhf.gguf import gguf_checkpoint, is_gguf_source
from rlhf.registry import Stage

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """One model of a stage, sized from its config on the meta device."""

    role: str  # policy, value model, reference, reward model, teacher
    path: str
    head: str  # "causal" (a vocabulary head) or "score" (a one-number classifier head)
    trained: bool
    lora: bool
    parameters: int
    trainable: int  # parameters that get gradients and optimizer state
    block_parameters: int  # the largest repeated block (what FSDP/ZeRO-3 gather at once)
    root_parameters: int  # outside the blocks: embeddings, final norm, head (FSDP2's root unit)
    weight_bytes: float  # as loaded (model dtype; 1 / 0.5 for 8-/4-bit quantized loads)
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def _count(model: Any) -> tuple[int, int, int]:
    """(parameters, largest block, root) of a meta model; tied weights counted once."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    params = list(model.parameters())
    block = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    root = sum(p.numel() for p in params if id(p) not in in_blocks)
    return sum(p.numel() for p in params), block, root


def size_model(
    role: str, folder: str, head: str, trained: bool, model_args: ModelArguments, lora: bool, trust_remote_code: bool
) -> ModelShape:
    """Instantiate `folder`'s config on the meta device (accelerate's init_empty_weights) and count it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if head == "score":
        config.num_labels = 1
    auto = AutoModelForCausalLM if head == "causal" else AutoModelForSequenceClassification
    with init_empty_weights():
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    # under init_empty_weights transformers 5 leaves tied embeddings as two meta tensors: tie them again
    model.tie_weights()
    parameters, block, root = _count(model)
    trainable = parameters if trained else 0
    if trained and lora:
        from peft import get_peft_model
        from trl import get_peft_config

        peft_args = dataclasses.replace(model_args, lora_task_type="SEQ_CLS" if head == "score" else "CAUSAL_LM")
        with init_empty_weights():
            peft_model = get_peft_model(model, get_peft_config(peft_args))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        parameters = sum(p.numel() for p in peft_model.parameters())
    text = config.get_text_config()
    dtype = model_args.dtype
    if dtype in ("auto", None):
        dtype = str(getattr(text, "dtype", None) or getattr(text, "torch_dtype", None) or "float32").replace(
            "torch.", ""
        )
    weight_bytes = 1.0 if model_args.load_in_8bit else 0.5 if model_args.load_in_4bit else DTYPE_BYTES.get(dtype, 4)
    heads = getattr(text, "num_attention_heads", 1)
    hidden = text.hidden_size
    return ModelShape(
        role=role,
        path=folder,
        head=head,
        trained=trained,
        lora=lora and trained,
        parameters=parameters,
        trainable=trainable,
        block_parameters=block,
        root_parameters=root,
        weight_bytes=weight_bytes,
        hidden=hidden,
        layers=text.num_hidden_layers,
        intermediate=getattr(text, "intermediate_size", None) or 4 * hidden,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // heads,
        vocab=text.vocab_size,
    )


# ------------------------------------------------------------------------------------------- recipe
def _locate(path: str, resolve: Callable[[str], str | None] | None) -> str:
    if is_gguf_source(path):
        return gguf_checkpoint(path)
    if resolve is not None:
        found = resolve(path)
        if found:
            return found
    if (Path(path) / "config.json").is_file():
        return path
    if not path.startswith((".", "/", "~")) and path.count("/") <= 1:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
        if isinstance(cached, str):
            return str(Path(cached).parent)
    raise RecipeError(
        f"model_name_or_path: no config.json at {path!r} (nor in the Hub cache); the planner reads the model's "
        "config: point it at a checkpoint folder, or a folder holding only its config.json."
    )


def model_roles(stage: Stage, values: dict[str, Any], lora: bool) -> list[tuple[str, str, str, bool, bool]]:
    """(role, model path, head, trained, with LoRA) of every model the stage holds, by the registry's copy counts."""
    policy = str(values["model_name_or_path"])
    name = "policy" if stage.trained_copies > 1 or stage.frozen_copies else "model"
    roles = [(name, policy, "score" if stage.name == "reward" else "causal", True, lora)]
    # PPO's value model (fully trained, no adapters): value, else reward, else policy; `shared` (the default for a
    # LoRA policy): a head on the policy's own backbone, one scalar per token, nothing to plan beside the policy.
    shared = values.get("value_model_path") == SHARED_VALUE_HEAD or (lora and not values.get("value_model_path"))
    if stage.trained_copies > 1 and not shared:
        value = values.get("value_model_path") or values.get("reward_model_path") or policy
        roles.append(("value model", str(value), "score", True, False))
    frozen = stage.frozen_copies
    if stage.name == "distill":
        roles.append(("teacher", str(values.get("teacher_model_name_or_path") or policy), "causal", False, False))
        frozen -= 1
    if frozen and not (lora and stage.reference_is_policy_under_lora):
        if stage.name in ("grpo", "rloo") and float(values.get("beta", 0.0) or 0.0) == 0.0:
            pass  # TRL loads no reference when beta is 0
        else:
            roles.append(("reference", policy, "causal", False, False))
    if values.get("reward_model_path"):
        roles.append(("reward model", str(values["reward_model_path"]), "score", False, False))
    return roles

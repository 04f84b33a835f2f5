"""`rlhf plan RECIPE`: the per-device memory a training stage needs, before anything loads or runs.

    rlhf plan recipes/tiny/ppo.yaml
    rlhf plan recipes/qwen/ppo.yaml --config accelerate_configs/fsdp.yaml --num-processes 8 --device-memory 80GB

Parameter counts come from each model's config, instantiated on the meta device (no weights, no
memory); LoRA's trainable count from peft on that meta model. The bytes per parameter follow the
parallelism the accelerate config file names (DDP, FSDP2 full shard, DeepSpeed ZeRO-2/3, CPU
offload); activations, loss logits and the rollout KV cache follow the recipe's batch and lengths.
The peak is the largest of a few moments of a step (forward/backward, optimizer step, rollout),
each listed item by item. On CPU, "device memory" is the resident memory (RSS) of one process
beyond what Python, torch, transformers and trl take by themselves (~0.6 GB, not counted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf.config import (
    SHARED_VALUE_HEAD,
    ModelArguments,
    RecipeError,
    check_known_keys,
    field_types,
    parse_overrides,
    read_recipe_file,
)
from rlhf.gguf import gguf_checkpoint, is_gguf_source
from rlhf.registry import Stage, stage_named

GiB = 2**30
# A process's memory on the device that holds no tensor: CUDA context, cuBLAS/NCCL workspaces,
# caching-allocator slack (an assumption from common practice; not measurable on this CPU machine).
GPU_RUNTIME_BYTES = 1 * GiB
# On CPU, what a running stage holds beyond an idle process that imported the stage's modules (torch,
# transformers, trl's trainers): datasets, tokenizer, malloc arenas. Calibrated (with the two below)
# on three measured runs, the rest held out: benchmarks/plan_validation.py.
CPU_RUNTIME_BYTES = 30 * 2**20
# glibc keeps the activations' freed memory in its heap, so on CPU the gradients of a step do not reuse
# it (peak RSS = activations + all gradients) and RSS runs ~18% above the live activation tensors.
CPU_ACTIVATION_SLACK = 0.18
# Vocabulary-sized fp32 tensors alive at the loss, in bytes per logit (measured: SFT minus reward-model
# peak at equal tokens; the count by hand is 20: logits, log-softmax, a shifted copy for the token
# accuracy metric, two gradients). Used on GPU too: the same code runs there.
LOSS_BYTES_PER_LOGIT = 36
# DeepSpeed's defaults when accelerate builds the config from its YAML (no bucket sizes given):
# reduce_bucket_size = allgather_bucket_size = 5e8 elements.
DEEPSPEED_BUCKET_ELEMENTS = 5e8
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DISTRIBUTED_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU", "FSDP", "DEEPSPEED")


# --------------------------------------------------------------------------------------------- inputs
def parse_memory_size(text: str, flag: str = "--device-memory") -> int:
    """'80GB' / '80 GiB' / '512MB' → bytes (GB = 10⁹, GiB = 2³⁰)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B)\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise RecipeError(f"{flag}: got {text!r}; give a positive size with a unit, e.g. 80GB, 24GiB or 512MB.")
    unit = match.group(2).upper()
    power = "KMGT".index(unit[0]) + 1
    return int(float(match.group(1)) * (1024**power if "I" in unit else 1000**power))


@dataclass(frozen=True)
class Parallelism:
    """How the processes share a model, read from an accelerate config file."""

    strategy: str  # "single", "ddp", "fsdp2", "zero2", "zero3"
    num_processes: int
    device: str  # "gpu" or "cpu"
    mixed_precision: str = "no"  # the config's; the recipe's bf16/fp16 decide for Trainer-based stages
    offload_params: bool = False  # FSDP fsdp_offload_params, DeepSpeed offload_param_device: cpu
    offload_optimizer: bool = False  # DeepSpeed offload_optimizer_device: cpu (FSDP offloads both)
    activation_checkpointing: bool = False  # FSDP fsdp_activation_checkpointing
    source: str = "no --config"

    @property
    def label(self) -> str:
        name = {
            "single": "one process",
            "ddp": "DDP",
            "fsdp2": "FSDP2 full shard",
            "zero2": "ZeRO-2",
            "zero3": "ZeRO-3",
        }[self.strategy]
        offload = [w for w, on in (("params", self.offload_params), ("optimizer", self.offload_optimizer)) if on]
        offload_text = f", CPU offload of {' + '.join(offload)}" if offload else ""
        count = "" if self.strategy == "single" else f" on {self.num_processes} processes"
        return f"{name}{count}{offload_text}"


def _on_gpu_here() -> bool:
    import torch

    return torch.cuda.is_available()


def _read_deepspeed_json(config_path: Path, json_path: str) -> dict[str, Any]:
    """The YAML-style keys (zero_stage, offload devices) of the DeepSpeed JSON an accelerate config names.

    accelerate resolves the path from where it is launched; the planner also tries it beside the config's folder
    (accelerate_configs/zero3_cpu.yaml names accelerate_configs/zero3_cpu.json from the repository root)."""
    candidates = [Path(json_path), config_path.parent.parent / json_path, config_path.parent / json_path]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise RecipeError(
            f"--config: {config_path} names the DeepSpeed JSON {json_path!r} (deepspeed_config_file), which does not "
            "exist; run from the folder it is relative to, or fix the path."
        )
    from accelerate.utils.deepspeed import HfDeepSpeedConfig  # what accelerate itself reads it with

    try:
        deepspeed = HfDeepSpeedConfig(str(found))
    except (ValueError, AttributeError) as error:
        raise RecipeError(
            f"--config: {found} (deepspeed_config_file) is not a DeepSpeed JSON config ({error})."
        ) from None
    return {
        "zero_stage": deepspeed.get_value("zero_optimization.stage", 2),
        "offload_optimizer_device": str(deepspeed.get_value("zero_optimization.offload_optimizer.device", "none")),
        "offload_param_device": str(deepspeed.get_value("zero_optimization.offload_param.device", "none")),
    }


def read_accelerate_config(path: str | None, num_processes: int | None = None) -> Parallelism:
    """The Parallelism an `accelerate launch --config_file PATH` run would use (`num_processes` overrides)."""
    if num_processes is not None and num_processes < 1:
        raise RecipeError(f"--num-processes: got {num_processes}; give at least 1.")
    if path is None:
        n = num_processes or 1
        return Parallelism("ddp" if n > 1 else "single", n, "gpu" if _on_gpu_here() else "cpu")
    if not Path(path).is_file():
        raise RecipeError(
            f"--config: {path!r} not found; pass an accelerate config file, e.g. accelerate_configs/fsdp.yaml."
        )
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"--config: {path} is not valid YAML ({error}).") from None
    if not isinstance(config, dict) or "distributed_type" not in config:
        raise RecipeError(f"--config: {path} has no `distributed_type`; it is not an accelerate config file.")
    kind = str(config["distributed_type"])
    if kind not in DISTRIBUTED_TYPES:
        raise RecipeError(
            f"--config: distributed_type {kind!r} in {path} is not one the planner knows; "
            f"use one of {', '.join(DISTRIBUTED_TYPES)} (see accelerate_configs/)."
        )
    n = num_processes or int(config.get("num_processes") or 1)
    device = "cpu" if config.get("use_cpu") or kind == "MULTI_CPU" else "gpu"
    common = {"num_processes": n, "device": device, "mixed_precision": str(config.get("mixed_precision") or "no")}
    common["source"] = path
    if kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        if int(fsdp.get("fsdp_version", 1)) != 2 or str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")) not in (
            "FULL_SHARD",
            "1",
        ):
            raise RecipeError(
                f"--config: {path} asks for FSDP version {fsdp.get('fsdp_version', 1)}; the planner models FSDP2 full "
                "shard (`fsdp_version: 2`), as accelerate_configs/fsdp.yaml sets."
            )
        offload = bool(fsdp.get("fsdp_offload_params"))
        checkpointing = bool(fsdp.get("fsdp_activation_checkpointing"))
        return Parallelism(
            "fsdp2", **common, offload_params=offload, offload_optimizer=offload, activation_checkpointing=checkpointing
        )  # type: ignore[arg-type]
    if kind == "DEEPSPEED":
        ds = config.get("deepspeed_config") or {}
        if ds.get("deepspeed_config_file"):
            ds = _read_deepspeed_json(Path(path), str(ds["deepspeed_config_file"]))
        stage = int(ds.get("zero_stage", 2))
        if stage not in (2, 3):
            raise RecipeError(f"--config: zero_stage {stage} in {path}; the planner models ZeRO stages 2 and 3.")
        offload_optimizer = str(ds.get("offload_optimizer_device", "none")) in ("cpu", "nvme")
        offload_params = stage == 3 and str(ds.get("offload_param_device", "none")) in ("cpu", "nvme")
        return Parallelism(f"zero{stage}", **common, offload_params=offload_params, offload_optimizer=offload_optimizer)  # type: ignore[arg-type]
    return Parallelism("ddp" if n > 1 else "single", **common)  # type: ignore[arg-type]


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


# ------------------------------------------------------------------------------------------- models
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


# ------------------------------------------------------------------------------------------- workload
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
    for flag in ("bf16", "fp16"):
        if get(flag) is True and not on_gpu:
            raise RecipeError(f"{flag}: true needs a GPU and this plan runs on CPU; remove it or pass a GPU --config.")
    # TRL configs leave bf16 unset and turn it on unless fp16 is (trl BaseConfig); rlhf.recipe turns both off on CPU.
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


# ----------------------------------------------------------------------------------------- estimate
@dataclass
class MemoryPlan:
    """Per-device bytes at each moment of a step; the largest moment is the peak."""

    stage: str
    parallelism: Parallelism
    models: list[ModelShape]
    workload: Workload
    moments: dict[str, dict[str, float]]  # moment → item → bytes on the device
    host: dict[str, float] = field(default_factory=dict)  # offloaded to CPU memory (per process)
    device_memory: int | None = None
    device_memory_source: str = ""

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=lambda m: sum(self.moments[m].values()))

    @property
    def peak(self) -> dict[str, float]:
        return self.moments[self.peak_moment]

    @property
    def total(self) -> int:
        return int(sum(self.peak.values()))

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def largest(self, count: int = 3) -> list[tuple[str, float]]:
        return sorted(self.peak.items(), key=lambda item: -item[1])[:count]

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "parallelism": dataclasses.asdict(self.parallelism),
            "models": [dataclasses.asdict(m) for m in self.models],
            "workload": dataclasses.asdict(self.workload),
            "moments": {k: {n: int(b) for n, b in v.items()} for k, v in self.moments.items()},
            "peak_moment": self.peak_moment,
            "total_bytes": self.total,
            "host_bytes": {k: int(v) for k, v in self.host.items()},
            "device_memory_bytes": self.device_memory,
            "fits": self.fits,
        }


def _activations(m: ModelShape, w: Workload, sequences: int) -> float:
    """Bytes a training forward keeps for backward in `m`'s blocks, plus one block's gradients during backward.

    Counted tensor by tensor on a Llama block (torch.autograd.graph.saved_tensors_hooks, parameters
    excluded: within 4% on hidden 128 × 4 and 512 × 8 layers): each RMSNorm keeps its input, the
    normalised input and its output in fp32; attention keeps q and k after RoPE, v, the output and its
    reshaped copy (SDPA/flash: no S² probabilities); the gated MLP keeps gate, up, act(gate), act·up.
    """
    tokens = sequences * w.seq_len
    act = 2 if w.bf16 else min(4, max(2, m.weight_bytes))  # matmul outputs: 16-bit under autocast
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    norms = 2 * 3 * m.hidden * 4
    matmuls = (3 * q + 2 * kv + 4 * m.intermediate) * act
    if w.eager_attention:
        matmuls += m.heads * w.seq_len * (4 + act)  # softmax output in fp32 and its cast
    if w.lora_dropout_inputs and m.lora:
        matmuls += 4 * m.hidden * (act + 1)  # each adapted input copied by dropout, plus its mask
    per_layer = norms + matmuls
    # backward holds the gradients of one block's intermediate tensors at a time (measured: ~one block's activations)
    if w.gradient_checkpointing:
        # only each block's input is kept; one block is recomputed at a time during backward
        return tokens * (m.layers * m.hidden * 4 + 2 * per_layer)
    return tokens * ((m.layers + 1) * per_layer + 3 * m.hidden * 4)


def _loss_logits(m: ModelShape, w: Workload, sequences: int) -> float:
    """Vocabulary-sized tensors alive at the loss (logits, log-softmax, copies for metrics, gradients)."""
    if m.head != "causal":
        return 0.0
    per_token = LOSS_BYTES_PER_LOGIT
    if w.stage == "ppo":  # full-sequence logits, then the response part divided by the temperature and its grads
        return sequences * m.vocab * (4 * w.seq_len + 12 * w.response_len)
    return sequences * w.seq_len * m.vocab * per_token


def _kv_cache(m: ModelShape, w: Workload) -> float:
    kv_bytes = 2 if w.bf16 or m.weight_bytes <= 2 else 4
    return 2 * m.layers * m.kv_heads * m.head_dim * w.seq_len * w.generation_batch * kv_bytes


def estimate(models: list[ModelShape], w: Workload, par: Parallelism) -> MemoryPlan:
    """Per-device memory of each moment of a step of `w` with `models` under `par`."""
    n = par.num_processes
    zero = par.strategy in ("zero2", "zero3")
    shard_state = par.strategy in ("fsdp2", "zero3")
    # DeepSpeed and FSDP's mixed precision keep 16-bit compute copies of the weights; ZeRO casts the model.
    half_weights = zero and w.bf16
    static: dict[str, float] = {}
    host: dict[str, float] = {}
    backward: dict[str, float] = {}
    step: dict[str, float] = {}

    def put(where: dict[str, float], name: str, value: float) -> None:
        if value > 0:
            where[name] = where.get(name, 0.0) + value

    for m in models:
        weight = 2 if half_weights else m.weight_bytes
        # rlhf.ppo shards its reference and reward model under FSDP2 (shard_frozen_model), else moves them whole.
        frozen_whole = not m.trained and w.stage == "ppo" and par.strategy != "fsdp2"
        share = 1 if frozen_whole or not shard_state else n
        weights_on_host = par.offload_params and not frozen_whole and m.trained
        put(host if weights_on_host else static, f"{m.role} weights", m.parameters * weight / share)
        if not m.trained:
            continue
        # trainable parameters: gradients, optimizer moments, and ZeRO's fp32 master copy
        trainable_bytes = 4 if m.lora else weight  # peft keeps adapters in fp32
        grad_bytes = m.trainable * trainable_bytes
        optimizer = m.trainable * (4 if zero else trainable_bytes) * w.optimizer_states
        master = m.trainable * 4 if half_weights and not m.lora else 0.0
        state_share = n if (zero or shard_state) else 1
        optimizer_on_host = par.offload_optimizer
        put(host if optimizer_on_host else static, "optimizer state", (optimizer + master) / state_share)
        grads = grad_bytes / (n if (zero or shard_state) else 1)
        put(host if optimizer_on_host and zero else step, "gradients", grads)
        if par.strategy == "ddp":
            # DDP's reducer copies every gradient into its buckets (gradient_as_bucket_view=False)
            put(static, "DDP gradient buckets", grad_bytes)
        if zero:
            put(
                step,
                "ZeRO reduce/all-gather buckets",
                2 * min(DEEPSPEED_BUCKET_ELEMENTS, m.trainable) * trainable_bytes,
            )
        if shard_state:
            # gathered 16-bit (or full) copies: the current and the prefetched block, and FSDP2's root unit
            gather_bytes = 2 if w.bf16 or par.mixed_precision in ("bf16", "fp16") else weight
            gathered = 2 * m.block_parameters + (m.root_parameters if par.strategy == "fsdp2" else 0)
            put(backward, "gathered parameters", gathered * gather_bytes)
            put(backward, "unsharded gradients of one block", m.block_parameters * gather_bytes)
        if w.bf16 and not zero and not shard_state and weight == 4:
            # autocast keeps a 16-bit copy of every weight used in forward until backward has used it
            put(backward, "autocast 16-bit weight copies", m.parameters * 2)
        # the head's gradient is allocated first in backward, while all activations are still alive
        if m.head == "causal" and not m.lora:
            put(
                backward,
                "output-layer gradient",
                m.vocab * m.hidden * trainable_bytes / (n if shard_state or zero else 1),
            )

    trained = [m for m in models if m.trained]
    for m in trained:
        checkpointing = w.gradient_checkpointing or par.activation_checkpointing
        workload = dataclasses.replace(w, gradient_checkpointing=checkpointing)
        put(backward, "activations", _activations(m, workload, w.batch))
        put(backward, "loss logits", _loss_logits(m, workload, w.batch))
    if w.stage == "distill":
        teacher = next((m for m in models if m.role == "teacher"), None)
        if teacher is not None:  # teacher logits (no grad) live beside the student's for the KL
            put(backward, "teacher logits", w.batch * w.seq_len * teacher.vocab * 4)

    runtime = GPU_RUNTIME_BYTES if par.device == "gpu" else CPU_RUNTIME_BYTES
    if par.device == "cpu":
        put(backward, "CPU allocator slack", CPU_ACTIVATION_SLACK * backward.get("activations", 0.0))
        put(backward, "gradients (heap not reused on CPU)", step.get("gradients", 0.0))
    moments = {
        "forward/backward": {**static, **backward},
        "optimizer step": {**static, **step},
    }
    if w.generation_batch:
        policy = models[0]
        rollout = dict(static)
        put(rollout, "KV cache (rollout generation)", _kv_cache(policy, w))
        scoring = {**static}
        if w.stage == "ppo" and par.strategy == "fsdp2":
            # rlhf.ppo gathers policy and value model whole for the rollout (rlhf.distributed.gathered_weights).
            whole = sum(m.parameters * (2 if w.bf16 else m.weight_bytes) for m in models if m.trained)
            put(rollout, "whole policy + value weights (gathered for the rollout)", whole)
            put(scoring, "whole policy + value weights (gathered for the rollout)", whole)
        elif par.strategy in ("fsdp2", "zero3"):
            put(rollout, "gathered parameters", (2 * policy.block_parameters + policy.root_parameters) * 2)
        # no-grad log-probs of generated sequences: full logits, and the response part divided by the temperature
        put(scoring, "scoring logits (no grad)", w.scoring_batch * policy.vocab * (4 * w.seq_len + 8 * w.response_len))
        moments["rollout generation"] = rollout
        moments["rollout scoring"] = scoring
    for moment in moments.values():
        moment[
            "runtime (CUDA context, workspaces)" if par.device == "gpu" else "runtime (data, tokenizer, allocator)"
        ] = runtime
    return MemoryPlan(w.stage, par, models, w, moments, host)


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
    # PPO's value model (fully trained, no adapters): value, else reward, else policy; `shared`: a head on the
    # policy's own backbone, one scalar per token, nothing to plan beside the policy.
    if stage.trained_copies > 1 and values.get("value_model_path") != SHARED_VALUE_HEAD:
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


def plan_values(
    stage: Stage,
    values: dict[str, Any],
    parallelism: Parallelism,
    device_memory: int | None = None,
    prompt_length: int = 256,
    resolve: Callable[[str], str | None] | None = None,
) -> MemoryPlan:
    """Plan a stage from its recipe values (a dict as in the YAML); `resolve` maps a not-yet-written model path to a folder."""
    if not values.get("model_name_or_path"):
        raise RecipeError("model_name_or_path: missing; the planner sizes the model from its config.")
    model_fields = field_types(ModelArguments)
    model_args = ModelArguments(**{k: v for k, v in values.items() if k in model_fields})
    if stage.name == "ppo" and parallelism.strategy == "zero3":
        raise RecipeError(
            "--config: PPO does not run under DeepSpeed ZeRO-3 (rlhf.stages.ppo refuses it); plan it with "
            "accelerate_configs/fsdp.yaml (FSDP2 shards all four models) or ddp.yaml."
        )
    lora = bool(model_args.use_peft)
    if stage.name == "ppo" and parallelism.strategy == "fsdp2" and lora:
        raise RecipeError(
            "use_peft: LoRA PPO does not run under FSDP (rlhf.stages.ppo refuses it); plan it with ddp.yaml, or "
            "set use_peft: false to shard the full model."
        )
    workload = read_workload(stage, values, parallelism.device, prompt_length)
    trust = bool(values.get("trust_remote_code"))
    models = [
        size_model(role, _locate(path, resolve), head, trained, model_args, adapters, trust)
        for role, path, head, trained, adapters in model_roles(stage, values, lora)
    ]
    plan = estimate(models, workload, parallelism)
    plan.device_memory = device_memory
    return plan


def plan_recipe(
    argv: list[str],
    config: str | None = None,
    num_processes: int | None = None,
    device_memory: int | None = None,
    prompt_length: int = 256,
) -> MemoryPlan:
    """Plan `RECIPE.yaml [--key value ...]` under an accelerate config; nothing loads but configs."""
    if not argv or argv[0].startswith("--"):
        raise RecipeError("usage: rlhf plan RECIPE.yaml [--config FILE] [--num-processes N] [--device-memory 80GB]")
    values = read_recipe_file(argv[0])
    stage = stage_named(values.get("stage"), f"recipe {argv[0]}")
    types = {**field_types(ModelArguments), **field_types(training_config_class(stage))}
    overrides = parse_overrides(argv[1:], types)
    check_known_keys(overrides, [*types, "stage"], "override", "the command line")
    parallelism = read_accelerate_config(config, num_processes)
    return plan_values(stage, {**values, **overrides}, parallelism, device_memory, prompt_length)


def largest_batch(plan: MemoryPlan, limit: int = 1024) -> int:
    """The largest per-device micro-batch (a power of two) whose peak fits the plan's device memory; 0 if none."""
    if plan.device_memory is None:
        return 0
    best, batch = 0, 1
    while batch <= limit:
        trial = estimate(plan.models, plan.workload.with_batch(batch), plan.parallelism)
        if trial.total > plan.device_memory:
            break
        best, batch = batch, batch * 2
    return best


# ------------------------------------------------------------------------------------------- output
def _gib(value: float) -> str:
    return f"{value / GiB:,.2f} GiB" if value >= GiB / 100 else f"{value / 2**20:,.1f} MiB"


def render(plan: MemoryPlan) -> str:
    """The plan as a table and a one-line verdict."""
    par, w = plan.parallelism, plan.workload
    device = "GPU" if par.device == "gpu" else "CPU (per-process RSS beyond the Python/torch/transformers/trl baseline)"
    lines = [
        f"stage {plan.stage}: {par.label} ({par.source}), {device}, {'16-bit autocast' if w.bf16 else 'no mixed precision'}",
        f"  micro-batch {w.batch} × {w.seq_len} tokens"
        + (
            f", {w.generation_batch} sequences generated at once ({w.response_len} new tokens)"
            if w.generation_batch
            else ""
        )
        + (", gradient checkpointing" if w.gradient_checkpointing or par.activation_checkpointing else ""),
    ]
    for m in plan.models:
        kind = ("LoRA, " + f"{m.trainable:,} trainable" if m.lora else "trained") if m.trained else "frozen"
        lines.append(f"  {m.role:<13} {m.parameters / 1e6:>10,.1f}M params  {kind}  ({m.path})")
    lines.append(
        f"  peak at: {plan.peak_moment}  ("
        + ", ".join(f"{k} {_gib(sum(v.values()))}" for k, v in plan.moments.items())
        + ")"
    )
    for name, value in sorted(plan.peak.items(), key=lambda item: -item[1]):
        lines.append(f"    {name:<42} {_gib(value):>14}")
    lines.append(f"    {'total per device':<42} {_gib(plan.total):>14}")
    for name, value in plan.host.items():
        lines.append(f"    (CPU memory, offloaded) {name:<24} {_gib(value):>14}")
    largest = ", ".join(f"{name} {_gib(value)}" for name, value in plan.largest())
    if plan.fits is None:
        lines.append(
            f"verdict: needs ~{_gib(plan.total)} per device; largest: {largest} (give --device-memory for a verdict)"
        )
    else:
        share = plan.total / plan.device_memory
        word = "fits" if plan.fits else "does not fit"
        lines.append(
            f"verdict: {word}: ~{_gib(plan.total)} of {_gib(plan.device_memory)} per device{plan.device_memory_source} "
            f"({share:.0%}); largest: {largest}"
        )
        batch = largest_batch(plan)
        lines.append(
            f"  largest per-device batch that fits: {batch}"
            if batch
            else "  even a batch of 1 does not fit: use LoRA, FSDP2/ZeRO-3, CPU offload or more processes"
        )
    return "\n".join(lines)


def machine_memory() -> int:
    """This machine's RAM in bytes (0 when unknown)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _default_device_memory(par: Parallelism) -> tuple[int | None, str]:
    """Without --device-memory: this machine's GPU, or on CPU its RAM shared by the processes."""
    if par.device == "gpu":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory, " (this machine's GPU)"
        return None, ""
    ram = machine_memory()
    return (ram // par.num_processes, " (this machine's RAM / processes)") if ram else (None, "")


PLAN_FLAGS = {"--config": str, "--num-processes": int, "--device-memory": str, "--prompt-length": int}
USAGE = (
    "usage: rlhf plan RECIPE.yaml [--key value ...] [--config ACCELERATE.yaml] [--num-processes N] "
    "[--device-memory 80GB] [--prompt-length 256] [--json]"
)


def _split(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The planner's own flags, and the rest: the recipe and its `--key value` overrides."""
    options: dict[str, Any] = {name[2:].replace("-", "_"): None for name in PLAN_FLAGS}
    options["json"], rest, i = False, [], 0
    while i < len(argv):
        name, _, inline = argv[i].partition("=")
        if name == "--json":
            options["json"] = True
        elif name in PLAN_FLAGS:
            if not inline:
                if i + 1 >= len(argv):
                    raise RecipeError(f"{name}: needs a value. {USAGE}")
                i += 1
                inline = argv[i]
            try:
                options[name[2:].replace("-", "_")] = PLAN_FLAGS[name](inline)
            except ValueError:
                raise RecipeError(f"{name}: got {inline!r}, expected a whole number.") from None
        else:
            rest.append(argv[i])
        i += 1
    return options, rest


def main(argv: list[str] | None = None) -> None:
    """`rlhf plan RECIPE [--key value ...] [--config F] [--num-processes N] [--device-memory 80GB]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}")
        if not argv:
            raise SystemExit(2)
        return
    options, rest = _split(argv)
    memory = parse_memory_size(options["device_memory"]) if options["device_memory"] is not None else None
    prompt_length = options["prompt_length"] or 256
    if prompt_length < 1:
        raise RecipeError(f"--prompt-length: got {prompt_length}; give the prompt tokens, at least 1.")
    plan = plan_recipe(rest, options["config"], options["num_processes"], memory, prompt_length)
    if memory is None:
        plan.device_memory, plan.device_memory_source = _default_device_memory(plan.parallelism)
    print(json.dumps(plan.as_dict(), indent=1) if options["json"] else render(plan))


if __name__ == "__main__":
    from rlhf.entrypoint import run

    run(main)

"""Per-device bytes at each moment of a step, item by item, and the plan of a stage from its recipe."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rlhf.config import (
    ModelArguments,
    RecipeError,
    check_known_keys,
    field_types,
    parse_overrides,
    read_recipe_file,
)
from rlhf.plan.parallelism import Parallelism, read_accelerate_config
from rlhf.plan.sizing import ModelShape, _locate, model_roles, size_model
from rlhf.plan.workload import Workload, read_workload, training_config_class
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
# RL stages ask for logits only where a response token is predicted (rlhf.logprobs, TRL's GRPO/RLOO with
# logits_to_keep): those logits, their copy at the sampling temperature and the two gradients, fp32.
RESPONSE_BYTES_PER_LOGIT = 16
# DeepSpeed's defaults when accelerate builds the config from its YAML (no bucket sizes given):
# reduce_bucket_size = allgather_bucket_size = 5e8 elements.
DEEPSPEED_BUCKET_ELEMENTS = 5e8


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
    if w.response_len:  # PPO, GRPO, RLOO: the positions that predict response tokens only
        return sequences * (w.response_len + 1) * m.vocab * RESPONSE_BYTES_PER_LOGIT
    return sequences * w.seq_len * m.vocab * LOSS_BYTES_PER_LOGIT


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
        # no-grad log-probs of generated sequences: the response positions' logits, their copy at the temperature
        # and the entropy's softmax
        put(scoring, "scoring logits (no grad)", w.scoring_batch * policy.vocab * 12 * (w.response_len + 1))
        moments["rollout generation"] = rollout
        moments["rollout scoring"] = scoring
    for moment in moments.values():
        moment[
            "runtime (CUDA context, workspaces)" if par.device == "gpu" else "runtime (data, tokenizer, allocator)"
        ] = runtime
    return MemoryPlan(w.stage, par, models, w, moments, host)


# ------------------------------------------------------------------------------------------- recipe
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

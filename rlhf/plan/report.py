"""The plan as a table and a one-line verdict."""

from __future__ import annotations

from rlhf.plan.memory import GiB, MemoryPlan, largest_batch


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

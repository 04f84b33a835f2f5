"""How the processes share a model, read from an accelerate config file (DDP, FSDP2, DeepSpeed ZeRO, offload)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhf.config import RecipeError

DISTRIBUTED_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU", "FSDP", "DEEPSPEED")


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

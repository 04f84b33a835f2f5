"""Run stages under `accelerate launch` and record what the multi-process tests check.

    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 2 --mixed_precision no \
        tests/distributed_stage.py REPORT.json STAGE RECIPE.yaml [--key value ...] [:: STAGE RECIPE.yaml ...]

Several stages (separated by `::`) run one after another in the same processes, as in a pipeline,
which also saves the launch and import time of a second run. Each stage runs unchanged, all of
them inside one `rlhf.entrypoint.run` (so its clean process-group shutdown runs once, at the end). The
only addition wraps each stage's `finish_stage` call: before the real one runs, every rank's
trained parameters are gathered to compare them across ranks (and, in the tests, with the saved
file), and how each rank holds them is recorded (a slice of each weight under FSDP2 or ZeRO-3); after
it returns, every rank reports whether the published output directory already exists. Rank 0 writes
REPORT.json.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch


def sharding(parameters: dict) -> tuple[dict, dict]:
    """How this rank holds each parameter, and every full parameter (gathered: collective, same order on all ranks).

    FSDP2 makes each parameter a DTensor: this rank holds `to_local()`, a slice along dim 0 (a one-row
    weight stays whole on one rank). DeepSpeed ZeRO-3 keeps a flat slice of each in `ds_tensor`, except
    the small ones it keeps whole everywhere (`ds_persist`). Under DDP every rank holds whole copies.
    """
    from torch.distributed.tensor import DTensor

    if any(hasattr(p, "ds_tensor") for p in parameters.values()):
        import deepspeed

        sharded = {name: p for name, p in parameters.items() if not getattr(p, "ds_persist", False)}
        rows = {name: p.ds_shape[0] for name, p in sharded.items()}
        local = {name: p.ds_tensor.numel() / p.ds_numel for name, p in sharded.items() if p.ds_numel > 1}
        with deepspeed.zero.GatheredParameters(list(parameters.values())):
            full = {name: p.detach().clone() for name, p in parameters.items()}
    else:
        sharded = {name: p for name, p in parameters.items() if isinstance(p, DTensor)}
        rows = {name: p.shape[0] for name, p in sharded.items()}
        local = {name: p.to_local().numel() / p.numel() for name, p in sharded.items() if p.numel() > 1}
        full = {name: p.full_tensor() if isinstance(p, DTensor) else p for name, p in parameters.items()}
    info = {
        "num_sharded_parameters": len(sharded),
        "unsharded_parameters": sorted(set(parameters) - set(sharded)),
        "local_fraction": local,
        "rows": rows,
    }
    return info, full


def wrap_finish_stage(module, report: dict):
    """Record cross-rank parameter agreement, sharding and publication around the stage's own finish_stage.

    Returns a function that puts the real finish_stage back.
    """
    real_finish_stage = module.finish_stage

    def finish_stage_and_check(trainer, recipe, metrics, final):
        from torch.distributed.fsdp import FSDPModule

        accelerator = trainer.accelerator
        model = accelerator.unwrap_model(trainer.model)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # FSDP2 groups kept gathered after a forward (reshard_after_forward=False: the root, the
                # embedding/head group) show whole weights until resharded; report the sharded state at rest.
                module.reshard()
        info, full = sharding(dict(model.named_parameters()))
        # PPO's inference-only models: the reference copy and the reward model, sharded on their own.
        rewards = getattr(getattr(trainer, "rollouts", None), "rewards", None)
        frozen = {
            "ref_model": getattr(trainer, "ref_model", None),
            "reward_model": getattr(rewards, "reward_model", None),
        }
        for name, frozen_model in frozen.items():
            if frozen_model is not None:
                report[f"{name}_sharding"] = sharding(dict(frozen_model.named_parameters()))[0]
        flat = torch.cat([p.detach().float().reshape(-1) for p in full.values()]).to(accelerator.device)
        per_rank = accelerator.gather(flat.unsqueeze(0))  # (world_size, num_parameters)
        result = real_finish_stage(trainer, recipe, metrics, final)
        published = accelerator.gather(torch.tensor([float(Path(final).is_dir())], device=accelerator.device))
        report.update(
            **info,
            world_size=accelerator.num_processes,
            num_parameters=flat.numel(),
            max_param_diff_across_ranks=(per_rank - per_rank[0]).abs().max().item(),
            # What the trained model holds, to compare with the saved checkpoint.
            parameter_sums={name: p.detach().double().sum().item() for name, p in full.items()},
            published_on_return=published.tolist(),
            is_main=accelerator.is_main_process,
            log_history=getattr(getattr(trainer, "state", None), "log_history", None),
        )
        return result

    module.finish_stage = finish_stage_and_check
    return lambda: setattr(module, "finish_stage", real_finish_stage)


def main() -> None:
    report_path, rest = Path(sys.argv[1]), sys.argv[2:]
    runs = []
    while rest:
        cut = rest.index("::") if "::" in rest else len(rest)
        runs.append((rest[0], rest[1:cut]))
        rest = rest[cut + 1 :]
    reports: dict[str, dict] = {}

    def run_all(_argv) -> None:
        for stage, argv in runs:
            module = importlib.import_module(f"rlhf.stages.{stage}")
            # RLOO runs the GRPO stage body, so its finish_stage is looked up in rlhf.stages.grpo.
            body = importlib.import_module("rlhf.stages.grpo") if stage == "rloo" else module
            restore = wrap_finish_stage(body, reports.setdefault(stage, {}))
            try:
                module.main(argv)
            finally:
                restore()
        # Written here: a rank of a multi-process run that succeeds leaves run() through os._exit.
        if all(report.get("is_main") for report in reports.values()):
            report_path.write_text(json.dumps(reports, indent=2, default=str))

    from rlhf.entrypoint import run

    run(run_all)


if __name__ == "__main__":
    main()

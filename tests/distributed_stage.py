"""Run stages under `accelerate launch` and record what the multi-process tests check.

    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 2 --mixed_precision no \
        tests/distributed_stage.py REPORT.json STAGE RECIPE.yaml [--key value ...] [:: STAGE RECIPE.yaml ...]

Several stages (separated by `::`) run one after another in the same processes, as in a pipeline,
which also saves the launch and import time of a second run. Each stage runs unchanged, all of
them inside one `rlhf.entrypoint.run` (so its clean process-group shutdown runs once, at the end). The
only addition wraps each stage's `finish_stage` call: before the real one runs, every rank's
trained parameters are gathered to compare them across ranks; after it returns, every rank
reports whether the published output directory already exists. Rank 0 writes REPORT.json.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch


def wrap_finish_stage(module, report: dict):
    """Record cross-rank parameter agreement and publication around the stage's own finish_stage.

    Returns a function that puts the real finish_stage back.
    """
    real_finish_stage = module.finish_stage

    def finish_stage_and_check(trainer, recipe, metrics, final):
        accelerator = trainer.accelerator
        model = accelerator.unwrap_model(trainer.model)
        flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()]).to(accelerator.device)
        per_rank = accelerator.gather(flat.unsqueeze(0))  # (world_size, num_parameters)
        result = real_finish_stage(trainer, recipe, metrics, final)
        published = accelerator.gather(torch.tensor([float(Path(final).is_dir())], device=accelerator.device))
        report.update(
            world_size=accelerator.num_processes,
            num_parameters=flat.numel(),
            max_param_diff_across_ranks=(per_rank - per_rank[0]).abs().max().item(),
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

    from rlhf.entrypoint import run

    run(run_all)
    if all(report.get("is_main") for report in reports.values()):
        report_path.write_text(json.dumps(reports, indent=2, default=str))


if __name__ == "__main__":
    main()

"""Run one stage under `accelerate launch` and record what the multi-process tests check.

    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 2 --mixed_precision no \
        tests/distributed_stage.py STAGE REPORT.json RECIPE.yaml [--key value ...]

The stage runs unchanged through `rlhf.cli.run` (so its clean process-group shutdown runs too). The
only addition wraps the stage's `finish_stage` call: before the real one runs, every rank's trained
parameters are gathered to compare them across ranks; after it returns, every rank reports whether
the published output directory already exists. Rank 0 writes REPORT.json.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch


def main() -> None:
    stage, report_path, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    module = importlib.import_module(f"rlhf.stages.{stage}")
    real_finish_stage = module.finish_stage
    report: dict = {}

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
    from rlhf.cli import run

    run(module.main, argv)
    if report.get("is_main"):
        report_path.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()

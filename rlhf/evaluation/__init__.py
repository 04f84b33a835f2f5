"""Evaluation: metrics, generation-based scores (reward, win-rate, KL), safety, perplexity and reports.

`rlhf eval CHECKPOINT --recipe recipes/tiny/eval.yaml` runs `rlhf.evaluation.runner.main`.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    """`rlhf eval`: score checkpoints and write eval.json plus a report (see rlhf.evaluation.runner)."""
    from rlhf.evaluation.runner import main as run_main

    run_main(argv)

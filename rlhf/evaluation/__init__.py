"""Evaluation: metrics, generation-based scores (reward, win-rate, KL), safety, robustness, perplexity and reports.

`rlhf eval CHECKPOINT --recipe recipes/tiny/eval.yaml` runs `main`; a pipeline calls `evaluate`
(both in rlhf.evaluation.runner). Sections are functions in a registry: rlhf.evaluation.sections.
"""

from __future__ import annotations

import importlib
from typing import Any

RUNNER_NAMES = ("main", "evaluate")


def __getattr__(name: str) -> Any:
    # The runner imports every section (datasets, trl, matplotlib); this package is also imported for its
    # light modules alone (generation by compress and export), so the runner loads on first use.
    if name in RUNNER_NAMES:
        return getattr(importlib.import_module("rlhf.evaluation.runner"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

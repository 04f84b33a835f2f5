"""Evaluation: metrics, generation-based scores (reward, win-rate, KL), safety, robustness, perplexity and reports.

`rlhf eval CHECKPOINT --recipe recipes/tiny/eval.yaml` runs `rlhf.evaluation.runner.main`; a
pipeline calls `rlhf.evaluation.runner.evaluate`. Sections are functions in a registry:
`rlhf.evaluation.sections.SECTIONS`.
"""

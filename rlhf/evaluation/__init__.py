"""Evaluation: metrics, generation-based scores, safety, perplexity and reports."""

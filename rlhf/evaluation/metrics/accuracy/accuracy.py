"""Accuracy: the fraction of predictions equal to their reference (offline copy of the Hub metric)."""

import evaluate

from rlhf.evaluation.metrics import LabelMetric


class Accuracy(LabelMetric, evaluate.Metric):
    summary = "Fraction of predictions equal to the reference label."
    inputs = "predictions, references: lists of integer labels; normalize: bool (default True)."

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        weights = sample_weight if sample_weight is not None else [1.0] * len(predictions)
        correct = sum(w for p, r, w in zip(predictions, references, weights) if p == r)
        return {"accuracy": float(correct / sum(weights) if normalize else correct)}

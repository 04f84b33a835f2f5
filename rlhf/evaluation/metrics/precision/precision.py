"""Precision: scikit-learn-style precision for binary or multi-class labels (offline copy of the Hub metric)."""

import evaluate

from rlhf.evaluation.metrics import AveragedLabelMetric


class Precision(AveragedLabelMetric, evaluate.Metric):
    score = "precision"
    summary = "Precision of the positive label (average='binary'), or averaged over labels ('macro', 'micro')."

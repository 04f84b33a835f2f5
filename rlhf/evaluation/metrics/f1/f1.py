"""F1: scikit-learn-style f1 for binary or multi-class labels (offline copy of the Hub metric)."""

import evaluate

from rlhf.evaluation.metrics import AveragedLabelMetric


class F1(AveragedLabelMetric, evaluate.Metric):
    score = "f1"
    summary = "F1 of the positive label (average='binary'), or averaged over labels ('macro', 'micro')."

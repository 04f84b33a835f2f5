"""Recall: scikit-learn-style recall for binary or multi-class labels (offline copy of the Hub metric)."""

import evaluate

from rlhf.evaluation.metrics import AveragedLabelMetric


class Recall(AveragedLabelMetric, evaluate.Metric):
    score = "recall"
    summary = "Recall of the positive label (average='binary'), or averaged over labels ('macro', 'micro')."

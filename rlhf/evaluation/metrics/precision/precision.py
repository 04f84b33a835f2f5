"""Precision: scikit-learn-style precision for binary or multi-class labels (offline copy of the Hub metric)."""

import datasets
import evaluate

from rlhf.evaluation.metrics import precision_recall_f1


class Precision(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Precision of the positive label (average='binary'), or averaged over labels ('macro', 'micro').",
            citation="",
            inputs_description="predictions, references: lists of integer labels; average: 'binary' | 'macro' | 'micro'; pos_label: int.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        return {"precision": float(precision_recall_f1(predictions, references, average, pos_label)[0])}

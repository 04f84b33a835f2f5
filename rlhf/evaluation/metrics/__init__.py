"""Metrics through Hugging Face `evaluate`, with local copies of the common ones so they load offline.

`evaluate.load("accuracy")` fetches the metric script from the Hub. The modules shipped here
(`metrics/<name>/<name>.py`, each an `evaluate.Metric`) load from their folder instead, so
`load_metric("f1")` works without a network; any other name falls through to `evaluate.load`.
The label metrics share their `_info` (and precision/recall/F1 their `_compute`) through the mixins
below: a mixin, not an `evaluate.Metric` subclass, because `evaluate.load` takes the first Metric
class a module holds as the metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import evaluate

METRICS_DIR = Path(__file__).parent
LOCAL_METRICS = ("accuracy", "precision", "recall", "f1", "exact_match", "pairwise_accuracy")
CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1")


def local_metric_path(name: str) -> Path | None:
    """The folder of a shipped metric module, or None when `name` is not shipped."""
    path = METRICS_DIR / name / f"{name}.py"
    return path.parent if path.is_file() else None


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """`evaluate.load` for a shipped metric's local folder (offline), else for a Hub metric name or path."""
    local = local_metric_path(name)
    return evaluate.load(str(local) if local else name, **kwargs)


def combine_metrics(names: Sequence[str] = CLASSIFICATION_METRICS) -> evaluate.CombinedEvaluations:
    """`evaluate.combine` over metrics loaded with `load_metric` (one `compute` call returns them all)."""
    return evaluate.combine([load_metric(name) for name in names])


def classification_counts(predictions: Sequence, references: Sequence, label) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of one label."""
    tp = sum(p == label and r == label for p, r in zip(predictions, references))
    fp = sum(p == label and r != label for p, r in zip(predictions, references))
    fn = sum(p != label and r == label for p, r in zip(predictions, references))
    return tp, fp, fn


def _ratio(numerator: float, denominator: float) -> float:
    # sklearn's zero_division=0 convention: an undefined ratio counts as 0.
    return numerator / denominator if denominator else 0.0


def precision_recall_f1(
    predictions: Sequence, references: Sequence, average: str = "binary", pos_label=1
) -> tuple[float, float, float]:
    """Precision, recall and F1, averaged like scikit-learn's `average=` ("binary", "macro" or "micro")."""
    if average == "binary":
        labels = [pos_label]
    elif average in ("macro", "micro"):
        labels = sorted(set(references) | set(predictions))
    else:
        raise ValueError(f"average={average!r}: use 'binary', 'macro' or 'micro'.")
    counts = [classification_counts(predictions, references, label) for label in labels]
    if average == "micro":
        tp, fp, fn = (sum(c[i] for c in counts) for i in range(3))
        counts = [(tp, fp, fn)]
    scores = []
    for tp, fp, fn in counts:
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        scores.append((precision, recall, _ratio(2 * precision * recall, precision + recall)))
    return tuple(sum(s[i] for s in scores) / len(scores) for i in range(3))  # type: ignore[return-value]


LABEL_FEATURES = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})
AVERAGE_INPUTS = (
    "predictions, references: lists of integer labels; average: 'binary' | 'macro' | 'micro'; pos_label: int."
)


class LabelMetric:
    """Mixin for an `evaluate.Metric` over integer labels: its info from the `summary` and `inputs` class attributes."""

    summary: str
    inputs: str = AVERAGE_INPUTS

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.summary, citation="", inputs_description=self.inputs, features=LABEL_FEATURES
        )


class AveragedLabelMetric(LabelMetric):
    """Mixin for precision, recall or F1 (the `score` class attribute), averaged like scikit-learn."""

    score: str  # "precision", "recall" or "f1"

    def _compute(self, predictions, references, average="binary", pos_label=1) -> dict[str, float]:
        precision, recall, f1 = precision_recall_f1(predictions, references, average, pos_label)
        return {self.score: float({"precision": precision, "recall": recall, "f1": f1}[self.score])}

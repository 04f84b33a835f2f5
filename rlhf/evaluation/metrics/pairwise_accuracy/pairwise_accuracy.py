"""Pairwise accuracy of a reward model: how often the chosen response scores above the rejected one."""

import datasets
import evaluate


class PairwiseAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of preference pairs where the chosen reward exceeds the rejected reward (ties count half).",
            citation="",
            inputs_description="chosen_rewards, rejected_rewards: lists of floats, one per pair.",
            features=datasets.Features(
                {"chosen_rewards": datasets.Value("float64"), "rejected_rewards": datasets.Value("float64")}
            ),
        )

    def _compute(self, chosen_rewards, rejected_rewards):
        wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen_rewards, rejected_rewards))
        margins = [c - r for c, r in zip(chosen_rewards, rejected_rewards)]
        n = len(margins)
        return {"pairwise_accuracy": wins / n if n else 0.0, "mean_margin": sum(margins) / n if n else 0.0}

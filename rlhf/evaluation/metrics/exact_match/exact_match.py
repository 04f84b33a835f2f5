"""Exact match: the fraction of predicted strings equal to their reference after optional normalisation."""

import re
import string

import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions identical to their reference string.",
            citation="",
            inputs_description=(
                "predictions, references: lists of strings; ignore_case, ignore_punctuation, ignore_numbers: bool; "
                "regexes_to_ignore: list of patterns removed before comparing."
            ),
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        regexes_to_ignore=None,
        ignore_case=False,
        ignore_punctuation=False,
        ignore_numbers=False,
    ):
        def normalise(text: str) -> str:
            for pattern in regexes_to_ignore or []:
                text = re.sub(pattern, "", text)
            if ignore_case:
                text = text.lower()
            if ignore_punctuation:
                text = text.translate(str.maketrans("", "", string.punctuation))
            if ignore_numbers:
                text = text.translate(str.maketrans("", "", string.digits))
            return text.strip()

        matches = [normalise(p) == normalise(r) for p, r in zip(predictions, references)]
        return {"exact_match": float(sum(matches) / len(matches)) if matches else 0.0}

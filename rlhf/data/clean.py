"""Row cleaning: unicode normalisation, whitespace, empty/short/long rows, invalid preference pairs, duplicates.

Each rule counts what it dropped; the counts are printed once and saved in the stage's metrics.json.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from datasets import Dataset

WHITESPACE = re.compile(r"[ \t\r\f\v]+")


def normalize_text(text: str, unicode_form: str | None = "NFKC") -> str:
    """Unicode-normalise and collapse runs of spaces (newlines are kept: they carry structure)."""
    if unicode_form:
        text = unicodedata.normalize(unicode_form, text)
    return "\n".join(WHITESPACE.sub(" ", line).strip() for line in text.split("\n")).strip()


def _map_strings(value: Any, fn) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: (_map_strings(v, fn) if k != "role" else v) for k, v in value.items()}
    return value


def _chars(value: Any) -> int:
    """Characters of text in a row or value; message roles do not count."""
    total = 0

    def count(text: str) -> str:
        nonlocal total
        total += len(text)
        return text

    _map_strings(value, count)
    return total


def clean_dataset(
    dataset: Dataset,
    normalize_unicode: bool = True,
    min_chars: int = 1,
    max_chars: int | None = None,
    deduplicate: bool = True,
) -> tuple[Dataset, dict[str, int]]:
    """Apply the cleaning rules; return the cleaned dataset and how many rows each rule dropped."""
    counts = {
        "rows_in": len(dataset),
        "dropped_empty": 0,
        "dropped_too_short": 0,
        "dropped_too_long": 0,
        "dropped_duplicates": 0,
        "dropped_identical_pairs": 0,
        "dropped_empty_side_pairs": 0,
    }
    # A pair that prefers nothing teaches nothing: DPO's loss sits at log 2 on it, and a reward
    # model cannot rank it, which caps its held-out accuracy.
    pairs = {"chosen", "rejected"} <= set(dataset.column_names)
    # datasets hands map() a lazy row, not a dict: copy it so nested values can be rebuilt.
    dataset = dataset.map(
        lambda row: _map_strings(dict(row), lambda t: normalize_text(t, "NFKC" if normalize_unicode else None))
    )
    lengths = [_chars(dict(row)) for row in dataset]
    seen: set[str] = set()
    keep = []
    for index, (row, length) in enumerate(zip(dataset, lengths)):
        if length == 0:
            counts["dropped_empty"] += 1
        elif pairs and (_chars(row["chosen"]) == 0 or _chars(row["rejected"]) == 0):
            counts["dropped_empty_side_pairs"] += 1
        elif pairs and row["chosen"] == row["rejected"]:
            counts["dropped_identical_pairs"] += 1
        elif length < min_chars:
            counts["dropped_too_short"] += 1
        elif max_chars is not None and length > max_chars:
            counts["dropped_too_long"] += 1
        else:
            if deduplicate:
                key = json.dumps(row, sort_keys=True, ensure_ascii=False)
                if key in seen:
                    counts["dropped_duplicates"] += 1
                    continue
                seen.add(key)
            keep.append(index)
    counts["rows_out"] = len(keep)
    return dataset.select(keep), counts

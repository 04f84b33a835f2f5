"""Cleaning rules drop what they should and count it."""

from __future__ import annotations

from datasets import Dataset

from rlhf.data.clean import clean_dataset, normalize_text


def test_normalisation_and_whitespace():
    assert normalize_text("  ﬁne\u00a0 day \t here  ") == "fine day here"
    assert normalize_text("a  b\n  c ") == "a b\nc"


def test_each_rule_counts_its_drops():
    rows = [
        {"text": "hello world"},
        {"text": "hello   world"},  # duplicate after whitespace normalisation
        {"text": "   "},  # empty after normalisation
        {"text": "hi"},  # too short
        {"text": "x" * 50},  # too long
        {"text": "a fine row"},
    ]
    cleaned, counts = clean_dataset(Dataset.from_list(rows), min_chars=5, max_chars=20)
    assert cleaned["text"] == ["hello world", "a fine row"]
    assert counts == {
        "rows_in": 6,
        "dropped_empty": 1,
        "dropped_too_short": 1,
        "dropped_too_long": 1,
        "dropped_duplicates": 1,
        "dropped_identical_pairs": 0,
        "dropped_empty_side_pairs": 0,
        "rows_out": 2,
    }


def test_invalid_preference_pairs_are_counted_apart_from_duplicates():
    rows = [
        {"prompt": "q1", "chosen": "yes", "rejected": "no"},
        {"prompt": "q1", "chosen": "yes", "rejected": "no"},  # a duplicate, not an invalid pair
        {"prompt": "q2", "chosen": "Same answer", "rejected": "Same answer "},  # equal once normalised
        {
            "prompt": "q3",
            "chosen": [{"role": "assistant", "content": " "}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
        {"prompt": "q4", "chosen": [{"role": "assistant", "content": "yes"}], "rejected": []},
    ]
    cleaned, counts = clean_dataset(Dataset.from_list(rows[:3]))
    assert cleaned["prompt"] == ["q1"]
    assert (counts["dropped_duplicates"], counts["dropped_identical_pairs"]) == (1, 1)
    _, counts = clean_dataset(Dataset.from_list(rows[3:]))
    assert counts["dropped_empty_side_pairs"] == 2 and counts["rows_out"] == 0


def test_messages_are_cleaned_but_roles_kept():
    rows = [{"messages": [{"role": "user", "content": " Hi  there "}, {"role": "assistant", "content": "Hello"}]}]
    cleaned, _ = clean_dataset(Dataset.from_list(rows * 2))
    assert len(cleaned) == 1
    assert cleaned[0]["messages"][0] == {"role": "user", "content": "Hi there"}

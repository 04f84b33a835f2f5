"""Augmentation is seeded, reproducible, changes inputs, and never touches eval data."""

from __future__ import annotations

import random

from rlhf.config import DataArguments
from rlhf.data import prepare_datasets
from rlhf.data.augment import AugmentationConfig, augment_words


def _args(**keys) -> DataArguments:
    return DataArguments(dataset_name="synthetic:sft", synthetic_num_examples=60, **keys)


def test_each_operation_changes_words():
    words = "the zorp is red and eats apples".split()
    vocab = ["blue", "fish"]
    assert len(augment_words(words, AugmentationConfig(random_deletion=0.5), vocab, random.Random(0))) < len(words)
    assert len(augment_words(words, AugmentationConfig(random_insertion=0.5), vocab, random.Random(0))) > len(words)
    swapped = augment_words(words, AugmentationConfig(random_swap=0.5), vocab, random.Random(0))
    assert sorted(swapped) == sorted(words) and swapped != words
    replaced = augment_words(words, AugmentationConfig(random_replacement=0.5), vocab, random.Random(0))
    assert len(replaced) == len(words) and {"blue", "fish"} & set(replaced)


def test_augmentation_is_reproducible_and_train_only():
    keys = {"augment_random_swap": 0.3, "augment_random_deletion": 0.1, "augment_num_copies": 1}
    train_a, eval_a, report = prepare_datasets(_args(**keys), "sft", seed=3)
    train_b, eval_b, _ = prepare_datasets(_args(**keys), "sft", seed=3)
    plain_train, plain_eval, _ = prepare_datasets(_args(), "sft", seed=3)
    assert train_a["messages"] == train_b["messages"]
    assert len(train_a) == 2 * len(plain_train) and report["augmented"]
    assert train_a["messages"][len(plain_train) :] != plain_train["messages"]
    # assistant turns (the targets) are left alone; only user turns change
    assert [m[1] for m in train_a["messages"][len(plain_train) :]] == [m[1] for m in plain_train["messages"]]
    assert eval_a["messages"] == plain_eval["messages"] == eval_b["messages"]
    other_seed, _, _ = prepare_datasets(_args(**keys), "sft", seed=4)
    assert other_seed["messages"] != train_a["messages"]

"""Data layer: load (files, folders, Hub ids, mixtures, synthetic) → convert → clean → split → augment."""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from rlhf.config import DataArguments, RecipeError
from rlhf.data.augment import AugmentationConfig, augment_dataset
from rlhf.data.clean import clean_dataset
from rlhf.data.formats import convert
from rlhf.data.load import concatenate, load_source, load_sources, sources

__all__ = ["prepare_datasets"]


def _clean(dataset: Dataset, data_args: DataArguments) -> tuple[Dataset, dict[str, int]]:
    return clean_dataset(
        dataset,
        normalize_unicode=data_args.clean_normalize_unicode,
        min_chars=data_args.clean_min_chars,
        max_chars=data_args.clean_max_chars,
        deduplicate=data_args.clean_deduplicate,
    )


def _held_out(data_args: DataArguments, target: str, seed: int) -> Dataset | None:
    """An explicit eval set: `eval_dataset_name`, or the synthetic world's held-out prompts."""
    if data_args.eval_dataset_name:
        entry = {"path": data_args.eval_dataset_name, "split": data_args.dataset_test_split}
        return convert(load_source(entry, data_args, seed, "eval_dataset_name"), target, "eval_dataset_name")
    synthetic = [e for e in sources(data_args) if e["path"].startswith("synthetic:")]
    if len(synthetic) == len(sources(data_args)):
        size = max(16, int(data_args.synthetic_num_examples * data_args.test_split_size))
        sized = DataArguments(**{**vars(data_args), "synthetic_num_examples": size})
        parts = [convert(load_source({**e, "split": "test"}, sized, seed, "dataset_name"), target) for e in synthetic]
        return concatenate(parts, seed)
    return None


def prepare_datasets(
    data_args: DataArguments, target: str, seed: int
) -> tuple[Dataset, Dataset | None, dict[str, Any]]:
    """Return (train, eval, report) in the layout `target` needs; the report holds cleaning counts."""
    converted = [convert(dataset, target, field) for field, dataset in load_sources(data_args, seed)]
    dataset = concatenate(converted, seed)
    dataset, counts = _clean(dataset, data_args)
    if len(dataset) == 0:
        raise RecipeError("dataset_name: no rows left after cleaning; loosen clean_min_chars/clean_max_chars.")
    eval_dataset = _held_out(data_args, target, seed)
    if eval_dataset is None and data_args.test_split_size > 0:
        if len(dataset) < 2:
            raise RecipeError("test_split_size: the dataset has too few rows to hold some out; add data or set 0.")
        split = dataset.train_test_split(test_size=data_args.test_split_size, seed=seed)
        dataset, eval_dataset = split["train"], split["test"]
    if data_args.max_train_samples is not None:
        dataset = dataset.select(range(min(len(dataset), data_args.max_train_samples)))
    if eval_dataset is not None and data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))
    augmentation = AugmentationConfig(
        data_args.augment_random_deletion,
        data_args.augment_random_swap,
        data_args.augment_random_insertion,
        data_args.augment_random_replacement,
        data_args.augment_num_copies,
    )
    dataset = augment_dataset(dataset, augmentation, seed)
    report = {
        "cleaning": counts,
        "train_rows": len(dataset),
        "eval_rows": len(eval_dataset) if eval_dataset is not None else 0,
        "augmented": augmentation.enabled,
    }
    return dataset, eval_dataset, report

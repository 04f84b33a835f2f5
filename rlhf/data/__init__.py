"""Data layer: load (files, folders, Hub ids, mixtures, synthetic) → convert → clean → split → augment."""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from rlhf.config import DataArguments, RecipeError
from rlhf.data.augment import AugmentationConfig, augment_dataset
from rlhf.data.clean import clean_dataset
from rlhf.data.formats import convert
from rlhf.data.load import concatenate, load_sources, read_source, sources
from rlhf.distributed import say_once

__all__ = ["prepare_datasets"]


# (count key, singular, plural, what happened), in the order the console line lists them
REASONS = (
    ("dropped_duplicates", "duplicate", "duplicates", "removed"),
    ("dropped_identical_pairs", "pair with chosen == rejected", "pairs with chosen == rejected", "dropped"),
    ("dropped_empty_side_pairs", "pair with an empty side", "pairs with an empty side", "dropped"),
    ("dropped_empty", "empty row", "empty rows", "dropped"),
    ("dropped_too_short", "row under clean_min_chars", "rows under clean_min_chars", "dropped"),
    ("dropped_too_long", "row over clean_max_chars", "rows over clean_max_chars", "dropped"),
    ("skipped_bad_rows", "bad row", "bad rows", "skipped"),
    ("skipped_blank_lines", "blank line", "blank lines", "ignored"),
)


def _clean(
    dataset: Dataset, data_args: DataArguments, skipped: list[dict[str, Any]]
) -> tuple[Dataset, dict[str, int], list[str]]:
    """Clean `dataset`; return it, every count (the loaders' skipped rows included) and examples of skipped rows."""
    dataset, counts = clean_dataset(
        dataset,
        normalize_unicode=data_args.clean_normalize_unicode,
        min_chars=data_args.clean_min_chars,
        max_chars=data_args.clean_max_chars,
        deduplicate=data_args.clean_deduplicate,
    )
    for key in ("skipped_bad_rows", "skipped_blank_lines"):
        counts[key] = sum(report[key] for report in skipped)
    examples = [example for report in skipped for example in report["skipped_examples"]]
    return dataset, counts, examples


def cleaning_summary(counts: dict[str, int], examples: list[str]) -> str:
    """How many rows came in, how many are left, and why the others went: `120 rows → 84 (36 duplicates removed)`."""
    parts = []
    for key, one, many, happened in REASONS:
        count = counts[key]
        if count:
            parts.append(f"{count} {one if count == 1 else many} {happened}")
            if key == "skipped_bad_rows" and examples:
                parts[-1] += f" (first: {examples[0]})"
    rows_read = counts["rows_in"] + counts["skipped_bad_rows"]
    return f"{rows_read} rows → {counts['rows_out']}" + (f" ({', '.join(parts)})" if parts else "")


def _held_out(
    data_args: DataArguments, target: str, seed: int
) -> tuple[Dataset | None, dict[str, int] | None, list[str]]:
    """An explicit eval set: `eval_dataset_name` (cleaned like the training data), or the synthetic world's."""
    if data_args.eval_dataset_name:
        entry = {"path": data_args.eval_dataset_name, "split": data_args.dataset_test_split}
        dataset, skipped = read_source(entry, data_args, seed, "eval_dataset_name", target)
        dataset = convert(dataset, target, "eval_dataset_name")
        dataset, counts, examples = _clean(dataset, data_args, [skipped])
        summary = cleaning_summary(counts, examples)
        say_once(f"data: eval_dataset_name {entry['path']}: {summary}")
        if len(dataset) == 0:
            raise RecipeError(
                f"eval_dataset_name: no rows left after cleaning ({summary}); "
                "fix the data or loosen clean_min_chars/clean_max_chars."
            )
        return dataset, counts, examples
    synthetic = [e for e in sources(data_args) if e["path"].startswith("synthetic:")]
    if len(synthetic) == len(sources(data_args)):
        size = max(16, int(data_args.synthetic_num_examples * data_args.test_split_size))
        sized = DataArguments(**{**vars(data_args), "synthetic_num_examples": size})
        parts = [
            convert(read_source({**e, "split": "test"}, sized, seed, "dataset_name")[0], target) for e in synthetic
        ]
        return concatenate(parts, seed), None, []
    return None, None, []


def prepare_datasets(
    data_args: DataArguments, target: str, seed: int
) -> tuple[Dataset, Dataset | None, dict[str, Any]]:
    """Return (train, eval, report) in the layout `target` needs; the report holds cleaning counts."""
    loaded = load_sources(data_args, seed, target)
    dataset = concatenate([convert(dataset, target, field) for field, dataset, _ in loaded], seed)
    dataset, counts, examples = _clean(dataset, data_args, [skipped for _, _, skipped in loaded])
    field = "dataset_mixture" if data_args.dataset_mixture else "dataset_name"
    summary = cleaning_summary(counts, examples)
    say_once(f"data: {field} {' + '.join(entry['path'] for entry in sources(data_args))}: {summary}")
    if len(dataset) == 0:
        raise RecipeError(
            f"{field}: no rows left after cleaning ({summary}); fix the data or loosen clean_min_chars/clean_max_chars."
        )
    eval_dataset, eval_counts, eval_examples = _held_out(data_args, target, seed)
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
        "skipped_examples": examples + eval_examples,
    }
    if eval_counts is not None:
        report["eval_cleaning"] = eval_counts
    return dataset, eval_dataset, report

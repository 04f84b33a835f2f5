"""Load datasets from local files, `save_to_disk` folders, the Hub, or the embedded synthetic world."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset, load_from_disk

from rlhf.config import DataArguments, RecipeError
from rlhf.data.synthetic import SYNTHETIC_KINDS, make_synthetic_dataset

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SOURCE_KEYS = {"path", "name", "data_dir", "data_files", "split", "columns", "fraction", "rename_columns"}


def sources(data_args: DataArguments) -> list[dict[str, Any]]:
    """The recipe's data sources as mixture entries (a single `dataset_name` is a mixture of one)."""
    if data_args.dataset_mixture:
        entries = []
        for i, entry in enumerate(data_args.dataset_mixture):
            if not isinstance(entry, dict) or "path" not in entry:
                raise RecipeError(
                    f"dataset_mixture[{i}]: each entry needs a `path:` (file, folder, Hub id or synthetic:<kind>)."
                )
            unknown = set(entry) - SOURCE_KEYS
            if unknown:
                raise RecipeError(
                    f"dataset_mixture[{i}]: unknown keys {sorted(unknown)}; allowed: {sorted(SOURCE_KEYS)}."
                )
            entries.append(entry)
        return entries
    if not data_args.dataset_name:
        raise RecipeError(
            "dataset_name: missing; set a data file, folder, Hub id or synthetic:<kind>, or a dataset_mixture."
        )
    return [
        {
            "path": data_args.dataset_name,
            "name": data_args.dataset_config,
            "split": data_args.dataset_train_split,
            "rename_columns": data_args.dataset_rename_columns,
        }
    ]


def _is_local_path(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in FILE_BUILDERS or os.path.exists(path)


def check_source(path: str, field: str) -> None:
    """Fail with the fix when a data source cannot be found, before anything heavy runs."""
    if path.startswith("synthetic:"):
        kind = path.split(":", 1)[1]
        if kind not in SYNTHETIC_KINDS:
            raise RecipeError(
                f"{field}: unknown synthetic dataset {path!r}; use synthetic:{' | synthetic:'.join(SYNTHETIC_KINDS)}."
            )
        return
    if _is_local_path(path):
        if not os.path.exists(path):
            raise RecipeError(f"{field}: {path!r} does not exist; fix the path or generate the data first.")
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if try_to_load_from_cache(path, "README.md", repo_type="dataset") is None:
            raise RecipeError(
                f"{field}: {path!r} is not a local path and the Hub is offline; download it or use a local file."
            )


def check_data_sources(data_args: DataArguments) -> None:
    """Check that every source the recipe names exists."""
    for i, entry in enumerate(sources(data_args)):
        field = f"dataset_mixture[{i}].path" if data_args.dataset_mixture else "dataset_name"
        check_source(entry["path"], field)
    if data_args.eval_dataset_name:
        check_source(data_args.eval_dataset_name, "eval_dataset_name")


def load_source(entry: dict[str, Any], data_args: DataArguments, seed: int, field: str) -> Dataset:
    """Load one source as a Dataset (its requested split)."""
    path, split = entry["path"], entry.get("split") or "train"
    if path.startswith("synthetic:"):
        kind = path.split(":", 1)[1]
        dataset = make_synthetic_dataset(
            kind,
            data_args.synthetic_num_examples,
            seed,
            "test" if split == "test" else "train",
            data_args.synthetic_sft_noise,
        )
    elif os.path.isdir(path) and (Path(path) / "dataset_dict.json").exists():
        dataset = load_from_disk(path)[split]
    elif os.path.isdir(path) and (Path(path) / "dataset_info.json").exists():
        dataset = load_from_disk(path)
    elif os.path.isfile(path):
        if os.path.getsize(path) == 0:
            raise RecipeError(f"{field}: {path!r} is empty; point to a file with rows.")
        builder = FILE_BUILDERS.get(Path(path).suffix)
        if builder is None:
            raise RecipeError(
                f"{field}: cannot read {path!r}; use one of {', '.join(FILE_BUILDERS)} or a save_to_disk folder."
            )
        dataset = load_dataset(builder, data_files=path, split="train")
    else:
        try:
            loaded = load_dataset(
                path, entry.get("name"), data_dir=entry.get("data_dir"), data_files=entry.get("data_files")
            )
        except Exception as error:  # network, auth and missing-repo errors all mean the same fix
            raise RecipeError(
                f"{field}: could not load {path!r} ({type(error).__name__}: {str(error)[:200]}); "
                "check the id and your connection, or point to a local file."
            ) from None
        dataset = loaded[split] if isinstance(loaded, DatasetDict) else loaded
    if entry.get("rename_columns"):
        missing = set(entry["rename_columns"]) - set(dataset.column_names)
        if missing:
            raise RecipeError(
                f"{field}: rename_columns names {sorted(missing)} but the data has {dataset.column_names}."
            )
        dataset = dataset.rename_columns(entry["rename_columns"])
    if entry.get("columns"):
        dataset = dataset.select_columns(entry["columns"])
    fraction = entry.get("fraction", 1.0)
    if fraction < 1.0:
        dataset = dataset.shuffle(seed=seed).select(range(int(len(dataset) * fraction)))
    if len(dataset) == 0:
        raise RecipeError(f"{field}: {path!r} has no rows; point to a non-empty dataset.")
    return dataset


def load_sources(data_args: DataArguments, seed: int) -> list[tuple[str, Dataset]]:
    """Load every source of the recipe as (field name for messages, Dataset)."""
    loaded = []
    for i, entry in enumerate(sources(data_args)):
        field = f"dataset_mixture[{i}]" if data_args.dataset_mixture else "dataset_name"
        loaded.append((field, load_source(entry, data_args, seed, field)))
    return loaded


def concatenate(datasets: list[Dataset], seed: int) -> Dataset:
    """Concatenate converted sources on their shared columns, shuffled with the run's seed."""
    common = set.intersection(*(set(d.column_names) for d in datasets))
    return concatenate_datasets([d.select_columns(sorted(common)) for d in datasets]).shuffle(seed=seed)

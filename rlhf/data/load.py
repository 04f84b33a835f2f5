"""Load datasets from local files, `save_to_disk` folders, the Hub, or the embedded synthetic world."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset, load_from_disk

from rlhf.config import DataArguments, RecipeError
from rlhf.data.synthetic import SYNTHETIC_KINDS, make_synthetic_dataset
from rlhf.data.validate import JsonScan, find_bad_rows, first_undecodable_line, scan_json_file, write_good_rows

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


def is_written_by(path: str, outputs: Collection[str]) -> bool:
    """Whether `path` is one of `outputs` (folders a pipeline's earlier stages write) or lies inside one."""
    folders = {Path(p) for p in outputs}
    return Path(path) in folders or any(parent in folders for parent in Path(path).parents)


def check_data_sources(data_args: DataArguments, pending: Collection[str] = ()) -> None:
    """Check that every source the recipe names exists (or lies in `pending`: outputs a pipeline writes first)."""
    for i, entry in enumerate(sources(data_args)):
        field = f"dataset_mixture[{i}].path" if data_args.dataset_mixture else "dataset_name"
        if not is_written_by(entry["path"], pending):
            check_source(entry["path"], field)
    if data_args.eval_dataset_name and not is_written_by(data_args.eval_dataset_name, pending):
        check_source(data_args.eval_dataset_name, "eval_dataset_name")


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def _load_file(builder: str, path: str | Path, field: str, shown: str, **kwargs: Any) -> Dataset:
    """`load_dataset` on a local file, its failure (a format `validate` does not check) as one line."""
    try:
        return load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as error:  # `datasets` chains three tracebacks; the innermost one says what is wrong
        cause = _root_cause(error)
        reason = (str(cause).strip().splitlines() or [""])[0][:200]
        raise RecipeError(
            f"{field}: could not read {shown} ({type(cause).__name__}: {reason}); fix the file or convert it to JSON Lines."
        ) from None


def _bad_rows_error(field: str, shown: str, where: str, problem: str) -> RecipeError:
    unit = "line" if where.startswith("line") else "row"
    return RecipeError(
        f"{field}: {shown} {where}: {problem}; fix the {unit} or set skip_bad_rows: true to skip such rows."
    )


def _load_json_file(path: str, field: str, skip: bool) -> tuple[Dataset, JsonScan]:
    """Read a JSON/JSON Lines file after checking it line by line; with `skip`, without its unreadable rows."""
    scan = scan_json_file(path, stop_at_first=not skip)
    if scan.bad and scan.fatal:
        line, problem = scan.bad[0]
        raise RecipeError(
            f"{field}: {path} line {line}: {problem}; fix the line (rows of a JSON array cannot be skipped; "
            "rows of a JSON Lines file can, with skip_bad_rows: true)."
        )
    if scan.bad and not skip:
        raise _bad_rows_error(field, path, f"line {scan.bad[0][0]}", scan.bad[0][1])
    if not scan.bad:
        return _load_file("json", path, field, path), scan
    if not scan.row_lines:
        line, problem = scan.bad[0]
        raise RecipeError(f"{field}: {path} has no readable rows (line {line}: {problem}); fix the file.")
    with tempfile.TemporaryDirectory() as folder:  # `datasets` reads the good rows from a copy
        copy = Path(folder) / "rows.jsonl"
        with open(copy, "wb") as out:
            write_good_rows(path, scan, out)
        return _load_file("json", copy, field, path, cache_dir=folder, keep_in_memory=True), scan


def read_source(
    entry: dict[str, Any], data_args: DataArguments, seed: int, field: str, target: str | None = None
) -> tuple[Dataset, dict[str, Any]]:
    """Load one source (its requested split) with its rows checked for `target`; also return what was skipped.

    A bad row (unreadable JSON, non-UTF-8 bytes, a value that does not fit `target`) raises a
    RecipeError naming the file and line (or row index), unless `skip_bad_rows` is set.
    """
    path, split = entry["path"], entry.get("split") or "train"
    skip = data_args.skip_bad_rows
    scan = JsonScan()
    if path.startswith("synthetic:"):
        kind = path.split(":", 1)[1]
        dataset = make_synthetic_dataset(
            kind,
            data_args.synthetic_num_examples,
            seed,
            "test" if split == "test" else "train",
            data_args.synthetic_sft_noise,
            data_args.synthetic_sft_mediocre,
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
        if builder == "json":
            dataset, scan = _load_json_file(path, field, skip)
        elif builder == "csv":
            undecodable = first_undecodable_line(path)
            if undecodable:
                raise RecipeError(f"{field}: {path} line {undecodable[0]}: {undecodable[1]}; fix the file.")
            # Text stays text: pandas would read empty cells and answers like "None" or "NA" as missing.
            dataset = _load_file(builder, path, field, path, keep_default_na=False)
        else:
            dataset = _load_file(builder, path, field, path)
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
    # A JSON file's rows are named by their line; other sources' by their row index.
    unit = "line" if scan.row_lines or scan.bad else "row index"
    skipped = list(scan.bad)
    if not path.startswith("synthetic:"):
        dropped = set()
        for index, problem in find_bad_rows(dataset, target):
            where = scan.row_lines[index] if scan.row_lines else index
            if not skip:
                raise _bad_rows_error(field, path, f"{unit} {where}", problem)
            skipped.append((where, problem))
            dropped.add(index)
        if dropped:
            dataset = dataset.select([i for i in range(len(dataset)) if i not in dropped])
    fraction = entry.get("fraction", 1.0)
    if fraction < 1.0:
        dataset = dataset.shuffle(seed=seed).select(range(int(len(dataset) * fraction)))
    examples = [f"{path} {unit} {where}: {problem}" for where, problem in sorted(skipped)[:5]]
    if len(dataset) == 0:
        if skipped:
            raise RecipeError(f"{field}: {path} has no good rows (first: {examples[0]}); fix the file.")
        raise RecipeError(f"{field}: {path!r} has no rows; point to a non-empty dataset.")
    report = {"skipped_bad_rows": len(skipped), "skipped_blank_lines": scan.blank_lines, "skipped_examples": examples}
    return dataset, report


def load_source(entry: dict[str, Any], data_args: DataArguments, seed: int, field: str) -> Dataset:
    """Load one source as a Dataset (its requested split); its JSON lines are checked, its row layout is not."""
    return read_source(entry, data_args, seed, field)[0]


def load_sources(data_args: DataArguments, seed: int, target: str) -> list[tuple[str, Dataset, dict[str, Any]]]:
    """Load every source of the recipe as (field name for messages, Dataset, what was skipped)."""
    loaded = []
    for i, entry in enumerate(sources(data_args)):
        field = f"dataset_mixture[{i}]" if data_args.dataset_mixture else "dataset_name"
        loaded.append((field, *read_source(entry, data_args, seed, field, target)))
    return loaded


def concatenate(datasets: list[Dataset], seed: int) -> Dataset:
    """Concatenate converted sources on their shared columns, shuffled with the run's seed."""
    common = set.intersection(*(set(d.column_names) for d in datasets))
    return concatenate_datasets([d.select_columns(sorted(common)) for d in datasets]).shuffle(seed=seed)

"""Sources (files of every kind, save_to_disk folders, mixtures, synthetic) load and split."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

from rlhf.config import DataArguments, RecipeError
from rlhf.data import prepare_datasets
from rlhf.data.load import check_data_sources

ROWS = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(20)]


@pytest.fixture
def data_files(tmp_path):
    dataset = Dataset.from_list(ROWS)
    paths = {
        "jsonl": tmp_path / "d.jsonl",
        "json": tmp_path / "d.json",
        "csv": tmp_path / "d.csv",
        "parquet": tmp_path / "d.parquet",
        "disk": tmp_path / "disk",
        "dict": tmp_path / "dict",
    }
    paths["jsonl"].write_text("\n".join(json.dumps(r) for r in ROWS))
    paths["json"].write_text(json.dumps(ROWS))
    dataset.to_csv(str(paths["csv"]))
    dataset.to_parquet(str(paths["parquet"]))
    dataset.save_to_disk(str(paths["disk"]))
    DatasetDict(train=dataset).save_to_disk(str(paths["dict"]))
    return paths


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "disk", "dict"])
def test_every_local_source_loads(data_files, kind):
    train, eval_, report = prepare_datasets(
        DataArguments(dataset_name=str(data_files[kind]), test_split_size=0.25), "sft", 0
    )
    assert len(train) == 15 and len(eval_) == 5
    assert set(train["prompt"]) | set(eval_["prompt"]) == {r["prompt"] for r in ROWS}
    assert report["cleaning"]["rows_out"] == 20


def test_weighted_mixture(data_files):
    args = DataArguments(
        dataset_mixture=[
            {"path": str(data_files["jsonl"]), "fraction": 0.5},
            {"path": str(data_files["parquet"]), "fraction": 1.0, "rename_columns": {"prompt": "prompt"}},
        ],
        clean_deduplicate=False,
        test_split_size=0.0,
    )
    train, eval_, _ = prepare_datasets(args, "sft", 0)
    assert len(train) == 30 and eval_ is None


def test_synthetic_eval_prompts_are_held_out():
    args = DataArguments(dataset_name="synthetic:prompts", synthetic_num_examples=300)
    train, eval_, _ = prepare_datasets(args, "prompt_only", 0)
    train_prompts = {p[0]["content"] for p in train["prompt"]}
    eval_prompts = {p[0]["content"] for p in eval_["prompt"]}
    assert eval_prompts and not train_prompts & eval_prompts


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(RecipeError, match="synthetic:nonsense"):
        check_data_sources(DataArguments(dataset_name="synthetic:nonsense"))
    with pytest.raises(RecipeError, match="Hub is offline"):
        check_data_sources(DataArguments(dataset_name="someone/some-dataset"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(RecipeError):
        prepare_datasets(DataArguments(dataset_name=str(empty)), "sft", 0)
    with pytest.raises(RecipeError, match="dataset_mixture\\[0\\]: each entry needs a `path:`"):
        prepare_datasets(DataArguments(dataset_mixture=[{"fraction": 1.0}]), "sft", 0)

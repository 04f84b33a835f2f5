"""The pipeline: wiring by name, stage cache, downstream invalidation, --only/--from, lineage and report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlhf.config import RecipeError
from rlhf.pipeline import load_pipeline, run_pipeline


def _write_pipeline(tmp_path: Path, sft_steps: int = 6) -> Path:
    sft_recipe = tmp_path / "sft.yaml"
    sft_recipe.write_text(
        yaml.safe_dump(
            {
                "stage": "sft",
                "model_name_or_path": "wired-by-pipeline",
                "dataset_name": "synthetic:sft",
                "synthetic_num_examples": 64,
                "max_length": 64,
                "max_steps": sft_steps,
                "learning_rate": 3e-3,
                "output_dir": "wired-by-pipeline",
                "report_to": "none",
                "save_strategy": "no",
                "disable_tqdm": True,
            }
        )
    )
    eval_recipe = tmp_path / "eval.yaml"
    eval_recipe.write_text(
        yaml.safe_dump(
            {"sections": ["generation", "perplexity"], "num_prompts": 8, "num_perplexity_texts": 8, "max_new_tokens": 8}
        )
    )
    pipeline = {
        "name": "mini",
        "output_dir": str(tmp_path / "out"),
        "stages": [
            {"name": "base", "command": "tiny-checkpoint", "args": {"hidden_size": 32, "num_layers": 1}},
            {"name": "sft", "recipe": str(sft_recipe), "inputs": {"model_name_or_path": "base"}},
            {"name": "eval", "command": "eval", "input": ["base", "sft"], "args": {"recipe": str(eval_recipe)}},
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


def _statuses(summary: dict) -> dict[str, str]:
    return {name: info["status"] for name, info in summary["stages"].items()}


def test_pipeline_runs_caches_and_reruns_downstream(tmp_path):
    path = _write_pipeline(tmp_path)
    first = run_pipeline(load_pipeline(str(path)))
    assert _statuses(first) == {"base": "ran", "sft": "ran", "eval": "ran"}
    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    assert "| base |" in report and "| sft |" in report and "## Lineage of `sft`" in report
    lineage = json.loads((out / "sft" / "lineage.json").read_text())
    assert lineage["inputs"]["base"]["stage"] == "base"
    recipe_used = yaml.safe_load((out / "sft" / "recipe.yaml").read_text())
    assert recipe_used["model_name_or_path"] == str(out / "base")  # wired by name, not by hand

    assert _statuses(run_pipeline(load_pipeline(str(path)))) == {"base": "cached", "sft": "cached", "eval": "cached"}

    _write_pipeline(tmp_path, sft_steps=7)  # a recipe change reruns that stage and everything after it
    assert _statuses(run_pipeline(load_pipeline(str(path)))) == {"base": "cached", "sft": "ran", "eval": "ran"}

    only = run_pipeline(load_pipeline(str(path)), only="eval")
    assert _statuses(only) == {"eval": "ran"}
    assert _statuses(run_pipeline(load_pipeline(str(path)), start="sft")) == {
        "base": "cached",
        "sft": "ran",
        "eval": "ran",
    }


def test_bad_pipelines_are_refused_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stages": [{"name": "sft", "command": "eval", "input": "nowhere"}]}))
    with pytest.raises(RecipeError, match="input 'nowhere' is not an earlier stage"):
        load_pipeline(str(bad))
    bad.write_text(yaml.safe_dump({"stage": [{"name": "x"}]}))
    with pytest.raises(RecipeError, match="unknown key `stage`. Did you mean `stages`"):
        load_pipeline(str(bad))
    bad.write_text(yaml.safe_dump({"stages": [{"name": "x", "command": "train-it"}]}))
    with pytest.raises(RecipeError, match="unknown command 'train-it'"):
        load_pipeline(str(bad))


def test_preflight_catches_a_broken_recipe_before_any_stage_runs(tmp_path):
    path = _write_pipeline(tmp_path)
    sft_recipe = tmp_path / "sft.yaml"
    sft_recipe.write_text(sft_recipe.read_text() + "learning_rat: 0.1\n")
    with pytest.raises(RecipeError, match="unknown recipe key `learning_rat`"):
        run_pipeline(load_pipeline(str(path)))
    assert not (tmp_path / "out" / "base").exists()

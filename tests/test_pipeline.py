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


def _add_ppo_stage(path: Path, **keys) -> dict:
    """Insert a PPO stage (wired to sft) after sft in the pipeline file; return the pipeline."""
    ppo_recipe = path.parent / "ppo.yaml"
    values = {"stage": "ppo", "model_name_or_path": "wired", "output_dir": "wired", "dataset_name": "synthetic:prompts"}
    ppo_recipe.write_text(yaml.safe_dump({**values, **keys}))
    pipeline = yaml.safe_load(path.read_text())
    pipeline["stages"].insert(2, {"name": "ppo", "recipe": str(ppo_recipe), "inputs": {"model_name_or_path": "sft"}})
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return pipeline


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
    assert not (tmp_path / "out" / ".pipeline").exists()  # a failed first run leaves no state behind


def test_a_base_model_without_chat_template_runs_in_a_pipeline(tiny_checkpoint, tmp_path):
    from tests.test_base_models import _base_copy

    base = _base_copy(tiny_checkpoint, tmp_path / "base-model")
    path = _write_pipeline(tmp_path, sft_steps=2)
    pipeline = yaml.safe_load(path.read_text())
    pipeline["stages"] = [{**pipeline["stages"][1], "inputs": {}}]
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(
        recipe.read_text().replace("model_name_or_path: wired-by-pipeline", f"model_name_or_path: {base}")
    )
    lines: list[str] = []
    summary = run_pipeline(load_pipeline(str(path)), echo=lines.append)
    assert _statuses(summary) == {"sft": "ran"}
    # the rendered example uses the plain template of the model's own tokens, the EOS inside the loss
    example = next(line for line in lines if line.startswith("  sft: "))
    assert "Assistant:" in example and "<|im_end|>]]" in example and "<|im_start|>" not in example


def test_preflight_checks_every_model_path_and_command_argument(tmp_path):
    """A missing reward model, or a typo in a command's `args:`, fails before the first stage runs."""
    path = _write_pipeline(tmp_path)
    pipeline = _add_ppo_stage(path, reward_model_path=str(tmp_path / "no-such-reward-model"))
    with pytest.raises(RecipeError, match="reward_model_path: path .*no-such-reward-model.* does not exist"):
        run_pipeline(load_pipeline(str(path)))

    pipeline["stages"].pop(2)
    pipeline["stages"][0]["args"]["hidden_sise"] = 32
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    with pytest.raises(RecipeError, match="stage base \\(command tiny-checkpoint\\): .*hidden_sise"):
        run_pipeline(load_pipeline(str(path)))

    del pipeline["stages"][0]["args"]["hidden_sise"]
    pipeline["stages"][-1]["args"]["num_promptz"] = 8
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    with pytest.raises(RecipeError, match="stage eval \\(command eval\\): unknown key `num_promptz`"):
        run_pipeline(load_pipeline(str(path)))
    assert not (tmp_path / "out" / "base").exists()


def test_pipeline_killed_mid_ppo_resumes_with_the_same_command(tmp_path):
    """SIGKILL the pipeline while PPO runs; the same command skips finished stages and resumes PPO."""
    import os
    import signal
    import subprocess
    import sys
    import time

    path = _write_pipeline(tmp_path)
    pipeline = _add_ppo_stage(
        path,
        synthetic_num_examples=64,
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        max_steps=30,
        per_device_train_batch_size=4,
        num_ppo_epochs=1,
        response_length=6,
        max_eval_samples=8,
        save_strategy="steps",
        save_steps=1,
        report_to="none",
        disable_tqdm=True,
    )
    pipeline["stages"][-1]["input"] = ["sft", "ppo"]
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    out = tmp_path / "out"

    command = [sys.executable, "-m", "rlhf.pipeline", str(path)]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "ppo.incomplete").glob("checkpoint-*/trainer_state.json")):
        assert process.poll() is None, "the pipeline ended before PPO could be killed"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / "sft").is_dir() and not (out / "ppo").exists() and not (out / "eval").exists()

    # The same command again: finished stages are skipped, PPO continues from its last checkpoint.
    summary = run_pipeline(load_pipeline(str(path)))
    assert _statuses(summary) == {"base": "cached", "sft": "cached", "ppo": "ran", "eval": "ran"}
    ppo_metrics = json.loads((out / "ppo" / "metrics.json").read_text())
    assert Path(ppo_metrics["resumed_from"]).name.startswith("checkpoint-")
    assert ppo_metrics["train"]["train_updates"] == 30
    report = (out / "report.md").read_text()
    assert "| ppo |" in report

    # An uninterrupted run of the same pipeline reaches the same headline: resume restored the
    # optimizer, RNG and data position, not just the weights.
    pipeline["output_dir"] = str(tmp_path / "uninterrupted")
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    run_pipeline(load_pipeline(str(path)))

    def headline(text: str) -> list[list[str]]:  # every column but latency, a wall-clock measurement
        table = text.split("## Headline")[1].split("## Stages")[0]
        return [line.split("|")[1:-2] for line in table.strip().splitlines()]

    assert headline((tmp_path / "uninterrupted" / "report.md").read_text()) == headline(report)


def test_training_stages_run_under_accelerate_launch_when_configured(tmp_path):
    path = _write_pipeline(tmp_path, sft_steps=2)
    pipeline = yaml.safe_load(path.read_text())
    pipeline["accelerate_config"] = str(Path(__file__).resolve().parents[1] / "accelerate_configs" / "cpu.yaml")
    pipeline["stages"] = pipeline["stages"][:2]  # base + sft
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    summary = run_pipeline(load_pipeline(str(path)))
    assert _statuses(summary) == {"base": "ran", "sft": "ran"}
    metrics = json.loads((tmp_path / "out" / "sft" / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and metrics["train"]["train_runtime"] > 0


def test_data_an_upstream_stage_writes_is_read_and_cached_by_that_stage(tiny_sft_checkpoint, tmp_path):
    # best-of-n writes samples/sft.jsonl; SFT reads it through `inputs: {dataset_name: samples/sft.jsonl}`.
    from rlhf.data.synthetic import make_synthetic_dataset

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in make_synthetic_dataset("prompts", 16, split="test")["prompt"])
    )
    sft_recipe = tmp_path / "sft.yaml"
    sft_recipe.write_text(
        yaml.safe_dump(
            {"stage": "sft", "model_name_or_path": "wired", "dataset_name": "wired", "output_dir": "wired"}
            | {"max_length": 64, "max_steps": 1, "report_to": "none", "save_strategy": "no", "disable_tqdm": True}
        )
    )
    samples = {
        "name": "samples",
        "command": "best-of-n",
        "input": "base",
        "args": {"prompts": str(prompts), "reward_funcs": ["rlhf.data.synthetic:rule_reward"], "seed": 0}
        | {"num_samples": 4, "max_new_tokens": 12, "temperature": 1.0},
    }
    pipeline = {
        "name": "upstream-data",
        "output_dir": str(tmp_path / "out"),
        "stages": [
            {"name": "base", "command": "export", "args": {"checkpoint": str(tiny_sft_checkpoint)}},
            samples,
            {
                "name": "sft",
                "recipe": str(sft_recipe),
                "inputs": {"model_name_or_path": "base", "dataset_name": "samples/sft.jsonl"},
            },
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    assert _statuses(run_pipeline(load_pipeline(str(path)))) == {"base": "ran", "samples": "ran", "sft": "ran"}
    used = yaml.safe_load((tmp_path / "out" / "sft" / "recipe.yaml").read_text())
    assert used["dataset_name"] == str(tmp_path / "out" / "samples" / "sft.jsonl")
    assert set(_statuses(run_pipeline(load_pipeline(str(path)))).values()) == {"cached"}

    # New samples: SFT reruns on them, and the run after that finds everything cached again (SFT's
    # fingerprint must not depend on the file as it was before the samples stage rewrote it).
    samples["args"]["seed"] = 1
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    assert _statuses(run_pipeline(load_pipeline(str(path)))) == {"base": "cached", "samples": "ran", "sft": "ran"}
    assert set(_statuses(run_pipeline(load_pipeline(str(path)))).values()) == {"cached"}

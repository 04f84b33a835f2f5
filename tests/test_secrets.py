"""Secrets and untrusted input: a Hub token never lands in a file rlhf writes; YAML builds no objects."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from rlhf.config import RecipeError, parse_overrides
from rlhf.pipeline import load_pipeline, run_pipeline
from rlhf.stages import sft
from tests.conftest import FAST_TRAINING, write_recipe
from tests.hub_server import FakeHub
from tests.test_publish import _online

RECIPE_TOKEN = "hf_SECRETTOKEN123"
ENV_TOKEN = "hf_ENVSECRET456"  # the user's own HF_TOKEN: no more welcome in a file than the recipe's


def files_holding(folder: Path, *secrets: str) -> list[str]:
    """Every file under `folder` whose bytes (pickles and zip archives too) contain one of `secrets`."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and any(secret.encode() in path.read_bytes() for secret in secrets):
            found.append(path.relative_to(folder).as_posix())
    return found


def _sft_values(**keys) -> dict:
    return {
        "stage": "sft",
        "dataset_name": "synthetic:sft",
        "synthetic_num_examples": 32,
        "max_eval_samples": 4,
        "max_length": 64,
        "max_steps": 2,
        "push_to_hub": True,
        "hub_model_id": "me/tiny-sft",
        "hub_token": RECIPE_TOKEN,
        **{**FAST_TRAINING, "save_strategy": "steps", "save_steps": 1, "per_device_train_batch_size": 4},
        **keys,
    }


class Killed(Exception):
    """Stands in for the process dying after its last checkpoint, before the output is finished."""


def test_a_killed_stage_leaves_no_token_in_its_checkpoints(tiny_checkpoint, tmp_path, monkeypatch):
    recipes, outputs = tmp_path / "recipes", tmp_path / "outputs"  # only what rlhf writes is searched
    recipes.mkdir()
    recipe = write_recipe(
        recipes / "sft.yaml", **_sft_values(model_name_or_path=str(tiny_checkpoint), output_dir=str(outputs / "sft"))
    )
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(sft, "finish_stage", killed)
    with pytest.raises(Killed):
        sft.main([str(recipe)])
    pickled_args = sorted((outputs / "sft.incomplete").glob("checkpoint-*/training_args.bin"))
    assert len(pickled_args) == 2  # the Trainer pickles its arguments into every checkpoint
    assert files_holding(outputs, RECIPE_TOKEN, ENV_TOKEN) == []


def test_pipeline_pushes_with_the_recipe_token_and_writes_it_nowhere(tmp_path, monkeypatch):
    recipes, out = tmp_path / "recipes", tmp_path / "out"
    recipes.mkdir()
    write_recipe(recipes / "sft.yaml", **_sft_values(model_name_or_path="wired", output_dir="wired"))
    pipeline = {
        "name": "secret",
        "output_dir": str(out),
        "stages": [
            {"name": "base", "command": "tiny-checkpoint", "args": {"hidden_size": 32, "num_layers": 1}},
            {"name": "sft", "recipe": str(recipes / "sft.yaml"), "inputs": {"model_name_or_path": "base"}},
            {"name": "eval", "command": "eval", "input": ["sft"], "args": {"recipe": str(recipes / "eval.yaml")}},
        ],
    }
    write_recipe(recipes / "eval.yaml", sections=["perplexity"], num_perplexity_texts=4)
    write_recipe(recipes / "pipeline.yaml", **pipeline)
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    with FakeHub() as hub:
        _online(monkeypatch, hub.url)
        run_pipeline(load_pipeline(str(recipes / "pipeline.yaml")))

    # The stage's one push authenticated with the recipe's token, which reached it through HF_TOKEN only.
    writes = [headers for method, _, headers in hub.requests if method == "POST"]
    assert writes and all(headers.get("authorization") == f"Bearer {RECIPE_TOKEN}" for headers in writes)
    assert "model.safetensors" in hub.files["me/tiny-sft"]
    assert os.environ["HF_TOKEN"] == ENV_TOKEN  # restored after the stage

    assert files_holding(out, RECIPE_TOKEN, ENV_TOKEN) == []
    assert not any(RECIPE_TOKEN.encode() in data for data in hub.files["me/tiny-sft"].values())
    # A token shows in the lineage and the fingerprint only as being set, downstream stages included.
    lineage = json.loads((out / "eval" / "lineage.json").read_text())
    assert lineage["inputs"]["sft"]["what"]["recipe"]["hub_token"] == "set"
    assert "hub_token" not in yaml.safe_load((out / ".pipeline" / "recipes" / "sft.yaml").read_text())


@pytest.mark.parametrize(
    "value",
    ['!!python/object/apply:os.system ["touch pwned"]', "!!python/object:collections.OrderedDict {}", "[unclosed"],
)
def test_an_override_that_is_not_plain_yaml_is_one_recipe_error(value, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=r"^--dataset_name: .* is not a plain YAML value") as error:
        parse_overrides(["--dataset_name", value])
    assert len(str(error.value).splitlines()) == 1
    recipe = write_recipe(
        tmp_path / "sft.yaml", **_sft_values(model_name_or_path=str(tiny_checkpoint), output_dir="out")
    )
    with pytest.raises(RecipeError, match="not a plain YAML value"):
        sft.parse([str(recipe), f"--learning_rate={value}"])
    # A text field takes the value as the literal text it is: no YAML, so no object is ever built.
    assert parse_overrides(["--dataset_name", value], {"dataset_name": str}) == {"dataset_name": value}
    assert not (tmp_path / "pwned").exists()


def test_a_recipe_file_with_a_python_tag_is_one_recipe_error(tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("stage: sft\ndataset_name: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        sft.parse([str(recipe)])


def test_rlhf_reads_yaml_only_with_the_safe_loader():
    unsafe = re.compile(r"yaml\.(load|load_all|unsafe_load|full_load)\(|yaml\.(Loader|UnsafeLoader|FullLoader)\b")
    package = Path(__file__).parents[1] / "rlhf"
    offenders = [str(p) for p in package.rglob("*.py") if unsafe.search(p.read_text())]
    assert offenders == []

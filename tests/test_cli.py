"""The `rlhf` command: dispatch, one-line errors for malformed recipes, and accelerate launch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.cli import main
from tests.conftest import FAST_TRAINING, write_recipe

REPO = Path(__file__).resolve().parents[1]


def test_malformed_recipes_print_one_clear_line(tiny_checkpoint, tmp_path, capsys):
    base = {"stage": "sft", "model_name_or_path": str(tiny_checkpoint), "dataset_name": "synthetic:sft"}
    cases = {
        "typo": ({**base, "output_dir": "o", "num_train_epoch": 1}, "did you mean `num_train_epochs`"),
        "type": ({**base, "output_dir": "o", "learning_rate": "fast"}, "learning_rate: got 'fast', expected a number"),
        "column": (
            {**base, "output_dir": "o", "dataset_name": str(tmp_path / "qa.jsonl")},
            "columns ['question', 'answer'] do not fit",
        ),
    }
    (tmp_path / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    for name, (keys, message) in cases.items():
        recipe = write_recipe(tmp_path / f"{name}.yaml", **keys)
        with pytest.raises(SystemExit) as exit_info:
            main(["train", str(recipe)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        last_line = err.strip().splitlines()[-1]  # earlier lines are datasets' progress bars
        assert last_line.startswith("error: ") and message.lower() in last_line.lower()
        assert "Traceback" not in err


def test_unknown_stage_and_command(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", stage="sftt")
    with pytest.raises(SystemExit):
        main(["train", str(recipe)])
    assert "set it to one of pretrain, sft" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["trian"])


def test_accelerate_launch_runs_a_stage(tiny_checkpoint, tmp_path):
    out = tmp_path / "sft"
    recipe = write_recipe(
        tmp_path / "sft.yaml",
        stage="sft",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name="synthetic:sft",
        synthetic_num_examples=40,
        max_length=64,
        max_steps=2,
        output_dir=str(out),
        **FAST_TRAINING,
    )
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(REPO / "accelerate_configs/cpu.yaml")]
    subprocess.run(
        [*command, "-m", "rlhf.stages.sft", str(recipe)], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert (out / "metrics.json").exists() and (out / "model.safetensors").exists()

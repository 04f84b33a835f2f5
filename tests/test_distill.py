"""Distillation stage: a smaller student trains from a teacher, saves loadable, and mismatches are refused early."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from rlhf.artifacts import read_metrics
from rlhf.config import RecipeError
from rlhf.stages import distill
from tests.conftest import FAST_TRAINING, write_recipe


def _recipe(tmp_path, teacher, name, **keys):
    values = {
        "stage": "distill",
        "teacher_model_name_or_path": str(teacher),
        "model_name_or_path": str(teacher),
        "student_hidden_size": 32,
        "student_num_layers": 1,
        "dataset_name": "synthetic:sft",
        "synthetic_num_examples": 64,
        "assistant_only_loss": True,
        "max_length": 64,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "measure_quality": False,
        "output_dir": str(tmp_path / name),
        **FAST_TRAINING,
    }
    values.update(keys)
    return write_recipe(tmp_path / f"{name}.yaml", **values)


def test_offline_distillation_saves_a_smaller_loadable_student(tiny_sft_checkpoint, tmp_path):
    distill.main([str(_recipe(tmp_path, tiny_sft_checkpoint, "student"))])
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_sft_checkpoint)
    assert student.config.hidden_size == 32 and student.config.num_hidden_layers == 1
    assert student.num_parameters() < teacher.num_parameters() / 2
    metrics = read_metrics(tmp_path / "student")
    assert metrics["parameters"]["student"] == student.num_parameters()
    assert metrics["parameters"]["student_fraction"] < 0.5


def test_distillation_loss_vanishes_when_the_student_is_the_teacher(tiny_sft_checkpoint, tmp_path):
    same = {"student_hidden_size": None, "student_num_layers": None, "max_steps": 1, "learning_rate": 0.0}
    distill.main([str(_recipe(tmp_path, tiny_sft_checkpoint, "kl", alpha=1.0, temperature=2.0, **same))])
    distill.main([str(_recipe(tmp_path, tiny_sft_checkpoint, "ce", alpha=0.0, **same))])
    assert read_metrics(tmp_path / "kl")["train"]["train_loss"] == pytest.approx(0.0, abs=1e-5)
    assert read_metrics(tmp_path / "ce")["train"]["train_loss"] > 0.05


@pytest.mark.parametrize("mode", ["on_policy", "gkd"])
def test_on_policy_and_gkd_modes_train(tiny_checkpoint, tmp_path, mode):
    distill.main([str(_recipe(tmp_path, tiny_checkpoint, mode, distillation_mode=mode, max_new_tokens=8, max_steps=2))])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / mode).config.hidden_size == 32
    assert read_metrics(tmp_path / mode)["mode"] == mode


def test_a_student_with_another_tokenizer_is_refused_before_training(tiny_checkpoint, tmp_path):
    from rlhf.tiny import build_tiny_checkpoint

    other = build_tiny_checkpoint(tmp_path / "other", hidden_size=32, num_layers=1, vocab_size=400)
    recipe = _recipe(tmp_path, tiny_checkpoint, "refused", model_name_or_path=str(other))
    with pytest.raises(RecipeError, match="tokenizer"):
        distill.main([str(recipe), "--student_hidden_size", "null", "--student_num_layers", "null"])
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.incomplete").exists()
    with pytest.raises(RecipeError, match="distillation_mode"):
        distill.main([str(recipe), "--distillation_mode", "online"])

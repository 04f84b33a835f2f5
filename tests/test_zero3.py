"""DeepSpeed ZeRO-3 on 2 CPU processes: every Trainer stage shards its model, and publishes one full checkpoint.

`accelerate launch` with accelerate_configs/zero3_cpu.yaml starts two gloo processes on this GPU-less machine;
DeepSpeed runs them through its CPU accelerator. The config's DeepSpeed JSON sets
`stage3_param_persistence_threshold: 0`, so every weight of the tiny model is partitioned (DeepSpeed's default
keeps weights under 100k elements whole on every process: all of them here). All stages share one launch, as in
tests/test_fsdp.py, whose checks (assert_sharded_and_published_once, ...) run unchanged on this launch's reports. PPO is not among them: it refuses
ZeRO-3 (generation would need the gathered weights), which the last test checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlhf.config import RecipeError
from tests import test_fsdp
from tests.conftest import write_recipe
from tests.test_distributed import CONFIGS, REPO, launch_stages

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (`pip install -e '.[dev]'` installs it)")

CONFIG = "zero3_cpu.yaml"
STAGES = test_fsdp.TRAINER_STAGES


@pytest.fixture(scope="module")
def zero3_run(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every Trainer stage run once, one after another, in the same 2 ZeRO-3 processes."""
    return launch_stages(tiny_checkpoint, tmp_path_factory.mktemp("zero3"), STAGES, timeout=900, config=CONFIG)


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", STAGES)
def test_stage_shards_its_model_over_two_cpu_processes_and_saves_one_full_checkpoint(zero3_run: dict, stage: str):
    # The FSDP2 checks, unchanged: world size 2; no parameter held whole, each rank holding about half of each
    # weight; published once, by the time finish_stage returns on either rank, as one safetensors checkpoint (no
    # sharded checkpoint folder left) that from_pretrained loads with the trained weights, parameter by parameter.
    test_fsdp.assert_sharded_and_published_once(zero3_run, stage)
    # ZeRO-3 partitions each weight flat (the last rank's slice padded), not by rows: one-row weights and norms
    # are split too, so every parameter is about half on each rank, and none is kept whole (`ds_persist`).
    report = zero3_run["reports"][stage]
    assert len(report["local_fraction"]) == report["num_sharded_parameters"] == len(report["parameter_sums"])
    for name, fraction in report["local_fraction"].items():
        assert test_fsdp.is_about_half(fraction, report["rows"][name]), name


@pytest.mark.multiprocess
def test_sft_loss_under_zero3_matches_one_process_with_the_same_global_batch(zero3_run: dict, tiny_checkpoint: Path):
    """The same 4 losses as one process with the same global batch (rel 1e-4), as under FSDP2 (the same test);
    evaluation before training ran too (rlhf.distributed drops the ZeRO-3 inference engine evaluate() builds)."""
    test_fsdp.assert_sft_loss_matches_one_process(zero3_run, tiny_checkpoint)


def test_ppo_refuses_the_zero3_cpu_config_before_loading(tiny_checkpoint: Path, tmp_path: Path, monkeypatch):
    """zero3_cpu.yaml names a DeepSpeed JSON, so `accelerate launch` sets no ACCELERATE_DEEPSPEED_ZERO_STAGE (unlike
    zero3.yaml, whose refusal tests/test_ppo.py checks): PPO reads the stage from the file and still refuses."""
    from rlhf.stages import ppo

    deepspeed_config = yaml.safe_load((CONFIGS / CONFIG).read_text())["deepspeed_config"]
    assert "zero_stage" not in deepspeed_config  # accelerate refuses it next to a JSON: the stage is in the file
    # What `accelerate launch --config_file accelerate_configs/zero3_cpu.yaml` sets for the stage (from the repo root).
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", deepspeed_config["deepspeed_config_file"])
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    assert json.loads((REPO / deepspeed_config["deepspeed_config_file"]).read_text())["zero_optimization"]["stage"] == 3
    recipe = write_recipe(
        tmp_path / "ppo.yaml",
        stage="ppo",
        model_name_or_path=str(tiny_checkpoint),
        dataset_name="synthetic:prompts",
        reward_funcs=["rlhf.data.synthetic:rule_reward"],
        output_dir=str(tmp_path / "out"),
    )
    with pytest.raises(RecipeError, match=r"^ppo: PPO does not run under DeepSpeed ZeRO-3 .*fsdp.yaml"):
        ppo.parse([str(recipe)])

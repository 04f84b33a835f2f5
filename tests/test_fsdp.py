"""FSDP2 on 2 CPU processes: every Trainer stage really shards its model, and publishes one full checkpoint.

`accelerate launch` with accelerate_configs/fsdp_cpu.yaml starts two gloo processes on this GPU-less
machine; rlhf makes accelerate shard over them (rlhf.distributed.shard_over_gloo_when_launched_with_fsdp)
instead of silently running DDP. All stages share one launch, as in tests/test_distributed.py. PPO
(its own trainer) shards all four models: policy + value model as one trained module, the reference
copy and the reward model as inference-only ones; it is compared with the same run under DDP, and
killed and resumed.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from rlhf.artifacts import INCOMPLETE_SUFFIX, read_metrics
from tests.conftest import write_recipe
from tests.test_distributed import REPO, SMALL, launch, launch_command, stage_recipes

TRAINER_STAGES = ["pretrain", "sft", "reward", "dpo", "grpo", "rloo", "distill"]
STAGES = [*TRAINER_STAGES, "ppo"]


def ppo_recipe_keys(sft_checkpoint: Path, reward_checkpoint: Path) -> dict:
    """PPO from the tiny SFT model against the tiny reward model (which the value model starts from) and the
    world's rule: four models, all sharded. Three updates, a checkpoint after each."""
    return {
        **SMALL,
        "model_name_or_path": str(sft_checkpoint),
        "dataset_name": "synthetic:prompts",
        "synthetic_num_examples": 200,
        "max_eval_samples": 16,
        "reward_model_path": str(reward_checkpoint),
        "reward_min_accuracy": 0.6,
        "reward_funcs": ["rlhf.data.synthetic:rule_reward"],
        "reward_weights": [0.5, 1.0],
        "response_length": 12,
        "max_steps": 3,
        "num_ppo_epochs": 1,
        "learning_rate": 3e-4,
        "save_strategy": "steps",
        "save_steps": 1,
    }


@pytest.fixture(scope="module")
def fsdp_run(
    tiny_checkpoint: Path,
    tiny_sft_checkpoint: Path,
    tiny_reward_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict:
    """Every stage run once, one after another, in the same 2 FSDP2 processes."""
    tmp = tmp_path_factory.mktemp("fsdp")
    recipes = {
        **{stage: {**SMALL, **keys} for stage, keys in stage_recipes(tiny_checkpoint, tmp).items()},
        "ppo": ppo_recipe_keys(tiny_sft_checkpoint, tiny_reward_checkpoint),
    }
    runs, outputs = [], {}
    for stage in STAGES:
        outputs[stage] = tmp / stage
        recipe = write_recipe(
            tmp / f"{stage}.yaml",
            stage=stage,
            **{"model_name_or_path": str(tiny_checkpoint), **recipes[stage]},
            output_dir=str(outputs[stage]),
        )
        runs.append((stage, recipe, []))
    reports = launch(tmp / "report.json", runs, timeout=900, config="fsdp_cpu.yaml")
    return {"reports": reports, "outputs": outputs, "tmp": tmp}


def is_about_half(fraction: float, rows: int) -> bool:
    """FSDP2 splits dim 0: ceil(rows / 2) rows on rank 0, the rest on rank 1."""
    return fraction == pytest.approx(0.5, abs=0.5 / rows)


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", STAGES)
def test_stage_shards_its_model_over_two_cpu_processes_and_saves_one_full_checkpoint(fsdp_run: dict, stage: str):
    assert_sharded_and_published_once(fsdp_run, stage)


def assert_sharded_and_published_once(run: dict, stage: str) -> None:
    """A stage's report and output from a sharded launch (FSDP2 here, ZeRO-3 in test_zero3.py)."""
    report, output = run["reports"][stage], run["outputs"][stage]
    assert report["world_size"] == 2
    assert read_metrics(output)["world_size"] == 2
    # Sharded, not replicated: every parameter is a DTensor, and each rank holds about half of each
    # weight (FSDP2 splits dim 0; ceil(rows / 2) rows on rank 0). A one-row weight stays on one rank.
    assert report["unsharded_parameters"] == []
    assert report["num_sharded_parameters"] == len(report["parameter_sums"]) > 0
    halves = {name: fraction for name, fraction in report["local_fraction"].items() if report["rows"][name] >= 2}
    assert len(halves) >= report["num_sharded_parameters"] - 1
    for name, fraction in halves.items():
        assert is_about_half(fraction, report["rows"][name]), name
    # PPO's reference copy and reward model, which only score, are sharded the same way.
    for frozen in ("ref_model", "reward_model") if stage == "ppo" else ():
        held = report[f"{frozen}_sharding"]
        assert held["unsharded_parameters"] == [] and held["num_sharded_parameters"] > 0, frozen
        for name, fraction in held["local_fraction"].items():
            assert held["rows"][name] < 2 or is_about_half(fraction, held["rows"][name]), (frozen, name)

    # Saved once, by the main process, as one whole safetensors checkpoint (no sharded checkpoint left).
    assert report["published_on_return"] == [1.0, 1.0]
    assert not output.with_name(output.name + INCOMPLETE_SUFFIX).exists()
    assert len(list(output.glob("*.safetensors"))) == 1
    assert not [path.name for path in output.iterdir() if path.is_dir() or path.suffix == ".distcp"]

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if stage == "reward" else AutoModelForCausalLM
    model = auto.from_pretrained(output)
    # The file holds the trained weights gathered from both shards: the same values, parameter by parameter.
    # (PPO trains policy and value model as one module; its output is the policy alone.)
    saved = {name: p.detach().double().sum().item() for name, p in model.named_parameters()}
    trained = report["parameter_sums"]
    if stage == "ppo":
        trained = {name.removeprefix("policy."): v for name, v in trained.items() if name.startswith("policy.")}
    assert saved.keys() == trained.keys()
    for name, value in trained.items():
        assert saved[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name


@pytest.mark.multiprocess
def test_sft_loss_under_fsdp_matches_one_process_with_the_same_global_batch(fsdp_run: dict, tiny_checkpoint: Path):
    """Sharding changes where weights live, not the maths: the loss curve is the one-process one (and DDP's,
    which test_distributed holds to the same one-process curve), to float rounding (rel 1e-4)."""
    assert_sft_loss_matches_one_process(fsdp_run, tiny_checkpoint)


def assert_sft_loss_matches_one_process(run: dict, tiny_checkpoint: Path) -> None:
    """The sharded launch's SFT losses against a 1-process run with the same global batch (and eval before training ran)."""
    from rlhf.stages import sft

    tmp = run["tmp"]
    recipe = write_recipe(
        tmp / "sft_one.yaml",
        stage="sft",
        model_name_or_path=str(tiny_checkpoint),
        output_dir=str(tmp / "sft_one"),
        **{**SMALL, **stage_recipes(tiny_checkpoint, tmp)["sft"], "per_device_train_batch_size": 8},
    )
    sft.main([str(recipe)])
    history = json.loads((tmp / "sft_one" / "trainer_state.json").read_text())["log_history"]
    one = [entry["loss"] for entry in history if "loss" in entry]
    sharded = [entry["loss"] for entry in run["reports"]["sft"]["log_history"] if "loss" in entry]
    assert len(one) == len(sharded) == 4
    assert sharded == pytest.approx(one, rel=1e-4)
    assert sharded[-1] < sharded[0]  # and it learned
    # Evaluation before training ran on the sharded model too (transformers alone raises there under FSDP2).
    # Its value is not compared: 2 processes split the 20 held-out rows into other batches than 1 does.
    assert math.isfinite(read_metrics(run["outputs"]["sft"])["eval_before"]["eval_before_loss"])


# ---- PPO: FSDP2 against DDP, and a kill -------------------------------------------------------------


@pytest.mark.multiprocess
def test_ppo_under_fsdp_trains_and_evaluates_like_ppo_under_ddp(
    fsdp_run: dict, tiny_sft_checkpoint: Path, tiny_reward_checkpoint: Path
):
    """The same PPO recipe on 2 processes, sharded (FSDP2) and replicated (DDP): sharding moves weights, not the maths.

    Rollouts sample with each rank's own seed in both, so the runs see the same responses; the update
    statistics agree to float rounding (reduce-scatter vs all-reduce sums in another order: rel 1e-3),
    and the greedy evaluation after training gives the same rewards (abs 1e-3).
    """
    tmp = fsdp_run["tmp"]
    recipe = write_recipe(
        tmp / "ppo_ddp.yaml",
        stage="ppo",
        **ppo_recipe_keys(tiny_sft_checkpoint, tiny_reward_checkpoint),
        output_dir=str(tmp / "ppo_ddp"),
    )
    ddp = launch(tmp / "ddp_report.json", [("ppo", recipe, [])], config="ddp.yaml")["ppo"]
    fsdp = fsdp_run["reports"]["ppo"]
    compared = ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "val/ratio")
    ddp_logs = [{k: log[k] for k in compared} for log in ddp["log_history"] if "objective/scores" in log]
    fsdp_logs = [{k: log[k] for k in compared} for log in fsdp["log_history"] if "objective/scores" in log]
    assert len(ddp_logs) == len(fsdp_logs) == 3
    for update, (replicated, sharded) in enumerate(zip(ddp_logs, fsdp_logs), start=1):
        for key in compared:
            assert sharded[key] == pytest.approx(replicated[key], rel=1e-3, abs=1e-5), (update, key)
    ddp_eval, fsdp_eval = read_metrics(tmp / "ppo_ddp")["eval"], read_metrics(fsdp_run["outputs"]["ppo"])["eval"]
    assert fsdp_eval.keys() == ddp_eval.keys()
    for key in ("eval_reward", "eval_rule_score", "eval_response_length"):
        assert fsdp_eval[key] == pytest.approx(ddp_eval[key], abs=1e-3), key
    # PPO moved the policy: the comparison is of trained models, not of two copies of the start.
    assert read_metrics(fsdp_run["outputs"]["ppo"])["eval"]["eval_kl"] != 0


@pytest.mark.multiprocess
def test_ppo_under_fsdp_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(
    fsdp_run: dict, tiny_sft_checkpoint: Path, tiny_reward_checkpoint: Path
):
    """SIGKILL to both ranks once a sharded checkpoint is complete; the same command resumes from it and ends
    with the weights of the uninterrupted run (fsdp_run's PPO, the same recipe)."""
    tmp = fsdp_run["tmp"]
    out = tmp / "ppo_killed"
    recipe = write_recipe(
        tmp / "ppo_killed.yaml",
        stage="ppo",
        **ppo_recipe_keys(tiny_sft_checkpoint, tiny_reward_checkpoint),
        output_dir=str(out),
    )
    command, env = launch_command(tmp / "killed_report.json", [("ppo", recipe, [])], config="fsdp_cpu.yaml")
    killed = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    incomplete = out.with_name(out.name + INCOMPLETE_SUFFIX)
    deadline = time.time() + 400
    while time.time() < deadline and not list(incomplete.glob("checkpoint-*/trainer_state.json")):
        assert killed.poll() is None, "PPO ended before it could be killed"
        time.sleep(0.2)
    # The launcher and both ranks (torch's launcher starts each rank in a session of its own).
    for process in [*psutil.Process(killed.pid).children(recursive=True), psutil.Process(killed.pid)]:
        process.kill()
    killed.wait()
    assert not out.exists()
    command, env = launch_command(tmp / "resumed_report.json", [("ppo", recipe, [])], config="fsdp_cpu.yaml")
    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert Path(read_metrics(out)["resumed_from"]).name.startswith("checkpoint-")
    uninterrupted = load_file(fsdp_run["outputs"]["ppo"] / "model.safetensors")
    after_resume = load_file(out / "model.safetensors")
    assert after_resume.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert (after_resume[name] - tensor).abs().max().item() <= 1e-6, name

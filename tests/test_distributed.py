"""Multi-process runs: the accelerate configs parse, and every stage trains correctly on 2 processes.

The 2-process runs are real: `accelerate launch` with accelerate_configs/ddp.yaml starts two gloo
processes on this GPU-less machine (tests/distributed_stage.py runs the stages in them). All
stages share one launch, as a pipeline would, so the ~10 s of imports per process is paid once.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Collection, Sequence
from pathlib import Path

import pytest
import torch
import yaml

from rlhf.artifacts import INCOMPLETE_SUFFIX, read_metrics
from tests.conftest import FAST_TRAINING, write_recipe

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "accelerate_configs"

# ---- the accelerate configs -----------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config_loads_with_accelerates_own_parser(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert config.distributed_type.value == raw["distributed_type"]
    # `accelerate launch` copies these blocks onto its arguments without checking names: a typo would be ignored.
    launch_arguments = {action.dest for action in launch_command_parser()._actions}
    for key in [*config.fsdp_config, *config.deepspeed_config]:
        assert key in launch_arguments, f"{path.name}: `{key}` is not an accelerate launch setting"
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port, "multi-node needs the main machine's address"


def test_every_documented_accelerate_config_exists():
    # The README and the docs site (docs/devices.md holds the table of configs).
    texts = [(REPO / "README.md").read_text(), *(page.read_text() for page in (REPO / "docs").rglob("*.md"))]
    named = {name for text in texts for name in re.findall(r"accelerate_configs/([\w.-]+\.yaml)", text)}
    shipped = {path.name for path in CONFIGS.glob("*.yaml")}
    assert {"ddp.yaml", "fsdp.yaml", "zero2.yaml", "zero3.yaml", "multi_node.yaml"} <= named
    assert named <= shipped, f"README or docs name configs that do not exist: {named - shipped}"


def test_run_tears_down_the_process_group(tmp_path: Path):
    from rlhf.entrypoint import run

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    seen = []
    run(lambda argv: seen.append(torch.distributed.is_initialized()), [])
    assert seen == [True]
    assert not torch.distributed.is_initialized()
    run(lambda argv: None, [])  # and a no-op when there is none


# ---- every stage on 2 processes ------------------------------------------------------------------

SMALL = {**FAST_TRAINING, "logging_steps": 1, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8}


def stage_recipes(base: Path, out: Path) -> dict[str, dict]:
    """One short recipe per stage, all from the tiny checkpoint; keys that batch sizes depend on are per stage."""
    prompts = {"dataset_name": "synthetic:prompts", "synthetic_num_examples": 200, "max_eval_samples": 8}
    preference = {"dataset_name": "synthetic:preference", "synthetic_num_examples": 200, "max_eval_samples": 16}
    online = {**prompts, "reward_funcs": ["rlhf.data.synthetic:rule_reward"], "max_completion_length": 8}
    online.update(num_generations=4, max_steps=2, eval_strategy="no")
    return {
        "pretrain": {
            "dataset_name": "synthetic:pretrain",
            "synthetic_num_examples": 200,
            "max_length": 64,
            "max_steps": 3,
        },
        "sft": {
            "dataset_name": "synthetic:sft",
            "synthetic_num_examples": 200,
            "clean_deduplicate": False,
            "assistant_only_loss": True,
            "max_length": 64,
            "max_steps": 4,
            "learning_rate": 3e-3,
        },
        "reward": {**preference, "max_length": 64, "max_steps": 3, "reward_stats_samples": 32},
        "dpo": {**preference, "max_length": 64, "max_steps": 3},
        "grpo": online,
        "rloo": online,
        "ppo": {
            **prompts,
            "reward_funcs": ["rlhf.data.synthetic:rule_reward"],
            "response_length": 8,
            "max_steps": 2,
            "num_ppo_epochs": 1,
            "learning_rate": 1e-3,
            # A checkpoint every update: each rank writes its RNG state into the main process's folder.
            "save_strategy": "steps",
            "save_steps": 1,
        },
        "distill": {
            "teacher_model_name_or_path": str(base),
            "dataset_name": "synthetic:sft",
            "synthetic_num_examples": 200,
            "assistant_only_loss": True,
            "max_length": 64,
            "student_num_layers": 1,
            "max_steps": 3,
            "measure_quality": False,
        },
    }


def free_port() -> int:
    """A free TCP port on this machine for a rendezvous, so parallel sessions never collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(
    report: Path,
    runs: list[tuple[str, Path, list[str]]],
    config: str = "ddp.yaml",
    port: int | None = None,
    launcher_args: Sequence[str] = (),
    mixed_precision: str | None = "no",
) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command (2 processes over gloo running `runs` in order) and its environment.

    `launcher_args` go to `accelerate launch` too (e.g. a machine's rank of a multi-machine launch);
    `mixed_precision=None` keeps the config's own."""
    argv = [str(report)]
    for i, (stage, recipe, overrides) in enumerate(runs):
        argv += (["::"] if i else []) + [stage, str(recipe), *overrides]
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)),
        *("--num_processes", "2", "--main_process_port", str(port or free_port())),
        *(("--mixed_precision", mixed_precision) if mixed_precision else ()),
        *launcher_args,
        str(REPO / "tests" / "distributed_stage.py"),
        *argv,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return command, env


def launch(report: Path, runs: list[tuple[str, Path, list[str]]], timeout: int = 400, config: str = "ddp.yaml") -> dict:
    """`accelerate launch` 2 processes over gloo running `runs` in order; the per-stage report of rank 0."""
    command, env = launch_command(report, runs, config)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def two_process(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every stage run once, one after another, in the same 2 processes."""
    return launch_stages(tiny_checkpoint, tmp_path_factory.mktemp("two_process"))


def launch_stages(base: Path, tmp: Path, stages: Collection[str] | None = None, **launch_options) -> dict:
    """The `stage_recipes` (all, or those in `stages`) run once each, one after another, in one 2-process launch."""
    runs, outputs = [], {}
    for stage, keys in stage_recipes(base, tmp).items():
        if stages is not None and stage not in stages:
            continue
        outputs[stage] = tmp / stage
        recipe = write_recipe(
            tmp / f"{stage}.yaml",
            stage=stage,
            model_name_or_path=str(base),
            output_dir=str(outputs[stage]),
            **{**SMALL, **keys},
        )
        runs.append((stage, recipe, []))
    return {"reports": launch(tmp / "report.json", runs, **launch_options), "outputs": outputs, "tmp": tmp}


STAGES = ["pretrain", "sft", "reward", "dpo", "grpo", "rloo", "ppo", "distill"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_on_two_processes_in_lockstep_and_saves_once(two_process: dict, stage: str):
    report, output = two_process["reports"][stage], two_process["outputs"][stage]
    assert report["world_size"] == 2
    assert read_metrics(output)["world_size"] == 2
    # DDP averaged the gradients: both replicas hold the same weights after the last step.
    assert report["max_param_diff_across_ranks"] == 0.0
    # finish_stage returns on no rank before the output is published, and leaves no scratch folder.
    assert report["published_on_return"] == [1.0, 1.0]
    assert not output.with_name(output.name + INCOMPLETE_SUFFIX).exists()
    assert len(list(output.glob("*.safetensors"))) == 1

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if stage == "reward" else AutoModelForCausalLM
    model = auto.from_pretrained(output)
    assert model.num_parameters() > 0
    if stage != "distill":  # the distilled student is a smaller model than the replicas compared above
        assert sum(p.numel() for p in model.parameters()) <= report["num_parameters"]


@pytest.mark.multiprocess
def test_sft_loss_on_two_processes_matches_one_process_with_the_same_global_batch(two_process: dict, tiny_checkpoint):
    from rlhf.stages import sft

    tmp = two_process["tmp"]
    recipe = write_recipe(
        tmp / "sft_one.yaml",
        stage="sft",
        model_name_or_path=str(tiny_checkpoint),
        output_dir=str(tmp / "sft_one"),
        **{**SMALL, **stage_recipes(tiny_checkpoint, tmp)["sft"], "per_device_train_batch_size": 8},
    )
    sft.main([str(recipe)])
    one = [
        entry["loss"]
        for entry in json.loads((tmp / "sft_one" / "trainer_state.json").read_text())["log_history"]
        if "loss" in entry
    ]
    two = [entry["loss"] for entry in two_process["reports"]["sft"]["log_history"] if "loss" in entry]
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-4)
    assert two[-1] < two[0]  # and it learned


@pytest.mark.multiprocess
def test_ppo_on_two_processes_covers_the_global_batch_and_evaluates_like_one_process(
    two_process: dict, tiny_checkpoint
):
    from rlhf.stages import ppo

    tmp = two_process["tmp"]
    keys = {**SMALL, **stage_recipes(tiny_checkpoint, tmp)["ppo"], "max_steps": 1, "save_strategy": "no"}
    recipe = write_recipe(
        tmp / "ppo_one.yaml",
        stage="ppo",
        model_name_or_path=str(tiny_checkpoint),
        output_dir=str(tmp / "ppo_one"),
        **keys,
    )
    ppo.main([str(recipe)])
    one, two = read_metrics(tmp / "ppo_one"), read_metrics(two_process["outputs"]["ppo"])
    # Each update samples per_device_train_batch_size prompts on each of the 2 ranks.
    assert two["train"]["train_episodes"] == 2 * 2 * SMALL["per_device_train_batch_size"]
    assert one["train"]["train_episodes"] == 1 * SMALL["per_device_train_batch_size"]
    # Greedy evaluation of the same starting policy: identical scores whether 1 or 2 processes generate.
    assert one["eval_before"] == pytest.approx(two["eval_before"], abs=1e-5)

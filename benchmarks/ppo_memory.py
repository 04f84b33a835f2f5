"""Peak memory of PPO with LoRA (the reference is the base with adapters off) vs full PPO vs SFT.

    .venv/bin/python benchmarks/ppo_memory.py                    # ~33M-parameter Llama, 2 alternating repeats
    .venv/bin/python benchmarks/ppo_memory.py --hidden-size 768 --num-layers 8

A random Llama big enough that weights, gradients and optimizer states dominate the ~0.6 GB that
Python + torch + transformers take by themselves. Each arm is a real stage run in its own
subprocess (`python -m rlhf.stages.sft|ppo recipe.yaml`, a few optimizer steps); peak RSS is the
child's own maximum resident set. Expected fp32 footprints (W = weights):
SFT ≈ 4W (weights, grads, 2 Adam moments); full PPO ≈ 9W (policy 4W + frozen reference 1W +
value model 4W); LoRA PPO ≈ 5W (shared frozen base 1W + value model 4W; the reference costs nothing).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _common import PYTHON, ensure_checkpoint, machine_note, median, print_table, run_child, write_yaml

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
ARMS = {"sft": SFT, "ppo-full": PPO, "ppo-lora": {**PPO, **LORA}, "sft-lora": {**SFT, **LORA}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", default="sft,ppo-full,ppo-lora")
    parser.add_argument("--work", default="/tmp/rlhf_bench/ppo_memory")
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
        f"layers, weights {weights_mb:.0f} MB fp32; goal: ppo-lora ≤ 1.5 × sft\n"
    )
    rows = []
    for arm in arms:
        value = median(rss[arm])
        rows.append([arm, f"{value:.0f}", value / sft if sft else "-", f"{value / weights_mb:.1f}"])
    print_table(["arm", "peak RSS MB (median)", "× sft", "peak RSS / weight size"], rows)


if __name__ == "__main__":
    main()

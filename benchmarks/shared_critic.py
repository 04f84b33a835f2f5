"""Does a shared value head cost a LoRA policy reward gain? Two critics, the same PPO recipe, seeds alternated.

    .venv/bin/python benchmarks/shared_critic.py                  # needs outputs/tiny/{sft,reward}: `make demo`
    .venv/bin/python benchmarks/shared_critic.py --seeds 42,1,2 --learning-rate 1e-3

`recipes/tiny/ppo.yaml` with a LoRA policy (r 16, alpha 32, every linear layer), run once per seed and
critic, the arms alternated (seed 42: value model, shared; seed 1: value model, shared; ...):

- `value_model`: `value_model_path` unset, so the critic is a full copy of the reward model (trained in full);
- `shared`: `value_model_path: shared`, a value head on the policy's own LoRA backbone.

Figures per run, from the stage's metrics.json: the held-out rule score before (`eval_before`, the SFT
model) and after PPO, the gain between them, the held-out reward, KL to the reference, and episodes/s.
Each run is a child process alone on the machine (2 threads unless `--threads`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _common import PYTHON, REPO, machine_note, median, print_table, run_child

ARMS = {"value_model": [], "shared": ["--value_model_path", "shared"]}
LORA = ["--use_peft", "true", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.0"]
LORA += ["--lora_target_modules", "all-linear"]


def run(arm: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    output = args.work / f"{arm}-{seed}"
    shutil.rmtree(output, ignore_errors=True)
    cmd = [PYTHON, "-m", "rlhf.stages.ppo", str(REPO / "recipes/tiny/ppo.yaml"), *LORA, *ARMS[arm]]
    cmd += ["--seed", str(seed), "--learning_rate", str(args.learning_rate), "--output_dir", str(output)]
    cmd += ["--model_name_or_path", str(args.sft), "--reward_model_path", str(args.reward), "--save_strategy", "no"]
    spent = run_child(cmd, args.threads, args.work / f"{arm}-{seed}.log")
    metrics = json.loads((output / "metrics.json").read_text())
    before, after = metrics["eval_before"], metrics["eval"]
    return {
        "rule_before": before["eval_before_rule_score"],
        "rule_after": after["eval_rule_score"],
        "gain": after["eval_rule_score"] - before["eval_before_rule_score"],
        "reward": after["eval_reward"],
        "kl": after["eval_kl"],
        "episodes_per_second": metrics["train"]["episodes_per_second"],
        "peak_rss_mb": spent["peak_rss_mb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="LoRA's (the recipe's 1e-4 is full FT)")
    parser.add_argument("--sft", type=Path, default=REPO / "outputs/tiny/sft")
    parser.add_argument("--reward", type=Path, default=REPO / "outputs/tiny/reward")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rlhf_bench/shared_critic"))
    args = parser.parse_args()
    for path in (args.sft, args.reward):
        if not (path / "config.json").exists():
            raise SystemExit(f"no checkpoint in {path}: run `make demo` first (it writes outputs/tiny)")
    args.work.mkdir(parents=True, exist_ok=True)
    rows, results = [], {arm: [] for arm in ARMS}
    for seed in map(int, args.seeds.split(",")):
        for arm in ARMS:
            result = run(arm, seed, args)
            results[arm].append(result)
            row = [arm, seed, *(f"{result[k]:.3f}" for k in ("rule_before", "rule_after", "gain", "reward", "kl"))]
            rows.append([*row, f"{result['episodes_per_second']:.1f}", f"{result['peak_rss_mb']:.0f}"])
            print("  " + " | ".join(map(str, rows[-1])), flush=True)
    for arm, runs in results.items():
        keys = ("rule_before", "rule_after", "gain", "reward", "kl")
        medians = [f"{median([r[k] for r in runs]):.3f}" for k in keys]
        speed = median([r["episodes_per_second"] for r in runs])
        rss = median([r["peak_rss_mb"] for r in runs])
        rows.append([f"**{arm} (median)**", "", *medians, f"{speed:.1f}", f"{rss:.0f}"])
    print(f"\nLoRA PPO on the tiny world, lr {args.learning_rate}, {args.threads} threads ({machine_note()})\n")
    headers = ["critic", "seed", "rule before", "rule after", "gain", "eval reward", "eval KL", "episodes/s"]
    print_table([*headers, "peak RSS MB"], rows)
    (args.work / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

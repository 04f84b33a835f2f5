"""Reward model, DPO and GRPO on the embedded tiny task: do they beat the SFT model they start from?

Run by hand, after `rlhf tiny-checkpoint outputs/tiny/base`, `rlhf train recipes/tiny/pretrain.yaml`
and `rlhf train recipes/tiny/sft.yaml`:

    .venv/bin/python benchmarks/rlhf_core.py [--out /tmp/rlhf_bench/rlhf_core] [--train grpo] [--stages reward,dpo,grpo]

Trains each stage from its recipe in recipes/tiny/ (outputs under --out, GRPO scored by the reward
model trained here), then prints, for SFT and each policy, on the world's held-out prompts
(split="test", greedy decoding): the rule score (1 = the preferred answer), the mean reward-model
score, and the KL to the SFT model on the policy's own responses. Also prints the reward model's
held-out pairwise accuracy and each stage's wall and CPU time (the CPU time stays meaningful when
other jobs share the machine; the wall time does not).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.artifacts import read_metrics  # noqa: E402
from rlhf.data.synthetic import classify_prompt, make_synthetic_dataset, rule_reward  # noqa: E402
from rlhf.evaluation.generation import (  # noqa: E402
    generate_tokens,
    prompt_text,
)
from rlhf.logprobs import kl_to_reference
from rlhf.rewards import reward_model_scores  # noqa: E402

SFT = "outputs/tiny/sft"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train(stage: str, out: Path, extra: list[str]) -> dict:
    """Run recipes/tiny/<stage>.yaml in-process; return wall and CPU seconds."""
    import importlib

    module = importlib.import_module(f"rlhf.stages.{stage}")
    wall, cpu = time.perf_counter(), cpu_seconds()
    module.main([f"recipes/tiny/{stage}.yaml", "--output_dir", str(out / stage), "--disable_tqdm", "true", *extra])
    return {"wall_s": time.perf_counter() - wall, "cpu_s": cpu_seconds() - cpu}


def evaluate(policy_dir: str, reference, reward_model, tokenizer, prompts: list) -> dict:
    """Rule score (overall and per prompt kind), mean reward-model score and KL to the reference."""
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    pairs = generate_tokens(policy, tokenizer, prompts, max_new_tokens=32)
    responses = [tokenizer.decode(r, skip_special_tokens=True).strip() for _, r in pairs]
    scores = rule_reward(prompts, responses)
    kinds: dict[str, list[float]] = {}
    for prompt, score in zip(prompts, scores):
        kinds.setdefault(classify_prompt(prompt_text(prompt)), []).append(score)
    result = {
        "rule": sum(scores) / len(scores),
        "by_kind": {k: sum(v) / len(v) for k, v in sorted(kinds.items())},
        "examples": list(zip([prompt_text(p) for p in prompts[:4]], responses[:4])),
    }
    if reward_model is not None:
        rewards = reward_model_scores(reward_model, tokenizer, prompts, responses).tolist()
        result["reward"] = sum(rewards) / len(rewards)
    result["kl"] = kl_to_reference(policy, reference, pairs, tokenizer.pad_token_id)["kl"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/rlhf_bench/rlhf_core")
    parser.add_argument("--stages", default="reward,dpo,grpo")
    parser.add_argument("--train", default=None, help="stages to (re)train, default all of --stages; '' reuses --out")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    stages = args.stages.split(",")

    timings = {}
    for stage in stages if args.train is None else [s for s in args.train.split(",") if s]:
        extra = ["--reward_model_path", str(out / "reward")] if stage == "grpo" else []
        timings[stage] = train(stage, out, extra)
        print(
            f"trained {stage}: {timings[stage]['wall_s']:.0f} s wall, {timings[stage]['cpu_s']:.0f} CPU-s", flush=True
        )

    tokenizer = AutoTokenizer.from_pretrained(SFT)
    reference = AutoModelForCausalLM.from_pretrained(SFT)
    reward_dir = out / "reward"
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dir) if reward_dir.exists() else None
    prompts = make_synthetic_dataset("prompts", args.num_prompts, seed=1, split="test")["prompt"]

    print("\n## rlhf_core: tiny task, held-out prompts, greedy decoding\n")
    if reward_model is not None:
        metrics = read_metrics(reward_dir)
        print(
            f"reward model: held-out pairwise accuracy {metrics['accuracy']:.3f}, margin {metrics['margin']:.2f}, "
            f"reward_stats mean {metrics['reward_stats']['mean']:.2f} std {metrics['reward_stats']['std']:.2f}\n"
        )
    rows = [("sft", SFT)] + [(s, str(out / s)) for s in stages if s != "reward" and (out / s).exists()]
    print(
        "| policy | rule score | fact | harmful | benign | greeting | RM score | KL to SFT | train wall s | train CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, path in rows:
        r = evaluate(path, reference, reward_model, tokenizer, prompts)
        kinds = [f"{r['by_kind'].get(k, float('nan')):.2f}" for k in ("fact", "harmful", "benign", "greeting")]
        t = timings.get(name, {})
        print(
            f"| {name} | {r['rule']:.3f} | {' | '.join(kinds)} | {r.get('reward', float('nan')):.2f} | {r['kl']:.2f} "
            f"| {t.get('wall_s', float('nan')):.0f} | {t.get('cpu_s', float('nan')):.0f} |",
            flush=True,
        )
        for prompt, response in r["examples"][:2]:
            print(f"|   | {prompt!r} → {response!r} | | | | | | | | |")
    if "reward" in timings:
        print(f"\nreward stage: {timings['reward']['wall_s']:.0f} s wall, {timings['reward']['cpu_s']:.0f} CPU-s")


if __name__ == "__main__":
    main()

"""Throughput and reward gain of rlhf.ppo.PPOTrainer vs TRL 1.12's PPOTrainer on the same models and batches.

TRL ≥ 1.13 has no PPOTrainer, so TRL 1.12 must be installed on its own, beside the project's TRL
(this script installs nothing):

    pip install trl==1.12.0 --no-deps --target /tmp/trl112
    python benchmarks/ppo_vs_trl.py --trl-path /tmp/trl112 [--updates 20] [--threads 1] [--repeats 2]

Each trainer runs in its own subprocess (TRL 1.12 is put first on sys.path only inside its worker)
with the same policy, reference, reward and value models, 16 episodes per update, 12-token
responses, 2 PPO epochs, one minibatch. Defaults build all-tiny random Llama models (hidden 64,
2 layers); `--policy outputs/tiny/sft --reward outputs/tiny/reward` uses the embedded task's models.
Prints episodes/s of both, their ratio, each one's peak RSS and reward gain (mean score of the last
quarter of updates minus the first quarter; raw reward-model scores in both: the trainer API is given
no reward statistics to standardise with). `--repeats N` runs the arms N times, alternated
(TRL, ours, TRL, ours, ...), and reports each run and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_models(folder: Path) -> tuple[str, str]:
    """A tiny random policy checkpoint and a reward model (sequence classifier) made from it."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.tiny import build_tiny_checkpoint

    policy = build_tiny_checkpoint(folder / "policy", hidden_size=64, num_layers=2)
    torch.manual_seed(1)
    reward = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    reward.save_pretrained(folder / "reward")
    AutoTokenizer.from_pretrained(policy).save_pretrained(folder / "reward")
    return str(policy), str(folder / "reward")


def load(policy_path: str, reward_path: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(policy_path)
    ref = AutoModelForCausalLM.from_pretrained(policy_path)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1)
    for model in (reward, value):
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, policy, ref, reward, value


def prompts(num: int):
    from rlhf.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset("prompts", num, seed=0).select_columns(["prompt"])


def common(args: argparse.Namespace, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=1,
        num_ppo_epochs=2,
        num_mini_batches=1,
        response_length=12,
        total_episodes=16 * args.updates,
        temperature=0.7,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        kl_coef=0.05,
        stop_token="eos",
        local_rollout_forward_batch_size=16,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )


def run_trl(args: argparse.Namespace, output_dir: str) -> dict:
    sys.path.insert(0, args.trl_path)  # TRL 1.12 shadows the installed TRL in this process only
    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer, policy, ref, reward, value = load(args.policy, args.reward)
    for model in (policy, ref):
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    def tokenize(row):
        return {
            "input_ids": tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=False)
        }

    dataset = prompts(512).map(tokenize, remove_columns=["prompt"])
    config = PPOConfig(**common(args, output_dir), num_sample_generations=0)
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(16)),
    )
    start = time.time()
    trainer.train()
    elapsed = time.time() - start
    scores = [e["objective/scores"] for e in trainer.state.log_history if "objective/scores" in e]
    return {"trl_version": trl.__version__, "seconds": elapsed, "scores": scores, "peak_rss_mb": peak_rss_mb()}


def run_ours(args: argparse.Namespace, output_dir: str) -> dict:
    from rlhf.ppo import PPOConfig, PPOTrainer

    tokenizer, policy, ref, reward, value = load(args.policy, args.reward)
    config = PPOConfig(**common(args, output_dir))
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=prompts(512),
    )
    start = time.time()
    trainer.train()
    elapsed = time.time() - start
    scores = [e["objective/scores"] for e in trainer.state.log_history if "objective/scores" in e]
    return {"seconds": elapsed, "scores": scores, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gain(scores: list[float]) -> float:
    quarter = max(1, len(scores) // 4)
    return sum(scores[-quarter:]) / quarter - sum(scores[:quarter]) / quarter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-path", default="/tmp/trl112", help="folder with trl 1.12 installed --no-deps")
    parser.add_argument("--policy", help="policy checkpoint (default: a tiny random one)")
    parser.add_argument("--reward", help="reward model checkpoint (default: a tiny random one)")
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs per arm, alternated")
    parser.add_argument("--worker", choices=["trl", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        with tempfile.TemporaryDirectory() as output_dir:
            result = (run_trl if args.worker == "trl" else run_ours)(args, output_dir)
        print("RESULT " + json.dumps(result))
        return

    if not (Path(args.trl_path) / "trl" / "experimental" / "ppo").is_dir():
        sys.exit(f"no TRL 1.12 in {args.trl_path}; run: pip install trl==1.12.0 --no-deps --target {args.trl_path}")
    with tempfile.TemporaryDirectory() as folder:
        if not (args.policy and args.reward):
            args.policy, args.reward = build_models(Path(folder))
        runs: dict[str, list[dict]] = {"trl": [], "ours": []}
        for repeat in range(args.repeats):
            for worker in ("trl", "ours"):  # alternated, so a slow spell of the machine hits both arms
                command = [sys.executable, __file__, "--worker", worker, "--trl-path", args.trl_path]
                command += ["--policy", args.policy, "--reward", args.reward, "--updates", str(args.updates)]
                command += ["--learning-rate", str(args.learning_rate), "--threads", str(args.threads)]
                env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
                env["OMP_NUM_THREADS"] = str(args.threads)
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{worker} worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
                runs[worker].append(json.loads(line[len("RESULT ") :]))
                result = runs[worker][-1]
                print(
                    f"  run {repeat + 1} {worker:<4} {episodes_of(args) / result['seconds']:.3f} episodes/s, "
                    f"peak RSS {result['peak_rss_mb']:.0f} MB, reward gain {gain(result['scores']):+.3f}",
                    flush=True,
                )
    episodes = episodes_of(args)
    print(f"{episodes} episodes (16/update, 12-token responses, 2 PPO epochs), {args.threads} thread(s), medians:")
    trl_label = f"TRL {runs['trl'][0]['trl_version']} PPOTrainer"
    for worker, label in (("trl", trl_label), ("ours", "rlhf.ppo.PPOTrainer")):
        results = runs[worker]
        print(
            f"{label:<26} {episodes / statistics.median([r['seconds'] for r in results]):6.3f} episodes/s   "
            f"peak RSS {statistics.median([r['peak_rss_mb'] for r in results]):.0f} MB   "
            f"reward gain {statistics.median([gain(r['scores']) for r in results]):+.3f}"
        )
    ratio = statistics.median([r["seconds"] for r in runs["trl"]]) / statistics.median(
        [r["seconds"] for r in runs["ours"]]
    )
    print(f"throughput ratio (ours / TRL 1.12): {ratio:.2f}")


def episodes_of(args: argparse.Namespace) -> int:
    return 16 * args.updates


if __name__ == "__main__":
    main()

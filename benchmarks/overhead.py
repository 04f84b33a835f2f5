"""What the thin layer costs: rlhf's SFT, reward, DPO and GRPO stages against plain TRL scripts.

    .venv/bin/python benchmarks/overhead.py                      # all four stages, 3 alternating repeats
    .venv/bin/python benchmarks/overhead.py --stages sft --repeats 5 --threads 2

Each arm runs in its own subprocess on the same checkpoint, the same data file and the same
training settings: `python -m rlhf.stages.<stage> recipe.yaml` against benchmarks/plain_trl/<stage>.py
(SFTTrainer / RewardTrainer / DPOTrainer / GRPOTrainer used directly, as TRL's example scripts do;
GRPO is scored by the world's rule in both arms). The arms
alternate (A B, B A, …) and the table shows median ratios of the same repeat:

The work unit is tokens trained, except for GRPO, whose unit is optimizer steps (steps/s: its tokens
depend on what was sampled):

- tokens/s, whole stage: tokens trained / the subprocess's wall time (import, data, model load,
  training, saving: everything the user waits for);
- tokens/s, train only: tokens trained / the trainer's `train_runtime`;
- peak RSS: the child's own maximum resident set (wait4 rusage).

For a like-for-like comparison the toolkit recipe turns off what the plain script does not do:
no held-out split (`test_split_size: 0`, a data file rather than `synthetic:` data, so no
eval-before/after pass) and no deduplication (the synthetic rows repeat on purpose).
`--with-eval` adds a third arm, the toolkit with its default held-out evaluation, to show its cost.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from _common import (
    REPO,
    ensure_checkpoint,
    launched,
    machine_note,
    median,
    print_table,
    run_child,
    spread,
    train_times,
    trainer_log,
    write_jsonl,
    write_yaml,
)

STAGE_DATA = {"sft": ("sft", 640), "reward": ("preference", 480), "dpo": ("preference", 256), "grpo": ("prompts", 256)}
COMMON = {
    "max_length": 128,
    "per_device_train_batch_size": 16,
    "num_train_epochs": 1,
    "learning_rate": 1.0e-4,
    "lr_scheduler_type": "linear",
    "logging_steps": 5,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "seed": 42,
    "bf16": False,
    "gradient_checkpointing": False,
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
}
STAGE_KEYS = {
    "sft": {"assistant_only_loss": True},
    "reward": {},
    "dpo": {"beta": 0.1},
    # recipes/tiny/grpo.yaml's sampling and KL settings, 16 steps of 2 prompts × 8 completions
    "grpo": {"max_steps": 16, "num_generations": 8, "max_completion_length": 24, "temperature": 1.0, "beta": 0.3},
}
# What a run's speed is counted in: tokens trained, or (GRPO) optimizer steps
WORK_UNIT = {"grpo": "global_step"}
# Keys a stage's config does not have (GRPOConfig has max_completion_length instead of max_length)
DROPPED_KEYS = {"grpo": ("max_length",)}


def prepare(work: Path, stage: str) -> Path:
    """Write the stage's training data once, as the JSONL file both arms read."""
    from rlhf.data.synthetic import make_synthetic_dataset

    kind, rows = STAGE_DATA[stage]
    path = work / f"{stage}.jsonl"
    if not path.exists():
        write_jsonl(path, make_synthetic_dataset(kind, rows, seed=0).to_list())
    return path


def same_order_as_the_toolkit(data: Path) -> Path:
    """The data file in the order the toolkit trains on it: the stage shuffles its rows with the run's seed
    (rlhf.data.load) before TRL's sampler shuffles them again, so on the raw file a run of `max_steps` would
    draw other rows (other lengths) in the plain arm. The rows are the same; only their order changes."""
    from datasets import load_dataset

    path = data.with_name(f"{data.stem}-toolkit-order.jsonl")
    if not path.exists():
        rows = load_dataset("json", data_files=str(data), split="train").shuffle(seed=COMMON["seed"])
        write_jsonl(path, rows.to_list())
    return path


def speed_ratios(pairs: list[tuple[dict, dict]], key: str, unit: str = "num_tokens") -> list[float]:
    """Work (`unit`: tokens or steps) per `key`-second of the rlhf run ÷ of the plain TRL run, one per repeat."""
    return [(t[unit] / t[key]) / (p[unit] / p[key]) for t, p in pairs]


def run_arm(arm: str, stage: str, checkpoint: Path, data: Path, work: Path, threads: int, tag: str) -> dict:
    out = work / f"{stage}-{arm}-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    keys = {"model_name_or_path": str(checkpoint), "output_dir": str(out), **COMMON, **STAGE_KEYS[stage]}
    for key in DROPPED_KEYS.get(stage, ()):
        keys.pop(key)
    if arm == "plain":
        config = write_yaml(work / f"{stage}-plain.yaml", keys)
        target = [str(REPO / "benchmarks/plain_trl" / f"{stage}.py"), "--config", str(config)]
        target += ["--dataset_name", str(same_order_as_the_toolkit(data) if stage in WORK_UNIT else data)]
    else:
        toolkit = {"stage": stage, "dataset_name": str(data), "test_split_size": 0.0, "clean_deduplicate": False}
        if stage == "grpo":
            toolkit["reward_funcs"] = ["rlhf.data.synthetic:rule_reward"]
        if arm == "toolkit+eval":  # the default: synthetic data with its held-out split, eval before and after
            toolkit = {"stage": stage, "dataset_name": f"synthetic:{STAGE_DATA[stage][0]}", "clean_deduplicate": False}
            toolkit["synthetic_num_examples"] = STAGE_DATA[stage][1]
            toolkit["per_device_eval_batch_size"] = 32
        config = write_yaml(work / f"{stage}-{arm}.yaml", {**toolkit, **keys})
        target = ["-m", f"rlhf.stages.{stage}", str(config)]
    times = work / f"{stage}-{arm}-{tag}.times"
    result = run_child(launched(times, *target), threads, log=work / f"{stage}-{arm}-{tag}.log")
    result.update(trainer_log(out))
    result.update(train_times(times))
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="sft,reward,dpo,grpo")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child (1: less sensitive to noise)")
    parser.add_argument("--with-eval", action="store_true", help="also time the toolkit with its held-out eval")
    parser.add_argument("--work", default="/tmp/rlhf_bench/overhead")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = ensure_checkpoint(work / "ckpt-128x4", hidden_size=128, num_layers=4)
    arms = ["toolkit", "plain"] + (["toolkit+eval"] if args.with_eval else [])

    rows = []
    for stage in args.stages.split(","):
        if not (REPO / "rlhf/stages" / f"{stage}.py").exists():
            print(f"skipping {stage}: rlhf/stages/{stage}.py does not exist yet")
            continue
        data = prepare(work, stage)
        runs: dict[str, list[dict]] = {arm: [] for arm in arms}
        for repeat in range(args.repeats):
            order = arms if repeat % 2 == 0 else arms[::-1]
            for arm in order:
                runs[arm].append(run_arm(arm, stage, checkpoint, data, work, args.threads, str(repeat)))
                r = runs[arm][-1]
                print(
                    f"  {stage} {arm:12s} #{repeat}: wall {r['wall_s']:.1f}s cpu {r['cpu_s']:.1f}s, train wall "
                    f"{r['train_wall_s']:.1f}s cpu {r['train_cpu_s']:.1f}s, tokens {r['num_tokens']:.0f}, "
                    f"rss {r['peak_rss_mb']:.0f}MB",
                    flush=True,
                )
        for arm in arms[:1] + arms[2:]:
            pairs = list(zip(runs[arm], runs["plain"]))

            cells = [f"{stage} ({arm})"]
            for key in ("cpu_s", "train_cpu_s", "wall_s", "train_wall_s"):
                ratios = speed_ratios(pairs, key, WORK_UNIT.get(stage, "num_tokens"))
                cells.append(f"{median(ratios):.3f} ({spread(ratios)})")
            cells.append(median([t["peak_rss_mb"] / p["peak_rss_mb"] for t, p in pairs]))
            for key in ("cpu_s", "train_cpu_s", "peak_rss_mb"):
                cells.append(f"{median([p[key] for _, p in pairs]):.1f} / {median([t[key] for t, _ in pairs]):.1f}")
            unit = WORK_UNIT.get(stage, "num_tokens")
            cells.append(
                f"{pairs[0][1][unit]:.0f} / {pairs[0][0][unit]:.0f}" + (" steps" if unit != "num_tokens" else "")
            )
            rows.append(cells)
    print(f"\nrlhf vs plain TRL ({machine_note()}, {args.threads} thread(s), {args.repeats} alternating repeats)")
    print("ratios are rlhf / plain TRL: tokens/s ≥ 0.98 and peak RSS ≤ 1.05 are the goals\n")
    print("tokens/s per CPU-second is what the run costs (robust to other jobs); per wall-second is noisier\n")
    print_table(
        [
            "stage",
            "tokens/CPU-s whole (range)",
            "tokens/CPU-s train-only",
            "tokens/wall-s whole",
            "tokens/wall-s train-only",
            "peak RSS",
            "CPU s whole plain / rlhf",
            "CPU s train plain / rlhf",
            "RSS MB plain / rlhf",
            "tokens plain / rlhf",
        ],
        rows,
    )


if __name__ == "__main__":
    main()

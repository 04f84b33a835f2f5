"""SFT throughput with packing vs padding on variable-length data, and whether the loss curves agree.

    .venv/bin/python benchmarks/packing.py
    .venv/bin/python benchmarks/packing.py --rows 1200 --repeats 3 --threads 2

Data: plain texts from the embedded world, most of them short (1–3 sentences) and some long
(10–40 sentences), as real SFT mixes are. Both arms run the SFT stage (`python -m rlhf.stages.sft`)
on the same file for one epoch; the packing arm sets `packing: true` (TRL's BFD packing, which
trains padding-free with per-sequence position_ids, so packed rows never attend to each other).

Packing puts several rows into one `max_length` block, so the same epoch takes fewer optimizer
steps. To keep the learning dynamics comparable the packing arm's batch size is scaled so that
each optimizer step sees about as many real tokens as a padded step does; the loss curves are
then compared on the axis of tokens seen (interpolated), and on the held-out eval loss.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import numpy as np
from _common import (
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


def variable_length_rows(num_rows: int, seed: int = 0) -> list[dict]:
    """Texts of 1–3 sentences (70%) or 10–40 sentences (30%) about the embedded world."""
    from rlhf.data.synthetic import CREATURES, FILLER_SENTENCES, creature_facts

    rng = random.Random(seed)
    sentences = [f"The {c} is {creature_facts(c)['color']}." for c in CREATURES]
    sentences += [f"The {c} eats {creature_facts(c)['food']}." for c in CREATURES] + FILLER_SENTENCES
    rows = []
    for _ in range(num_rows):
        count = rng.randint(1, 3) if rng.random() < 0.7 else rng.randint(10, 40)
        rows.append({"text": " ".join(rng.choice(sentences) for _ in range(count))})
    return rows


def curve(losses: list[tuple], points: np.ndarray) -> np.ndarray:
    """Training loss interpolated at the given numbers of tokens seen."""
    tokens = np.array([t for _, _, t in losses], dtype=float)
    values = np.array([v for _, v, _ in losses], dtype=float)
    return np.interp(points, tokens, values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16, help="padding arm; the packing arm's is scaled")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="/tmp/rlhf_bench/packing")
    args = parser.parse_args()
    work = Path(args.work)
    checkpoint = ensure_checkpoint(Path("/tmp/rlhf_bench/overhead/ckpt-128x4"), hidden_size=128, num_layers=4)
    rows = variable_length_rows(args.rows)
    data = write_jsonl(work / "variable.jsonl", rows)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    lengths = np.array([min(len(tokenizer(r["text"])["input_ids"]) + 1, args.max_length) for r in rows])
    packed_batch = max(1, round(args.batch_size * lengths.mean() / args.max_length))
    common = {
        "stage": "sft",
        "model_name_or_path": str(checkpoint),
        "dataset_name": str(data),
        "test_split_size": 0.1,
        "clean_deduplicate": False,
        "max_length": args.max_length,
        "num_train_epochs": 1,
        "learning_rate": 1.0e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "per_device_eval_batch_size": 16,
        "report_to": "none",
        "seed": 42,
        "disable_tqdm": True,
    }
    arms = {
        "padding": {"packing": False, "per_device_train_batch_size": args.batch_size},
        "packing": {"packing": True, "packing_strategy": "bfd", "per_device_train_batch_size": packed_batch},
    }
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for repeat in range(args.repeats):
        for arm in list(arms) if repeat % 2 == 0 else list(arms)[::-1]:
            out = work / f"out-{arm}"
            shutil.rmtree(out, ignore_errors=True)
            recipe = write_yaml(work / f"{arm}.yaml", {**common, **arms[arm], "output_dir": str(out)})
            times = work / f"{arm}.times"
            command = launched(times, "-m", "rlhf.stages.sft", str(recipe))
            result = run_child(command, args.threads, work / f"{arm}.log")
            result.update(trainer_log(out))
            result.update(train_times(times))
            result["eval_loss"] = json.loads((out / "metrics.json").read_text())["eval"].get("eval_loss")
            runs[arm].append(result)
            print(
                f"  {arm:8s} #{repeat}: train {result['train_wall_s']:.1f}s (cpu {result['train_cpu_s']:.1f}s), "
                f"{result['num_tokens']:.0f} tokens, "
                f"{result['global_step']} steps, eval loss {result['eval_loss']:.4f}",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)

    def speedups(key: str) -> list[float]:
        return [
            (k["num_tokens"] / k[key]) / (p["num_tokens"] / p[key]) for k, p in zip(runs["packing"], runs["padding"])
        ]

    pad, pack = runs["padding"][0], runs["packing"][0]
    total = min(pad["num_tokens"], pack["num_tokens"])
    points = np.linspace(0.1, 1.0, 10) * total
    gap = curve(pack["losses"], points) - curve(pad["losses"], points)
    last = points >= 0.75 * total

    print(f"\nSFT packing vs padding ({machine_note()}, {args.threads} thread(s), {args.repeats} alternating repeats)")
    print(
        f"{len(rows)} rows, token lengths mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, max {lengths.max()}; "
        f"max_length {args.max_length}; batch {args.batch_size} rows (padding) vs {packed_batch} packed blocks\n"
    )
    print_table(
        ["measure", "value"],
        [
            ["tokens per CPU-s packing ÷ padding, train only (median)", median(speedups("train_cpu_s"))],
            ["  range", spread(speedups("train_cpu_s"))],
            ["tokens per wall-s packing ÷ padding, train only", median(speedups("train_wall_s"))],
            ["  range", spread(speedups("train_wall_s"))],
            ["tokens per CPU-s packing ÷ padding, whole stage (with eval)", median(speedups("cpu_s"))],
            ["optimizer steps padding / packing", f"{pad['global_step']} / {pack['global_step']}"],
            ["real tokens trained padding / packing", f"{pad['num_tokens']:.0f} / {pack['num_tokens']:.0f}"],
            ["held-out eval loss padding / packing", f"{pad['eval_loss']:.4f} / {pack['eval_loss']:.4f}"],
            ["train loss at equal tokens: mean |packing − padding|", float(np.abs(gap).mean())],
            ["  over the last 25% of tokens: mean (packing − padding)", float(gap[last].mean())],
            ["  at 10%, 50%, 100% of tokens", ", ".join(f"{g:+.3f}" for g in gap[[0, 4, 9]])],
        ],
    )


if __name__ == "__main__":
    main()

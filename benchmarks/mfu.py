"""Model FLOPs utilisation of the SFT stage on this machine's CPU.

    .venv/bin/python benchmarks/mfu.py                     # ~14M-parameter Llama, 2 threads
    .venv/bin/python benchmarks/mfu.py --hidden-size 512 --num-layers 8 --threads 1
    .venv/bin/python benchmarks/mfu.py --model CHECKPOINT --max-length 128 --batch-size 2 --max-steps 3 --repeats 1

`--model` measures a checkpoint folder (safetensors) instead of a random Llama built here, e.g. the
converted SmolLM2-135M-Instruct (`benchmarks/profile_135m.py` runs it so).

Achieved FLOP/s = TRL's `compute_flops_per_token(config, max_length)` (6·N-style count: forward +
backward, non-causal attention convention) × tokens/s of a real SFT stage run (trainer
`num_tokens` / seconds inside Trainer.train()). Peak FLOP/s = the best of several large fp32 `torch.matmul`s
with the same thread count, measured before and after each training run (the machine is shared:
the best measurement is the closest to the hardware's peak). The SFT run trains on packed
`synthetic:pretrain` text (`packing_strategy: wrapped`, full `max_length` blocks, no padding), so
every token the FLOP count assumes is a real one. The same ratio per CPU-second (training
CPU time, matmul CPU time) is printed too: on a shared machine it is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from _common import (
    PYTHON,
    child_env,
    ensure_checkpoint,
    launched,
    machine_note,
    median,
    print_table,
    run_child,
    train_times,
    trainer_log,
    write_yaml,
)

MATMUL = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1])); n = int(sys.argv[2])
a, b = torch.randn(n, n), torch.randn(n, n)
best = best_cpu = 0.0
for _ in range(int(sys.argv[3])):
    wall, cpu = time.perf_counter(), time.process_time()
    torch.matmul(a, b)
    best = max(best, 2 * n**3 / (time.perf_counter() - wall))
    best_cpu = max(best_cpu, 2 * n**3 / (time.process_time() - cpu))
print(best, best_cpu)
"""


def peak_matmul_flops(threads: int, size: int = 2048, reps: int = 12) -> tuple[float, float]:
    """Best fp32 matmul FLOP per wall-second and per CPU-second of an n×n product, with `threads` torch threads."""
    out = subprocess.run(
        [PYTHON, "-c", MATMUL, str(threads), str(size), str(reps)],
        env=child_env(threads),
        capture_output=True,
        text=True,
        check=True,
    )
    wall, cpu = out.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint folder to measure instead of the random Llama built here")
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--eval-samples", type=int, default=16, help="held-out rows evaluated before and after")
    parser.add_argument("--work", default="/tmp/rlhf_bench/mfu")
    args = parser.parse_args()
    work = Path(args.work)
    if args.model:
        checkpoint = Path(args.model)
    else:
        checkpoint = ensure_checkpoint(
            work / f"ckpt-{args.hidden_size}x{args.num_layers}",
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=max(1, args.hidden_size // 64),
        )
    from transformers import AutoConfig
    from trl.trainer.utils import adjusted_mfu, compute_flops_per_token, compute_mfu

    config = AutoConfig.from_pretrained(checkpoint)
    flops_per_token = compute_flops_per_token(config, args.max_length)
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as handle:
        num_params = sum(_numel(handle.get_slice(k).get_shape()) for k in handle.keys())

    peaks, rates, cpu_rates = [peak_matmul_flops(args.threads)], [], []
    for repeat in range(args.repeats):
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        recipe = write_yaml(
            work / "sft.yaml",
            {
                "stage": "sft",
                "model_name_or_path": str(checkpoint),
                "dataset_name": "synthetic:pretrain",
                "synthetic_num_examples": 2000,
                "max_eval_samples": args.eval_samples,
                "clean_deduplicate": False,
                "packing": True,
                "packing_strategy": "wrapped",
                "max_length": args.max_length,
                "per_device_train_batch_size": args.batch_size,
                "per_device_eval_batch_size": args.batch_size,
                "max_steps": args.max_steps,
                "learning_rate": 1.0e-4,
                "logging_steps": 1,
                "save_strategy": "no",
                "report_to": "none",
                "seed": repeat,
                "disable_tqdm": True,
                "output_dir": str(out),
            },
        )
        times = work / "sft.times"
        run_child(launched(times, "-m", "rlhf.stages.sft", str(recipe)), args.threads, work / "sft.log")
        log, spent = trainer_log(out), train_times(work / "sft.times")
        rates.append(log["num_tokens"] / spent["train_wall_s"])
        cpu_rates.append(log["num_tokens"] / spent["train_cpu_s"])
        print(
            f"  #{repeat}: {rates[-1]:.0f} tokens/s, {cpu_rates[-1]:.0f} tokens/CPU-s over {log['num_tokens']:.0f} "
            f"tokens",
            flush=True,
        )
        peaks.append(peak_matmul_flops(args.threads))
        shutil.rmtree(out, ignore_errors=True)

    peak, peak_cpu = max(p for p, _ in peaks), max(c for _, c in peaks)
    tokens_per_s, tokens_per_cpu_s = median(rates), median(cpu_rates)
    mfu = compute_mfu(flops_per_token, tokens_per_s, 1, peak)
    # The same ratio per CPU-second: what fraction of the matmul rate the cores we did get delivered.
    mfu_cpu = compute_mfu(flops_per_token, tokens_per_cpu_s, 1, peak_cpu)
    print(f"\nSFT MFU ({machine_note()}, {args.threads} thread(s), fp32)\n")
    print_table(
        ["measure", "value"],
        [
            [
                "model",
                f"{config.model_type} hidden {config.hidden_size} × {config.num_hidden_layers} layers, "
                f"{num_params / 1e6:.1f}M params",
            ],
            ["sequence length (packed, wrapped)", args.max_length],
            ["training FLOPs per token (TRL compute_flops_per_token)", f"{flops_per_token / 1e6:.1f} M"],
            ["SFT tokens/s, train only (median)", f"{tokens_per_s:.0f}"],
            ["SFT tokens per CPU-second, train only (median)", f"{tokens_per_cpu_s:.0f}"],
            ["achieved FLOP/s", f"{flops_per_token * tokens_per_s / 1e9:.2f} G"],
            [
                "peak fp32 matmul FLOP/s (best of runs)",
                f"{peak / 1e9:.2f} G ({', '.join(f'{p / 1e9:.1f}' for p, _ in peaks)})",
            ],
            ["peak fp32 matmul FLOP per CPU-second", f"{peak_cpu / 1e9:.2f} G"],
            ["MFU % (wall clock)", f"{mfu:.1f}"],
            [
                "MFU % (wall clock, causal-adjusted: TRL adjusted_mfu)",
                f"{adjusted_mfu(mfu, config, args.max_length):.1f}",
            ],
            ["MFU % per CPU-second (robust to other jobs)", f"{mfu_cpu:.1f}"],
        ],
    )
    (work / "result.json").write_text(
        json.dumps(
            {
                "mfu": mfu,
                "mfu_causal": adjusted_mfu(mfu, config, args.max_length),
                "mfu_cpu": mfu_cpu,
                "peak": peak,
                "peaks": [p for p, _ in peaks],
                "peak_cpu": peak_cpu,
                "tokens_per_s": tokens_per_s,
                "tokens_per_cpu_s": tokens_per_cpu_s,
                "flops_per_token": flops_per_token,
                "num_params": num_params,
                "max_length": args.max_length,
                "batch_size": args.batch_size,
                "max_steps": args.max_steps,
                "threads": args.threads,
            }
        )
    )


def _numel(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


if __name__ == "__main__":
    main()

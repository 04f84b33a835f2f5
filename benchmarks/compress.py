"""Size and quality of the tiny SFT model after distillation, quantization and pruning.

.venv/bin/python benchmarks/compress.py [--teacher outputs/tiny/sft] [--work /tmp/rlhf-compress]
    [--arms int8,int8-torchao,int4,int4-bf16,sparse50,mlp50,distill] [--recovery-steps 200]

Each arm runs the real command (`rlhf quantize`, `rlhf prune`, `rlhf train recipes/tiny/distill.yaml`)
in-process and reads the `compress_report.json` / `metrics.json` it wrote; a finished output is
reused, delete it to re-measure. Targets (the embedded task, rule score on all held-out prompts):
distilled student >= 90% of the teacher's rule score at <= 30% of its parameters; int8 >= 3x smaller
on disk, rule score within 1 point; int4 >= 5x smaller; 50% sparsity after recovery within 2 points.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ARMS = {
    "int8": ("quantize", ["--method", "int8", "--backend", "quanto"]),
    "int8-torchao": ("quantize", ["--method", "int8", "--backend", "torchao"]),
    "int4": ("quantize", ["--method", "int4", "--backend", "quanto"]),
    "int4-bf16": ("quantize", ["--method", "int4", "--backend", "quanto", "--dtype", "bfloat16"]),
    "sparse50": ("prune", ["--method", "magnitude", "--sparsity", "0.5"]),
    "mlp50": ("prune", ["--method", "structured", "--mlp-keep", "0.5"]),
    "distill": ("distill", []),
    # Minitron-style: structured-prune the teacher to ~28% of its parameters, then distill into that.
    "prune-distill": ("distill", ["--method", "structured", "--mlp-keep", "0.125", "--heads-keep", "0.5"]),
}


def run_arm(name: str, teacher: str, work: Path, recovery_steps: int) -> dict:
    command, extra = ARMS[name]
    out = work / name
    if command == "distill":
        from rlhf.stages import distill

        if not (out / "metrics.json").exists():
            argv = [str(REPO / "recipes/tiny/distill.yaml"), "--teacher_model_name_or_path", teacher]
            argv += ["--model_name_or_path", teacher, "--output_dir", str(out), "--save_strategy", '"no"']
            if extra:
                from rlhf.compress.prune import main as prune

                seed = work / f"{name}-seed"
                if not (seed / "config.json").exists():
                    prune([teacher, *extra, "--output", str(seed), "--no-eval"])
                argv += ["--model_name_or_path", str(seed)]
                argv += [f"--student_{key}" for key in ("hidden_size", "num_layers", "num_attention_heads")]
                argv = [a if not a.startswith("--student_") else a + "=null" for a in argv]
            distill.main(argv)
        metrics = json.loads((out / "metrics.json").read_text())
        from rlhf.compress import weights_size_bytes

        return {
            "before": metrics["teacher"],
            "after": metrics["student"],
            "size_bytes_before": weights_size_bytes(teacher),
            "size_bytes_after": weights_size_bytes(out),
        }
    if not (out / "compress_report.json").exists():
        if command == "quantize":
            from rlhf.compress.quantize import main
        else:
            from rlhf.compress.prune import main

            extra = [*extra, "--recovery-steps", str(recovery_steps)]
        main([teacher, *extra, "--output", str(out)])
    return json.loads((out / "compress_report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="outputs/tiny/sft")
    parser.add_argument("--work", default="/tmp/rlhf-compress")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--recovery-steps", type=int, default=200)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.arms.split(","):
        report = run_arm(name, args.teacher, work, args.recovery_steps)
        before, after = report["before"], report["after"]
        rows.append(
            [
                name,
                f"{report['size_bytes_after'] / 1e6:.2f}",
                f"{report['size_bytes_before'] / report['size_bytes_after']:.2f}x",
                f"{after['parameters'] / before['parameters']:.0%}",
                f"{after.get('linear_sparsity', 0):.0%}",
                f"{before['rule_score']:.3f}",
                f"{after['rule_score']:.3f}",
                f"{100 * (after['rule_score'] - before['rule_score']):+.1f}",
                f"{after['rule_score'] / max(before['rule_score'], 1e-9):.0%}",
                f"{before['perplexity']:.2f} → {after['perplexity']:.2f}",
                f"{before.get('latency_ms_per_token', float('nan')):.1f} → {after.get('latency_ms_per_token', float('nan')):.1f}",
            ]
        )
    header = [
        "arm", "MB", "smaller", "params", "sparsity", "rule before", "rule after", "Δ points", "kept",
        "perplexity", "ms/token (batch 1, CPU)",
    ]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

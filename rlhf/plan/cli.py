"""`rlhf plan RECIPE`: the per-device memory a training stage needs, before anything loads or runs.

    rlhf plan recipes/tiny/ppo.yaml
    rlhf plan recipes/qwen/ppo.yaml --config accelerate_configs/fsdp.yaml --num-processes 8 --device-memory 80GB

Parameter counts come from each model's config, instantiated on the meta device (no weights, no
memory); LoRA's trainable count from peft on that meta model. The bytes per parameter follow the
parallelism the accelerate config file names (DDP, FSDP2 full shard, DeepSpeed ZeRO-2/3, CPU
offload); activations, loss logits and the rollout KV cache follow the recipe's batch and lengths.
The peak is the largest of a few moments of a step (forward/backward, optimizer step, rollout),
each listed item by item. On CPU, "device memory" is the resident memory (RSS) of one process
beyond what Python, torch, transformers and trl take by themselves (~0.6 GB, not counted).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from rlhf.config import RecipeError
from rlhf.plan.memory import plan_recipe
from rlhf.plan.parallelism import Parallelism
from rlhf.plan.report import render


def parse_memory_size(text: str, flag: str = "--device-memory") -> int:
    """'80GB' / '80 GiB' / '512MB' → bytes (GB = 10⁹, GiB = 2³⁰)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B)\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise RecipeError(f"{flag}: got {text!r}; give a positive size with a unit, e.g. 80GB, 24GiB or 512MB.")
    unit = match.group(2).upper()
    power = "KMGT".index(unit[0]) + 1
    return int(float(match.group(1)) * (1024**power if "I" in unit else 1000**power))


def machine_memory() -> int:
    """This machine's RAM in bytes (0 when unknown)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _default_device_memory(par: Parallelism) -> tuple[int | None, str]:
    """Without --device-memory: this machine's GPU, or on CPU its RAM shared by the processes."""
    if par.device == "gpu":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory, " (this machine's GPU)"
        return None, ""
    ram = machine_memory()
    return (ram // par.num_processes, " (this machine's RAM / processes)") if ram else (None, "")


PLAN_FLAGS = {"--config": str, "--num-processes": int, "--device-memory": str, "--prompt-length": int}
USAGE = (
    "usage: rlhf plan RECIPE.yaml [--key value ...] [--config ACCELERATE.yaml] [--num-processes N] "
    "[--device-memory 80GB] [--prompt-length 256] [--json]"
)


def _split(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The planner's own flags, and the rest: the recipe and its `--key value` overrides."""
    options: dict[str, Any] = {name[2:].replace("-", "_"): None for name in PLAN_FLAGS}
    options["json"], rest, i = False, [], 0
    while i < len(argv):
        name, _, inline = argv[i].partition("=")
        if name == "--json":
            options["json"] = True
        elif name in PLAN_FLAGS:
            if not inline:
                if i + 1 >= len(argv):
                    raise RecipeError(f"{name}: needs a value. {USAGE}")
                i += 1
                inline = argv[i]
            try:
                options[name[2:].replace("-", "_")] = PLAN_FLAGS[name](inline)
            except ValueError:
                raise RecipeError(f"{name}: got {inline!r}, expected a whole number.") from None
        else:
            rest.append(argv[i])
        i += 1
    return options, rest


def main(argv: list[str] | None = None) -> None:
    """`rlhf plan RECIPE [--key value ...] [--config F] [--num-processes N] [--device-memory 80GB]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}")
        if not argv:
            raise SystemExit(2)
        return
    options, rest = _split(argv)
    memory = parse_memory_size(options["device_memory"]) if options["device_memory"] is not None else None
    prompt_length = options["prompt_length"] or 256
    if prompt_length < 1:
        raise RecipeError(f"--prompt-length: got {prompt_length}; give the prompt tokens, at least 1.")
    plan = plan_recipe(rest, options["config"], options["num_processes"], memory, prompt_length)
    if memory is None:
        plan.device_memory, plan.device_memory_source = _default_device_memory(plan.parallelism)
    print(json.dumps(plan.as_dict(), indent=1) if options["json"] else render(plan))

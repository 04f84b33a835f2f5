"""The one list of training stages and of `rlhf` commands, read by the CLI and the pipeline.

Entries name their modules as strings and import them on use, so `rlhf --help` stays instant.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from rlhf.config import Recipe, RecipeError, read_recipe_file
from rlhf.gguf import cache_root

# What `rlhf train RECIPE --help` lists comes from these packages' config classes and from rlhf's own.
HELP_SOURCES = ("transformers", "trl", "peft", "accelerate")


@dataclass(frozen=True)
class Stage:
    """A training stage: `rlhf.stages.<name>` exposes `parse(argv, produced)` and `main(argv)`."""

    name: str
    data_format: str  # what rlhf.data.prepare_datasets turns the stage's data into
    trained_copies: int = 1  # models that train (memory: weights + gradients + optimizer state)
    frozen_copies: int = 0  # inference-only models (reference, reward, teacher)
    reference_is_policy_under_lora: bool = False  # the reference is the policy with adapters off

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"rlhf.stages.{self.name}")

    def parse(self, argv: list[str], produced: Collection[str] = ()) -> Recipe:
        """The stage's checked recipe, exactly as its main() reads it; nothing loads."""
        return self.module.parse(argv, produced)

    def recipe_help(self) -> str:
        """Every key of this stage's recipes, as `python -m rlhf.stages.<name> --help` prints them.

        Building the list imports the stage's config classes (torch, transformers and TRL: seconds), so
        `rlhf train RECIPE --help` keeps it in the cache ($RLHF_CACHE, else ~/.cache/rlhf), under the
        installed versions of those packages and a digest of rlhf's source.
        """
        cached = _recipe_help_file(self.name)
        if cached.is_file():
            return cached.read_text()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
            self.parse(["--help"])  # rlhf.recipe.parse_recipe prints the keys and exits before reading a recipe
        text = printed.getvalue()
        with contextlib.suppress(OSError):  # a read-only cache only costs the next --help its seconds
            cached.parent.mkdir(parents=True, exist_ok=True)
            for stale in cached.parent.glob(f"{self.name}-*.txt"):
                stale.unlink()
            scratch = cached.with_suffix(f".{os.getpid()}.tmp")
            scratch.write_text(text)
            os.replace(scratch, cached)
        return text


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("pretrain", "language_modeling"),
        Stage("sft", "sft"),
        Stage("reward", "preference"),
        Stage("dpo", "preference", frozen_copies=1, reference_is_policy_under_lora=True),
        Stage("ppo", "prompt_only", trained_copies=2, frozen_copies=2, reference_is_policy_under_lora=True),
        Stage("grpo", "prompt_only", frozen_copies=1, reference_is_policy_under_lora=True),
        Stage("rloo", "prompt_only", frozen_copies=1, reference_is_policy_under_lora=True),
        Stage("distill", "sft", frozen_copies=1),
        Stage("kto", "unpaired", frozen_copies=1, reference_is_policy_under_lora=True),
        Stage("orpo", "preference"),
        Stage("cpo", "preference"),  # SimPO: recipes/tiny/simpo.yaml, `loss_type: simpo`
        # frozen: the reference and a reward model (none when only reward functions judge)
        Stage("online_dpo", "prompt_only", frozen_copies=2, reference_is_policy_under_lora=True),
    )
}


def _recipe_help_file(stage: str) -> Path:
    digest = hashlib.sha256()
    for package in HELP_SOURCES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            digest.update(f"{package}=={metadata.version(package)};".encode())
    for source in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(source.read_bytes())
    return cache_root() / "recipe_keys" / f"{stage}-{digest.hexdigest()[:16]}.txt"


def stage_of(recipe_path: str) -> Stage:
    """The registered stage a recipe file names in its `stage:` key."""
    return stage_named(read_recipe_file(recipe_path).get("stage"), f"recipe {recipe_path}")


def stage_named(name: Any, where: str) -> Stage:
    """The registered stage called `name`; `where` says whose `stage:` key it came from."""
    if name not in STAGES:
        raise RecipeError(f"{where}: `stage:` is {name!r}; set it to one of {', '.join(STAGES)}.")
    return STAGES[name]


@dataclass(frozen=True)
class Command:
    """An `rlhf` command: `main(argv)` for the shell; `function(**kwargs)` for a pipeline stage, if it has one.

    A pipeline calls `function(<inputs>, **args, output=<stage dir>)`; `inputs` says whether the
    function takes one checkpoint, a list of them, or none as its first argument.
    """

    name: str
    module: str
    main: str
    help: str
    function: str | None = None
    inputs: str = "one"  # "one", "many" or "none"
    writes_output: bool = True
    check: str | None = None  # takes `function`'s arguments and validates them without loading anything

    def load(self, attribute: str) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.module), attribute)


COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        Command("train", "rlhf.cli", "train", "run the stage a recipe names: rlhf train RECIPE.yaml [--key value ...]"),
        Command(
            "plan",
            "rlhf.plan",
            "main",
            "per-device memory of a recipe's stage under DDP/FSDP2/ZeRO/LoRA/offload, and whether it fits",
        ),
        Command(
            "tiny-checkpoint",
            "rlhf.tiny",
            "main",
            "write the embedded tiny base checkpoint",
            "build_tiny_checkpoint",
            inputs="none",
        ),
        Command(
            "pipeline", "rlhf.pipeline", "main", "run a chain of stages from a pipeline YAML, with caching and resume"
        ),
        Command(
            "eval",
            "rlhf.evaluation.runner",
            "main",
            "score a checkpoint: metrics, reward, win-rate, KL, safety",
            "evaluate",
            inputs="many",
            check="check_evaluation",
        ),
        Command(
            "ifeval-prompts",
            "rlhf.ifeval",
            "main",
            "IFEval-style prompts built offline: train, held-out prompts, held-out constraint types",
            "write_prompts",
            inputs="none",
        ),
        Command(
            "best-of-n",
            "rlhf.best_of_n",
            "main",
            "rejection sampling: a model's samples ranked by reward functions, as demonstrations and comparisons",
            "best_of_n",
            check="check_best_of_n",
        ),
        Command("attention", "rlhf.interpret", "main", "attention heatmaps of a checkpoint on a text", "attention"),
        Command("quantize", "rlhf.compress.quantize", "main", "int8/int4 weight-only quantization", "quantize"),
        Command("prune", "rlhf.compress.prune", "main", "magnitude or structured pruning", "prune"),
        Command("merge", "rlhf.export", "merge_main", "merge LoRA/DoRA adapters into the base model", "merge"),
        Command("export", "rlhf.export", "export_main", "write a clean, self-contained checkpoint", "export"),
        Command("chat", "rlhf.export", "chat_main", "interactive chat with a checkpoint"),
        Command("generate", "rlhf.export", "generate_main", "batched generation over a jsonl file"),
        Command(
            "publish",
            "rlhf.publish",
            "main",
            "write a model card and push an output directory to the Hub",
            "publish",
            writes_output=False,
        ),
    )
}
PIPELINE_COMMANDS = [name for name, command in COMMANDS.items() if command.function]

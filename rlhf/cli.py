"""`rlhf <command> ...`: dispatch only; every command lives in its own module."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from rlhf.config import RecipeError, recipe_stage
from rlhf.distributed import shutdown_distributed

# command → (module, function, one-line help). Modules import lazily: `rlhf --help` stays instant.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("rlhf.cli", "train", "run the stage a recipe names: rlhf train RECIPE.yaml [--key value ...]"),
    "tiny-checkpoint": ("rlhf.modeling", "main", "write the embedded tiny base checkpoint"),
    "pipeline": ("rlhf.pipeline", "main", "run a chain of stages from a pipeline YAML, with caching and resume"),
    "eval": ("rlhf.evaluation", "main", "score a checkpoint: metrics, reward, win-rate, KL, safety"),
    "attention": ("rlhf.interpret", "main", "attention heatmaps of a checkpoint on a text"),
    "quantize": ("rlhf.compress.quantize", "main", "int8/int4 weight-only quantization"),
    "prune": ("rlhf.compress.prune", "main", "magnitude or structured pruning"),
    "merge": ("rlhf.export", "merge_main", "merge LoRA/DoRA adapters into the base model"),
    "export": ("rlhf.export", "export_main", "write a clean, self-contained checkpoint"),
    "chat": ("rlhf.export", "chat_main", "interactive chat with a checkpoint"),
    "generate": ("rlhf.export", "generate_main", "batched generation over a jsonl file"),
    "publish": ("rlhf.publish", "main", "write a model card and push an output directory to the Hub"),
}


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Call a command's main; a user mistake prints one clear line and exits 2 instead of a traceback."""
    try:
        main(argv)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutdown_distributed()  # under accelerate launch / torchrun; a no-op in one process


def train(argv: list[str] | None = None) -> None:
    """Run the stage named by the recipe's `stage:` key."""
    argv = list(sys.argv[2:] if argv is None else argv)
    if not argv:
        raise RecipeError("usage: rlhf train RECIPE.yaml [--key value ...]")
    stage = recipe_stage(argv[0])
    importlib.import_module(f"rlhf.stages.{stage}").main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
        print("usage: rlhf <command> [args]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            sys.exit(2)
        return
    module, function, _ = COMMANDS[argv[0]]
    run(getattr(importlib.import_module(module), function), argv[1:])


if __name__ == "__main__":
    main()

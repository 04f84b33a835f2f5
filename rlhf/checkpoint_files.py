"""What a checkpoint folder holds and what loading it may run: pickled weights, PEFT adapters, remote code.

Below `rlhf.modeling` and `rlhf.quantized`, which both check a folder before they load it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path

from rlhf.config import RecipeError

# Files that torch.load unpickles; unpickling can run arbitrary code, safetensors cannot.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Trainer and accelerate state saved beside the weights of a checkpoint; they never hold the model's
# weights, and resuming reads them with torch.load(weights_only=True).
TRAINING_STATE_FILES = (
    "training_args.bin",
    "optimizer*.pt",
    "optimizer*.bin",
    "scheduler*.pt",
    "scheduler*.bin",
    "scaler.pt",
    "sampler*.bin",
    "rng_state*.pth",
    "random_states_*.pkl",
    "custom_checkpoint_*.pkl",
)


def pickle_weight_files(names: Iterable[str]) -> list[str]:
    """The pickled weight files among a checkpoint's file names, when it has no safetensors to load instead."""
    names = list(names)
    if any(name.endswith(".safetensors") for name in names):
        return []  # loaders pass use_safetensors=True, so pickles beside safetensors are never read
    return sorted(
        name
        for name in names
        if name.endswith(PICKLE_SUFFIXES) and not any(fnmatchcase(name, state) for state in TRAINING_STATE_FILES)
    )


def refuse_pickle_weights(names: Iterable[str], where: str, field: str = "model_name_or_path") -> None:
    """RecipeError naming the file and the fix when a checkpoint's weights exist only as pickles."""
    pickles = pickle_weight_files(names)
    if pickles:
        raise RecipeError(
            f"{field}: {where}/{pickles[0]} holds pickled weights and there are no safetensors; loading a pickle "
            "can run code. Convert the checkpoint to safetensors (`save_pretrained` it where you trust it), or "
            "set `allow_pickle_weights: true` if you trust the source."
        )


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    """True when `path` holds a PEFT adapter (LoRA, DoRA, …) rather than full weights."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(adapter_dir: str | Path, base: str | None = None) -> str:
    """The base checkpoint an adapter applies to: `base` if given, else the one its adapter_config.json names."""
    if base:
        return base
    with open(Path(adapter_dir) / ADAPTER_CONFIG) as handle:
        named = json.load(handle).get("base_model_name_or_path")
    if not named:
        raise RecipeError(f"{adapter_dir}/{ADAPTER_CONFIG} names no base_model_name_or_path; pass --base BASE_DIR.")
    return named


def local_files(folder: str | Path) -> list[str]:
    return [p.name for p in Path(folder).iterdir() if p.is_file()]


def warn_remote_code(name_or_path: str | Path, trust_remote_code: bool) -> None:
    """One stderr line when a checkpoint is loaded with trust_remote_code, naming whose code runs."""
    if trust_remote_code:
        print(f"warning: trust_remote_code: runs code from {name_or_path}", file=sys.stderr)
